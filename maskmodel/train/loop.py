"""The per-worker training loop that Ray Train runs on every worker.

Kept short on purpose: restore → for each epoch (train, evaluate, report with
a checkpoint). Everything it needs comes in ``loop_config`` from
:mod:`maskmodel.train.training` (which this module never imports); metrics are
summed on the device and across workers with ``torch.distributed``, once per
epoch, so every number counts each image exactly once. Images arrive as uint8
crops and are augmented and normalised here, on the worker's device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from maskmodel import testhooks
from maskmodel.console import fmt_seconds
from maskmodel.data.discovery import SKIPPED_LABEL
from maskmodel.telemetry import TrainingMetrics
from maskmodel.train.outputs import META_FILE, STATE_FILE, write_epoch_outputs, write_samples_grid

log = logging.getLogger(__name__)

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
    from maskmodel.io import storage

    if storage.exists(marker):
        return
    storage.write_text(marker, f"failed once at epoch {epoch}\n")
    raise RuntimeError(f"injected test failure at epoch {epoch}")


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


class Watchdog:
    """Says plainly, in the worker's log, when no batch has arrived for ``stall_s`` seconds.

    A data pipeline with no CPU to run on waits forever without a word; this
    names the likely cause. :meth:`beat` on every batch; checks run on a daemon thread.
    """

    def __init__(self, stall_s: float, *, rank: int, clock=time.monotonic) -> None:
        self.stall_s, self.rank, self.clock = stall_s, rank, clock
        self.last = clock()
        self.warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.last = self.clock()
        self.warned = False

    def check(self) -> bool:
        """Log once per stall; true when it did."""
        idle = self.clock() - self.last
        if idle < self.stall_s or self.warned:
            return False
        self.warned = True
        log.warning("worker rank %d has had no batch for %s: the data pipeline may have no CPU left to read and "
                    "decode images (see `ray status`); lower --cpus-per-worker or --num-workers, or add CPUs",
                    self.rank, fmt_seconds(idle))
        return True

    def __enter__(self) -> "Watchdog":
        self.beat()
        if self.stall_s > 0:
            self._thread = threading.Thread(target=self._run, name="maskmodel-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(10.0, self.stall_s / 4)):
            self.check()


def _run_epoch(model, shard, *, device, batch_size, prepare, optimizer=None, precision="fp32", num_classes=2,
               channels_last=False, on_first_batch=None, watchdog: Watchdog | None = None) -> dict[str, Any]:
    """One pass over ``shard``; trains when ``optimizer`` is given. Returns globally summed counts.

    Batches arrive as uint8 crops (pinned, copied asynchronously to a GPU);
    ``prepare`` turns them into the model's input on the device (augmentation
    and normalisation). Rows labelled ``SKIPPED_LABEL`` (the epoch could not
    read or decode them) count in no loss, accuracy or image count, only in
    ``skipped``; they stay in the batch, masked on the device, so that no
    per-batch host sync is needed and every worker takes the same steps.
    Sums stay on the device and are synchronised once, at the end, with the
    other workers'.
    """
    training = optimizer is not None
    model.train(training)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=SKIPPED_LABEL)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, images: summed on the device
    seen = 0  # rows, skipped ones included: a host count, no host-to-device copy per batch
    cm = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    batches = shard.iter_torch_batches(
        batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.int64}, device=device,
        pin_memory=device.type == "cuda", prefetch_batches=2,
        local_shuffle_buffer_size=(max(256, 8 * batch_size) if training else None),
    )
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        if watchdog is not None:
            watchdog.beat()
        images, labels = prepare(batch["image"]), batch["label"]
        valid = labels != SKIPPED_LABEL
        if on_first_batch is not None and i == 0:
            on_first_batch(images[valid], labels[valid])
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(training), _autocast(device, precision):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        if training:
            optimizer.zero_grad(set_to_none=True)
            (loss / valid.sum().clamp(min=1)).backward()
            optimizer.step()
        preds = logits.detach().argmax(dim=1)
        sums += torch.stack([loss.detach().double(), ((preds == labels) & valid).sum().double(),
                             valid.sum().double()])
        seen += labels.shape[0]
        if not training:
            cm += torch.bincount(labels.clamp(min=0) * num_classes + preds, weights=valid.double(),
                                 minlength=num_classes * num_classes)
    elapsed = time.perf_counter() - start
    totals = _all_reduce(torch.cat([sums, sums.new_tensor([seen]), cm]))
    n = max(float(totals[2]), 1.0)
    return {"loss": float(totals[0]) / n, "acc": float(totals[1]) / n, "images": int(totals[2]),
            "skipped": int(totals[3]) - int(totals[2]), "seconds": elapsed,
            "cm": totals[4:].view(num_classes, num_classes).long().tolist()}


def _schedule(optimizer, cfg: dict[str, Any]):
    """Per-epoch learning rate: optional linear warm-up (for large global batches), then constant or cosine."""
    warmup, epochs = int(cfg.get("warmup_epochs") or 0), cfg["epochs"]

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if cfg["lr_schedule"] == "cosine":
            span = max(1, epochs - warmup)
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / span))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup_worker(cfg: dict[str, Any]) -> tuple[int, int, torch.device]:
    """Logging, intra-op threads and the seed of this Ray Train worker; returns (rank, world size, device)."""
    import ray.train
    import ray.train.torch

    _worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"] + rank)
    return rank, world, ray.train.torch.get_device()


def restore(model: torch.nn.Module, optimizer, scheduler, *, rank: int) -> tuple[int, list[dict], int]:
    """Load Ray Train's latest checkpoint, if any, into the (unwrapped) ``model``, optimizer and scheduler.

    Returns ``(first epoch to run, history so far, attempt)``: ``(0, [], 0)`` on a fresh start.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, [], 0
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The saved lr is the one the old run's schedule set for this epoch; a resubmission with more --epochs has
    # another schedule (a cosine that ended at 0 would train the added epochs at lr 0): set it from this one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns; here it is the point
        for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr
    start, attempt = int(state["epoch"]) + 1, int(state["attempt"]) + 1
    if rank == 0:
        log.info("resumed from the checkpoint of epoch %d (attempt %d)", start, attempt)
    return start, list(state["history"]), attempt


def report_epoch(cfg: dict[str, Any], *, rank: int, model: torch.nn.Module, optimizer, scheduler, epoch: int,
                 history: list[dict], attempt: int, metrics: dict[str, Any], **outputs: Any) -> None:
    """Every worker: report ``metrics``; rank 0 also refreshes metrics.csv and the curves and checkpoints.

    ``outputs`` go to :func:`write_epoch_outputs` (``columns``, ``panels``). Ray Train uploads the
    checkpoint in the background (and then deletes its folder): the next epoch starts without waiting
    for object storage.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    write_epoch_outputs(cfg["output"], history, **outputs)
    d = tempfile.mkdtemp(prefix="maskmodel-ckpt-")
    torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "history": history, "attempt": attempt}, os.path.join(d, STATE_FILE))
    with open(os.path.join(d, META_FILE), "w") as f:
        json.dump(cfg["meta"], f)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                     checkpoint_dir_name=f"epoch_{epoch:04d}", checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    testhooks.pause(f"train-epoch-{epoch}")  # test-only: stop/kill here, not at a random time


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry: train, evaluate on every worker's val shard, report + checkpoint each epoch."""
    import ray
    import ray.train
    import ray.train.torch

    from maskmodel.data.augment import DeviceAugment
    from maskmodel.data.transforms import normalize
    from maskmodel.models.classifier import build_model, unwrap

    rank, world, device = setup_worker(cfg)
    use_gpu = device.type == "cuda"
    if use_gpu:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    precision = cfg["precision"]
    if precision == "auto":
        precision = "bf16" if use_gpu else "fp32"
    mean, std = cfg["mean"], cfg["std"]
    augment = DeviceAugment(rotation_degrees=cfg["rotation_degrees"], jitter=cfg["jitter"], mean=mean, std=std) \
        if cfg["augment"] else None

    model = build_model(cfg["arch"], len(cfg["classes"]))
    model.load_state_dict(ray.get(cfg["initial_state_ref"]))
    if use_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    if cfg.get("compile"):
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    scheduler = _schedule(optimizer, cfg)

    start_epoch, history, attempt = restore(unwrap(model), optimizer, scheduler, rank=rank)

    per_worker_batch = max(1, cfg["batch_size"] // world)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    metrics_out = TrainingMetrics(cfg["output"]) if rank == 0 else None
    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg["epochs"]):
        _maybe_inject_failure(epoch)
        epoch_start = time.perf_counter()
        grab = None
        if rank == 0 and epoch == 0 and not history:
            def grab(imgs, labels):  # noqa: E306 - exactly what the model is about to see
                write_samples_grid(cfg["output"], imgs, labels, cfg["classes"], mean=mean, std=std)
        # Each worker and epoch draws its own augmentation, reproducibly from the seed.
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] * 100_003 + epoch * 1_009 + rank)
        train_prep = ((lambda x: augment(x, gen)) if augment is not None else
                      (lambda x: normalize(x, mean=mean, std=std)))
        with Watchdog(cfg["stall_s"], rank=rank) as watchdog:
            tr = _run_epoch(model, train_shard, device=device, batch_size=per_worker_batch, optimizer=optimizer,
                            prepare=train_prep, precision=precision, num_classes=len(cfg["classes"]),
                            channels_last=use_gpu, on_first_batch=grab, watchdog=watchdog)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            # Evaluate the plain module: DDP's forward syncs buffers collectively, which would
            # deadlock when workers hold different numbers of val batches (exact, unequal shards).
            va = _run_epoch(unwrap(model), val_shard, device=device, batch_size=per_worker_batch,
                            prepare=lambda x: normalize(x, mean=mean, std=std), precision=precision,
                            num_classes=len(cfg["classes"]), channels_last=use_gpu, watchdog=watchdog)
        seconds = time.perf_counter() - epoch_start
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
               "val_acc": va["acc"], "train_images": tr["images"], "val_images": va["images"],
               "images_per_s": tr["images"] / max(tr["seconds"], 1e-9), "lr": lr, "epoch_seconds": seconds,
               # Left out of this epoch: by the check pass, and by this epoch's own reads and decodes.
               "attempt": attempt, "skipped_train": cfg["skipped"].get("train", 0) + tr["skipped"],
               "skipped_val": cfg["skipped"].get("val", 0) + va["skipped"], "val_confusion": va["cm"]}
        history.append(row)
        metrics = {k: v for k, v in row.items() if k != "val_confusion"}
        if rank == 0:
            done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - run_start) / done * (cfg["epochs"] - epoch - 1)
            log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f img/s | ETA %s",
                     epoch + 1, cfg["epochs"], tr["loss"], tr["acc"], va["loss"], va["acc"],
                     row["images_per_s"], fmt_seconds(eta))
            metrics_out.record(row)
        report_epoch(cfg, rank=rank, model=unwrap(model), optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                     history=history, attempt=attempt, metrics=metrics)
