"""The Ray side of scoring: where the objects come from, the load step, the predictor actor pool.

::

    list       a prefix listing or a small manifest (driver), or Ray reads a large manifest (CSV/Parquet)
    load       loose objects: read many at once, decode, crop   (maskmodel.score.loading.load_batch)
               archives: one task per tar, per range of a zip's members (zip_ranges, load_archive)
    predict    actor pool: the model loaded once per actor     (maskmodel.score.inference.Predictor)

The pipeline streams: its memory does not grow with the number of images.
:func:`ensure_ray` starts or joins Ray and sizes the actor pool;
:func:`build_dataset` returns the lazy dataset of result rows that
:func:`maskmodel.score.scoring.execute` writes and commits.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterator

import pyarrow as pa

from maskmodel.runtime import rayshim, timeline
from maskmodel.errors import UserError
from maskmodel.io import paths, storage
from maskmodel.io.archives import archive_kind
from maskmodel.io.storage import ObjectInfo
from maskmodel.runtime.raysession import init_ray
from maskmodel.runtime.resources import autoscaler_max, check_actor_cpus, cluster_cpus, gpu_actor_cpus
from maskmodel.score.inference import Predictor
from maskmodel.score.loading import load_archive, load_batch, zip_ranges
from maskmodel.score.plan import MANIFEST_COLUMNS, ScoreConfig, ScorePlan

log = logging.getLogger(__name__)

MAX_INPUT_BLOCKS = 10_000


def _source(plan: ScorePlan):
    """The objects to score as ``(loose, archives)`` datasets of ``path`` [, ``version``, ``size``]; ``None`` if empty."""
    import ray

    cfg = plan.config
    if plan.objects is not None:
        loose = [o for o in plan.objects if not archive_kind(o.uri)]
        packed = [o for o in plan.objects if archive_kind(o.uri)]

        def table(objs: list[ObjectInfo], per_block: int):
            if not objs:
                return None
            t = pa.table({"path": pa.array([o.uri for o in objs], pa.string()),
                          "version": pa.array([o.version for o in objs], pa.string()),
                          "size": pa.array([o.size for o in objs], pa.int64())})
            blocks = min(MAX_INPUT_BLOCKS, -(-len(objs) // per_block))
            rows = -(-len(objs) // blocks)
            # from_blocks, not from_arrow: from_arrow runs one Ray task per block for its metadata and waits for
            # them, which in a fresh local Ray means waiting for a worker process to start (about 1 s here).
            return ray.data.from_blocks([t.slice(i, rows) for i in range(0, len(objs), rows)])

        return table(loose, cfg.read_batch), table(packed, 1)
    fs, path = storage.pyarrow_filesystem(plan.manifest)
    keep = [c for c in MANIFEST_COLUMNS if c in plan.manifest_columns]
    if plan.manifest.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        ds = ray.data.read_csv(path, filesystem=fs, convert_options=pacsv.ConvertOptions(
            column_types={c: MANIFEST_COLUMNS[c] for c in keep}, include_columns=keep))
    else:
        ds = ray.data.read_parquet(path, filesystem=fs, columns=keep)
    ds = ds.map_batches(_resolve_paths, fn_kwargs={"base": manifest_base(plan.manifest)}, batch_format="pyarrow")
    if not cfg.archives:
        return ds, None
    # Vectorised over Arrow batches (a row-wise ``ds.filter(fn)`` is slower, and Ray warns about it).
    return (ds.map_batches(_only, fn_kwargs={"archives": False}, batch_format="pyarrow"),
            ds.map_batches(_only, fn_kwargs={"archives": True}, batch_format="pyarrow"))


def _only(batch: pa.Table, *, archives: bool) -> pa.Table:
    """The rows of a manifest batch that are archives (``archives=True``) or loose objects."""
    keep = [(archive_kind(p) is not None) == archives for p in batch.column("path").to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


def manifest_base(manifest: str) -> str:
    """The folder a manifest's relative paths are under: the manifest's own (:func:`maskmodel.io.paths.entry_folder`)."""
    return paths.entry_folder(manifest)


def resolve_manifest_path(base: str, path: str) -> str:
    """A manifest entry as the URI a prefix listing would give (the one rule: :func:`maskmodel.io.paths.resolve_entry`)."""
    return paths.resolve_entry(base, path)


def _resolve_paths(table: pa.Table, *, base: str) -> pa.Table:
    paths = [resolve_manifest_path(base, p) for p in table.column("path").to_pylist()]
    return table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths, pa.string()))


def ensure_ray(cfg: ScoreConfig) -> tuple[int, str]:
    """Start or join Ray; return ``(actors, device)`` for the predictor pool.

    With ``--num-gpus`` and fewer GPUs up than one actor needs, the run goes on
    (its pending GPU actors make the autoscaler add nodes) when ``--actors`` is
    given or the cluster's autoscaler can add GPUs; otherwise :class:`UserError`.
    The wait for those GPUs is bounded by ``--gpu-wait-s`` (:func:`result_batches`).
    """
    import ray

    # Joins RAY_ADDRESS (a cluster, or `ray job submit`) if set, else starts a local Ray; scoring's workers are
    # quiet through the environment alone, so a local Ray's prestarted workers serve the job.
    init_ray(env_is_enough=True, local={"include_dashboard": None if cfg.dashboard else False})
    if cfg.num_gpus:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus >= cfg.num_gpus:
            actors = cfg.actors or max(1, int(gpus // cfg.num_gpus))
            check_actor_cpus(cluster_cpus(), actors, load_tasks=True, per_actor=actor_cpus(cfg))
            return actors, "cuda"
        most = autoscaler_max("GPU")
        if most is not None and most < cfg.num_gpus:
            raise UserError(f"--num-gpus {cfg.num_gpus:g} but the Ray cluster has {gpus:g} GPUs and its "
                            f"autoscaler can add at most {most:g}; use --num-gpus 0 to score on CPU, or give the "
                            f"cluster a GPU node group.")
        if rayshim.started_local_ray():  # a Ray instance of this process: nothing will ever add a GPU
            raise UserError(f"--num-gpus {cfg.num_gpus:g} but this machine has {gpus:g} GPUs; use --num-gpus 0 "
                            f"to score on CPU, or set RAY_ADDRESS to a cluster with GPU nodes.")
        if not cfg.actors and most is None:
            raise UserError(f"--num-gpus {cfg.num_gpus:g} but the Ray cluster has {gpus:g} GPUs; use --num-gpus 0 "
                            f"to score on CPU, or pass --actors N to wait for an autoscaler to start GPU nodes.")
        # Without --actors: one per GPU the autoscaler may add (1 if it has no upper limit).
        actors = cfg.actors or (max(1, int(most // cfg.num_gpus)) if most < sys.maxsize else 1)
        log.info("the Ray cluster has %g GPUs now; waiting for the autoscaler to start GPU nodes for %d predictor "
                 "actor(s) of %g GPU", gpus, actors, cfg.num_gpus)
        return actors, "cuda"
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
    actors = cfg.actors or max(1, len(nodes))
    check_actor_cpus(cluster_cpus(), actors, load_tasks=cfg.load_tasks)
    return actors, "cpu"


def actor_cpus(cfg: ScoreConfig) -> float:
    """CPUs per GPU predictor actor (:func:`maskmodel.runtime.resources.gpu_actor_cpus`). Ray must be initialised."""
    import ray

    return gpu_actor_cpus(cfg.actor_cpus, ray.nodes(), cfg.num_gpus)


def result_batches(ds, cfg: ScoreConfig, *, actors: int, device: str) -> Iterator[pa.Table]:
    """The result tables of ``ds`` (from :func:`build_dataset`) as they come.

    On GPUs, Ray Data waits at most ``--gpu-wait-s`` for the predictor actors to start
    (``DataContext.wait_for_min_actors_s``, set by :func:`build_dataset`; Ray's default
    waits forever); when they do not, :class:`UserError` says so in one sentence.
    """
    import ray

    try:
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    except ray.exceptions.GetTimeoutError as e:
        if device != "cuda":
            raise
        gpus = ray.cluster_resources().get("GPU", 0)
        raise UserError(f"--num-gpus {cfg.num_gpus:g}: the {actors} predictor actor(s) did not start within "
                        f"--gpu-wait-s {cfg.gpu_wait_s} s (the Ray cluster has {gpus:g} GPUs); give the cluster GPU "
                        f"nodes or an autoscaler that can start them, raise --gpu-wait-s, or pass --num-gpus 0 to "
                        f"score on CPU.") from e


def build_dataset(plan: ScorePlan, *, actors: int, device: str, precision: str):
    """The lazy Ray Dataset of result rows (pyarrow blocks of ``plan.schema``)."""
    import ray

    cfg = plan.config
    gpu = device == "cuda"
    # On CPU both steps ask for one CPU, so Ray fuses the load step into the actor: loading runs
    # between forward passes, never competes with torch's threads (which use every core), and no
    # pixels cross the object store (measured against separate tasks: benchmarks/README.md). With
    # GPUs the resources differ, so the load step runs in CPU tasks on every core, feeding the GPU
    # actors uint8 crops, or, with GPU decoding, the compressed bytes. --load-tasks on CPU keeps
    # the steps apart: Ray Data never fuses an operator that has a ray_remote_args_fn.
    separate = {"ray_remote_args_fn": _one_cpu} if cfg.load_tasks and not gpu else {}
    # With a face stage the load step decodes each picture whole, once, bounded by --max-pixels: on CPU that
    # stays inside the actor; with GPUs this bounded uint8 picture is what crosses the object store.
    faces = cfg.faces != "none"
    common = {"card": plan.card, "max_bytes": cfg.max_image_bytes, "gpu_decode": gpu and cfg.decode != "cpu",
              "skip_keys": plan.skip_keys if len(plan.skip_keys) else None,
              "max_pixels": cfg.max_pixels if faces else None}
    # A bounded wait for the actors' GPUs (Ray's default, -1, waits forever): see result_batches. Set before the
    # source dataset is made, which copies the driver's DataContext; a CPU run gets Ray's default back.
    from ray.data.context import DEFAULT_WAIT_FOR_MIN_ACTORS_S

    ray.data.DataContext.get_current().wait_for_min_actors_s = cfg.gpu_wait_s if gpu else DEFAULT_WAIT_FOR_MIN_ACTORS_S
    loose, packed = _source(plan)
    parts = []
    if loose is not None:
        # Fused into a CPU actor, the load step has the actor's cores to itself while it runs.
        threads = (cfg.threads or _node_cpus()) if not gpu and not separate else 1
        parts.append(loose.map_batches(_load_loose, batch_size=cfg.read_batch, batch_format="numpy",
                                       fn_kwargs={**common, "concurrency": cfg.read_concurrency,
                                                  "decode_threads": threads}, num_cpus=1, **separate))
    if packed is not None:
        # One task per tar (read front to back through one GET) and per range of a zip's members.
        ranges = packed.map_batches(zip_ranges, batch_size=8, batch_format="numpy", num_cpus=1)
        parts.append(ranges.map_batches(load_archive, batch_size=1, batch_format="numpy", num_cpus=1,
                                        fn_kwargs={**common, "extensions": cfg.extensions,
                                                   "rows_per_batch": cfg.read_batch,
                                                   "max_ratio": cfg.max_compression_ratio}, **separate))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    # A GPU actor gets CPUs for its host work and as many torch threads (Ray would set OMP_NUM_THREADS=1 for
    # one CPU, making every host op single-threaded); a CPU actor's threads are --threads (0: all of its node's).
    cpus = actor_cpus(cfg) if gpu else 1
    return ds.map_batches(
        Predictor, batch_size=cfg.predict_batch(device), batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model_uri": cfg.model, "run_id": cfg.run_id, "precision": precision,
                               "device": device, "threads": max(1, int(cpus)) if gpu else cfg.threads,
                               "faces": cfg.faces, "detector_weights": cfg.detector_weights,
                               "detect_options": cfg.detect_options()},
        num_gpus=cfg.num_gpus if gpu else None, num_cpus=cpus)


_loaded_once = False


def _load_loose(batch: dict, **kwargs) -> dict:
    """:func:`load_batch`, its first call in each process marked on the timeline (:mod:`maskmodel.runtime.timeline`)."""
    global _loaded_once
    if _loaded_once:
        return load_batch(batch, **kwargs)
    timeline.mark("first load start", "load")
    out = load_batch(batch, **kwargs)
    timeline.mark("first load done", "load")
    _loaded_once = True
    return out


def _node_cpus() -> int:
    """CPUs of the smallest node with CPUs: what a predictor actor's threads default to (a conservative guess)."""
    import ray

    cpus = [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
    return max(1, int(min(cpus))) if cpus else 1


def _one_cpu() -> dict:
    return {"num_cpus": 1}
