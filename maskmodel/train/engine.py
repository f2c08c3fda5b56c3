"""The one training engine: what every Ray Train worker runs, whatever the model.

:func:`run` owns the epoch loop (detectron2's ``TrainerBase.train``): the
worker's set-up, restoring Ray Train's latest checkpoint, test fault injection,
the watchdog, the initial weights' evaluation as epoch 0 where the task asks
for it, the training pass (sums kept on the device, reduced across workers
once per epoch; a progress line every ~30 s inside it,
:mod:`maskmodel.train.progress`), the learning-rate schedule, the metrics row,
the epoch's line with its ETA, metrics.csv and curves, the checkpoint and the
report to Ray Train. A :class:`Task` supplies only what differs between models
(detectron2's ``run_step``): building the network and its optimizer, the
batches, one training step and one evaluation. Epochs count from 1 wherever a
person reads them (log lines, metrics rows, ``best_epoch``; epoch 0 is the
initial weights, before training); the loop's own index, checkpoint names and
the test hooks count from 0.
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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist

from maskmodel.runtime import testhooks
from maskmodel.console import fmt_seconds
from maskmodel.train.outputs import META_FILE, STATE_FILE, write_epoch_outputs
from maskmodel.train.progress import StepProgress, steps_per_worker

log = logging.getLogger(__name__)

# Test-only fault injection: the driver forwards these (and testhooks' pause variables) to the workers.
FAIL_AT_EPOCH_ENV = "MASKMODEL_TEST_FAIL_AT_EPOCH"  # the loop's 0-based index of the epoch that raises once
FAIL_MARKER_ENV = "MASKMODEL_TEST_FAIL_MARKER"
TEST_ENV = (FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV, testhooks.PAUSE_ENV, testhooks.PAUSE_DIR_ENV)


@dataclass(frozen=True)
class Worker:
    """One Ray Train worker: its loop config, rank, world size, device and resolved precision."""

    cfg: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    precision: str  # "bf16" or "fp32" ("auto" resolved: bf16 on CUDA)

    @property
    def batch_size(self) -> int:
        """This worker's share of the global batch."""
        return max(1, self.cfg["batch_size"] // self.world)

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda"


class Task(Protocol):
    """What a model supplies to :func:`run`; everything else is the engine's.

    ``train_step`` returns float64 sums on the device, ``[loss * images, images, skipped, *extras * images]``
    (``extras`` named by :attr:`train_extras`, e.g. ``("acc",)``): no host sync per step. A task with a true
    ``evaluate_before_training`` attribute gets an epoch-0 row: its initial weights evaluated before epoch 1
    (``row`` then gets an empty ``train``; ``describe`` a ``train_loss`` of ``None``).
    """

    train_extras: tuple[str, ...]
    columns: dict[str, Any]  # write_epoch_outputs' ``columns`` / ``panels`` (empty: the classifier's defaults)

    def build(self, w: Worker) -> torch.nn.Module:
        """The plain network with its initial weights (on any device; the engine moves it)."""

    def optimizer(self, w: Worker, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer: ...

    def train_batches(self, w: Worker, shard: Any, epoch: int) -> Iterable[Any]: ...

    def train_step(self, w: Worker, model: torch.nn.Module, batch: Any, optimizer, *, grab: bool) -> torch.Tensor:
        """One step; ``grab``: write the first-batch sample grid (rank 0, first batch of the run)."""

    def evaluate(self, w: Worker, net: torch.nn.Module, shard: Any, watchdog: "Watchdog") -> dict[str, Any]:
        """Every worker's validation rows, each counted once; holds at least ``images`` and ``skipped``."""

    def row(self, train: dict[str, Any], val: dict[str, Any]) -> dict[str, Any]:
        """The task's own metrics columns (``train_loss``, ``lr`` and the counts are the engine's)."""

    def describe(self, row: dict[str, Any]) -> str:
        """The task's part of the epoch's log line, numbers rounded."""


def _worker_logging() -> None:
    lg = logging.getLogger("maskmodel")
    lg.setLevel(logging.INFO)
    # Ray may already route the root logger to the driver; add a handler only if nothing will print.
    if not lg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        lg.addHandler(h)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every worker (itself when not distributed), returned on the CPU."""
    if dist.is_available() and dist.is_initialized():
        # gloo cannot reduce on CUDA for every op; sums are tiny, do them on CPU unless NCCL.
        t = t.cuda() if dist.get_backend() == "nccl" else t.cpu()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def maybe_inject_failure(epoch: int) -> None:
    """Test-only: raise once at the loop's ``epoch`` (0-based) when :data:`FAIL_AT_EPOCH_ENV` asks for it."""
    at = os.environ.get(FAIL_AT_EPOCH_ENV)
    marker = os.environ.get(FAIL_MARKER_ENV)
    if at is None or int(at) != epoch or not marker:
        return
    from maskmodel.io import storage

    if storage.exists(marker):
        return
    storage.write_text(marker, f"failed once at epoch {epoch}\n")
    raise RuntimeError(f"injected test failure at epoch {epoch}")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` for ``precision == "bf16"``, else a context that changes nothing."""
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


def run_pass(batches: Iterable[Any], step: Callable[[int, Any], torch.Tensor], *, size: int, device: torch.device,
             watchdog: Watchdog | None = None, progress: StepProgress | None = None) -> tuple[torch.Tensor, float]:
    """Call ``step(i, batch)`` on every batch and sum what it returns (float64 ``(size,)`` on ``device``).

    The sums stay on the device, so the pass makes no host sync of its own (``progress`` reads them back
    only when its line is due, every ~30 s); they are reduced across workers once, at the end. Returns
    ``(sums on the CPU, seconds)``.
    """
    sums = torch.zeros(size, dtype=torch.float64, device=device)
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        if watchdog is not None:
            watchdog.beat()
        sums += step(i, batch)
        if progress is not None:
            progress.update(i + 1, sums)
    elapsed = time.perf_counter() - start
    return all_reduce(sums), elapsed


def schedule(optimizer, cfg: dict[str, Any]):
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


def setup_worker(cfg: dict[str, Any]) -> Worker:
    """Logging, intra-op threads, the seed and the precision of this Ray Train worker."""
    import ray.train
    import ray.train.torch

    _worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"] + rank)
    device = ray.train.torch.get_device()
    precision = cfg.get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    return Worker(cfg=cfg, rank=rank, world=world, device=device, precision=precision)


def restore(model: torch.nn.Module, optimizer, scheduler, *, rank: int) -> tuple[int, list[dict], int]:
    """Load Ray Train's latest checkpoint, if any, into the (unwrapped) ``model``, optimizer and scheduler.

    Returns ``(first epoch index to run, history so far, attempt)``: ``(0, [], 0)`` on a fresh start.
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
        log.info("resumed from the checkpoint of epoch %d (attempt %d)", start, attempt)  # epoch counted from 1
    return start, list(state["history"]), attempt


def report_epoch(cfg: dict[str, Any], *, rank: int, model: torch.nn.Module, optimizer, scheduler, epoch: int,
                 history: list[dict], attempt: int, metrics: dict[str, Any], **outputs: Any) -> None:
    """Every worker: report ``metrics``; rank 0 also refreshes metrics.csv and the curves and checkpoints.

    ``epoch`` is the loop's 0-based index (the checkpoint's name); ``outputs`` go to
    :func:`write_epoch_outputs` (``columns``, ``panels``). Ray Train uploads the checkpoint in the
    background (and then deletes its folder): the next epoch starts without waiting for object storage.
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


def train_pass(task: Task, w: Worker, model: torch.nn.Module, shard: Any, optimizer, *, epoch: int,
               watchdog: Watchdog | None, grab: bool) -> dict[str, Any]:
    """One training pass of ``task`` over ``shard``: ``loss``, ``images``, ``skipped``, ``seconds`` and the extras.

    Rank 0 logs progress inside the pass (:class:`StepProgress`) every ``cfg["progress_s"]`` seconds (30) or
    ``cfg["progress_steps"]`` steps; ``cfg["train_images"]``, when given, makes it say ``step/total`` and an ETA.
    """
    model.train()
    cfg = w.cfg
    progress = StepProgress(
        f"epoch {epoch + 1}/{cfg['epochs']}", world=w.world, every_s=float(cfg.get("progress_s", 30.0)),
        every_steps=int(cfg.get("progress_steps", 0)),
        total_steps=steps_per_worker(int(cfg.get("train_images", 0)), world=w.world, batch_size=w.batch_size),
    ) if w.rank == 0 else None
    totals, seconds = run_pass(
        task.train_batches(w, shard, epoch),
        lambda i, batch: task.train_step(w, model, batch, optimizer, grab=grab and i == 0),
        size=3 + len(task.train_extras), device=w.device, watchdog=watchdog, progress=progress)
    images = max(float(totals[1]), 1.0)
    return {"loss": float(totals[0]) / images, "images": int(totals[1]), "skipped": int(totals[2]),
            "seconds": seconds, **{k: float(v) / images for k, v in zip(task.train_extras, totals[3:])}}


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    """Floats to 6 significant digits: what metrics.csv, the report and the logs show."""
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}


def _before_training(task: Task, w: Worker, net: torch.nn.Module, val_shard: Any, attempt: int) -> dict[str, Any]:
    """Epoch 0: the initial (e.g. pretrained) weights evaluated on the validation split, before any step, so the
    curves and metrics.csv say what training added. Every worker evaluates; rank 0 logs and writes outputs."""
    cfg, start = w.cfg, time.perf_counter()
    with Watchdog(cfg["stall_s"], rank=w.rank) as watchdog:
        va = task.evaluate(w, net, val_shard, watchdog)
    row = _rounded({"epoch": 0, "train_loss": None, **task.row({}, va), "lr": None, "images_per_s": None,
                    "epoch_seconds": time.perf_counter() - start, "train_images": 0, "val_images": va["images"],
                    "attempt": attempt, "skipped_train": cfg["skipped"].get("train", 0),
                    "skipped_val": cfg["skipped"].get("val", 0) + va["skipped"]})
    if w.rank == 0:
        log.info("epoch 0/%d (the initial weights, before training)  %s", cfg["epochs"], task.describe(row))
        write_epoch_outputs(cfg["output"], [row], **task.columns)
    return row


def run(task: Task, cfg: dict[str, Any]) -> None:
    """Ray Train entry for ``task``: train, evaluate on every worker's val shard, report + checkpoint each epoch."""
    import ray.train
    import ray.train.torch

    from maskmodel.runtime.telemetry import TrainingMetrics

    w = setup_worker(cfg)
    net = task.build(w)
    if w.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)  # moves ``net`` to the device (in place) and wraps it in DDP
    if cfg.get("compile"):
        model = torch.compile(model)
    optimizer = task.optimizer(w, [p for p in model.parameters() if p.requires_grad])
    scheduler = schedule(optimizer, cfg)
    start_epoch, history, attempt = restore(net, optimizer, scheduler, rank=w.rank)

    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    metrics_out = TrainingMetrics(cfg["output"]) if w.rank == 0 else None
    fresh = start_epoch == 0 and not history  # no checkpoint yet: the first batch's grid is written
    if fresh and getattr(task, "evaluate_before_training", False):
        history.append(_before_training(task, w, net, val_shard, attempt))
    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg["epochs"]):
        maybe_inject_failure(epoch)
        epoch_start = time.perf_counter()
        with Watchdog(cfg["stall_s"], rank=w.rank) as watchdog:
            tr = train_pass(task, w, model, train_shard, optimizer, epoch=epoch, watchdog=watchdog,
                            grab=w.rank == 0 and epoch == 0 and fresh)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            # Evaluate the plain module: DDP's forward syncs buffers collectively, which would
            # deadlock when workers hold different numbers of val batches (exact, unequal shards).
            va = task.evaluate(w, net, val_shard, watchdog)
        row = _rounded({
            "epoch": epoch + 1, "train_loss": tr["loss"], **task.row(tr, va), "lr": lr,
            "images_per_s": tr["images"] / max(tr["seconds"], 1e-9),
            "epoch_seconds": time.perf_counter() - epoch_start, "train_images": tr["images"],
            "val_images": va["images"], "attempt": attempt,
            # Left out of this epoch: by the check pass, and by this epoch's own reads and decodes.
            "skipped_train": cfg["skipped"].get("train", 0) + tr["skipped"],
            "skipped_val": cfg["skipped"].get("val", 0) + va["skipped"]})
        history.append(row)
        if w.rank == 0:
            eta = (time.perf_counter() - run_start) / (epoch + 1 - start_epoch) * (cfg["epochs"] - epoch - 1)
            skipped = row["skipped_train"] + row["skipped_val"]
            log.info("epoch %d/%d  %s | %.1f img/s%s | ETA %s", epoch + 1, cfg["epochs"], task.describe(row),
                     row["images_per_s"], f" | {skipped} image(s) skipped" if skipped else "", fmt_seconds(eta))
            metrics_out.record(row)
        report_epoch(cfg, rank=w.rank, model=net, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                     history=history, attempt=attempt, **task.columns,
                     metrics={k: v for k, v in row.items() if not isinstance(v, list)})
