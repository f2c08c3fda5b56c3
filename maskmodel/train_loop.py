"""The per-worker training loop that Ray Train runs on every worker.

Kept short on purpose: restore → for each epoch (train, evaluate, report with
a checkpoint). Everything it needs comes in ``loop_config`` from
:mod:`maskmodel.training`; metrics are summed across workers with
``torch.distributed`` so every number counts each image exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from maskmodel import testhooks

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# Test-only fault injection: the driver forwards these (and testhooks' pause variables) to the workers.
FAIL_AT_EPOCH_ENV = "MASKMODEL_TEST_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "MASKMODEL_TEST_FAIL_MARKER"
TEST_ENV = (FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV, testhooks.PAUSE_ENV, testhooks.PAUSE_DIR_ENV)


def _worker_logging() -> None:
    lg = logging.getLogger("maskmodel")
    lg.setLevel(logging.INFO)
    # Ray may already route the root logger to the driver; add a handler only if nothing will print.
    if not lg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        lg.addHandler(h)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        # gloo cannot reduce on CUDA for every op; sums are tiny, do them on CPU unless NCCL.
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def _maybe_inject_failure(epoch: int) -> None:
    at = os.environ.get(FAIL_AT_EPOCH_ENV)
    marker = os.environ.get(FAIL_MARKER_ENV)
    if at is None or int(at) != epoch or not marker:
        return
    from maskmodel import storage

    if storage.exists(marker):
        return
    storage.write_text(marker, f"failed once at epoch {epoch}\n")
    raise RuntimeError(f"injected test failure at epoch {epoch}")


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _run_epoch(model, shard, *, device, batch_size, optimizer=None, precision="fp32",
               num_classes=2, channels_last=False, on_first_batch=None) -> dict[str, Any]:
    """One pass over ``shard``; trains when ``optimizer`` is given. Returns globally summed counts."""
    training = optimizer is not None
    model.train(training)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    seen = torch.zeros((), dtype=torch.float64)
    cm = torch.zeros((num_classes, num_classes), dtype=torch.float64)
    batches = shard.iter_torch_batches(
        batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64}, device=device,
        local_shuffle_buffer_size=(max(256, 8 * batch_size) if training else None), prefetch_batches=2,
    )
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        images, labels = batch["image"], batch["label"]
        if on_first_batch is not None and i == 0:
            on_first_batch(images, labels)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(training), _autocast(device, precision):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        if training:
            optimizer.zero_grad(set_to_none=True)
            (loss / labels.shape[0]).backward()
            optimizer.step()
        preds = logits.argmax(dim=1)
        loss_sum += loss.detach().double().cpu()
        correct += (preds == labels).sum().double().cpu()
        seen += labels.shape[0]
        if not training:
            idx = (labels * num_classes + preds).cpu()
            cm += torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes).double()
    elapsed = time.perf_counter() - start
    totals = _all_reduce(torch.cat([torch.stack([loss_sum, correct, seen]), cm.flatten()]))
    n = max(float(totals[2]), 1.0)
    return {"loss": float(totals[0]) / n, "acc": float(totals[1]) / n, "images": int(totals[2]),
            "seconds": elapsed, "cm": totals[3:].view(num_classes, num_classes).long().tolist()}


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry: train, evaluate on every worker's val shard, report + checkpoint each epoch."""
    import ray
    import ray.train
    import ray.train.torch

    from maskmodel.model import build_model, unwrap
    from maskmodel.training import write_epoch_outputs, write_samples_grid

    _worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"] + rank)
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    precision = cfg["precision"]
    if precision == "auto":
        precision = "bf16" if use_gpu else "fp32"

    model = build_model(cfg["arch"], len(cfg["classes"]))
    model.load_state_dict(ray.get(cfg["initial_state_ref"]))
    if use_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    if cfg["lr_schedule"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    start_epoch, history, attempt = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, attempt = int(state["epoch"]) + 1, list(state["history"]), int(state["attempt"]) + 1
        if rank == 0:
            log.info("resumed from the checkpoint of epoch %d (attempt %d)", start_epoch, attempt)

    per_worker_batch = max(1, cfg["batch_size"] // world)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg["epochs"]):
        _maybe_inject_failure(epoch)
        epoch_start = time.perf_counter()
        grab = None
        if rank == 0 and epoch == 0 and not history:
            grab = lambda imgs, labels: write_samples_grid(cfg["output"], imgs, labels, cfg["classes"])  # noqa: E731
        tr = _run_epoch(model, train_shard, device=device, batch_size=per_worker_batch, optimizer=optimizer,
                        precision=precision, num_classes=len(cfg["classes"]), channels_last=use_gpu,
                        on_first_batch=grab)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        # Evaluate the plain module: DDP's forward syncs buffers collectively, which would
        # deadlock when workers hold different numbers of val batches (exact, unequal shards).
        va = _run_epoch(unwrap(model), val_shard, device=device, batch_size=per_worker_batch, precision=precision,
                        num_classes=len(cfg["classes"]), channels_last=use_gpu)
        seconds = time.perf_counter() - epoch_start
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
               "val_acc": va["acc"], "train_images": tr["images"], "val_images": va["images"],
               "images_per_s": tr["images"] / max(tr["seconds"], 1e-9), "lr": lr, "epoch_seconds": seconds,
               "attempt": attempt, "skipped_train": cfg["skipped"].get("train", 0),
               "skipped_val": cfg["skipped"].get("val", 0), "val_confusion": va["cm"]}
        history.append(row)
        metrics = {k: v for k, v in row.items() if k != "val_confusion"}
        if rank == 0:
            done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - run_start) / done * (cfg["epochs"] - epoch - 1)
            log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f img/s | ETA %s",
                     epoch + 1, cfg["epochs"], tr["loss"], tr["acc"], va["loss"], va["acc"],
                     row["images_per_s"], _fmt_seconds(eta))
            write_epoch_outputs(cfg["output"], history)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": {k: v.cpu() for k, v in unwrap(model).state_dict().items()},
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "epoch": epoch, "history": history, "attempt": attempt}, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
            testhooks.pause(f"train-epoch-{epoch}")  # test-only: stop/kill here, not at a random time
        else:
            ray.train.report(metrics, checkpoint=None)


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

