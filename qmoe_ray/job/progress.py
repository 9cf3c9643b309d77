"""Progress records of a compression job, kept in the output location so that a rerun resumes.

Why in the output location: the driver's disk may be gone with the driver (a lost head node, a
job resubmitted from another machine); the output bucket outlives both and is where the shards
already are. Layout under the output URL while a job runs::

    progress/job.json                         source, its config hash, the output-determining
                                              options and the format version, written first
    progress/source-index.json                the source's config and tensor index (every shard
                                              header, parsed once by the driver), from which
                                              every actor opens the source
    progress/inputs/batch-00007.safetensors   batch 7's model inputs (token ids, masks) and
                                              calibration mask, written before the stores start
    progress/layer-00003.json                 written after layer 3's shard and activations:
                                              the shard's index entries, expert stats, timings
    progress/activations/layer-00003/batch-00007.safetensors
                                              the residual stream of batch 7 after layer 3

Why the inputs are written here rather than handed to the store actors: a store's constructor
arguments of realistic size (2048 x 512 token ids: 8 MiB) would live in Ray's object store, and
Ray cannot restart an actor whose arguments are gone; a store killed by the OOM killer would end
the job. Its constructor takes only a URL and a batch range, and a restarted store (on any node)
reads its samples back from the output location. The source's index goes the same way (5 MiB as
JSON for a DeepSeek-V3-sized source of 47k tensors): one read per actor start instead of every
shard's header (2 requests per shard per actor, again after every restart), and no constructor
argument in Ray's object store (an actor whose argument there is lost cannot be restarted).

Why activations are checkpointed (rather than recomputed through the compressed layers): the
recomputed stream must equal the original bit for bit, or the layers after the resume point would
be calibrated on different activations and the bytes would differ from an uninterrupted run. The
original outputs come from the quantization workers' kernels (GPU matmuls on a GPU cluster, a
batch shape that depends on the expert group); a recompute on the stores cannot promise the same
floating-point sums. Writing the stream costs one sequential write per layer, which
``qmoe_ray.bench.resume`` measures against the recompute (BENCHMARKS.md, ``resume``). Only the
latest layer's activations are kept, one file per batch (so a resume may use any number of
stores), and the whole ``progress/`` folder is removed once the manifest is written.

Storage retries (``with_retries``) live in ``qmoe_ray.storage.retry``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from qmoe_ray.format import manifest as mf
from qmoe_ray.job.config import UNRECORDED
from qmoe_ray.storage.checkpoint import SourceIndex
from qmoe_ray.storage.fs import redact, url_to_fs
from qmoe_ray.storage.retry import put_file, with_retries

PROGRESS = "progress"
JOB = f"{PROGRESS}/job.json"
SOURCE_INDEX = f"{PROGRESS}/source-index.json"

def source_fingerprint(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> str:
    """SHA-256 over the source's config and its tensor list (names, dtypes, shapes): changes
    when a different model sits at the same URL."""
    h = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        h.update(f"\n{name}:{tensors[name]}".encode())
    return h.hexdigest()


def inputs_file(batch: int) -> str:
    return f"{PROGRESS}/inputs/batch-{batch:05d}.safetensors"


def layer_record_name(index: int) -> str:
    return f"{PROGRESS}/layer-{index:05d}.json"


def activations_dir(index: int) -> str:
    return f"{PROGRESS}/activations/layer-{index:05d}"


def batch_file(index: int, batch: int) -> str:
    return f"{activations_dir(index)}/batch-{batch:05d}.safetensors"


class Progress:
    """Reads and writes a job's progress records under ``output`` (see module doc).

    Args:
        output: the job's output URL.
        storage_options: fsspec options for it.
    """

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None):
        self.output = output.rstrip("/")
        self.fs, root = url_to_fs(output, **dict(storage_options or {}))
        self.root = root.rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _url(self, rel: str) -> str:
        return f"{self.output}/{rel}"

    def put(self, rel: str, data: bytes) -> None:
        """Write a whole file (transient errors retried)."""
        path = self._path(rel)
        with_retries(lambda: put_file(self.fs, path, data), f"writing {self._url(rel)}")

    def get(self, rel: str) -> bytes | None:
        """A whole file's bytes, or None when it does not exist."""
        path = self._path(rel)

        def read() -> bytes | None:
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None

        return with_retries(read, f"reading {self._url(rel)}")

    def remove(self, rel: str) -> None:
        """Delete a file or folder (recursively) if present."""
        path = self._path(rel)

        def rm() -> None:
            self.fs.invalidate_cache()
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

        with_retries(rm, f"deleting {self._url(rel)}")

    # -- the job record ----------------------------------------------------------------------
    def check(self, job: Mapping[str, Any], overwrite: bool) -> bool:
        """Compare ``job`` with the job recorded at the output (nothing is written).

        Args:
            job: ``{"source", "source_fingerprint", "options"}`` of this run.
            overwrite: earlier progress will be cleared: nothing to compare.

        Returns:
            True when the output holds progress of this same job (a resume).

        Raises:
            ValueError: the output holds progress of a newer format version, another source or
                other options (each differing option named), and ``overwrite`` is False.
        """
        if overwrite:
            return False
        raw = self.get(JOB)
        if raw is None:
            return False
        check_same_job(json.loads(raw), job, self.output)
        return True

    def recorded_job(self) -> dict[str, Any] | None:
        """The job recorded at the output (``start``), or None."""
        raw = self.get(JOB)
        return None if raw is None else json.loads(raw)

    def start(self, job: Mapping[str, Any], overwrite: bool) -> None:
        """Record ``job`` as the output's job (after ``check``); ``overwrite`` first clears
        earlier progress and shards."""
        if overwrite:  # the old manifest first: a half-removed checkpoint is never loadable
            self.remove(mf.MANIFEST)
            self.remove(PROGRESS)
            self.remove("shards")
        record = {"format": mf.FORMAT_NAME, "format_version": mf.FORMAT_VERSION, **job}
        self.put(JOB, mf.dumps(record))

    def done_layers(self, indices: list[int]) -> list[dict[str, Any]]:
        """The records of the finished layers at the start of ``indices`` (processing order);
        stops at the first layer without a record."""
        out = []
        for i in indices:
            raw = self.get(layer_record_name(i))
            if raw is None:
                break
            out.append(json.loads(raw))
        return out

    def finish_layer(self, index: int, record: Mapping[str, Any], previous: int | None) -> None:
        """Record layer ``index`` as done, then drop the activations of ``previous``."""
        self.put(layer_record_name(index), mf.dumps(record))
        if previous is not None:
            self.remove(activations_dir(previous))

    # -- calibration inputs ------------------------------------------------------------------
    def save_inputs(self, batch: int, inputs: Mapping[str, np.ndarray], calib: np.ndarray) -> None:
        """Write one batch's model inputs and its calibration mask (written by the driver before
        the stores start, so that a store restarted anywhere rebuilds its samples from here)."""
        arrays = {f"input.{k}": np.ascontiguousarray(v) for k, v in sorted(inputs.items())}
        arrays["calib"] = np.ascontiguousarray(calib, dtype=bool)
        self.put(inputs_file(batch), np_save(arrays))

    def save_source_index(self, index: SourceIndex) -> None:
        """Write the source's index (config and tensor index) for the actors to open it by."""
        self.put(SOURCE_INDEX, index.to_json())

    def load_source_index(self) -> SourceIndex:
        """The source's index that ``save_source_index`` wrote.

        Raises:
            FileNotFoundError: none was written (the job's progress folder is gone).
        """
        raw = self.get(SOURCE_INDEX)
        if raw is None:
            raise FileNotFoundError(f"{redact(self._url(SOURCE_INDEX))}: missing; rerun the job")
        return SourceIndex.from_json(raw)

    def load_inputs(self, batch: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One batch's ``(inputs, calib)`` as ``save_inputs`` wrote them.

        Raises:
            FileNotFoundError: the batch's inputs are missing (progress deleted by hand): rerun
                with ``--overwrite``.
        """
        raw = self.get(inputs_file(batch))
        if raw is None:
            raise FileNotFoundError(
                f"{self._url(inputs_file(batch))} is missing: the job's progress is incomplete; "
                "rerun with --overwrite to start over"
            )
        arrays = np_load(raw)
        inputs = {k[len("input."):]: v for k, v in arrays.items() if k.startswith("input.")}
        return inputs, arrays["calib"]

    # -- activations -------------------------------------------------------------------------
    def save_state(self, index: int, batch: int, state: Mapping[str, torch.Tensor]) -> None:
        """Write one batch's state after layer ``index``."""
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sorted(state.items())}
        self.put(batch_file(index, batch), st_save(tensors))

    def load_state(self, index: int, batch: int) -> dict[str, torch.Tensor]:
        """Read one batch's state after layer ``index``.

        Raises:
            FileNotFoundError: the checkpoint has no such batch (progress was deleted by hand or
                the batch size differs): rerun with ``--overwrite``.
        """
        raw = self.get(batch_file(index, batch))
        if raw is None:
            raise FileNotFoundError(
                f"{self._url(batch_file(index, batch))} is missing: the job's progress is "
                "incomplete; rerun with --overwrite to start over"
            )
        return st_load(raw)


def check_same_job(recorded: Mapping[str, Any], job: Mapping[str, Any], where: str) -> None:
    """Refuse to continue a job recorded with another format version, source or options.

    Raises:
        ValueError: naming the first difference and the fix.
    """
    version = recorded.get("format_version")
    if recorded.get("format") != mf.FORMAT_NAME or not isinstance(version, int):
        raise ValueError(f"{where}/{JOB} is not a qmoe-ray progress record; choose another "
                         "output or pass --overwrite to replace it")
    if version > mf.FORMAT_VERSION:
        raise ValueError(
            f"{where} holds a job written by a newer qmoe-ray (format version {version}; this one "
            f"writes {mf.FORMAT_VERSION}): upgrade qmoe-ray to resume it, or pass --overwrite"
        )
    if recorded.get("source") != job["source"]:
        raise ValueError(
            f"{where} holds a job of source {recorded.get('source')!r}, not {job['source']!r}: "
            "choose another output or pass --overwrite to start over"
        )
    if recorded.get("source_fingerprint") != job["source_fingerprint"]:
        raise ValueError(
            f"{where} holds a job of another model at {job['source']!r} (its config or tensors "
            "changed since): choose another output or pass --overwrite to start over"
        )
    if recorded.get("trim") != job.get("trim"):
        said = {k: v for k, v in (recorded.get("trim") or {}).items() if k != "scores"}
        raise ValueError(
            f"{where} holds a job run with another trim plan ({str(said or 'none')[:300]}); "
            "rerun with the recorded plan to resume, or pass --overwrite to start over"
        )
    old, new = recorded.get("options", {}), job["options"]
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        what = ", ".join(f"{k}={old.get(k, UNRECORDED.get(k))!r} "
                         f"(now {new.get(k, UNRECORDED.get(k))!r})" for k in diff)
        raise ValueError(
            f"{where} holds a job run with other options: {what}; rerun with the recorded "
            "values to resume, or pass --overwrite to start over"
        )
