"""A cluster from ``ray start --head`` has token auth on.

Training submitted with ``ray job submit`` to such a cluster, data and outputs on S3, is
``tests/runtime/test_multinode.py::test_train_score_query_across_nodes`` (two worker nodes).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_token_auth_is_on(ray_cluster):
    # A client without the token is refused: the cluster is not open to anyone on the network.
    env = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    import subprocess

    res = subprocess.run([ray_cluster._ray, "job", "list", "--address", ray_cluster.address], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert ray_cluster.run("job", "list", "--address", ray_cluster.address).returncode == 0
