"""The classifier and its model directory.

A model directory (local or object storage) holds ``model.pt`` (a plain state
dict, loaded with ``torch.load(..., weights_only=True)``) and ``model.json``
(the :class:`ModelCard`): everything the scoring job needs, with no other
input. ``model_id`` is a hash of the weights' bytes and identifies the model
in every result row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision

from maskmodel.alert import alert_classes, card_alert_classes
from maskmodel.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_for
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.models.spec import CLASSIFIER_ARCHITECTURES, CLASSIFIER_WEIGHT_KEYWORDS

log = logging.getLogger(__name__)

ARCHITECTURES = CLASSIFIER_ARCHITECTURES
WEIGHTS_FILE = "model.pt"
WEIGHT_KEYWORDS = CLASSIFIER_WEIGHT_KEYWORDS
CARD_FILE = "model.json"
CARD_VERSION = 1

_IMAGENET_WEIGHTS = {
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
}


@dataclass(frozen=True)
class ModelCard:
    """The contents of ``model.json``."""

    arch: str
    classes: tuple[str, ...]
    input_size: int
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    model_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = CARD_VERSION
    # The label files it learnt from: [{"uri", "sha256"}] (maskmodel.data.lineage); empty for an ImageFolder tree.
    annotation_sets: tuple[dict[str, str], ...] = ()
    # Classes that raise an alert (every class but the compliant one); a card without them (written before
    # the field existed) gets them by maskmodel.alert's rule when read.
    alert_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.alert_classes and len(self.classes) >= 2:
            object.__setattr__(self, "alert_classes", alert_classes(self.classes))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        d["alert_classes"] = list(self.alert_classes)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["annotation_sets"] = [dict(a) for a in self.annotation_sets]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], *, source: str = "model.json") -> "ModelCard":
        try:
            card = cls(
                arch=str(d["arch"]), classes=tuple(str(c) for c in d["classes"]),
                input_size=int(d["input_size"]), resize_size=int(d.get("resize_size") or resize_for(int(d["input_size"]))),
                mean=tuple(float(x) for x in d.get("mean", IMAGENET_MEAN)),
                std=tuple(float(x) for x in d.get("std", IMAGENET_STD)),
                model_id=str(d.get("model_id", "")), config=dict(d.get("config") or {}),
                metrics=dict(d.get("metrics") or {}), created_at=str(d.get("created_at", "")),
                format_version=int(d.get("format_version", CARD_VERSION)),
                annotation_sets=tuple({"uri": str(a["uri"]), "sha256": str(a["sha256"])}
                                      for a in d.get("annotation_sets") or ()),
            )
            if len(card.classes) >= 2:
                card = dataclasses.replace(card, alert_classes=card_alert_classes(
                    card.classes, [str(c) for c in d.get("alert_classes") or ()]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source} is not a valid model card ({type(e).__name__}: {e}); "
                            f"point --model at a directory written by jobs.train.") from e
        if card.arch not in ARCHITECTURES:
            raise UserError(f"{source} names architecture {card.arch!r}; supported: {', '.join(ARCHITECTURES)}.")
        if len(card.classes) < 2:
            raise UserError(f"{source} lists {len(card.classes)} class(es); a classifier needs at least two.")
        return card


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """A torchvision ``arch`` with random weights and a fresh ``num_classes``-way head."""
    if arch not in ARCHITECTURES:
        raise UserError(f"Unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}.")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


def _load_backbone_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    # The head is task-specific: keep ours unless the shapes already match.
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not (k.startswith("fc.") and v.shape != own.get(k, v).shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"The weights in {source} do not fit this architecture "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                        f"{(missing + unexpected)[:3]}); pass weights saved from the same --arch.")


def load_state_dict_uri(uri: str) -> dict[str, torch.Tensor]:
    """Load a state dict (or a checkpoint dict holding ``model``/``state_dict``) from any storage."""
    data = storage.read_bytes(uri)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a state dict"
        raise UserError(f"{uri!r} is not a readable PyTorch state dict ({type(e).__name__}); "
                        f"save one with torch.save(model.state_dict(), path).") from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{uri!r} does not hold a state dict of tensors.")
    return state


def init_weights(model: torch.nn.Module, arch: str, weights: str) -> None:
    """Load ``weights`` (``none``, ``imagenet`` or a URI of a state dict) into ``model``'s backbone."""
    if weights == "none":
        return
    if weights == "imagenet":
        enum_name, member = _IMAGENET_WEIGHTS[arch].split(".")
        spec = getattr(getattr(torchvision.models, enum_name), member)
        try:
            state = spec.get_state_dict(progress=False)
        except Exception as e:  # noqa: BLE001 - URLError, socket errors, hash mismatch...
            raise UserError(
                f"Could not download torchvision's ImageNet weights for {arch} ({type(e).__name__}); "
                f"train from scratch with --weights none, or pass --weights URI of a saved state dict."
            ) from e
        _load_backbone_state(model, state, "torchvision's ImageNet weights")
        return
    _load_backbone_state(model, load_state_dict_uri(weights), weights)


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    torch.save(state, buf)
    return buf.getvalue()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / ``torch.compile`` wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_model_dir(uri: str, weights: bytes, card: ModelCard) -> ModelCard:
    """Write ``model.pt`` then ``model.json`` under ``uri``; returns the card with its ``model_id``.

    The card is written last, so a directory with a ``model.json`` always has
    its weights.
    """
    model_id = hashlib.sha256(weights).hexdigest()[:16]
    card = dataclasses.replace(card, model_id=model_id,
                               created_at=card.created_at or dt.datetime.now(dt.timezone.utc).isoformat())
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_json(storage.join(uri, CARD_FILE), card.to_json())
    return card


def load_card(uri: str) -> ModelCard:
    """Read and validate ``model.json``; :class:`UserError` when missing or invalid."""
    card_uri = storage.join(uri, CARD_FILE)
    raw = storage.read_json_object(
        card_uri, missing=f"{uri!r} is not a model directory (no {CARD_FILE}); point --model at the model "
                          f"directory written by jobs.train.", fix="re-export the model with jobs.train.")
    return ModelCard.from_json(raw, source=card_uri)


def load_model_dir(uri: str, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Load a model directory: the model in eval mode on ``device`` and its card."""
    card = load_card(uri)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    if not storage.exists(weights_uri):
        raise UserError(f"{uri!r} has a {CARD_FILE} but no {WEIGHTS_FILE}; copy the whole model directory.")
    model = build_model(card.arch, len(card.classes))
    state = load_state_dict_uri(weights_uri)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights_uri!r} does not match {card.arch} with {len(card.classes)} classes; "
                        f"the model directory is inconsistent, re-export it with jobs.train.") from e
    return model.to(device).eval(), card
