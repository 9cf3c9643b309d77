"""The first half of a compression job: every check, before the cluster does any work.

``prepare`` reads only the source's config and tensor index, the calibration data and the
output's progress records; it starts nothing, and leaves the output as it found it (a probe file
is written and removed). What it finds is a frozen ``Plan`` that ``driver.execute`` carries out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmoe_ray.data import resolve_data, resolve_source
from qmoe_ray.errors import InputError
from qmoe_ray.job import cluster, grouping
from qmoe_ray.job.config import CompressConfig, StorageOptions
from qmoe_ray.job.group import QuantOptions
from qmoe_ray.job.grouping import AUTO
from qmoe_ray.job.progress import Progress, source_fingerprint
from qmoe_ray.job.trimming import job_trim
from qmoe_ray.models import LayerSpec, get_family
from qmoe_ray.models.trim import TrimmedFamily
from qmoe_ray.storage.checkpoint import Checkpoint, SourceIndex, open_checkpoint, source_index
from qmoe_ray.storage.fs import redact, url_to_fs

log = logging.getLogger("qmoe_ray")

MIN_CALIB_TOKENS = 256


@dataclass(frozen=True)
class Plan:
    """A checked compression job, ready to run (``driver.execute``).

    Attributes:
        cfg, storage: the job's options and storage options.
        source: the source's URL or path (``"embedded"`` resolved).
        index: the source's config and tensor index, read once here and handed to every actor.
        family: the model family (the expert layout resolved from the names).
        layers: every layer, in processing order.
        quant: how a group is quantized.
        progress: the output's progress records.
        job: this job as recorded in progress (source, fingerprint, output-determining options).
        resuming: the output holds progress of this same job.
        done: the records of the layers already done (a resume), in order.
        inputs, is_calib: the samples (calibration, then held-out) and which are calibration.
        restart_timeout_s: how long recovery waits for restarted actors.
        started_at: ``time.perf_counter()`` when the job began (the report's seconds).
        trim: the ``TrimPlan`` the job applies (``family`` and ``layers`` are then the trimmed
            model's), or None.
        group_sizes: experts per group for each MoE layer (``{layer name: size}``); None while
            ``--group-size auto`` waits for the cluster's memory (``driver.execute`` resolves
            it, ``resolve_groups``).
        grouping: how the sizes were chosen (``grouping.summary`` per layer, the budget and
            where it came from), for the report; None with a fixed size and no budget.
        shapes: the cost model's shape of each MoE layer (``grouping.shapes_of``), or None.
    """

    cfg: CompressConfig
    storage: StorageOptions
    source: str
    index: SourceIndex
    family: Any
    layers: list[LayerSpec]
    quant: QuantOptions
    progress: Progress
    job: dict[str, Any]
    resuming: bool
    done: list[dict[str, Any]]
    inputs: dict[str, np.ndarray]
    is_calib: np.ndarray
    restart_timeout_s: float
    started_at: float
    trim: Any = None  # the TrimPlan applied (qmoe_ray.job.trimming), None: no trim
    group_sizes: dict[str, int] | None = None
    grouping: dict[str, Any] | None = None
    shapes: dict[str, Any] | None = None

    @property
    def moe_layers(self) -> list[LayerSpec]:
        """The mixture-of-experts layers."""
        return [l for l in self.layers if l.moe]


def source_label(source: str) -> str:
    """The source as recorded in the manifest, the reports and progress: no credentials (the
    URL's userinfo and query string dropped)."""
    return redact(source)


def fingerprint(ckpt: Checkpoint) -> str:
    """The source's identity for resume checks and the manifest: config.json + the stored
    tensors' names, dtypes and shapes (a quantized source's encodings included)."""
    return source_fingerprint(
        ckpt.raw_config, {n: f"{i.dtype}{list(i.shape)}" for n, i in ckpt.stored.items()})


def check_output_writable(output: str, options: Mapping[str, Any], overwrite: bool) -> None:
    """Fail fast when ``output`` cannot be written or already holds a checkpoint.

    Changes nothing at the output (a probe file is written and removed; a folder made for it is
    removed again): an existing checkpoint is replaced only once every check has passed
    (``Progress.start``).

    Raises:
        PermissionError / OSError: the output cannot be written (names the URL).
        FileExistsError: a checkpoint (manifest) is already there and ``overwrite`` is False.
    """
    fs, root = url_to_fs(output, **dict(options))
    root = root.rstrip("/")
    if fs.exists(f"{root}/manifest.json") and not overwrite:
        raise FileExistsError(
            f"{redact(output)} already holds a compressed checkpoint; choose another output or "
            "pass --overwrite to replace it"
        )
    probe = f"{root}/.qmoe-write-probe"
    made = not fs.exists(root)
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
        if made and fs.isdir(root) and not fs.ls(root):
            fs.rmdir(root)
    except Exception as exc:  # noqa: BLE001 - any backend error means "cannot write here"
        raise PermissionError(
            f"cannot write to output {redact(output)}: {type(exc).__name__}: {exc}. Check the URL "
            "and the credentials/storage options for it."
        ) from None


def _open_source(cfg: CompressConfig, source: str,
                 storage: StorageOptions) -> tuple[Checkpoint, Any]:
    """The source and its family, checked: MoE layers, every expected tensor with its shape."""
    ckpt = open_checkpoint(source, **storage.source)
    family = get_family(ckpt.config, ckpt)  # the expert layout, resolved from the names
    if not any(l.moe for l in family.layers()):
        raise ValueError(f"{cfg.source}: the model has no mixture-of-experts layers; "
                         "qmoe-ray compresses MoE models only")
    family.check_weights(ckpt.names, ckpt.shape)  # a missing tensor or a wrong shape: now
    return ckpt, family


def _samples(cfg: CompressConfig, source: str, config: Mapping[str, Any],
             storage: StorageOptions) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The calibration then the held-out samples, and which are calibration.

    Raises:
        InputError: fewer than ``MIN_CALIB_TOKENS`` calibration tokens.
    """
    from qmoe_ray.data import load_samples

    data_spec = resolve_data(cfg.data, cfg.source)
    calib = load_samples(data_spec, config, cfg.num_samples, cfg.seq_len, seed=cfg.seed,
                         split="calib", tokenizer_source=source, storage_options=storage.source)
    held = (load_samples(data_spec, config, cfg.eval_samples, cfg.seq_len, seed=cfg.seed,
                         split="heldout", tokenizer_source=source,
                         storage_options=storage.source, fewer_ok=True)
            if cfg.eval_samples else None)
    if held is not None and len(held["input_ids"]) < cfg.eval_samples:
        log.warning("--eval-samples %d: the held-out split of %s holds %d samples of this "
                    "length; the report's loss uses those %d", cfg.eval_samples,
                    redact(cfg.data), len(held["input_ids"]), len(held["input_ids"]))
    n_tok = int(np.asarray(calib["attention_mask"]).sum()) if "attention_mask" in calib else 0
    if n_tok < MIN_CALIB_TOKENS:
        raise InputError(
            f"only {n_tok} calibration tokens ({cfg.num_samples} samples x {cfg.seq_len}); at "
            f"least {MIN_CALIB_TOKENS} are needed: raise --num-samples or --seq-len"
        )
    inputs = calib if held is None else {k: np.concatenate([calib[k], held[k]]) for k in calib}
    is_calib = np.zeros(len(next(iter(inputs.values()))), dtype=bool)
    is_calib[: len(next(iter(calib.values())))] = True
    return inputs, is_calib


def prepare(cfg: CompressConfig, storage: StorageOptions | None = None) -> Plan:
    """Check everything that can be checked before the cluster does work; starts nothing.

    Raises:
        ValueError / FileExistsError / PermissionError / InputError: bad input (including
        progress of another job at the output), each naming what to change.
    """
    storage = storage or StorageOptions()
    started_at = time.perf_counter()
    source = resolve_source(cfg.source)
    cluster.check_local_cpus(cfg)  # refuse before any work, not after starting Ray
    ckpt, family = _open_source(cfg, source, storage)
    quant = QuantOptions.from_config(cfg)
    check_output_writable(cfg.output, storage.output, cfg.overwrite)
    prog = Progress(cfg.output, storage.output)
    inputs, is_calib = _samples(cfg, source, ckpt.config, storage)
    trim = job_trim(cfg, storage, ckpt, family, inputs, is_calib)
    if trim is not None:
        family = TrimmedFamily(family, trim)
    layers = family.layers()
    job = {"source": source_label(cfg.source),
           "source_fingerprint": fingerprint(ckpt),
           "options": cfg.output_options(),
           "trim": None if trim is None else trim.to_dict()}
    resuming = prog.check(job, cfg.overwrite)
    done = prog.done_layers([l.index for l in layers]) if resuming else []
    shapes = _shapes(cfg, family, layers, ckpt.config, inputs)
    recorded = (prog.recorded_job() or {}).get("group_sizes") if resuming else None
    budget = None if cluster.address(cfg) and cfg.worker_memory is None else worker_budget(cfg)
    sizes, grouping_info = resolve_groups(cfg, family, shapes, budget, recorded)
    if cfg.group_size == AUTO and sizes is not None:
        job["group_sizes"] = sizes  # the job's record: a resume groups as this run does
    return Plan(cfg=cfg, storage=storage, source=source, index=source_index(ckpt),
                family=family, layers=layers, quant=quant, progress=prog, job=job,
                resuming=resuming, done=done, inputs=inputs, is_calib=is_calib,
                restart_timeout_s=cluster.restart_timeout_s(), started_at=started_at, trim=trim,
                group_sizes=sizes, grouping=grouping_info, shapes=shapes)


def _shapes(cfg: CompressConfig, family: Any, layers: list[LayerSpec], config: Mapping[str, Any],
            inputs: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
    """Every MoE layer's shape for the memory model (None: a fixed group size, no budget, and
    a family whose expert tensors cannot be sized, which then needs none)."""
    mask = inputs.get("attention_mask")
    tokens = int(np.asarray(mask).sum()) if mask is not None else int(
        np.asarray(next(iter(inputs.values()))).size)
    try:
        return grouping.shapes_of(family, layers, config, tokens, cfg.hessian_dtype)
    except InputError:
        if cfg.group_size == AUTO or cfg.worker_memory is not None:
            raise
        return None


def worker_budget(cfg: CompressConfig, ray_memory: tuple[float, str] | None = None
                  ) -> tuple[float, str]:
    """The bytes per worker the groups are sized to, and where the figure comes from:
    ``--worker-memory``; else Ray's (``ray_memory``, on a joined cluster) or this machine's
    available memory over the workers.

    Raises:
        InputError: ``--group-size auto`` on GPU workers without ``--worker-memory``, or a
            cluster that reports no memory.
    """
    if cfg.worker_memory is not None:
        return cfg.worker_memory * grouping.GIB, f"--worker-memory {cfg.worker_memory:g}"
    if cfg.gpus_per_worker and cfg.group_size == AUTO:
        raise InputError("--group-size auto with --gpus-per-worker "
                         f"{cfg.gpus_per_worker:g}: give --worker-memory GIB (the GPU's memory, "
                         "e.g. 80 for an H100), or a fixed --group-size")
    if cluster.address(cfg):
        if ray_memory is None:
            raise InputError("--group-size auto: the Ray cluster reports no memory for the "
                             "workers' nodes; give --worker-memory GIB")
        return ray_memory
    return grouping.local_budget(cfg.num_workers)


def resolve_groups(cfg: CompressConfig, family: Any, shapes: Mapping[str, Any] | None,
                   budget: tuple[float, str] | None, recorded: Mapping[str, int] | None
                   ) -> tuple[dict[str, int] | None, dict[str, Any] | None]:
    """Each MoE layer's group size and how it was chosen (``Plan.group_sizes`` / ``grouping``).

    ``auto``: the sizes ``recorded`` by the job this one resumes (checked to fit the budget,
    when one is known), else ``grouping.choose``'s; ``(None, None)`` while the budget waits
    for the cluster. A fixed size: every layer's, checked against a ``--worker-memory`` given.

    Raises:
        InputError: one expert (``auto``), the fixed group, or the recorded groups do not fit
            the budget (each naming the layer, what it needs and the fix).
    """
    from qmoe_ray.job.costmodel import load_constants

    base = load_constants().worker_base_bytes
    names = [l.name for l in family.layers() if l.moe]
    if cfg.group_size != AUTO:
        sizes = dict.fromkeys(names, int(cfg.group_size))
        if cfg.worker_memory is None:
            budget = None  # not asked: no check (the jobs of before the option)
        elif shapes is not None and budget is not None:
            grouping.check_fixed(shapes, sizes, budget[0], base, budget[1])
    elif recorded:
        sizes = {n: int(recorded[n]) for n in names}
        if budget is not None and shapes is not None:
            grouping.check_fixed(shapes, sizes, budget[0], base, budget[1], resumed=True)
    elif budget is None or shapes is None:
        return None, None
    else:
        sizes = grouping.choose(shapes, budget[0], base, cfg.num_workers, budget[1])
    if shapes is None:
        return sizes, None
    return sizes, {"group_size": cfg.group_size, "recorded": bool(recorded),
                   "budget_gib": None if budget is None else round(budget[0] / grouping.GIB, 4),
                   "budget_from": None if budget is None else budget[1],
                   "margin": grouping.MARGIN, "layers": grouping.summary(shapes, sizes, base)}
