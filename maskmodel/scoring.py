"""Batch scoring on Ray Data: image objects (loose, or inside archives) in, one committed Parquet row per image out.

The pipeline streams; its memory does not grow with the number of images
(beyond a prefix listing's ~100 bytes per object on the driver; use a manifest
for huge collections)::

    list      driver: a prefix listing, or Ray reads a manifest (CSV/Parquet, `path` column)
    load      Ray tasks (on CPU fused into the actors): read, decode, crop; archives member by member
    predict   actor pool, the model loaded once per actor       (maskmodel.pipeline)
    write     driver: rolling Parquet files of this attempt     (maskmodel.results.AttemptWriter)
    commit    driver: one Delta commit, made last, adds them and replaces the run id's old files (results.commit)

:func:`prepare` makes every check a user can fail (input, model, output,
credentials) before anything runs or is written; :func:`execute` runs the
pipeline; :func:`score` does both. The per-batch steps
(:mod:`maskmodel.loading`, :mod:`maskmodel.inference`) run without Ray.

Progress: a live line in a terminal, a log line every few seconds otherwise
(:class:`maskmodel.console.Progress`); images, errors by kind and img/s are Ray
metrics (:mod:`maskmodel.telemetry`). Test-only pause point ``score-batch-<k>``
(:mod:`maskmodel.testhooks`): the driver waits after writing its k-th batch,
so a test can kill a run mid-way without racing it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from maskmodel import incremental, results, storage, testhooks
from maskmodel.config import config_to_dict, field, resolve_paths
from maskmodel.archives import ARCHIVE_EXTENSIONS, DEFAULT_MAX_RATIO, archive_kind
from maskmodel.console import Progress
from maskmodel.decode import IMAGE_EXTENSIONS
from maskmodel.errors import UserError
from maskmodel.inference import BF16_AGREEMENT_KEY, resolve_precision
from maskmodel.model import ModelCard, load_model_dir
from maskmodel.pipeline import build_dataset, ensure_ray
from maskmodel.storage import ObjectInfo
from maskmodel.telemetry import ScoringMetrics

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")


def default_run_id() -> str:
    """A UTC timestamp id such as ``20250101T020000Z``."""
    return f"{results.utc_now():%Y%m%dT%H%M%SZ}"


@dataclass(frozen=True)
class ScoreConfig:
    """Everything ``jobs.score`` needs; the resolved copy is stored in the run's Delta commit.

    Local paths become absolute here, on construction in the driver (``path=`` fields,
    :func:`maskmodel.config.resolve_paths`), so no Ray worker resolves them against its own folder.
    """

    input: str = field(path=True, help="URI of the images: a prefix (listed recursively) or a .csv/.parquet manifest "
                            "with a `path` column (paths absolute, or relative to the manifest's folder)")
    model: str = field(path=True, help="URI of a model directory written by jobs.train")
    output: str = field(path=True, help="URI of the results folder (a Delta Lake table partitioned by run_id)")
    run_id: str = field("", help="id of this run; re-using an id replaces that run (default: UTC timestamp)")
    incremental: bool = field(False, help="skip objects (same path and version) already in a committed run")
    allow_empty: bool = field(False, help="commit an empty run instead of failing when the input has no images")
    extensions: tuple[str, ...] = field(IMAGE_EXTENSIONS, help="file extensions scored under a prefix and inside "
                                                               "archives, any case")
    archives: bool = field(True, help="score the image members of .tar, .tar.gz, .tgz and .zip objects (under the "
                                      "prefix or in the manifest); a member's path is <archive>#<member>")
    max_compression_ratio: float = field(DEFAULT_MAX_RATIO, help="an archive member (or a gzip stream) expanding "
                                                                 "more than this many times is a decompression "
                                                                 "bomb: an error row")
    batch_size: int = field(0, help="images per model call (0: 64 on CPU, 512 on GPU)")
    read_batch: int = field(32, help="images per load batch (read, decode, crop)")
    read_concurrency: int = field(32, help="object reads in flight per load batch (object stores reward "
                                           "concurrency: 30 ms per request one at a time is 33 images/s)")
    decode: str = field("auto", choices=("auto", "cpu", "gpu"),
                        help="where JPEGs are decoded: gpu = nvJPEG in the predictor (the load step only checks "
                             "headers and ships the compressed bytes; other formats and failures on the GPU "
                             "decode on the CPU); auto = gpu when predictors have a GPU")
    load_tasks: bool = field(False, help="on CPU, run the load step in tasks of its own instead of inside the "
                                         "predictor actors (with GPUs it always runs in CPU tasks)")
    num_gpus: float = field(0.0, help="GPUs per predictor actor; 0 scores on CPU")
    actors: int = field(0, help="predictor actors (0: one per GPU, or one per node on CPU)")
    threads: int = field(0, help="torch threads per CPU actor (0: all cores of its node)")
    precision: str = field("auto", choices=("auto", "fp32", "bf16"),
                           help="auto: bf16 on GPU; on CPU bf16 only with native bf16 and a model.json "
                                f"'{BF16_AGREEMENT_KEY}' of 1.0, else fp32")
    max_image_bytes: int = field(64 << 20, help="objects larger than this become 'too large' error rows unread")
    rows_per_file: int = field(250_000, help="rows per output Parquet file")

    def __post_init__(self) -> None:
        resolve_paths(self)
        if self.run_id:
            results.validate_run_id(self.run_id)
        if self.decode == "gpu" and not self.num_gpus:
            raise ValueError("--decode gpu needs --num-gpus > 0 (the predictors decode on their GPU)")
        at_least = {"read_batch": 1, "max_image_bytes": 1, "max_compression_ratio": 1, "rows_per_file": 1, "batch_size": 0, "actors": 0,
                    "threads": 0, "num_gpus": 0, "read_concurrency": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}")


@dataclass(frozen=True)
class ScorePlan:
    """A checked run: resolved config, the model card, and the input (a listing or a manifest)."""

    config: ScoreConfig
    card: ModelCard
    schema: pa.Schema
    objects: list[ObjectInfo] | None       # prefix input, already filtered for --incremental
    manifest: str | None                   # manifest input (read by Ray)
    manifest_columns: tuple[str, ...] = ()
    skip_keys: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.uint64))
    skipped: int | None = 0                # None: not known up front (manifest + --incremental)
    manifest_rows: int | None = None       # rows of a Parquet manifest (a CSV's count is not known up front)

    @property
    def total(self) -> int | None:
        """Objects this run will score, when known before it starts (for the progress display)."""
        if self.objects is not None:  # an archive's members are counted only as it is read
            return None if any(archive_kind(o.uri) for o in self.objects) else len(self.objects)
        return self.manifest_rows if not len(self.skip_keys) else None

    @property
    def has_work(self) -> bool:
        return self.manifest is not None or bool(self.objects)


@dataclass(frozen=True)
class ScoreResult:
    run_id: str
    commit_uri: str
    images: int
    ok: int
    errors: int
    skipped: int | None
    elapsed_s: float

    def summary_line(self) -> str:
        rate = self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0
        skipped = f", {self.skipped} skipped as already scored" if self.skipped else ""
        return (f"{self.images} images: {self.ok} ok, {self.errors} errors{skipped}, {rate:.1f} images/s; "
                f"committed run {self.run_id} at {self.commit_uri}")


# ----------------------------------------------------------------------------- door checks

def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS)


def _manifest_head(uri: str) -> tuple[tuple[str, ...], int]:
    """Column names and (a lower bound of) the row count of a manifest, reading only its head."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    storage.info(uri)  # a clear "does not exist" / credentials message first
    fs, path = storage.filesystem(uri)
    with storage.storage_errors(uri, "read"), fs.open(path, "rb") as f:
        try:
            if not uri.lower().endswith(".csv"):
                meta = pq.ParquetFile(f).metadata
                return tuple(meta.schema.names), meta.num_rows
            reader = pacsv.open_csv(f)
            rows = 0
            for batch in reader:
                rows += batch.num_rows
                if rows:
                    break
            return tuple(reader.schema.names), rows
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"Manifest {uri!r} is not a readable {'CSV' if uri.lower().endswith('.csv') else 'Parquet'} "
                            f"file ({str(e).splitlines()[0]}); fix or regenerate it.") from e


def prepare(config: ScoreConfig) -> ScorePlan:
    """Check input, model and output and resolve the run; nothing is written (a write probe is removed).

    Raises :class:`UserError` (one sentence) for a missing or empty input
    (unless ``allow_empty``), a missing or invalid model directory, an
    output that cannot be written, or missing credentials.
    """
    cfg = dataclasses.replace(config, run_id=config.run_id or default_run_id())
    objects, manifest, columns, rows = None, None, (), 0
    if is_manifest(cfg.input):
        columns, rows = _manifest_head(cfg.input)
        if "path" not in columns:
            raise UserError(f"Manifest {cfg.input!r} has no 'path' column (columns: {', '.join(columns)}); "
                            f"add one with the image URIs.")
        if not rows and not cfg.allow_empty:
            raise UserError(f"Manifest {cfg.input!r} lists no images; pass --allow-empty to commit an empty run.")
        manifest = cfg.input if rows else None
        objects = None if rows else []
    else:
        listed = cfg.extensions + (ARCHIVE_EXTENSIONS if cfg.archives else ())
        objects = storage.list_files(cfg.input, extensions=listed)
        if not objects and not cfg.allow_empty:
            raise UserError(f"No images under {cfg.input!r} (extensions: {', '.join(listed)}); check the "
                            f"prefix or --extensions, or pass --allow-empty to commit an empty run.")
    model, card = load_model_dir(cfg.model)  # proves the weights load, not just that model.json parses
    del model
    try:
        schema = results.results_schema(card.classes)
    except ValueError as e:
        raise UserError(f"{cfg.model!r}: {e}; rename the classes in model.json.") from e
    storage.check_writable(cfg.output)
    results.check_output(cfg.output)
    skip, skipped = np.empty(0, np.uint64), 0
    if cfg.incremental:
        skip = incremental.committed_keys(cfg.output, exclude_run_id=cfg.run_id)
        if objects is not None:
            seen = incremental.contains(skip, incremental.object_keys([o.uri for o in objects], [o.version for o in objects]))
            objects, skipped = [o for o, s in zip(objects, seen) if not s], int(seen.sum())
            if not any(archive_kind(o.uri) for o in objects):
                skip = np.empty(0, np.uint64)  # applied; archives left to read skip their scored members with it
        else:
            skipped = None
    manifest_rows = rows if manifest and not manifest.lower().endswith(".csv") else None
    return ScorePlan(cfg, card, schema, objects, manifest, tuple(columns), skip, skipped, manifest_rows)


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
    t0 = time.monotonic()
    if plan.has_work:
        actors, device = ensure_ray(cfg)
        ray_start_s, t0 = time.monotonic() - t0, time.monotonic()
        log.info("scoring %s with model %s (%s, %s, %d actor(s)) into %s", cfg.input, plan.card.model_id,
                 device, precision, actors, cfg.output)
        ds = build_dataset(plan, actors=actors, device=device, precision=precision)
        progress = Progress(f"scoring {cfg.run_id}", plan.total)
        metrics = ScoringMetrics(cfg.run_id)
        for batch_no, table in enumerate(ds.iter_batches(batch_format="pyarrow", batch_size=None), start=1):
            if first_batch_s is None:  # actor start + model load + the first batch
                first_batch_s, first_batch_rows = time.monotonic() - t0, table.num_rows
            writer.write(table)
            n_ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
            images, ok = images + table.num_rows, ok + n_ok
            progress.update(table.num_rows, table.num_rows - n_ok)
            metrics.record(table.num_rows, table.column("error").to_pylist() if n_ok < table.num_rows else (),
                           images / max(time.monotonic() - t0, 1e-9))
            testhooks.pause(f"score-batch-{batch_no}")
        progress.close()
    elapsed = time.monotonic() - t0
    counts = {"images": images, "ok": ok, "errors": images - ok, "skipped": plan.skipped}
    record = results.commit(writer, meta={
        "counts": counts, "model_id": plan.card.model_id, "model": cfg.model, "classes": list(plan.card.classes),
        "input": cfg.input, "precision": precision, "actors": actors, "config": config_to_dict(cfg),
        "started_at": started.isoformat(), "finished_at": results.utc_now().isoformat(), "elapsed_s": elapsed,
        "ray_start_s": ray_start_s, "first_batch_s": first_batch_s, "first_batch_rows": first_batch_rows})
    return ScoreResult(cfg.run_id, record.uri, images, ok, images - ok, plan.skipped, elapsed)


def score(config: ScoreConfig) -> ScoreResult:
    """Check, score and commit: :func:`prepare` then :func:`execute`."""
    return execute(prepare(config))
