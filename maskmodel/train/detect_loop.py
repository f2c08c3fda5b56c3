"""The detector's part of the training engine: its network, its data step, its step and its evaluation.

:func:`detect_loop_per_worker` is :func:`maskmodel.train.engine.run` with a
:class:`DetectorTask`. A detector of :mod:`maskmodel.models.detect.trainable`
takes the images with their target boxes and returns its losses. For
CenterFace the CenterNet targets are built padded on the CPU in the data step
(:func:`collate`, in Ray Data's prefetch threads) and its loss is
computed with masks on the device, so a step (:func:`detector_step`) makes no
host sync; torchvision's zoo takes per-image boxes, read once per step. Bf16
autocast and channels_last on CUDA. Evaluation gathers every worker's boxes to
compute AP50 / COCO AP (pycocotools, :func:`maskmodel.metrics.detection.detection_metrics`)
and recall / precision at the operating threshold, through the same NMS and
limits the face stage applies when scoring
(:func:`maskmodel.models.detect.geometry.postprocess`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from maskmodel.train import engine
from maskmodel.train.engine import Worker, autocast, run_pass

EVAL_SCORE_FLOOR = 0.05  # AP ranks every detection above this (torchvision's own floor for R-CNNs)

#: Fewest images a training step takes: BatchNorm in train mode needs two values per channel, and SSDlite's
#: extra layers pool a picture down to 1x1, so a batch of one image raises there.
MIN_STEP_IMAGES = 2


def _writable(a: np.ndarray) -> np.ndarray:
    """``a`` contiguous and writable (Ray Data hands out read-only views; torch warns on those), copied only then."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def collate(images: np.ndarray, boxes: np.ndarray, n_boxes: np.ndarray, *, centernet: bool) -> dict[str, torch.Tensor]:
    """A detector batch on the CPU (the data step, :func:`ray_collate`); what :func:`detector_step` takes, on a device.

    ``images`` uint8 ``(N, 3, S, S)``, ``boxes`` float ``(N, B, 4)`` in input pixels, ``n_boxes`` int ``(N,)``
    (``-1``: an image left out). Raises nothing for empty batches.
    """
    out = {"image": torch.as_tensor(_writable(images), dtype=torch.uint8),
           "boxes": torch.as_tensor(_writable(boxes), dtype=torch.float32),
           "n_boxes": torch.as_tensor(_writable(n_boxes), dtype=torch.int64)}
    if centernet:
        from maskmodel.models.detect.centernet import STRIDE, batch_targets

        side = out["image"].shape[-1] // STRIDE
        out.update(batch_targets(out["boxes"], out["n_boxes"], (side, side)))
    return out


def _zero_step(model) -> torch.Tensor:
    """A loss of 0 touching every parameter: every worker takes the same steps (DDP) even with nothing to learn."""
    return sum(p.sum() * 0.0 for p in model.parameters())


def detector_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer, *, precision: str = "fp32",
                  channels_last: bool = False) -> torch.Tensor:
    """One detector training step on the batch's device; returns float64 ``[loss * images, images, skipped]`` there.

    ``batch``: :func:`collate`'s tensors on the model's device (with CenterNet targets for CenterFace).
    Rows with ``n_boxes == -1`` are left out of the loss (CenterFace: masked, no host sync; torchvision's
    zoo: the counts are read once, as its models take per-image boxes); a batch of fewer than
    :data:`MIN_STEP_IMAGES` rows (an epoch's last) takes a zero step. ``precision`` ``"bf16"`` autocasts
    the forward; the loss sums stay on the device: nothing here waits for the device on a CenterFace step.
    This is also what ``benchmarks/gpu_check.py`` times on a GPU.
    """
    from maskmodel.models.detect.centernet import TARGET_KEYS

    images, counts = batch["image"], batch["n_boxes"]
    valid = counts >= 0
    learnt = valid.sum().double()
    x = images.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(images.device, precision):
        if images.shape[0] < MIN_STEP_IMAGES:
            loss, learnt = _zero_step(model), learnt * 0
        elif "heatmap" in batch:
            loss = sum(model(x, {k: batch[k] for k in TARGET_KEYS}).values())
        else:
            kept = [(i, c) for i, c in enumerate(counts.tolist()) if c >= 0]
            if len(kept) < MIN_STEP_IMAGES:
                loss, learnt = _zero_step(model), learnt * 0
            else:
                index = torch.tensor([i for i, _ in kept], device=images.device)
                loss = sum(model(x.index_select(0, index), [batch["boxes"][i, :c] for i, c in kept]).values())
    optimizer.zero_grad(set_to_none=True)
    loss.float().backward()
    optimizer.step()
    return torch.stack([loss.detach().double() * learnt, learnt, (~valid).sum().double()])


def ray_collate(*, centernet: bool):
    """:func:`collate` as Ray Data's ``collate_fn``: run on the CPU in the prefetch threads of
    ``iter_torch_batches``, which then pins its tensors and copies them to the worker's device.
    (Ray is imported here, not at the top: this module, and :func:`detector_step`, need no Ray.)
    """
    from ray.data.collate_fn import NumpyBatchCollateFn

    class DetectorCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return collate(batch["image"], batch["boxes"], batch["n_boxes"], centernet=centernet)

    return DetectorCollate()


def _train_batches(shard, *, device: torch.device, batch_size: int, centernet: bool):
    return shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=ray_collate(centernet=centernet), device=device,
        pin_memory=device.type == "cuda", prefetch_batches=2, local_shuffle_buffer_size=max(64, 4 * batch_size))


def train_epoch(model, shard, *, device, batch_size, optimizer, watchdog=None, precision: str = "fp32",
                channels_last: bool = False, centernet: bool = False) -> dict[str, Any]:
    """One training pass of :func:`detector_step` over ``shard``: ``loss``, ``images``, ``skipped``, ``seconds``."""
    model.train()

    device = torch.device(device)
    totals, seconds = run_pass(
        _train_batches(shard, device=device, batch_size=batch_size, centernet=centernet),
        lambda i, batch: detector_step(model, batch, optimizer, precision=precision, channels_last=channels_last),
        size=3, device=device, watchdog=watchdog)
    return {"loss": float(totals[0]) / max(float(totals[1]), 1.0), "images": int(totals[1]),
            "skipped": int(totals[2]), "seconds": seconds}


@torch.inference_mode()
def _evaluate(model, shard, *, decode, device, batch_size, image_size, score_threshold, nms_iou,
              watchdog) -> dict[str, Any]:
    """AP50, COCO AP, recall and precision over every worker's validation rows (each counted once)."""
    from maskmodel.metrics.detection import detection_metrics
    from maskmodel.models.detect.geometry import DetectOptions, place, postprocess

    model.eval()
    size = (image_size, image_size)
    options = DetectOptions(input_size=size, score_threshold=EVAL_SCORE_FLOOR, nms_iou=nms_iou, max_faces=100,
                            min_face=0.0, margin=0.0)
    truth, predicted, scores, skipped = [], [], [], 0
    for batch in shard.iter_torch_batches(
            batch_size=batch_size, dtypes={"image": torch.uint8, "boxes": torch.float32, "n_boxes": torch.int64},
            device=device):
        watchdog.beat()
        ok = batch["n_boxes"] >= 0
        skipped += int((~ok).sum())
        images, boxes, counts = batch["image"][ok], batch["boxes"][ok].cpu(), batch["n_boxes"][ok].cpu()
        if not len(images):
            continue
        b, s, idx = decode(model(images.float()), input_size=size, threshold=EVAL_SCORE_FLOOR, top_k=1000)
        # The letterboxed input is the picture here: placements are the identity.
        faces = postprocess(b, s, idx, [place(image_size, image_size, size)] * len(images), options)
        for f, bx, n in zip(faces, boxes, counts):
            truth.append(bx[:int(n)].numpy())
            predicted.append(f.boxes)
            scores.append(f.scores)
    mine = (truth, predicted, scores, skipped)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    truth = [t for g in gathered for t in g[0]]
    predicted = [p for g in gathered for p in g[1]]
    scores = [s for g in gathered for s in g[2]]
    m = detection_metrics(truth, predicted, scores, sizes=[size] * len(truth), threshold=score_threshold)
    return {**m, "skipped": sum(g[3] for g in gathered)}


class DetectorTask:
    """The detector for :func:`maskmodel.train.engine.run`: AdamW or SGD, CenterNet's or torchvision's losses."""

    train_extras: tuple[str, ...] = ()
    #: Epoch 0: the pretrained (initial) weights' validation figures, so the curves say what fine-tuning added.
    evaluate_before_training = True

    def __init__(self, cfg: dict[str, Any]) -> None:
        from maskmodel.models.detect.centerface import ARCHITECTURE

        self.cfg = cfg
        self.centernet = cfg["arch"] == ARCHITECTURE
        self.columns = {"columns": cfg["columns"], "panels": [tuple(p) for p in cfg["panels"]]}

    def build(self, w: Worker) -> torch.nn.Module:
        import ray

        from maskmodel.models.detect.trainable import build

        net = build(self.cfg["arch"])
        net.load_state_dict(ray.get(self.cfg["initial_state_ref"]))
        return net

    def optimizer(self, w: Worker, params):
        cfg = self.cfg
        if cfg["optimizer"] == "adamw":
            return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])

    def train_batches(self, w: Worker, shard, epoch: int):
        return _train_batches(shard, device=w.device, batch_size=w.batch_size, centernet=self.centernet)

    def train_step(self, w: Worker, model, batch, optimizer, *, grab: bool) -> torch.Tensor:
        if grab:  # exactly what the model is about to see
            from maskmodel.train.outputs import write_boxes_grid

            ok = batch["n_boxes"] >= 0
            write_boxes_grid(self.cfg["output"], batch["image"][ok], batch["boxes"][ok], batch["n_boxes"][ok])
        return detector_step(model, batch, optimizer, precision=w.precision, channels_last=w.channels_last)

    def evaluate(self, w: Worker, net, shard, watchdog) -> dict[str, Any]:
        from maskmodel.models.detect.trainable import decode

        cfg = self.cfg
        return _evaluate(net, shard, decode=decode(cfg["arch"]), device=w.device, batch_size=w.batch_size,
                         image_size=cfg["image_size"], score_threshold=cfg["score_threshold"], nms_iou=cfg["nms_iou"],
                         watchdog=watchdog)

    def row(self, train: dict[str, Any], val: dict[str, Any]) -> dict[str, Any]:
        return {"val_ap50": max(val["ap50"], 0.0), "val_ap": max(val["ap"], 0.0), "val_recall": val["recall"],
                "val_precision": val["precision"], "val_faces": val["faces"]}

    def describe(self, row: dict[str, Any]) -> str:
        loss = "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}"  # epoch 0: no training yet
        return (f"train loss {loss} | val AP50 {row['val_ap50']:.3f} AP {row['val_ap']:.3f} "
                f"recall {row['val_recall']:.3f} precision {row['val_precision']:.3f} at "
                f"{self.cfg['score_threshold']:.2f}")


def detect_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry: the detector on the one engine (see :func:`maskmodel.train.engine.run`)."""
    engine.run(DetectorTask(cfg), cfg)
