"""Ray actor wrappers around the plain store, worker and writer classes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from qmoe_ray.compress import QuantOptions
from qmoe_ray.config import CompressConfig, StorageOptions
from qmoe_ray.distributed.reducer import CheckpointWriter
from qmoe_ray.distributed.stores import ActivationShard
from qmoe_ray.distributed.workers import GroupWorker


@ray.remote(num_cpus=0)
class ActivationStore(ActivationShard):
    """A store whose batches' state lives in Ray's object store (spilled to disk when full)."""

    def __init__(self, source: str, storage_options: Mapping[str, Any], inputs: Mapping[str, np.ndarray],
                 calib: np.ndarray, batch_size: int):
        super().__init__(source, storage_options, inputs, calib, batch_size,
                         keep=lambda s: ray.put(s), fetch=lambda r: ray.get(r))


@ray.remote
class QuantWorker:
    """A quantization worker (its resources are set by ``make_actors``)."""

    def __init__(self, source: str, storage_options: Mapping[str, Any], opts: QuantOptions,
                 threads: int, device: str):
        self.worker = GroupWorker(source, storage_options, opts, threads=threads, device=device)

    def run(self, layer, group, experts, cap, *parts):
        enc, outputs = self.worker.run(layer, group, experts, parts, cap)
        return (enc, *outputs)


@ray.remote(num_cpus=0)
class Writer(CheckpointWriter):
    """The checkpoint writer."""


@dataclass
class Actors:
    stores: list[Any]
    workers: list[Any]
    writer: Any


def make_actors(cfg: CompressConfig, storage: StorageOptions, source: str, opts: QuantOptions,
                inputs: Mapping[str, np.ndarray], is_calib: np.ndarray) -> Actors:
    """Create the stores (contiguous whole batches each), the workers and the writer."""
    from qmoe_ray.distributed.driver import split_batches

    n = len(is_calib)
    stores = []
    for i, (a, b) in enumerate(split_batches(n, cfg.batch_size, cfg.num_stores)):
        part = {k: np.ascontiguousarray(v[a:b]) for k, v in inputs.items()}
        stores.append(ActivationStore.options(name=None, max_concurrency=1).remote(
            source, storage.source, part, is_calib[a:b], cfg.batch_size))
    device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
    workers = [
        QuantWorker.options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker).remote(
            source, storage.source, opts, max(1, int(cfg.cpus_per_worker)), device)
        for _ in range(cfg.num_workers)
    ]
    writer = Writer.remote(cfg.output, storage.output, source, storage.source)
    return Actors(stores, workers, writer)
