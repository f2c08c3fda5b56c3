"""CPU budgets: no default may wait forever for a CPU that workers or actors have already taken.

Ray Data's read and decode tasks need a whole CPU each. Training workers,
Tune trials and scoring's predictor actors reserve CPUs too; if they take
every CPU of a fixed cluster the data pipeline never runs and the job waits
without a word. These checks run on the driver before anything starts: they
pick a default that leaves a CPU free, or stop with one sentence naming the fix.
An autoscaler that can add CPUs is trusted to do so.
"""

from __future__ import annotations

import logging
import math

from maskmodel.runtime import rayshim
from maskmodel.errors import UserError

log = logging.getLogger(__name__)

DATA_CPUS = 1.0  # what the data pipeline needs at least: one task at a time
MIN_WORKER_CPUS = 0.1  # below this a worker's share of a CPU is not a plan


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster now (``ray.cluster_resources()``; 0 when none are up). Ray must be initialised."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def autoscaler_max(resource: str) -> float | None:
    """The most of ``resource`` (``GPU``, ``CPU``) the cluster's autoscaler may bring up; ``None``: no limits published.

    An autoscaler may publish its node groups (min/max nodes, resources per node)
    to the GCS; Ray Train and Ray Data read the same record to tell an autoscaling
    cluster from a fixed one. Without it (no autoscaler, or no way to read it) we
    cannot tell, so callers behave as on a fixed cluster.
    """
    limits = rayshim.autoscaler_limits()
    return None if limits is None else float(limits.get(resource, 0))


def _can_grow_to(cpus_needed: float) -> bool:
    return (autoscaler_max("CPU") or 0.0) >= cpus_needed


def cpus_per_worker(requested: float, workers: int, cluster_cpus: float, *, what: str = "training worker",
                    flag: str = "--cpus-per-worker", count_flag: str = "--num-workers", groups: int = 1,
                    extra_cpus: float = 0.0) -> float:
    """The CPUs each of ``groups * workers`` workers reserves, leaving :data:`DATA_CPUS` for the data pipeline.

    ``requested`` 0 means choose: 1 CPU each when that leaves a CPU free,
    else an even share of all but one CPU (logged). An explicit value, or a
    share under :data:`MIN_WORKER_CPUS`, that leaves no CPU free raises
    :class:`UserError`. ``extra_cpus`` (per group) is reserved besides the
    workers (a Tune trial's driver).
    """
    n = groups * workers
    reserved = groups * extra_cpus
    if requested > 0:
        left = cluster_cpus - reserved - n * requested
        if left >= DATA_CPUS or _can_grow_to(reserved + n * requested + DATA_CPUS):
            return requested
        fit = math.floor((cluster_cpus - reserved - DATA_CPUS) / n * 100) / 100
        fix = f"pass {flag} {fit:g} or use fewer {count_flag}" if fit >= MIN_WORKER_CPUS else f"use fewer {count_flag}"
        raise UserError(f"{n} {what}(s) x {requested:g} CPU leave {max(left, 0):g} of the Ray cluster's "
                        f"{cluster_cpus:g} CPUs for reading and decoding images, which needs {DATA_CPUS:g}; "
                        f"{fix}, or add CPUs.")
    if cluster_cpus - reserved - n >= DATA_CPUS or _can_grow_to(reserved + n + DATA_CPUS):
        return 1.0
    share = math.floor((cluster_cpus - reserved - DATA_CPUS) / n * 100) / 100
    if share < MIN_WORKER_CPUS:
        raise UserError(f"{n} {what}(s) cannot share the Ray cluster's {cluster_cpus:g} CPUs and leave "
                        f"{DATA_CPUS:g} for reading and decoding images; use fewer {count_flag}, or add CPUs.")
    log.info("%s auto: %g CPU each, so that %d %s(s) leave %g of %g CPUs for reading and decoding images",
             flag, share, n, what, cluster_cpus - reserved - n * share, cluster_cpus)
    return share


def check_actor_cpus(cluster_cpus: float, actors: int, *, load_tasks: bool, per_actor: float = 1.0) -> None:
    """Fail in one sentence when predictor actors (``per_actor`` CPUs each) would leave no CPU for the load step."""
    need = actors * per_actor + (DATA_CPUS if load_tasks else 0)
    if need <= cluster_cpus or _can_grow_to(need):
        return
    what = "and one for the load step " if load_tasks else ""
    raise UserError(f"{actors} predictor actor(s) need {actors * per_actor:g} CPU(s) {what}but the Ray cluster has "
                    f"{cluster_cpus:g}; pass fewer --actors{' or a smaller --actor-cpus' if per_actor > 1 else ''}, "
                    f"or add CPUs to the cluster.")


#: Most CPUs a GPU predictor actor takes by default: its host work (JPEG bytes to tensors, nvJPEG's header
#: parsing, CPU fallbacks, result rows) runs on a few threads; the load step's tasks need the rest.
MAX_GPU_ACTOR_CPUS = 4
#: CPUs per GPU actor when no GPU node is up yet (an autoscaler will start one of unknown size).
UNKNOWN_NODE_GPU_ACTOR_CPUS = 2


def gpu_actor_cpus(requested: float, nodes: list[dict], num_gpus: float) -> float:
    """The CPUs each GPU predictor actor reserves (Ray then sets its ``OMP_NUM_THREADS`` to that many).

    ``requested`` (``--actor-cpus``) when not 0; else half the CPUs per actor of the smallest GPU node in
    ``nodes`` (``ray.nodes()`` records; half, so the load step's tasks keep the rest), from 1 to
    :data:`MAX_GPU_ACTOR_CPUS`; :data:`UNKNOWN_NODE_GPU_ACTOR_CPUS` when no GPU node is up.
    """
    if requested:
        return requested
    per_actor = [n["Resources"]["CPU"] * num_gpus / n["Resources"]["GPU"] for n in nodes
                 if n.get("Alive") and n.get("Resources", {}).get("GPU") and n["Resources"].get("CPU")]
    if not per_actor:
        return UNKNOWN_NODE_GPU_ACTOR_CPUS
    return float(max(1, min(MAX_GPU_ACTOR_CPUS, int(min(per_actor) // 2))))
