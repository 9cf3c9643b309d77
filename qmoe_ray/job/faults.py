"""Fault recovery of a compression job: the one place that tells a cluster failure from a job
error, and the one retry loop around every step that stateful actors take part in.

A failure that comes from the cluster (an actor or node lost, an object lost), or a stateful actor
(a store, the writer) found restarted, is recovered by waiting for every actor to answer again,
restoring every store from the last activation checkpoint and redoing the step; since every step
is deterministic, the bytes are those of an undisturbed run. Any other error is the job's own and
is raised at once (see ``qmoe_ray.job.actors`` for which actors Ray restarts and retries itself).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from qmoe_ray.errors import ResourceError

log = logging.getLogger("qmoe_ray")

T = TypeVar("T")

MAX_ATTEMPTS = 4
"""Tries per step when the cluster fails under it (lost actors/nodes); job errors are not retried."""


def system_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the cluster failing rather than the job."""
    import ray.exceptions as rex

    system = (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError,
              rex.WorkerCrashedError, rex.NodeDiedError, rex.RaySystemError,
              rex.ObjectFetchTimedOutError, rex.OutOfMemoryError)
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, system):
            return True
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return False


def incarnations(actors: Any, timeout: float) -> list[str]:
    """Each stateful actor's incarnation (stores, then the writer)."""
    import ray

    return ray.get([a.ping.remote() for a in [*actors.stores, actors.writer]], timeout=timeout)


def recoverable(exc: BaseException, actors: Any, known: list[str]) -> bool:
    """A cluster failure, or a stateful actor restarted (its calls then fail as job errors)."""
    if system_failure(exc):
        return True
    try:
        return incarnations(actors, 10.0) != known
    except Exception:  # noqa: BLE001 - an actor that cannot answer is a cluster failure too
        return True


def recover(actors: Any, redo: int | None, after: int | None, timeout_s: float) -> list[str]:
    """Wait for every actor to answer (restarted ones included), then put the stores back to the
    stream after layer ``after`` and drop the writer's held groups of layer ``redo``.

    Returns:
        The stateful actors' incarnations after recovery.

    Raises:
        ResourceError: the actors did not come back within ``timeout_s`` (the message names
            what the cluster lacks).
    """
    import ray

    deadline = time.monotonic() + timeout_s
    everyone = [*actors.stores, *actors.workers, actors.writer]
    while True:
        try:
            ray.get([a.ping.remote() for a in everyone],
                    timeout=max(1.0, deadline - time.monotonic()))
            break
        except Exception as exc:  # noqa: BLE001 - restarting actors answer with several errors
            if time.monotonic() >= deadline:
                raise ResourceError(
                    f"actors lost with their node(s) were not restarted within "
                    f"{timeout_s:.0f}s ({type(exc).__name__}); the cluster has "
                    f"{ray.available_resources()} available: add nodes or lower --num-workers"
                ) from exc
            time.sleep(0.5)
    if redo is not None:
        ray.get(actors.writer.discard_layer.remote(redo))
    ray.get([s.restore.remote(after) for s in actors.stores])
    return incarnations(actors, 60.0)


@dataclass
class Guard:
    """Runs the job's steps with recovery: holds the actors, the stateful actors' incarnations
    as last seen, and what recovery cost (``recoveries``, ``seconds``)."""

    actors: Any
    timeout_s: float
    known: list[str] | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.recoveries: list[dict[str, Any]] = []
        if self.known is None:
            self.known = incarnations(self.actors, 600.0)

    def run(self, step: Callable[[int], T], failure: str, redo: int | None,
            after: int | None, name: str | None = None) -> tuple[T, int]:
        """``step(attempt)`` until it succeeds, recovering from cluster failures in between.

        Args:
            step: the step; called with the attempt number (1, 2, ...).
            failure: what failed, as the error message starts (``compression failed at layer
                X``).
            redo: the layer index whose groups the writer drops before a retry (None: none).
            after: the last layer done (the stores are restored to the stream after it).
            name: the step in the log and in ``recoveries`` (a layer's name; None: the step's
                recoveries are not recorded).

        Returns:
            The step's result and the attempt that gave it.

        Raises:
            RuntimeError: ``failure`` (and the attempt), from a job error or when the cluster
                failed ``MAX_ATTEMPTS`` times.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return step(attempt), attempt
            except Exception as exc:
                if attempt == MAX_ATTEMPTS or not recoverable(exc, self.actors, self.known):
                    why = "" if attempt == 1 else f" (attempt {attempt})"
                    raise RuntimeError(f"{failure}{why}: {exc}") from exc
                log.warning("%s: the cluster failed under it (%s: %s); restoring the stores "
                            "and redoing it", name or failure, type(exc).__name__,
                            str(exc).splitlines()[0][:200] if str(exc) else "")
                t0 = time.perf_counter()
                self.known = recover(self.actors, redo, after, self.timeout_s)
                self.seconds += time.perf_counter() - t0
                if name is not None:
                    self.recoveries.append({"layer": name, "attempt": attempt,
                                            "error": type(exc).__name__})
        raise AssertionError("unreachable")
