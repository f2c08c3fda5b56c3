"""Batch scoring on Ray Data: image objects (loose, or inside archives) in, one committed Parquet row per image out.

The pipeline streams; its memory does not grow with the number of images
(beyond a prefix listing's ~100 bytes per object on the driver; use a manifest
for huge collections)::

    list      driver: a prefix listing, or a manifest (CSV/Parquet, `path` column) of up to 100 000 rows;
              Ray reads a larger manifest as it streams
    load      Ray tasks (on CPU fused into the actors): read, decode, crop; archives member by member
    predict   actor pool, the model loaded once per actor       (maskmodel.score.pipeline)
    write     driver: rolling Parquet files of this attempt     (maskmodel.results.AttemptWriter)
    commit    driver: one Delta commit, made last, adds them and replaces the run id's old files (results.commit)

:func:`prepare` makes every check a user can fail (input, model, output,
credentials) before anything runs or is written; :func:`execute` runs the
pipeline; :func:`score` does both. The per-batch steps
(:mod:`maskmodel.score.loading`, :mod:`maskmodel.score.inference`) run without Ray.

Progress: a live line in a terminal, a log line every few seconds otherwise
(:class:`maskmodel.console.Progress`); images, errors by kind and img/s are Ray
metrics (:mod:`maskmodel.runtime.telemetry`). Test-only pause point ``score-batch-<k>``
(:mod:`maskmodel.runtime.testhooks`): the driver waits after writing its k-th batch,
so a test can kill a run mid-way without racing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from maskmodel import results
from maskmodel.runtime import testhooks, timeline
from maskmodel.config import config_to_dict
from maskmodel.console import Progress
from maskmodel.errors import UserError
from maskmodel.io import objectkeys, storage
from maskmodel.io.storage import LeftOut, ObjectInfo
from maskmodel.io.archives import ARCHIVE_EXTENSIONS, archive_kind
from maskmodel.models.classifier import load_model_dir
from maskmodel.models.precision import resolve_precision
from maskmodel.results import drift, incremental
from maskmodel.results.profile import RunProfile, figures
from maskmodel.models.detect import load_detector
from maskmodel.score.faces import CENTERFACE_MODES, run_options
from maskmodel.score.pipeline import build_dataset, ensure_ray, manifest_base, resolve_manifest_path, result_batches
from maskmodel.score.plan import MANIFEST_COLUMNS, ScoreConfig, ScorePlan
from maskmodel.runtime.telemetry import RunGauges, ScoringMetrics

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")
#: A manifest of up to this many rows is read whole by the driver and scored like a listing; a larger one streams
#: through Ray Data's reader. Read on the driver, a small manifest starts no reader tasks, and on CPU the load
#: step runs inside the predictor actors: about 4 s less fixed cost per run on 2 cores (benchmarks/README.md).
#: The bound keeps the driver's own work below that: it resolves an entry in about 13 us (s3://, one core), 1.3 s
#: for 100 000. A Parquet manifest's rows are in its footer; a CSV's are estimated from its size.
MANIFEST_ON_DRIVER_ROWS = 100_000
#: Bytes of a CSV manifest's row, for that estimate: a typical object URI (``s3://archive/cameras/2025-01-01/
#: cam-0042/frame-0001234.jpg`` and its newline is 60).
CSV_ROW_BYTES = 64


def default_run_id() -> str:
    """A UTC timestamp id such as ``20250101T020000Z``."""
    return f"{results.utc_now():%Y%m%dT%H%M%SZ}"


@dataclass(frozen=True)
class ScoreResult:
    run_id: str
    commit_uri: str
    images: int
    ok: int
    errors: int
    skipped: int | None
    elapsed_s: float
    left_out: LeftOut = LeftOut()  # files the listing passed over on purpose (hidden, not of --extensions)

    def summary_line(self) -> str:
        rate = self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0
        skipped = f", {self.skipped} skipped as already scored" if self.skipped else ""
        kinds = [f"{n} {what}" for n, what in ((self.left_out.hidden, "hidden"),
                                               (self.left_out.extension, "not of --extensions")) if n]
        if kinds:
            skipped += f", {self.left_out.total} files left out ({', '.join(kinds)})"
        return (f"{self.images} images: {self.ok} ok, {self.errors} errors{skipped}, {rate:.1f} images/s; "
                f"committed run {self.run_id} at {self.commit_uri}")


# ----------------------------------------------------------------------------- door checks

def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS)


def _manifest_head(uri: str) -> tuple[tuple[str, ...], int, int]:
    """Column names, (a lower bound of) the row count and the file size (bytes) of a manifest, reading its head."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    size = storage.info(uri).size  # a clear "does not exist" / credentials message first
    fs, path = storage.filesystem(uri)
    with storage.storage_errors(uri, "read"), fs.open(path, "rb") as f, _unreadable_manifest(uri):
        if not uri.lower().endswith(".csv"):
            meta = pq.ParquetFile(f).metadata
            return tuple(meta.schema.names), meta.num_rows, size
        reader = pacsv.open_csv(f)
        rows = 0
        for batch in reader:
            rows += batch.num_rows
            if rows:
                break
        return tuple(reader.schema.names), rows, size


def _manifest_objects(uri: str, columns: tuple[str, ...]) -> list[ObjectInfo]:
    """A small manifest read whole: its entries as a listing's objects (paths resolved, no extension filter).

    ``size`` and ``version`` are ``None`` where the manifest has no such column (or no value).
    Raises :class:`UserError` for an unreadable file or an entry without a path.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    keep = [c for c in MANIFEST_COLUMNS if c in columns]
    fs, path = storage.filesystem(uri)
    with storage.storage_errors(uri, "read"), fs.open(path, "rb") as f, _unreadable_manifest(uri):
        if uri.lower().endswith(".csv"):
            table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                column_types={c: MANIFEST_COLUMNS[c] for c in keep}, include_columns=keep))
        else:
            table = pq.read_table(f, columns=keep).cast(pa.schema([(c, MANIFEST_COLUMNS[c]) for c in keep]))
    paths = table.column("path").to_pylist()
    if None in paths:
        raise UserError(f"Manifest {uri!r} has an empty path in row {paths.index(None) + 1}; give every row an "
                        f"image URI or remove it.")
    base = manifest_base(uri)
    n = len(paths)
    sizes = table.column("size").to_pylist() if "size" in keep else [None] * n
    versions = table.column("version").to_pylist() if "version" in keep else [None] * n
    return [ObjectInfo(uri=resolve_manifest_path(base, p), size=s, version=v) for p, s, v in zip(paths, sizes, versions)]


@contextlib.contextmanager
def _unreadable_manifest(uri: str) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise UserError(f"Manifest {uri!r} is not a readable {'CSV' if uri.lower().endswith('.csv') else 'Parquet'} "
                        f"file ({str(e).splitlines()[0]}); fix or regenerate it.") from e


def prepare(config: ScoreConfig) -> ScorePlan:
    """Check input, model and output and resolve the run; nothing is written (a write probe is removed).

    Raises :class:`UserError` (one sentence) for a missing or empty input
    (unless ``allow_empty``), a missing or invalid model directory, an
    output that cannot be written, or missing credentials.
    """
    cfg = dataclasses.replace(config, run_id=config.run_id or default_run_id())
    if cfg.check:
        drift.load_checks(cfg.check)  # a bad check file is one sentence before any work
    # The model and detector checks (card, weights, building the networks: requests one after another, then
    # CPU) overlap the input's listing; an input error is still reported first, then the model's. Nothing is written.
    with ThreadPoolExecutor(2, thread_name_prefix="model-check") as pool:
        model_check, faces_check = pool.submit(load_model_dir, cfg.model), pool.submit(check_faces, cfg)
        try:
            objects, manifest, columns, rows, left_out = _check_input(cfg)
        except BaseException:
            model_check.cancel()
            faces_check.cancel()
            raise
        timeline.mark("input listed")
        model, card = model_check.result()  # proves the weights load, not just that model.json parses
        detector = faces_check.result()
    del model
    timeline.mark("model checked")
    try:
        schema = results.results_schema(card.classes)
    except ValueError as e:
        raise UserError(f"{cfg.model!r}: {e}; rename the classes in model.json.") from e
    storage.check_writable(cfg.output)
    results.check_output(cfg.output)
    timeline.mark("output checked")
    skip, skipped = np.empty(0, np.uint64), 0
    if cfg.incremental:
        skip = incremental.committed_keys(cfg.output, exclude_run_id=cfg.run_id, forgotten=not cfg.rescore_forgotten)
        if objects is not None:
            known = [i for i, o in enumerate(objects) if o.version is not None]
            seen = np.zeros(len(objects), bool)
            if known:
                seen[known] = objectkeys.contains(skip, objectkeys.object_keys(
                    [objects[i].uri for i in known], [objects[i].version for i in known]))
            objects, skipped = [o for o, s in zip(objects, seen) if not s], int(seen.sum())
            if any(o.version is None for o in objects):
                skipped = None  # manifest entries without a version are checked as they are read
            elif not any(archive_kind(o.uri) for o in objects):
                skip = np.empty(0, np.uint64)  # applied; archives left to read skip their scored members with it
        else:
            skipped = None
    manifest_rows = rows if manifest and not manifest.lower().endswith(".csv") else None
    return ScorePlan(cfg, card, schema, objects, manifest, tuple(columns), skip, skipped, manifest_rows,
                     detector=detector, left_out=left_out)


def _check_input(cfg: ScoreConfig) -> tuple[list | None, str | None, tuple[str, ...], int, LeftOut]:
    """``(objects, manifest, columns, rows, left_out)`` of the input: a listing (and what it passed over), or a
    manifest's head; UserError if unusable."""
    objects, manifest, columns, rows, left_out = None, None, (), 0, LeftOut()
    if is_manifest(cfg.input):
        columns, rows, size = _manifest_head(cfg.input)
        if "path" not in columns:
            raise UserError(f"Manifest {cfg.input!r} has no 'path' column (columns: {', '.join(columns)}); "
                            f"add one with the image URIs.")
        if not rows and not cfg.allow_empty:
            raise UserError(f"Manifest {cfg.input!r} lists no images; pass --allow-empty to commit an empty run.")
        csv = cfg.input.lower().endswith(".csv")
        if rows and (size <= MANIFEST_ON_DRIVER_ROWS * CSV_ROW_BYTES if csv else rows <= MANIFEST_ON_DRIVER_ROWS):
            objects = _manifest_objects(cfg.input, columns)
        else:
            manifest = cfg.input if rows else None
            objects = None if rows else []
    else:
        listed = cfg.extensions + (ARCHIVE_EXTENSIONS if cfg.archives else ())
        objects, left_out = storage.list_objects(cfg.input, extensions=listed)
        if not objects and not cfg.allow_empty:
            raise UserError(f"No images under {cfg.input!r} (extensions: {', '.join(listed)}); check the "
                            f"prefix or --extensions, or pass --allow-empty to commit an empty run.")
    return objects, manifest, tuple(columns), rows, left_out


def check_faces(cfg: ScoreConfig) -> str:
    """The model id of the run's face detector (``"none"`` with ``--faces none``), loaded once here so that a
    missing or unreadable detector is one sentence before any work; :class:`UserError` otherwise."""
    if cfg.faces == "none":
        return results.NO_DETECTOR
    detector = load_detector("centerface" if cfg.faces in CENTERFACE_MODES else cfg.faces,
                             weights=cfg.detector_weights or None)
    try:
        run_options(cfg.detect_options(), detector.options())
    except ValueError as e:
        raise UserError(f"The detector {cfg.faces!r} cannot run with these options: {e}.") from e
    return detector.model_id


def execute(plan: ScorePlan) -> ScoreResult:
    """Run the pipeline and commit the run; returns its counts. Error rows do not fail the run.

    ``elapsed_s`` (and images/s) counts from a running Ray to the commit: actor start
    and model load included, starting a local Ray instance (``ray_start_s``) not.
    """
    cfg, started = plan.config, results.utc_now()
    writer = results.AttemptWriter(cfg.output, cfg.run_id, plan.schema, rows_per_file=cfg.rows_per_file)
    images = ok = actors = 0
    ray_start_s = first_batch_s = first_batch_rows = None
    precision = resolve_precision(cfg.precision, device="cuda" if cfg.num_gpus else "cpu", card=plan.card)
    profile = RunProfile(alert_classes=plan.card.alert_classes, detected=cfg.faces != "none")
    cluster: dict[str, float] = {}
    t0, cpu0 = time.monotonic(), time.process_time()
    if plan.has_work:
        actors, device = ensure_ray(cfg)
        ray_start_s, t0 = time.monotonic() - t0, time.monotonic()
        timeline.mark("ray up")
        cluster = _cluster_resources()
        log.info("scoring %s with model %s (%s, %s, %d actor(s)) into %s", cfg.input, plan.card.model_id,
                 device, precision, actors, cfg.output)
        ds = build_dataset(plan, actors=actors, device=device, precision=precision)
        progress = Progress(f"scoring {cfg.run_id}", plan.total)
        metrics = ScoringMetrics(cfg.run_id)
        timeline.mark("dataset built")
        for batch_no, table in enumerate(result_batches(ds, cfg, actors=actors, device=device), start=1):
            if first_batch_s is None:  # actor start + model load + the first batch
                first_batch_s, first_batch_rows = time.monotonic() - t0, table.num_rows
                timeline.mark("first result batch")
            writer.write(table)
            profile.update(table)  # folded as it streams: the profile never re-reads rows
            n_ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
            images, ok = images + table.num_rows, ok + n_ok
            progress.update(table.num_rows, table.num_rows - n_ok)
            metrics.record(table.num_rows, table.column("error").to_pylist() if n_ok < table.num_rows else (),
                           images / max(time.monotonic() - t0, 1e-9))
            testhooks.pause(f"score-batch-{batch_no}")
        progress.close()
        timeline.mark("last result batch")
    elapsed = time.monotonic() - t0
    counts = {"images": images, "ok": ok, "errors": images - ok, "skipped": plan.skipped,
              "left_out": {"hidden": plan.left_out.hidden, "extension": plan.left_out.extension}}
    run_profile = profile.finish(elapsed_s=elapsed, cost=cost_inputs(
        actors=actors, cpus_per_actor=1, gpus_per_actor=cfg.num_gpus if actors else 0, cluster=cluster,
        elapsed_s=elapsed, driver_cpu_s=time.process_time() - cpu0))
    record = results.commit(writer, meta={
        "counts": counts, "faces": cfg.faces, "detector": plan.detector, "model_id": plan.card.model_id, "model": cfg.model, "classes": list(plan.card.classes),
        "input": cfg.input, "precision": precision, "actors": actors, "config": config_to_dict(cfg),
        "started_at": started.isoformat(), "finished_at": results.utc_now().isoformat(), "elapsed_s": elapsed,
        "ray_start_s": ray_start_s, "first_batch_s": first_batch_s, "first_batch_rows": first_batch_rows,
        "profile": run_profile})
    timeline.mark("committed")
    if plan.has_work:
        RunGauges(cfg.run_id).record(figures(run_profile))
    return ScoreResult(cfg.run_id, record.uri, images, ok, images - ok, plan.skipped, elapsed, plan.left_out)


def cost_inputs(*, actors: int, cpus_per_actor: float, gpus_per_actor: float, cluster: dict[str, float],
                elapsed_s: float, driver_cpu_s: float) -> dict[str, float | int]:
    """What a run cost, as inputs for SQL (docs/watching-runs.md): resources held times seconds.

    ``actor_cpu_s`` / ``actor_gpu_s``: the predictor actors' reserved CPUs / GPUs x elapsed seconds;
    ``cluster_cpu_s`` / ``cluster_gpu_s``: the whole cluster's (``ray.cluster_resources()`` at the start)
    x elapsed seconds, what a dedicated cluster bills; ``driver_cpu_s``: CPU seconds this driver process used.
    """
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    return {"actors": actors, "gpus": actors * gpus_per_actor, "cluster_cpus": cpus, "cluster_gpus": gpus,
            "actor_cpu_s": actors * cpus_per_actor * elapsed_s, "actor_gpu_s": actors * gpus_per_actor * elapsed_s,
            "cluster_cpu_s": cpus * elapsed_s, "cluster_gpu_s": gpus * elapsed_s, "driver_cpu_s": driver_cpu_s}


def _cluster_resources() -> dict[str, float]:
    """The running Ray cluster's total resources (``{}`` where Ray cannot say)."""
    import ray

    try:
        return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    except Exception as e:  # noqa: BLE001 - cost inputs are best effort; the run must not fail for them
        log.warning("could not read the cluster's resources for the run's cost inputs: %s", e)
        return {}


def score(config: ScoreConfig) -> ScoreResult:
    """Check, score and commit: :func:`prepare` then :func:`execute`."""
    return execute(prepare(config))


def check_scored(config: ScoreConfig, result: ScoreResult) -> drift.CheckReport:
    """The committed run ``result`` checked against ``config.check`` (its baseline read from the Delta log)."""
    return drift.check_run(results.list_commits(config.output), drift.load_checks(config.check),
                           run_id=result.run_id)
