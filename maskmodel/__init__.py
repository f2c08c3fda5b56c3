"""maskmodel: distributed training and batch scoring of a face-mask classifier on Ray."""

__version__ = "0.1.0"
