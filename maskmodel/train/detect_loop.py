"""The per-worker loop of the detector's training: restore -> for each epoch (train, evaluate, report + checkpoint).

The classifier's loop pieces are shared (:func:`~maskmodel.train.loop.setup_worker`,
:func:`~maskmodel.train.loop.restore`, :func:`~maskmodel.train.loop.report_epoch`,
the watchdog, the schedule, test fault injection); what differs is the step: a
detector of :mod:`maskmodel.models.detect.trainable` takes the images with each
one's target boxes and returns its losses, and evaluation gathers every worker's boxes to compute
AP50 / COCO AP (pycocotools, :func:`maskmodel.detection_metrics.detection_metrics`)
and recall / precision at the operating threshold, through the same NMS and
limits the face stage applies when scoring
(:func:`maskmodel.models.detect.geometry.postprocess`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from maskmodel.console import fmt_seconds
from maskmodel.train.loop import Watchdog, _all_reduce, _maybe_inject_failure, _schedule, report_epoch, restore, \
    setup_worker

log = logging.getLogger(__name__)

EVAL_SCORE_FLOOR = 0.05  # AP ranks every detection above this (torchvision's own floor for R-CNNs)


def _boxes(boxes: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    """Padded ``(N, MAX_BOXES, 4)`` boxes and their counts -> per image float ``(K_i, 4)``."""
    return [b[:int(n)].float() for b, n in zip(boxes, counts)]


#: Fewest images a training step takes: BatchNorm in train mode needs two values per channel, and SSDlite's
#: extra layers pool a picture down to 1x1, so a batch of one image raises there.
MIN_STEP_IMAGES = 2


def _train_epoch(model, shard, *, device, batch_size, optimizer, watchdog, on_first_batch=None) -> dict[str, Any]:
    """One training pass; rows an epoch could not read (``n_boxes == -1``) are left out of the step, and so is a
    batch left with a single image (:data:`MIN_STEP_IMAGES`)."""
    model.train()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * images, images, skipped
    start = time.perf_counter()
    for i, batch in enumerate(shard.iter_torch_batches(
            batch_size=batch_size, dtypes={"image": torch.uint8, "boxes": torch.float32, "n_boxes": torch.int64},
            device=device, local_shuffle_buffer_size=max(64, 4 * batch_size))):
        watchdog.beat()
        ok = batch["n_boxes"] >= 0
        images, boxes, counts = batch["image"][ok], batch["boxes"][ok], batch["n_boxes"][ok]
        if on_first_batch is not None and i == 0:
            on_first_batch(images, boxes, counts)
        if len(images) < MIN_STEP_IMAGES:  # a lone image (an epoch's last batch) sits this step out with the rest
            images, boxes, counts = images[:0], boxes[:0], counts[:0]
        if len(images):
            losses = model(images.float(), _boxes(boxes, counts))
            loss = sum(losses.values())
        else:  # every worker takes the same steps (DDP): a zero step touching every parameter
            loss = sum(p.sum() * 0.0 for p in model.parameters())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.tensor([float(loss.detach()) * len(images), len(images), int((~ok).sum())],
                             dtype=torch.float64)
    elapsed = time.perf_counter() - start
    totals = _all_reduce(sums)
    return {"loss": float(totals[0]) / max(float(totals[1]), 1.0), "images": int(totals[1]),
            "skipped": int(totals[2]), "seconds": elapsed}


@torch.inference_mode()
def _evaluate(model, shard, *, decode, device, batch_size, image_size, score_threshold, nms_iou,
              watchdog) -> dict[str, Any]:
    """AP50, COCO AP, recall and precision over every worker's validation rows (each counted once)."""
    from maskmodel.detection_metrics import detection_metrics
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


def detect_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry: train the detector, evaluate on every worker's val shard, report + checkpoint each epoch."""
    import ray
    import ray.train
    import ray.train.torch

    from maskmodel.models.detect.trainable import build, decode
    from maskmodel.train.outputs import write_boxes_grid

    rank, world, device = setup_worker(cfg)
    net = build(cfg["arch"])
    net.load_state_dict(ray.get(cfg["initial_state_ref"]))
    model = ray.train.torch.prepare_model(net)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
                 if cfg["optimizer"] == "adamw" else
                 torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]))
    scheduler = _schedule(optimizer, cfg)
    start_epoch, history, attempt = restore(net, optimizer, scheduler, rank=rank)

    per_worker_batch = max(1, cfg["batch_size"] // world)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg["epochs"]):
        _maybe_inject_failure(epoch)
        epoch_start = time.perf_counter()
        grab = None
        if rank == 0 and epoch == 0 and not history:
            def grab(images, boxes, counts):  # noqa: E306 - exactly what the model is about to see
                write_boxes_grid(cfg["output"], images, boxes, counts)
        with Watchdog(cfg["stall_s"], rank=rank) as watchdog:
            tr = _train_epoch(model, train_shard, device=device, batch_size=per_worker_batch, optimizer=optimizer,
                              watchdog=watchdog, on_first_batch=grab)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            # The plain module, as the classifier: DDP's forward would sync with workers holding fewer val rows.
            va = _evaluate(net, val_shard, decode=decode(cfg["arch"]), device=device, batch_size=per_worker_batch, image_size=cfg["image_size"],
                           score_threshold=cfg["score_threshold"], nms_iou=cfg["nms_iou"], watchdog=watchdog)
        row = {"epoch": epoch, "train_loss": tr["loss"], "val_ap50": max(va["ap50"], 0.0), "val_ap": max(va["ap"], 0.0),
               "val_recall": va["recall"], "val_precision": va["precision"], "lr": lr,
               "images_per_s": tr["images"] / max(tr["seconds"], 1e-9),
               "epoch_seconds": time.perf_counter() - epoch_start, "train_images": tr["images"],
               "val_images": va["images"], "val_faces": va["faces"], "attempt": attempt,
               "skipped_train": cfg["skipped"].get("train", 0) + tr["skipped"],
               "skipped_val": cfg["skipped"].get("val", 0) + va["skipped"]}
        history.append(row)
        if rank == 0:
            eta = (time.perf_counter() - run_start) / (epoch + 1 - start_epoch) * (cfg["epochs"] - epoch - 1)
            log.info("epoch %d/%d  train loss %.4f | val AP50 %.3f AP %.3f recall %.3f precision %.3f at %.2f | "
                     "%.2f img/s | ETA %s", epoch + 1, cfg["epochs"], tr["loss"], row["val_ap50"], row["val_ap"],
                     va["recall"], va["precision"], cfg["score_threshold"], row["images_per_s"], fmt_seconds(eta))
        report_epoch(cfg, rank=rank, model=net, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                     history=history, attempt=attempt, metrics=dict(row), columns=cfg["columns"],
                     panels=[tuple(p) for p in cfg["panels"]])
