"""The ablation study: a grid of training configurations run as parallel Ray Tune trials, one Ray Train run each.

The original study compared learning rate {0.01, 0.005} x augmentation {off,
on}; any values (and extra factors such as initial weights) can be given. The
Ray 2.60 pattern: each Tune trial runs :func:`_trial`, a function trainable
that builds the job's own ``TorchTrainer`` with
:func:`maskmodel.train.training.prepare_training`, adds Ray Train's
``TuneReportCallback`` (which forwards every epoch's metrics to Tune) and
fits it; a Trainer passed straight to a Tuner is deprecated. Each trial writes
a complete training output (model directory, curves, report) under
``<output>/trials/<trial>/``.

After the trials, every trial's exported model is evaluated on the ``scene``
split (the not-tightly-cropped images) with :func:`maskmodel.study.evaluation.evaluate`,
i.e. through the scoring pipeline. Outputs: ``ablation.csv`` and ``ablation.md``
(one row per configuration, failed trials included as ``failed`` rows),
``ablation_curves.png`` (val loss and accuracy of all trials on shared axes) and
``ablation.json`` (config, rows, per-epoch histories, summary).

Epochs are numbered from 1 in every output. Test-only hook:
``MASKMODEL_TEST_FAIL_TRIAL=<index>`` (read on the driver) makes that trial's
Ray Train worker raise at epoch 2 (epoch 1 for one-epoch runs) with no retries.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

from maskmodel.config import config_to_dict, field, resolve_paths
from maskmodel.io import storage
from maskmodel.models.spec import CLASSIFIER_ARCHITECTURES as ARCHITECTURES
from maskmodel.models.spec import CLASSIFIER_WEIGHT_KEYWORDS as WEIGHT_KEYWORDS

log = logging.getLogger(__name__)

FAIL_TRIAL_ENV = "MASKMODEL_TEST_FAIL_TRIAL"
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
COLUMNS = ("trial", "lr", "augment", "weights", "status", "epochs_run", "final_val_acc", "best_val_acc",
           "best_epoch", "scene_acc", "scene_images", "scene_errors", "train_acc_over_threshold_epoch",
           "final_train_acc", "final_val_loss", "model_id", "error")


@dataclass(frozen=True)
class AblationConfig:
    """The grid and the per-trial training settings; the CLI of ``jobs.ablation`` is derived from it.

    Local paths become absolute here, on construction in the driver (``path=`` fields,
    :func:`maskmodel.config.resolve_paths`), so no Ray worker resolves them against its own folder.
    """

    data: str = field(path=True, help="training data URI (as for jobs.train); its scene split, if any, scores each model")
    output: str = field(path=True, help="output URI: ablation.csv/.md/.json, ablation_curves.png and trials/<trial>/")
    lrs: tuple[float, ...] = field((0.01, 0.005), help="learning rates to compare")
    augment: tuple[str, ...] = field(("off", "on"), choices=("on", "off"), help="augmentation settings to compare")
    weights: tuple[str, ...] = field(("imagenet",), path=WEIGHT_KEYWORDS, help="initial weights to compare (imagenet, none, or URIs)")
    arch: str = field("resnet50", choices=ARCHITECTURES, help="architecture of every trial")
    epochs: int = field(50, help="epochs per trial")
    batch_size: int = field(64, help="global batch size per trial")
    image_size: int = field(224, help="input edge in pixels")
    num_workers: int = field(1, help="Ray Train workers per trial")
    gpu: bool = field(False, help="train each trial's workers on GPUs")
    cpus_per_worker: float = field(0.0, help="CPUs reserved per training worker; 0 = 1 each if one trial then "
                                             "leaves a CPU free for reading and decoding images, else less")
    torch_threads: int = field(0, help="intra-op threads per worker; 0 = max(1, cpus_per_worker)")
    trial_cpus: float = field(0.01, help="CPUs Tune reserves for each trial's driver, which only starts the "
                                         "Train run (its workers reserve their own)")
    max_concurrent_trials: int = field(0, help="trials run at once; 0 = as many as fit while one CPU stays free "
                                               "for Ray Data's decode tasks")
    max_failures: int = field(1, help="worker failures each trial's Train run recovers from")
    scene_split: str = field("scene", help="split to score every trial's model on (skipped if the data lacks it)")
    overfit_threshold: float = field(0.999, help="report the first epoch whose train accuracy exceeds this")
    max_tiles: int = field(24, help="images on each trial's scene contact sheet")
    seed: int = field(0, help="random seed of every trial (trials differ only in the grid factors)")

    def __post_init__(self) -> None:
        resolve_paths(self)
        if not self.lrs or not self.augment or not self.weights:
            raise ValueError("--lrs, --augment and --weights each need at least one value")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError("--lrs must be positive")
        if self.epochs < 1 or self.num_workers < 1 or self.max_concurrent_trials < 0:
            raise ValueError("--epochs and --num-workers must be at least 1, --max-concurrent-trials at least 0")
        if self.trial_cpus <= 0:
            raise ValueError("--trial-cpus must be positive (Tune cannot place a trial that reserves nothing)")


@dataclass(frozen=True)
class AblationResult:
    output: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    elapsed_s: float


def trial_specs(config: AblationConfig, *, cpus_per_worker: float | None = None) -> list[dict[str, Any]]:
    """One spec per grid point (lr x augment x weights, in that nesting order): index, name, TrainConfig fields.

    ``cpus_per_worker``: the value the trials' workers reserve, resolved against the cluster by the caller.
    """
    from maskmodel.train.training import TrainConfig

    # Local paths are absolute already (AblationConfig resolves them): Tune runs each trial elsewhere.
    out, data, output = [], config.data, config.output
    many_weights = len(config.weights) > 1
    for i, (lr, aug, w) in enumerate(itertools.product(config.lrs, config.augment, config.weights)):
        name = f"lr{lr:g}-aug-{aug}" + (f"-w-{re.sub(r'[^A-Za-z0-9._-]+', '_', w)[-40:]}" if many_weights else "")
        train = TrainConfig(
            data=data, output=storage.join(output, "trials", name), arch=config.arch, weights=w,
            epochs=config.epochs, batch_size=config.batch_size, lr=lr,
            image_size=config.image_size, augment=aug == "on", num_workers=config.num_workers, gpu=config.gpu,
            cpus_per_worker=config.cpus_per_worker if cpus_per_worker is None else cpus_per_worker,
            torch_threads=config.torch_threads,
            max_failures=config.max_failures, seed=config.seed)
        out.append({"index": i, "name": name, "lr": lr, "augment": aug, "weights": w,
                    "train": config_to_dict(train)})
    return out


def _trial(param: dict[str, Any]) -> None:
    """The Tune function trainable: build this trial's TorchTrainer, forward its metrics to Tune, export."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from maskmodel.train.engine import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV
    from maskmodel.train.training import TrainConfig, export, prepare_training

    spec = param["trial"]
    config = TrainConfig(**spec["train"])
    env = None
    if spec.get("inject_failure"):
        config = dataclasses.replace(config, max_failures=0)
        env = {FAIL_AT_EPOCH_ENV: str(min(1, config.epochs - 1)),
               FAIL_MARKER_ENV: storage.join(config.output, "_injected_failure")}
    trainer, classes = prepare_training(config, callbacks=[TuneReportCallback()], worker_env=env)
    export(config, trainer.fit(), classes)


def _plan_cpus(config: AblationConfig, trials: int) -> tuple[float, int]:
    """``(CPUs per training worker, trials at once)`` that leave one CPU for Ray Data; :class:`UserError` if none do.

    Ray Data's read and decode tasks need a whole free CPU; trials that reserve every CPU would wait forever.
    """
    import ray

    from maskmodel.runtime.resources import DATA_CPUS, cluster_cpus, cpus_per_worker

    cpus = cluster_cpus()
    kw = dict(what="trial worker", extra_cpus=config.trial_cpus)
    if config.max_concurrent_trials:  # the user's number of trials at once must fit as a whole
        n = min(config.max_concurrent_trials, trials)
        return cpus_per_worker(config.cpus_per_worker, config.num_workers, cpus, groups=n,
                               count_flag="--max-concurrent-trials", **kw), config.max_concurrent_trials
    per_worker = cpus_per_worker(config.cpus_per_worker, config.num_workers, cpus, **kw)  # one trial at least
    per_trial = config.trial_cpus + config.num_workers * per_worker
    n = math.floor((cpus - DATA_CPUS) / per_trial + 1e-9)
    if config.gpu:
        n = min(n, int(ray.cluster_resources().get("GPU", 0) // config.num_workers))
    return per_worker, max(1, min(n, trials))


def _history_rows(rows) -> list[dict[str, float]]:
    return [{k: (int(float(r[k])) if k == "epoch" else float(r[k])) for k in HISTORY_KEYS} for r in rows
            if all(r.get(k) not in (None, "") for k in HISTORY_KEYS)]


def _history(result, output: str) -> list[dict[str, float]]:
    """The trial's per-epoch metrics, as Tune received them through ``TuneReportCallback``.

    A worker that raises right after reporting can lose that last report: Ray Train V2's controller polls
    the worker group and may see the error before the report. The trial's rank-0 worker writes every
    finished epoch to ``metrics.csv`` before reporting it, so where that file holds more epochs (a failed
    trial), it is the record.
    """
    df = result.metrics_dataframe
    tuned = [] if df is None or not set(HISTORY_KEYS) <= set(df.columns) else _history_rows(
        df[list(HISTORY_KEYS)].dropna().to_dict("records"))
    path = storage.join(output, "metrics.csv")
    if result.error and storage.exists(path):
        written = _history_rows(csv.DictReader(io.StringIO(storage.read_text(path))))
        if len(written) > len(tuned):
            return written
    return tuned


def summarize_trial(spec: dict[str, Any], history: Sequence[dict[str, float]], *, error: str | None,
                    best_epoch: int | None, model_id: str, scene: dict[str, Any] | None,
                    threshold: float) -> dict[str, Any]:
    """One table row. ``best_epoch`` (from 1, the exported model's) falls back to the best val epoch."""
    last = history[-1] if history else {}
    best = max(history, key=lambda h: h["val_acc"]) if history else None  # first of ties
    if best_epoch is None and best is not None:
        best_epoch = best["epoch"]
    over = next((h["epoch"] for h in history if h["train_acc"] > threshold), "never" if history else "")
    return {"trial": spec["name"], "lr": spec["lr"], "augment": spec["augment"], "weights": spec["weights"],
            "status": "failed" if error else "ok", "epochs_run": len(history),
            "final_val_acc": last.get("val_acc"), "best_val_acc": best["val_acc"] if best else None,
            "best_epoch": best_epoch,
            "scene_acc": scene["accuracy"] if scene else None, "scene_images": scene["images"] if scene else None,
            "scene_errors": scene["errors"] if scene else None, "train_acc_over_threshold_epoch": over,
            "final_train_acc": last.get("train_acc"), "final_val_loss": last.get("val_loss"),
            "model_id": model_id, "error": (error or "").strip().splitlines()[-1][:300] if error else ""}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean scene and final val accuracy per augmentation setting (ok trials), and on-minus-off per lr/weights."""
    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    ok = [r for r in rows if r["status"] == "ok"]
    by_aug = {a: {"trials": sum(r["augment"] == a for r in ok),
                  "mean_scene_acc": mean(r["scene_acc"] for r in ok if r["augment"] == a),
                  "mean_final_val_acc": mean(r["final_val_acc"] for r in ok if r["augment"] == a)}
              for a in dict.fromkeys(r["augment"] for r in rows)}
    pairs = []
    for lr, w in dict.fromkeys((r["lr"], r["weights"]) for r in ok):
        got = {r["augment"]: r["scene_acc"] for r in ok if (r["lr"], r["weights"]) == (lr, w)}
        if got.get("on") is not None and got.get("off") is not None:
            pairs.append({"lr": lr, "weights": w, "scene_acc_on_minus_off": got["on"] - got["off"]})
    return {"by_augment": by_aug, "pairs": pairs, "failed": [r["trial"] for r in rows if r["status"] != "ok"]}


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows([{k: ("" if r[k] is None else r[k]) for k in COLUMNS} for r in rows])
    return buf.getvalue()


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def ablation_markdown(config: AblationConfig, rows: Sequence[dict[str, Any]], summary: dict[str, Any],
                      elapsed_s: float) -> str:
    """``ablation.md``: the settings, one row per configuration, and the augmentation comparison on scene."""
    out = ["# Ablation study", "",
           f"- data: `{config.data}`; {config.arch}, weights {', '.join(config.weights)}, {config.epochs} epoch(s), "
           f"batch {config.batch_size}, {config.image_size} px, {config.num_workers} worker(s) per trial",
           f"- grid: lr {', '.join(f'{v:g}' for v in config.lrs)} x augmentation {', '.join(config.augment)}; "
           f"wall time {elapsed_s / 60:.1f} min", "- epochs are numbered from 1; *best epoch* is the epoch of the "
           "exported (best val accuracy) model; *train acc > "
           f"{100 * config.overfit_threshold:g} %* is the first epoch whose training accuracy exceeded it",
           f"- scene accuracy: the exported model scored on the `{config.scene_split}` split through the scoring "
           "pipeline (per-trial reports under `trials/<trial>/scene_eval/`)", "",
           f"| trial | lr | augment | weights | status | final val acc | best epoch | {config.scene_split} acc | "
           f"train acc > {100 * config.overfit_threshold:g} % at epoch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['trial']} | {r['lr']:g} | {r['augment']} | {r['weights']} | {r['status']} | "
                   f"{_pct(r['final_val_acc'])} | {r['best_epoch'] or '–'} | {_pct(r['scene_acc'])} | "
                   f"{r['train_acc_over_threshold_epoch'] or '–'} |")
    out += ["", "Mean over successful trials:", ""]
    for aug, s in summary["by_augment"].items():
        out.append(f"- augmentation {aug}: {s['trials']} trial(s), {config.scene_split} acc "
                   f"{_pct(s['mean_scene_acc'])}, final val acc {_pct(s['mean_final_val_acc'])}")
    for p in summary["pairs"]:
        out.append(f"- lr {p['lr']:g}, weights {p['weights']}: {config.scene_split} accuracy with augmentation "
                   f"minus without = {100 * p['scene_acc_on_minus_off']:+.2f} points")
    for r in rows:
        if r["status"] != "ok":
            out.append(f"- **{r['trial']} failed** after {r['epochs_run']} epoch(s): {r['error']}")
    out += ["", "![val loss and accuracy of every trial](ablation_curves.png)", ""]
    return "\n".join(out)


def run_ablation(config: AblationConfig) -> AblationResult:
    """Run the grid as Tune trials, score each model on the scene split, write the table and the curves.

    Bad data, an unwritable output or unusable ``weights`` raise
    :class:`UserError` before any trial starts. A trial that fails is a
    ``failed`` row (with its error and the epochs it finished), never dropped.
    """
    from ray import tune

    from maskmodel.data.discovery import discover
    from maskmodel.models.classifier import build_model, init_weights, load_card
    from maskmodel.study import eval_reports
    from maskmodel.study.evaluation import EvalConfig, evaluate

    started = time.monotonic()
    storage.check_writable(config.output)
    data = discover(config.data)
    for w in config.weights:  # a bad --weights fails here, once, not in every trial
        init_weights(build_model(config.arch, len(data.classes)), config.arch, w)
    from maskmodel.console import verbose
    from maskmodel.runtime.raysession import init_ray

    init_ray()  # joins RAY_ADDRESS (a cluster, `ray job submit`) if set, else starts a local Ray
    worker_cpus, concurrent = _plan_cpus(config, len(trial_specs(config)))
    specs = trial_specs(config, cpus_per_worker=worker_cpus)
    fail = os.environ.get(FAIL_TRIAL_ENV)
    for s in specs:
        s["inject_failure"] = fail is not None and int(fail) == s["index"]
    log.info("%d trial(s), %d at a time: %s", len(specs), concurrent, ", ".join(s["name"] for s in specs))
    fs, path = storage.pyarrow_filesystem(config.output)
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": config.trial_cpus}),
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        # Tune's status table every few seconds is hundreds of lines: trials print their own epoch lines,
        # and the summary table ends the run. --verbose brings the table back.
        run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs,
                                  verbose=1 if verbose() else 0),
    )
    grid = sorted(tuner.fit(), key=lambda r: r.config["trial"]["index"])

    rows, curves, histories = [], [], {}
    for result in grid:
        spec = result.config["trial"]
        history = _history(result, spec["train"]["output"])
        error = str(result.error) if result.error else None
        model_dir = storage.join(spec["train"]["output"], "model")
        scene, best_epoch, model_id = None, None, ""
        if not error:
            card = load_card(model_dir)
            best_epoch, model_id = card.metrics.get("epoch"), card.model_id
            if data.splits.get(config.scene_split):
                scene = evaluate(EvalConfig(model=model_dir, data=config.data, split=(config.scene_split,),
                                            output=storage.join(spec["train"]["output"], "scene_eval"),
                                            max_tiles=config.max_tiles)).report["splits"][config.scene_split]
        rows.append(summarize_trial(spec, history, error=error, best_epoch=best_epoch, model_id=model_id,
                                    scene=scene, threshold=config.overfit_threshold))
        curves.append((spec["name"], history, bool(error)))
        histories[spec["name"]] = history
    summary = summarize(rows)
    elapsed = time.monotonic() - started
    storage.write_text(storage.join(config.output, "ablation.csv"), _csv(rows))
    storage.write_text(storage.join(config.output, "ablation.md"), ablation_markdown(config, rows, summary, elapsed))
    storage.write_bytes(storage.join(config.output, "ablation_curves.png"), eval_reports.ablation_curves_png(curves))
    storage.write_json(storage.join(config.output, "ablation.json"),
                       {"config": config_to_dict(config), "rows": rows, "summary": summary, "histories": histories,
                        "elapsed_s": elapsed})
    if not data.splits.get(config.scene_split):
        log.warning("%s has no %r split: the table has no scene accuracy", config.data, config.scene_split)
    return AblationResult(config.output, rows, summary, elapsed)
