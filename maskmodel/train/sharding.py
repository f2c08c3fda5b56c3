"""How datasets are split across Ray Train workers.

Ray Train's default ``DataConfig`` splits every dataset with
``streaming_split(equal=True)``, which may drop up to ``world_size - 1`` rows
so that workers get equal counts. That is right for training (DDP needs the
same number of steps on every worker) and wrong for evaluation, where each
image must be counted exactly once. :class:`ExactEvalDataConfig` splits the
named evaluation datasets with ``equal=False`` instead.
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig


class ExactEvalDataConfig(DataConfig):
    """Train splits equal (may drop a few rows per epoch); ``exact`` datasets split without dropping any."""

    def __init__(self, exact: tuple[str, ...] = ("val",)) -> None:
        super().__init__(datasets_to_split="all")
        self._exact = tuple(exact)

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles, worker_node_ids,
                  **kwargs) -> list[dict[str, Any]]:
        plain = {k: v for k, v in datasets.items() if k not in self._exact}
        output = super().configure(plain, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in self._exact:
            if name not in datasets:
                continue
            ds = datasets[name].copy(datasets[name])
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            hints = worker_node_ids if self._enable_shard_locality else None
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output
