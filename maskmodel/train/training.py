"""The training job: data preparation on the driver, Ray Train, and the outputs.

:func:`train` checks everything a user can get wrong (data layout, classes,
weights, output storage, a checkpoint of another run, CPUs left for data)
before any worker starts, streams the images through Ray Data (reduced-size
decode + random crop and flip on CPUs, uint8 through the object store;
rotation, colour jitter and normalisation on the workers' devices), runs
:func:`maskmodel.train.loop.train_loop_per_worker` (the classifier on the one engine,
:mod:`maskmodel.train.engine`) on ``num_workers`` Ray
Train workers, and exports the best model with its reports to ``output``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from maskmodel import reports
from maskmodel.config import config_to_dict
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.train.config import TrainConfig
from maskmodel.train.outputs import CHECKPOINTS

log = logging.getLogger(__name__)

RUN_NAME = CHECKPOINTS[1]  # fixed, so re-submitting with the same --output resumes the run


@dataclass(frozen=True)
class TrainOutputs:
    """Where a finished run put its outputs."""

    output: str
    model_dir: str
    model_id: str
    val_acc: float
    epochs_run: int
    best_epoch: int  # counted from 1: the epoch whose weights the model directory holds


# --- driver side ---

def _init_ray() -> None:
    from maskmodel.runtime.raysession import init_ray

    init_ray()  # connects to RAY_ADDRESS under `ray job submit`, else starts a local instance


def _initial_state(config: TrainConfig, num_classes: int) -> dict:
    import torch

    from maskmodel.models.classifier import build_model, init_weights

    torch.manual_seed(config.seed)
    model = build_model(config.arch, num_classes)
    init_weights(model, config.arch, config.weights)
    return model.state_dict()


def _prepare_split(items, *, name: str, config: TrainConfig, cache: bool, crop, reduce_to: int, shuffle: bool):
    """The classifier's split: ``(uri, label)`` items through :func:`prepare_split` and a :class:`DecodeCrop`."""
    from maskmodel.data.discovery import DecodeCrop

    return prepare_split([{"uri": it.uri, "label": it.label} for it in items], name=name, seed=config.seed,
                         max_unreadable=config.max_unreadable, cache=cache, shuffle=shuffle,
                         decoder=DecodeCrop(crop, reduce_to=reduce_to))


def prepare_split(rows: list[dict], *, name: str, seed: int, max_unreadable: float, cache: bool, decoder,
                  shuffle: bool):
    """Raw bytes checked once (unreadable images counted and dropped) → ``decoder`` per epoch; returns (dataset, bad).

    ``rows``: one dict per image with its ``uri`` and whatever ``decoder`` needs
    besides the bytes (a label, packed boxes); ``decoder`` is a Ray Data batch
    callable that gets those columns plus ``data`` and ``error``. Shared by the
    classifier's and the detector's training.

    Streaming (``cache`` off): each epoch reads the objects again, in a new
    block order: the shuffle is over the list of objects, before any byte is
    read, so the first batch is on its way after the first block, not after the
    whole split. Cached: the bytes are kept in Ray's object store, materialised
    once; each epoch reorders references to those blocks and copies nothing.
    Either way a local shuffle buffer in the training loop mixes across blocks.
    Raises :class:`UserError` when more than ``max_unreadable`` of the split is
    unreadable, naming a few.
    """
    import ray
    from ray.data.expressions import col

    from maskmodel.data.discovery import fetch_and_check

    rows = list(rows)
    if shuffle:
        # Listings come sorted, i.e. grouped by class; a shuffle buffer alone would still feed
        # single-class batches. Shuffle once here, then reorder blocks every epoch below.
        random.Random(seed).shuffle(rows)

    def listing(rows):
        return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 64, 200)))

    raw = listing(rows).map_batches(fetch_and_check, batch_size=64)
    if cache:
        raw = raw.materialize()  # the only copy: bad rows hold no bytes, and the decode step drops them
    errors = raw.select_columns(["uri", "error"]).filter(expr=col("error") != "").materialize()
    bad = errors.count()
    if bad:
        examples = "; ".join(f"{r['uri']} ({r['error']})" for r in errors.take(3))
        if bad > max_unreadable * len(rows):
            raise UserError(f"{bad} of {len(rows)} images in the {name} split are unreadable "
                            f"(over the {max_unreadable:.0%} limit), e.g. {examples}; fix or remove them.")
        log.warning("%s split: skipping %d unreadable image(s), e.g. %s", name, bad, examples)
    if cache:
        # The check pass's failures are counted above; what the decoder finds is the epoch's own.
        good = raw.filter(expr=col("error") == "")
        good = good.randomize_block_order() if shuffle else good  # unseeded: a new order on every epoch's pass
    else:
        # The check pass found the unreadable objects: each epoch re-reads only the good ones and decodes
        # each once (in the decoder). The block order is randomised over the listing, before the reads.
        skip = {r["uri"] for r in errors.iter_rows()}
        source = listing([r for r in rows if r["uri"] not in skip])
        good = (source.randomize_block_order() if shuffle else source).map_batches(
            fetch_and_check, batch_size=64, fn_kwargs={"check": False})
    return good.map_batches(decoder, batch_size=32), bad


def make_trainer(loop, loop_config: dict[str, Any], *, output: str, datasets: dict[str, Any], num_workers: int,
                 gpu: bool, worker_cpus: float, max_failures: int, score_attribute: str,
                 callbacks: Sequence[Any] = (), worker_env: dict[str, str] | None = None):
    """The ``TorchTrainer`` both trainings run: checkpoints under ``<output>/checkpoints/train`` (so the same
    ``--output`` resumes), failure retries, the best checkpoint kept by ``score_attribute`` (max), the test hooks'
    variables forwarded, ``val`` split exactly (every image counted once) and the rest equally."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from maskmodel.runtime.raysession import train_logging_config
    from maskmodel.train.engine import TEST_ENV
    from maskmodel.train.sharding import ExactEvalDataConfig

    env = {k: os.environ[k] for k in TEST_ENV if k in os.environ}
    env.update(worker_env or {})
    fs, path = storage.pyarrow_filesystem(storage.join(output, CHECKPOINTS[0]))
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=gpu,
            resources_per_worker={"CPU": worker_cpus, **({"GPU": 1} if gpu else {})}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=score_attribute, checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=list(callbacks) or None,
            logging_config=train_logging_config(),
        ),
        datasets=datasets,
        dataset_config=ExactEvalDataConfig(exact=("val",)),
    )


def load_state(checkpoint) -> dict:
    """The :data:`~maskmodel.train.outputs.STATE_FILE` dict of a Ray Train checkpoint (model, history, ...)."""
    import torch

    from maskmodel.train.outputs import STATE_FILE

    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def best_and_latest(result, metric: str) -> tuple[dict, dict]:
    """The states of a finished fit's best checkpoint by ``metric`` (max) and of its latest one."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    latest = load_state(result.checkpoint)
    best_ckpt = result.get_best_checkpoint(metric=metric, mode="max") or result.checkpoint
    return load_state(best_ckpt), latest


def _object_store_bytes() -> float:
    import ray

    return float(ray.cluster_resources().get("object_store_memory", 0.0))


def train(config: TrainConfig) -> TrainOutputs:
    """Run one training job end to end; see the module docstring. Raises :class:`UserError` on bad input."""
    trainer, classes = prepare_training(config)
    return export(config, trainer.fit(), classes)


def prepare_training(config: TrainConfig, *, callbacks: Sequence[Any] = (),
                     worker_env: dict[str, str] | None = None) -> tuple[Any, tuple[str, ...]]:
    """Check the input and build (but do not fit) the run's ``TorchTrainer``; returns it and the class names.

    ``callbacks`` go into the Ray Train ``RunConfig`` (e.g. Ray Tune's
    ``TuneReportCallback`` when a Tune trial runs this); ``worker_env`` adds
    environment variables for the workers. Raises :class:`UserError` on bad
    input, before any worker starts.
    """
    from maskmodel.data.annotations import annotation_format
    from maskmodel.data.discovery import discover
    from maskmodel.data.transforms import EvalCrop, TrainCrop
    from maskmodel.runtime.resources import cluster_cpus, cpus_per_worker
    from maskmodel.train.outputs import check_resumable, run_meta, train_alert_classes

    storage.check_writable(config.output)
    if annotation_format(config.data) is not None:
        return _prepare_annotated(config, callbacks=callbacks, worker_env=worker_env)
    data = discover(config.data, val_fraction=config.val_fraction)
    counts = data.counts()
    alerts = train_alert_classes(data.classes, config.compliant_class)  # a wrong --compliant-class fails here
    meta = run_meta(config.arch, data.classes, config.image_size)
    check_resumable(config.output, meta)  # a different run's checkpoints are refused here, not in a worker
    log.info("data %s: classes %s (alert: %s); %s%s", config.data, list(data.classes), ", ".join(alerts),
             ", ".join(f"{s}={sum(c.values())}" for s, c in counts.items()),
             f"; {data.skipped_line()}" if data.skipped_by_extension else "")
    initial = _initial_state(config, len(data.classes))  # bad --weights fail here, before any worker

    _init_ray()
    worker_cpus = cpus_per_worker(config.cpus_per_worker, config.num_workers, cluster_cpus())
    cache = config.cache_raw == "on" or (
        config.cache_raw == "auto" and data.total_bytes < 0.3 * _object_store_bytes())
    # The CPU side of augmentation is crop + flip; everything else happens on the worker's device.
    evaluate = EvalCrop(crop_size=config.image_size)
    train_crop = TrainCrop(crop_size=config.image_size) if config.augment else evaluate
    train_ds, bad_train = _prepare_split(data.splits["train"], name="train", config=config, cache=cache,
                                         crop=train_crop, shuffle=True,
                                         reduce_to=getattr(train_crop, "decode_side", evaluate.resize_size))
    val_ds, bad_val = _prepare_split(data.splits["val"], name="val", config=config, cache=cache, crop=evaluate,
                                     reduce_to=evaluate.resize_size, shuffle=False)
    storage.write_json(storage.join(config.output, "train_config.json"),
                       {"config": config_to_dict(config), "classes": list(data.classes), "counts": counts,
                        "skipped_by_extension": data.skipped_by_extension})

    trainer = _classifier_trainer(config, data.classes, meta, initial, worker_cpus, train_ds, val_ds,
                                  {"train": bad_train, "val": bad_val}, callbacks=callbacks, worker_env=worker_env)
    return trainer, data.classes


def _classifier_trainer(config: TrainConfig, classes: Sequence[str], meta: dict, initial: dict, worker_cpus: float,
                        train_ds, val_ds, skipped: dict[str, int], *, callbacks: Sequence[Any],
                        worker_env: dict[str, str] | None):
    """The classifier's ``TorchTrainer`` over prepared ``train``/``val`` datasets (columns ``image``, ``label``)."""
    import ray

    from maskmodel.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from maskmodel.train.loop import train_loop_per_worker

    return make_trainer(
        train_loop_per_worker, output=config.output, datasets={"train": train_ds, "val": val_ds},
        num_workers=config.num_workers, gpu=config.gpu, worker_cpus=worker_cpus, max_failures=config.max_failures,
        score_attribute="val_acc", callbacks=callbacks, worker_env=worker_env,
        loop_config={
            "classes": list(classes), "arch": config.arch, "epochs": config.epochs,
            "batch_size": config.batch_size, "lr": config.effective_lr, "momentum": config.momentum,
            "weight_decay": config.weight_decay, "lr_schedule": config.lr_schedule, "seed": config.seed,
            "precision": config.precision, "output": config.output, "compile": config.compile,
            "warmup_epochs": config.warmup_epochs, "augment": config.augment,
            "rotation_degrees": config.rotation_degrees, "jitter": config.jitter, "occlusion": config.occlusion,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "meta": meta, "stall_s": 60 * config.stall_minutes,
            "torch_threads": config.torch_threads or max(1, int(worker_cpus)),
            "initial_state_ref": ray.put(initial), "skipped": skipped,
        })


def _prepare_annotated(config: TrainConfig, *, callbacks: Sequence[Any], worker_env: dict[str, str] | None
                       ) -> tuple[Any, tuple[str, ...]]:
    """:func:`prepare_training` for annotated photos (:mod:`maskmodel.train.annotated`): faces cut once per job
    by the face stage's own crop, per split, in Ray Data; the dataset summary logged and kept with the run."""
    from maskmodel.models.spec import DetectOptions
    from maskmodel.runtime.resources import cluster_cpus, cpus_per_worker
    from maskmodel.train.annotated import face_datasets, load_annotated, summary_line, without_unreadable
    from maskmodel.train.outputs import check_resumable, run_meta, train_alert_classes

    opts = DetectOptions()  # scoring's defaults: the margin and minimum face size the face stage cuts with
    data = load_annotated(config.data, class_map=config.class_map, images_root=config.images_root,
                          val_fraction=config.val_fraction, min_face=opts.min_face)
    train_alert_classes(data.classes, config.compliant_class)  # a wrong --compliant-class fails here
    meta = run_meta(config.arch, data.classes, config.image_size)
    check_resumable(config.output, meta)
    initial = _initial_state(config, len(data.classes))
    _init_ray()
    worker_cpus = cpus_per_worker(config.cpus_per_worker, config.num_workers, cluster_cpus())
    datasets, bad = face_datasets(data, image_size=config.image_size, augment=config.augment, options=opts,
                                  max_pixels=config.max_pixels, max_unreadable=config.max_unreadable, seed=config.seed)
    summary = without_unreadable(data, bad)
    log.info("data %s: classes %s; %s", config.data, list(data.classes), summary_line(summary))
    storage.write_json(storage.join(config.output, "train_config.json"),
                       {"config": config_to_dict(config), "classes": list(data.classes), "counts": summary["faces"],
                        "dataset": summary})
    trainer = _classifier_trainer(config, data.classes, meta, initial, worker_cpus, datasets["train"],
                                  datasets["val"], {s: len(b) for s, b in bad.items()}, callbacks=callbacks,
                                  worker_env=worker_env)
    return trainer, data.classes


def export(config: TrainConfig, result, classes: tuple[str, ...]) -> TrainOutputs:
    """Write the best checkpoint as the model directory, plus metrics, curves and the final report."""
    import torch

    from maskmodel.data.annotations import annotation_format
    from maskmodel.data.lineage import annotation_sets, label_files
    from maskmodel.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_for
    from maskmodel.metrics import classification_report
    from maskmodel.models.classifier import ModelCard, save_model_dir
    from maskmodel.train.outputs import train_alert_classes, write_epoch_outputs

    best, latest = best_and_latest(result, "val_acc")
    history = latest["history"]
    best_row = best["history"][-1]
    buf = io.BytesIO()
    torch.save(best["model"], buf)
    card = ModelCard(
        arch=config.arch, classes=tuple(classes), input_size=config.image_size,
        resize_size=resize_for(config.image_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        config=config_to_dict(config), alert_classes=train_alert_classes(classes, config.compliant_class),
        metrics={k: best_row[k] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")},
        # Annotated photos (COCO, VOC, YOLO: file or folder) are hashed whole; other data only when it is a
        # manifest file (an ImageFolder tree's labels are its folder names).
        annotation_sets=tuple(annotation_sets([config.data]) if annotation_format(config.data) is not None
                              else label_files([config.data])),
    )
    dataset = _dataset_summary(config)
    if dataset:  # annotated photos: faces per class and split, too small, unreadable (jobs.train's summary)
        card = dataclasses.replace(card, metrics={**card.metrics, "dataset": dataset})
    agreement = bf16_agreement(config, card, best["model"])
    if agreement is not None:
        from maskmodel.models.precision import BF16_AGREEMENT_KEY

        card = dataclasses.replace(card, metrics={**card.metrics, BF16_AGREEMENT_KEY: agreement})
    model_dir = storage.join(config.output, "model")
    card = save_model_dir(model_dir, buf.getvalue(), card)

    cm = np.asarray(best_row["val_confusion"])
    report = classification_report(cm, classes)
    report.update(model_id=card.model_id, best_epoch=best_row["epoch"], epochs_run=len(history),
                  data=config.data, split="val")
    write_epoch_outputs(config.output, history)
    storage.write_json(storage.join(config.output, "report.json"), report)
    storage.write_bytes(storage.join(config.output, "confusion_matrix.png"),
                        reports.confusion_matrix_png(cm, classes, title=f"val, epoch {best_row['epoch']}"))
    return TrainOutputs(output=config.output, model_dir=model_dir, model_id=card.model_id,
                        val_acc=float(best_row["val_acc"]), epochs_run=len(history), best_epoch=int(best_row["epoch"]))


def _dataset_summary(config: TrainConfig) -> dict[str, Any] | None:
    """The annotated data's summary :func:`prepare_training` kept in ``train_config.json`` (``None``: other data)."""
    uri = storage.join(config.output, "train_config.json")
    return storage.read_json(uri).get("dataset") if storage.exists(uri) else None


def bf16_agreement(config: TrainConfig, card, state: dict, *, limit: int = 256) -> float | None:
    """Share of held-out images (test split, else val; at most ``limit``) whose bf16 label equals fp32's.

    Recorded in ``model.json`` so that scoring's ``--precision auto`` uses bf16 on a CPU only
    where it was shown to change no label. ``None`` when this CPU has no native bf16 to check with.
    """
    from maskmodel.data.discovery import discover
    from maskmodel.data.transforms import EvalCrop, preprocess_image
    from maskmodel.io.decode import DecodeError
    from maskmodel.models.classifier import build_model
    from maskmodel.models.precision import cpu_has_native_bf16, label_agreement

    if not cpu_has_native_bf16():
        return None
    crop = EvalCrop(crop_size=card.input_size, resize_size=card.resize_size)
    if _dataset_summary(config):
        from maskmodel.train.annotated import held_out_faces

        pixels = held_out_faces(config, crop, limit)
    else:
        data = discover(config.data, val_fraction=config.val_fraction)
        items = (data.splits.get("test") or data.splits["val"])[:limit]
        pixels = []
        for it in items:
            try:
                pixels.append(preprocess_image(storage.read_bytes(it.uri), crop)[0])
            except (DecodeError, UserError):
                continue  # unreadable images were already counted and skipped during training
    if not pixels:
        return None
    model = build_model(card.arch, len(card.classes))
    model.load_state_dict(state)
    batches = [np.stack(pixels[i:i + 64]) for i in range(0, len(pixels), 64)]
    agreement = label_agreement(model, batches, mean=card.mean, std=card.std)
    log.info("bf16 gives the fp32 label on %.1f%% of %d held-out images", 100 * agreement, len(pixels))
    return agreement

