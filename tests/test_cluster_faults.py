"""Faults on a multi-node cluster (``ray.cluster_utils.Cluster``, every node on 127.0.0.1): the node
running a quantization worker and the node holding an activation store are removed mid-layer (a
replacement node joins, as an autoscaler would add one), and the job still writes the bytes of an
undisturbed run; and the same bytes on 1, 2 and 3 workers/stores."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from resume_helpers import assert_same_bytes, files, job_cfg, make_tiny_mixtral

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Every non-head node offers "store_slot"s and the stores ask for one (``_stores_off_head``): left to
# SPREAD alone, the CPU-less head may hold every store, and then no node can be removed under one.
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20,
        "resources": {"store_slot": 3}}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def cluster():
    """A CPU-less head (driver, writer) and three 1-CPU nodes; node deaths noticed within ~2 s."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "object_store_memory": 100 * 2**20,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 3,
                           "health_check_timeout_ms": 500}})
    for _ in range(3):
        c.add_node(**NODE)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def clean(cluster, model, tmp_path_factory) -> dict[str, bytes]:
    from qmoe_ray.job.driver import run_compression

    out = tmp_path_factory.mktemp("clean")
    run_compression(job_cfg(model, out, num_workers=1, num_stores=1), progress=False)
    return files(out)


def _node_of(cluster, node_id: str):
    for n in cluster.worker_nodes:
        if n.node_id == node_id:
            return n
    return None  # the head


class NodeKiller:
    """A driver hook that removes one node at the first dispatch of a group in layer 1, and
    adds a replacement; ``pick(actors)`` names the node id to remove."""

    def __init__(self, cluster, pick):
        self.cluster, self.pick, self.removed = cluster, pick, None

    def __call__(self, event, info):
        import ray

        if self.removed or event != "group_dispatched" or info["layer"].index != 1:
            return
        node_id = self.pick(ray, info)
        node = _node_of(self.cluster, node_id)
        assert node is not None, "the chosen actor runs on the head node"
        self.cluster.remove_node(node, allow_graceful=False)
        self.removed = node_id
        self.cluster.add_node(**NODE)
        self.cluster.wait_for_nodes()


def test_lost_worker_node_mid_layer(cluster, model, clean, tmp_path):
    from qmoe_ray.job.driver import run_compression

    def worker_node(ray, info):  # the node of the worker that just got the group
        return ray.get(info["actors"].workers[info["worker"]].node_id.remote())

    killer = NodeKiller(cluster, worker_node)
    out = tmp_path / "out"
    rep = run_compression(job_cfg(model, out, num_workers=2, num_stores=2), progress=False,
                          hook=killer)
    assert killer.removed
    assert_same_bytes(files(out), clean)
    assert rep["resumed_after_layers"] == 0


@pytest.fixture
def _stores_off_head(monkeypatch):
    """Make ``make_actors`` place each store on a non-head node (one "store_slot" each)."""
    from qmoe_ray.job import actors

    real = actors.ActivationStoreActor

    class Pinned:
        @staticmethod
        def options(**kw):
            return real.options(resources={"store_slot": 1}, **kw)

    monkeypatch.setattr(actors, "ActivationStoreActor", Pinned)


def test_lost_store_node_mid_layer(cluster, model, clean, tmp_path, _stores_off_head):
    from qmoe_ray.job.driver import run_compression

    def store_node(ray, info):  # a node holding a store (not the head)
        head = cluster.head_node.node_id
        nodes = ray.get([s.node_id.remote() for s in info["actors"].stores])
        assert head not in nodes, "a store was placed on the head despite store_slot"
        return nodes[0]

    killer = NodeKiller(cluster, store_node)
    out = tmp_path / "out"
    rep = run_compression(job_cfg(model, out, num_workers=3, num_stores=3), progress=False,
                          hook=killer)
    assert killer.removed
    assert rep["recoveries"] and rep["recoveries"][0]["layer"] == "model.layers.1"
    assert_same_bytes(files(out), clean)


def test_missing_resources_are_named_not_waited_for(cluster, model, tmp_path, monkeypatch):
    from qmoe_ray.job.cluster import check_resources
    from qmoe_ray.job.driver import run_compression

    monkeypatch.setenv("QMOE_RESOURCE_WAIT_S", "0")
    with pytest.raises(RuntimeError, match=r"has 0 GPU but 1 workers x 1 GPU"):
        run_compression(job_cfg(model, tmp_path / "a", gpus_per_worker=1), progress=False)
    # 3 CPUs in all, but one per node: a 2-CPU worker fits nowhere
    with pytest.raises(RuntimeError, match=r"worker 1 of 1 fits on no node: each needs 2 CPU"):
        run_compression(job_cfg(model, tmp_path / "b", cpus_per_worker=2), progress=False)
    # with a wait, the autoscaler is asked for the bundles first, then the same message
    with pytest.raises(RuntimeError, match="fits on no node"):
        check_resources(job_cfg(model, tmp_path / "c", cpus_per_worker=2), wait_s=1.0)
    assert not (tmp_path / "a" / "progress").exists()  # refused before the job was recorded


def test_failed_job_releases_its_actors(cluster, model, tmp_path):
    """On a shared cluster a job that fails frees its workers' CPUs at once, even while the
    caller still holds the exception (whose traceback references the driver's frames)."""
    import ray

    from qmoe_ray.job.driver import run_compression

    def boom(event, info):
        if event == "group_dispatched":
            raise ValueError("injected failure")

    with pytest.raises(RuntimeError, match="injected failure") as held:
        run_compression(job_cfg(model, tmp_path / "o", num_workers=2, num_stores=2),
                        progress=False, hook=boom)
    free = None
    for _ in range(100):  # kills are asynchronous: up to 10 s
        free = ray.available_resources().get("CPU", 0)
        if free == ray.cluster_resources().get("CPU"):
            break
        time.sleep(0.1)
    assert free == ray.cluster_resources().get("CPU"), (free, held.value)
    assert not (tmp_path / "o" / "manifest.json").exists()
