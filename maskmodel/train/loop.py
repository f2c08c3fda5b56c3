"""The classifier's part of the training engine: its network, its step and its evaluation.

:func:`train_loop_per_worker` is what Ray Train runs on every worker:
:func:`maskmodel.train.engine.run` with a :class:`ClassifierTask`. Everything
it needs comes in ``loop_config`` from :mod:`maskmodel.train.training` (which
this module never imports). Images arrive as uint8 crops and are augmented and
normalised here, on the worker's device; sums stay on the device and are
synchronised with the other workers once per pass, so every number counts each
image exactly once.
"""

from __future__ import annotations

from typing import Any

import torch

from maskmodel.data.discovery import SKIPPED_LABEL
from maskmodel.train import engine
from maskmodel.train.engine import Worker, autocast, run_pass
from maskmodel.train.outputs import write_samples_grid


def _batches(shard, *, device, batch_size: int, training: bool):
    return shard.iter_torch_batches(
        batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.int64}, device=device,
        pin_memory=device.type == "cuda", prefetch_batches=2,
        local_shuffle_buffer_size=(max(256, 8 * batch_size) if training else None),
    )


def classifier_step(model, batch, *, prepare, optimizer=None, precision="fp32", num_classes=2, channels_last=False,
                    on_first_batch=None) -> torch.Tensor:
    """One batch through ``model``: a training step when ``optimizer`` is given, else an evaluation.

    ``batch``: ``image`` uint8 ``(N, 3, S, S)`` and ``label`` int64 ``(N,)`` on the model's device;
    ``prepare`` turns the images into the model's input there (augmentation, normalisation). Rows
    labelled ``SKIPPED_LABEL`` (the epoch could not read or decode them) stay in the batch, masked:
    they count in no loss, accuracy or image count, only in ``skipped``, and no host sync is needed.
    Returns float64 sums on the device: ``[loss, images, skipped, correct]``, followed in evaluation
    by the flattened ``(num_classes, num_classes)`` confusion matrix (rows: truth). A training batch of one
    image (an epoch's last, when the images per worker leave a remainder of one) is left out of the epoch,
    as ``drop_last`` would, and counts in nothing: batch norm has no statistics of one image (torch raises
    "Expected more than 1 value per channel" where a feature map is 1x1, ResNets under 64 px), and a step
    normalised by the running statistics instead threw a from-scratch run off course (the demo's val accuracy
    fell from 0.79 to 0.28). Train splits are equal across workers, so every worker leaves it out alike. The
    shuffle puts another image last the next epoch.
    """
    training = optimizer is not None
    if training and batch["label"].shape[0] == 1:  # an unreadable one still counts as skipped
        skipped = (batch["label"] == SKIPPED_LABEL).double()
        return torch.cat([skipped.new_zeros(2), skipped, skipped.new_zeros(1)])
    images, labels = prepare(batch["image"]), batch["label"]
    valid = labels != SKIPPED_LABEL
    if on_first_batch is not None:
        on_first_batch(images[valid], labels[valid])
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(training), autocast(images.device, precision):
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=SKIPPED_LABEL)
    if training:
        optimizer.zero_grad(set_to_none=True)
        (loss / valid.sum().clamp(min=1)).backward()
        optimizer.step()
    preds = logits.detach().argmax(dim=1)
    sums = torch.stack([loss.detach().double(), valid.sum().double(), (~valid).sum().double(),
                        ((preds == labels) & valid).sum().double()])
    if training:
        return sums
    cm = torch.bincount(labels.clamp(min=0) * num_classes + preds, weights=valid.double(),
                        minlength=num_classes * num_classes)
    return torch.cat([sums, cm])


def _run_epoch(model, shard, *, device, batch_size, prepare, optimizer=None, precision="fp32", num_classes=2,
               channels_last=False, on_first_batch=None, watchdog=None) -> dict[str, Any]:
    """One pass over ``shard`` (trains when ``optimizer`` is given) with :func:`classifier_step`.

    Returns the globally summed ``loss`` (mean), ``acc``, ``images``, ``skipped``, ``seconds`` and the
    validation confusion matrix ``cm`` (list of lists; zeros when training).
    """
    training = optimizer is not None
    model.train(training)
    size = 4 + (0 if training else num_classes * num_classes)

    def step(i: int, batch) -> torch.Tensor:
        return classifier_step(model, batch, prepare=prepare, optimizer=optimizer, precision=precision,
                               num_classes=num_classes, channels_last=channels_last,
                               on_first_batch=on_first_batch if i == 0 else None)

    totals, seconds = run_pass(_batches(shard, device=device, batch_size=batch_size, training=training), step,
                               size=size, device=device, watchdog=watchdog)
    n = max(float(totals[1]), 1.0)
    cm = totals[4:] if not training else torch.zeros(num_classes * num_classes, dtype=torch.float64)
    return {"loss": float(totals[0]) / n, "acc": float(totals[3]) / n, "images": int(totals[1]),
            "skipped": int(totals[2]), "seconds": seconds, "cm": cm.view(num_classes, num_classes).long().tolist()}


class ClassifierTask:
    """The classifier for :func:`maskmodel.train.engine.run`: a torchvision ResNet, SGD, device augmentation."""

    train_extras = ("acc",)
    columns: dict[str, Any] = {}  # metrics.csv and curves: the classifier's defaults

    def __init__(self, cfg: dict[str, Any]) -> None:
        from maskmodel.data.augment import DeviceAugment

        self.cfg = cfg
        self.classes = list(cfg["classes"])
        self.mean, self.std = cfg["mean"], cfg["std"]
        self.augment = DeviceAugment(rotation_degrees=cfg["rotation_degrees"], jitter=cfg["jitter"],
                                     occlusion=cfg.get("occlusion", 0.0), mean=self.mean,
                                     std=self.std) if cfg["augment"] else None
        self.gen: torch.Generator | None = None

    def build(self, w: Worker) -> torch.nn.Module:
        import ray

        from maskmodel.models.classifier import build_model

        model = build_model(self.cfg["arch"], len(self.classes))
        model.load_state_dict(ray.get(self.cfg["initial_state_ref"]))
        return model

    def optimizer(self, w: Worker, params):
        return torch.optim.SGD(params, lr=self.cfg["lr"], momentum=self.cfg["momentum"],
                               weight_decay=self.cfg["weight_decay"])

    def train_batches(self, w: Worker, shard, epoch: int):
        # Each worker and epoch draws its own augmentation, reproducibly from the seed.
        self.gen = torch.Generator(device=w.device).manual_seed(self.cfg["seed"] * 100_003 + epoch * 1_009 + w.rank)
        return _batches(shard, device=w.device, batch_size=w.batch_size, training=True)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        from maskmodel.data.transforms import normalize

        return normalize(x, mean=self.mean, std=self.std)

    def train_step(self, w: Worker, model, batch, optimizer, *, grab: bool) -> torch.Tensor:
        def sample_grid(imgs, labels):  # exactly what the model is about to see
            write_samples_grid(self.cfg["output"], imgs, labels, self.classes, mean=self.mean, std=self.std)

        prepare = (lambda x: self.augment(x, self.gen)) if self.augment is not None else self._normalize
        return classifier_step(model, batch, prepare=prepare, optimizer=optimizer, precision=w.precision,
                               num_classes=len(self.classes), channels_last=w.channels_last,
                               on_first_batch=sample_grid if grab else None)

    def evaluate(self, w: Worker, net, shard, watchdog) -> dict[str, Any]:
        return _run_epoch(net, shard, device=w.device, batch_size=w.batch_size, prepare=self._normalize,
                          precision=w.precision, num_classes=len(self.classes), channels_last=w.channels_last,
                          watchdog=watchdog)

    def row(self, train: dict[str, Any], val: dict[str, Any]) -> dict[str, Any]:
        return {"train_acc": train["acc"], "val_loss": val["loss"], "val_acc": val["acc"], "val_confusion": val["cm"]}

    def describe(self, row: dict[str, Any]) -> str:
        return (f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}")


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry: the classifier on the one engine (see :func:`maskmodel.train.engine.run`)."""
    engine.run(ClassifierTask(cfg), cfg)

