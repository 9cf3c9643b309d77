"""Ray actor wrappers around the plain store, worker and writer classes, and their fault policy.

- Workers are stateless between calls: ``max_restarts=-1`` and ``max_task_retries=-1``, so a
  worker that dies mid-group (process crash, lost node) is restarted and the group is retried by
  Ray itself; the result is the same bytes, since a group's quantization is deterministic.
- Stores and the writer hold state that a restart loses (the residual stream; a layer's encoded
  groups). They restart (``max_restarts=-1``) but their calls are *not* retried
  (``max_task_retries=0``): the failure reaches the driver, which restores every store from the
  last activation checkpoint and redoes the layer (``qmoe_ray.job.faults``).
- Stores are spread over the nodes (``SPREAD``), so their memory is too, and losing a node loses
  only some of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from qmoe_ray.job.config import CompressConfig, StorageOptions
from qmoe_ray.job.group import QuantOptions
from qmoe_ray.job.progress import Progress
from qmoe_ray.job.stores import ActivationStore
from qmoe_ray.job.workers import QuantWorker
from qmoe_ray.job.writer import CheckpointWriter


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class ActivationStoreActor(ActivationStore):
    """A store whose batches' state lives in Ray's object store (spilled to disk when full).

    Its constructor arguments are small (URLs, options, a batch range), so Ray keeps them inline
    and can always restart it: the samples and the source's index are read from the job's
    progress folder at the output (``Progress.save_inputs``, ``Progress.save_source_index``,
    written by the driver), on the first start and after a restart alike.
    """

    def __init__(self, source: str, storage_options: Mapping[str, Any], batch_size: int,
                 first_batch: int, num_batches: int, output: str,
                 output_options: Mapping[str, Any], trim: Any = None):
        prog = Progress(output, output_options)
        parts = [prog.load_inputs(first_batch + i) for i in range(num_batches)]
        inputs = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        calib = np.concatenate([p[1] for p in parts])
        super().__init__(source, storage_options, inputs, calib, batch_size,
                         keep=lambda s: ray.put(s), fetch=lambda r: ray.get(r),
                         first_batch=first_batch, output=output, output_options=output_options,
                         index=prog.load_source_index(), trim=trim)

    def node_id(self) -> str:
        """The Ray node this store runs on."""
        return _node_id()

    def pid(self) -> int:
        """The store's process id (for fault tests and operators)."""
        return os.getpid()


@ray.remote(max_restarts=-1, max_task_retries=-1)
class QuantWorkerActor:
    """A quantization worker (its resources are set by ``make_actors``); it opens the source by
    the index in the job's progress folder at ``output``."""

    def __init__(self, source: str, storage_options: Mapping[str, Any], opts: QuantOptions,
                 threads: int, device: str, output: str, output_options: Mapping[str, Any],
                 trim: Any = None):
        index = Progress(output, output_options).load_source_index()
        self.worker = QuantWorker(source, storage_options, opts, threads=threads, device=device,
                                  index=index, trim=trim)

    def run(self, layer, group, experts, cap, target_bits, *parts):
        enc, outputs = self.worker.run(layer, group, experts, parts, cap, target_bits)
        return (enc, *outputs)

    def ping(self) -> str:
        """Workers keep no state between calls: any incarnation will do."""
        return "worker"

    def node_id(self) -> str:
        """The Ray node this worker runs on."""
        return _node_id()

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class CheckpointWriterActor(CheckpointWriter):
    """The checkpoint writer; it opens the source by the index in the job's progress folder."""

    def __init__(self, output: str, output_options: Mapping[str, Any], source: str,
                 source_options: Mapping[str, Any], drop_mtp: bool = False):
        index = Progress(output, output_options).load_source_index()
        super().__init__(output, output_options, source, source_options, index, drop_mtp)

    def node_id(self) -> str:
        """The Ray node the writer runs on."""
        return _node_id()

    def pid(self) -> int:
        """The writer's process id."""
        return os.getpid()


@dataclass
class Actors:
    """A job's actor handles."""

    stores: list[Any]
    workers: list[Any]
    writer: Any

    def all(self) -> list[Any]:
        """Every actor: stores, workers, the writer."""
        return [*self.stores, *self.workers, self.writer]


def split_batches(n: int, batch_size: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous sample ranges of whole batches for ``parts`` stores (some may be empty)."""
    nb = math.ceil(n / batch_size)
    per = [nb // parts + (1 if i < nb % parts else 0) for i in range(parts)]
    out, b = [], 0
    for p in per:
        out.append((min(b * batch_size, n), min((b + p) * batch_size, n)))
        b += p
    return [r for r in out if r[1] > r[0]]


def save_inputs(prog: Progress, inputs: Mapping[str, np.ndarray], is_calib: np.ndarray,
                batch_size: int) -> None:
    """Write every batch's inputs to the job's progress folder (see ``ActivationStoreActor``)."""
    for i, a in enumerate(range(0, len(is_calib), batch_size)):
        prog.save_inputs(i, {k: v[a: a + batch_size] for k, v in inputs.items()},
                         is_calib[a: a + batch_size])


def make_actors(cfg: CompressConfig, storage: StorageOptions, source: str, opts: QuantOptions,
                num_samples: int, trim: Any = None) -> Actors:
    """Create the stores (contiguous whole batches each, their samples read from the progress
    folder that ``save_inputs`` wrote), the workers and the writer; each opens the source by the
    index that ``Progress.save_source_index`` wrote there. ``trim`` (a ``TrimPlan``): the stores
    and workers run the trimmed model (the writer writes what the driver asks for)."""
    stores = []
    for a, b in split_batches(num_samples, cfg.batch_size, cfg.num_stores):
        first = a // cfg.batch_size
        stores.append(ActivationStoreActor.options(max_concurrency=1, scheduling_strategy="SPREAD").remote(
            source, storage.source, cfg.batch_size, first, -(-b // cfg.batch_size) - first,
            cfg.output, storage.output, trim))
    device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
    workers = [
        QuantWorkerActor.options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker).remote(
            source, storage.source, opts, max(1, int(cfg.cpus_per_worker)), device, cfg.output,
            storage.output, trim)
        for _ in range(cfg.num_workers)
    ]
    writer = CheckpointWriterActor.remote(cfg.output, storage.output, source, storage.source,
                                          drop_mtp=cfg.drop_mtp)
    return Actors(stores, workers, writer)
