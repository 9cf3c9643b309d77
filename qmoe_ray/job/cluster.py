"""The Ray cluster of a compression job: connecting to it (or starting one), what it can host, and
letting go of it.

Three settings come from the environment, read here at call time (never at import):

- ``RAY_ADDRESS``: the cluster to join when ``CompressConfig.address`` is unset (``ray job
  submit`` sets it); without either, an in-process single-node cluster is started.
- ``QMOE_RESOURCE_WAIT_S`` (seconds): how long to wait for an autoscaler to add the resources the
  workers ask for (default 300 on a cluster the job joined, 0 on a local one it started).
- ``QMOE_RESTART_TIMEOUT_S`` (seconds, default 180): how long fault recovery waits for restarted
  actors (``qmoe_ray.job.faults``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterable
from typing import Any

from qmoe_ray.errors import InputError, ResourceError
from qmoe_ray.job.config import CompressConfig

log = logging.getLogger("qmoe_ray")

RESOURCE_WAIT_ENV = "QMOE_RESOURCE_WAIT_S"
RESTART_TIMEOUT_ENV = "QMOE_RESTART_TIMEOUT_S"
DEFAULT_RESTART_TIMEOUT_S = 180.0
"""How long to wait for restarted actors (a lost node's actors need room elsewhere)."""
DEFAULT_REMOTE_RESOURCE_WAIT_S = 300.0


def address(cfg: CompressConfig) -> str | None:
    """The Ray address to join: the config's, else ``RAY_ADDRESS``; None: a local cluster."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def ray_running() -> bool:
    """Whether this process is already connected to Ray (then the job uses that cluster)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def restart_timeout_s() -> float:
    """Seconds fault recovery waits for restarted actors (``QMOE_RESTART_TIMEOUT_S``)."""
    return float(os.environ.get(RESTART_TIMEOUT_ENV, DEFAULT_RESTART_TIMEOUT_S))


def resource_wait_s(joined: bool) -> float:
    """Seconds to wait for an autoscaler (``QMOE_RESOURCE_WAIT_S``); ``joined``: the job joined
    a cluster rather than starting its own (only then can resources still appear)."""
    default = DEFAULT_REMOTE_RESOURCE_WAIT_S if joined else 0.0
    return float(os.environ.get(RESOURCE_WAIT_ENV, default))


def local_cpus() -> int:
    """CPUs of the in-process local cluster: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_local_cpus(cfg: CompressConfig) -> None:
    """Refuse, before any work, workers that a local cluster (this machine) cannot host.

    Raises:
        InputError: the workers ask for more CPUs than this machine's cores.
    """
    if address(cfg) or ray_running():
        return
    need = cfg.num_workers * cfg.cpus_per_worker
    if need > local_cpus():
        raise InputError(
            f"--num-workers {cfg.num_workers} x --cpus-per-worker {cfg.cpus_per_worker:g} = "
            f"{need:g} CPUs, but the local cluster has {local_cpus()} (this machine's cores); "
            "lower --num-workers / --cpus-per-worker, or pass --address of a larger Ray "
            "cluster")


def check_address(join: str, timeout_s: float = 5.0) -> None:
    """Refuse, in seconds, an address where nothing listens (``ray.init`` would retry for
    minutes, then fail with a traceback). Only ``HOST:PORT`` addresses are probed (``auto``
    and ``ray://`` client addresses are left to Ray).

    Raises:
        InputError: nothing accepts a connection at ``HOST:PORT`` within ``timeout_s``.
    """
    host, sep, port = join.rpartition(":")
    if not sep or "://" in join or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(
            f"--address {join}: no Ray head answers there ({reason}); start one (ray start "
            "--head) or give the address `ray start` printed (HOST:6379 by default)") from None


def ray_init(cfg: CompressConfig) -> bool:
    """Connect to (or start) Ray. Returns True when this call started it (or connected it)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    join = address(cfg)
    if not join:
        # A local single-node cluster stays on loopback: Ray otherwise resolves 127.0.0.1 to the
        # machine's external address (read when ray's constants are first imported, hence set
        # before `import ray`).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if join:
        check_address(join)
        try:
            ray.init(address=join, log_to_driver=True)
        except ConnectionError as exc:  # e.g. a cluster that wants another auth token
            raise InputError(f"--address {join}: could not join the Ray cluster: {exc}") from None
        return True
    # address="local": always a new cluster of our own, never one that `ray start` (or a stale
    # /tmp/ray/ray_current_cluster file) points at. It is sized to the machine (its cores), so
    # that check_resources refuses a request beyond it instead of starting 1000 workers.
    # Ray's notice that it made a token for the local cluster is not the user's business.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    ray.init(
        address="local",
        num_cpus=local_cpus(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=512 * 2**20,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )
    return True


def _resource_problem(cfg: CompressConfig) -> str | None:
    """Why the cluster cannot host the workers (None when it can)."""
    import ray

    have = ray.cluster_resources()
    per = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}
    for res, each in per.items():
        amount = cfg.num_workers * each
        if amount > 0 and have.get(res, 0) < amount:
            flag = "cpus" if res == "CPU" else "gpus"
            return (f"the Ray cluster has {have.get(res, 0):g} {res} but {cfg.num_workers} "
                    f"workers x {each:g} {res} = {amount:g} were asked for; lower --num-workers / "
                    f"--{flag}-per-worker or add nodes with that resource")
    # a worker must fit on one node: pack them greedily onto the alive nodes' totals
    free = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    for k in range(cfg.num_workers):
        node = next((n for n in free if all(n.get(r, 0) >= v for r, v in per.items() if v > 0)),
                    None)
        if node is None:
            largest = {r: max((n.get(r, 0) for n in free), default=0) for r in per}
            return (f"worker {k + 1} of {cfg.num_workers} fits on no node: each needs "
                    f"{per['CPU']:g} CPU and {per['GPU']:g} GPU, the nodes left have at most "
                    f"{largest['CPU']:g} CPU and {largest['GPU']:g} GPU; lower "
                    "--cpus-per-worker / --gpus-per-worker or add larger nodes")
        for r, v in per.items():
            node[r] = node.get(r, 0) - v
    return None


def ray_worker_memory(cfg: CompressConfig) -> tuple[float, str] | None:
    """Ray's figure of the memory a worker may use (``--group-size auto`` on a joined cluster):
    the ``memory`` resource of each alive node that can host a worker, shared by as many
    workers as it holds (its CPUs / GPUs over each worker's, at most ``num_workers``), the
    smallest over the nodes; None when no such node reports memory."""
    import ray

    per = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}
    best: tuple[float, str] | None = None
    for n in ray.nodes():
        res = n.get("Resources", {}) if n.get("Alive") else {}
        slots = min((int(res.get(r, 0) // v) for r, v in per.items() if v > 0), default=0)
        if slots < 1 or not res.get("memory"):
            continue
        each = float(res["memory"]) / min(slots, cfg.num_workers)
        if best is None or each < best[0]:
            best = (each, f"Ray's memory resource of node {n.get('NodeManagerAddress')}, "
                          f"{res['memory'] / 2**30:.2f} GiB, over {min(slots, cfg.num_workers)} "
                          "worker(s) on it; --worker-memory GIB to set it")
    return best


def check_resources(cfg: CompressConfig, wait_s: float = 0.0) -> None:
    """Refuse when the cluster lacks what the workers ask for (instead of hanging).

    Args:
        cfg: the job's options (workers and their CPUs/GPUs).
        wait_s: on an autoscaling cluster, ask the autoscaler for the workers' resources and wait
            up to this long for them to appear.

    Raises:
        ResourceError: naming the resource, what is asked and what the cluster has.
    """
    deadline = time.monotonic() + wait_s
    asked = False
    while True:
        problem = _resource_problem(cfg)
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise ResourceError(problem)
        if not asked:
            from ray.autoscaler.sdk import request_resources

            bundle = {"CPU": cfg.cpus_per_worker}
            if cfg.gpus_per_worker:
                bundle["GPU"] = cfg.gpus_per_worker
            request_resources(bundles=[bundle] * cfg.num_workers)
            log.warning("%s; waiting up to %.0fs for the autoscaler to add them "
                        "(%s)", problem, wait_s, RESOURCE_WAIT_ENV)
            asked = True
        time.sleep(2.0)


def shutdown() -> None:
    """Disconnect from Ray (stopping a cluster this process started); nothing if not connected.
    For callers outside the job package (benchmarks), which do not import Ray themselves."""
    if ray_running():
        import ray

        ray.shutdown()


def release(started: bool, actors: Iterable[Any]) -> None:
    """Let go of the cluster: shut down a cluster this job started or joined (``ray_init``
    returned True), else kill the job's actors, so that a shared cluster gets their CPUs/GPUs
    back now rather than at garbage collection."""
    import ray

    if started:
        ray.shutdown()
        return
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass


def actor_pids(handles: Iterable[Any]) -> list[int]:
    """The process ID of each actor (every actor class here has a ``pid`` method)."""
    import ray

    return [int(p) for p in ray.get([h.pid.remote() for h in handles])]


def object_store_mib() -> dict[str, float]:
    """The object store's plasma bytes in use and bytes spilled so far, in MiB (Ray's memory
    summary; 0 where it names neither). Raises what Ray raises when the cluster is gone."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)

    def mib(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)\s*MiB", text)
        return float(m.group(1)) if m else 0.0

    return {"plasma_mb": mib("Plasma memory usage"), "spilled_mb": mib("Spilled")}
