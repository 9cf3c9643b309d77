"""The trim a compression job applies (``--trim-plan`` or the budget flags; docs/TRIM.md).

The job compresses the *trimmed* model: every actor wraps its family in the same
``TrimmedFamily``, so the walk never visits a dropped block, a Layer-Dropped block runs as a
dense block without its MoE, and an Expert-Dropped layer routes over its kept experts, which are
quantized on the tokens the trimmed router sends them, with error propagation from the already
compressed (and trimmed) layers before.

With budgets instead of a plan, the job first scores the *source* (trim, then quantize) on its
calibration samples, in one pass on the driver (``trim_scores``, the walk of ``qmoe-ray
analyze``): a global expert budget ranks the experts of every layer together, so the whole
choice must be known before the first layer is compressed, and He, Dong et al. 2024 find the
order of trimming and quantization changes the result by at most about half a point.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qmoe_ray.errors import InputError
from qmoe_ray.job.config import CompressConfig, StorageOptions
from qmoe_ray.models.trim_plan import MAX_PLAN_BYTES, TrimPlan


def read_plan_file(url: str, storage_options: Mapping[str, Any]) -> TrimPlan:
    """The plan at ``url`` (size-capped, checked: ``TrimPlan.from_json``)."""
    from qmoe_ray.storage.fs import fs_errors, read_small, redact, url_to_fs

    opts = dict(storage_options)
    fs, path = url_to_fs(url, **opts)
    with fs_errors(url, "read", opts):
        raw = read_small(fs, path, MAX_PLAN_BYTES, f"--trim-plan {redact(url)}", url=url,
                         storage_options=opts, what="a trim plan may have")
    return TrimPlan.from_json(raw, f"--trim-plan {redact(url)}")


def _scored_plan(cfg: CompressConfig, ckpt: Any, family: Any, inputs: Mapping[str, np.ndarray],
                 is_calib: np.ndarray) -> TrimPlan:
    import torch

    from qmoe_ray.job.stores import CachedWeights
    from qmoe_ray.models.trim import trim_scores
    from qmoe_ray.models.trim_plan import plan_from_scores

    W = CachedWeights(ckpt, family.stored_dtype)  # the weights the output will ship
    idx = np.flatnonzero(is_calib)
    states = []
    with torch.no_grad():
        for a in range(0, len(idx), cfg.batch_size):
            rows = idx[a: a + cfg.batch_size]
            batch = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v)[rows]))
                     for k, v in inputs.items()}
            states.append(family.embed(W, batch))
        W.clear()
        scores = trim_scores(family, W, states, after_layer=lambda *_: W.clear())
    record = {**scores.to_dict(), "data": "the job's calibration samples",
              "samples": int(len(idx))}
    return plan_from_scores(family, record, cfg.drop_experts, cfg.drop_layers, cfg.drop_blocks)


def job_trim(cfg: CompressConfig, storage: StorageOptions, ckpt: Any, family: Any,
             inputs: Mapping[str, np.ndarray], is_calib: np.ndarray) -> TrimPlan | None:
    """The plan the job applies (None: no trim), checked against the source's family.

    Raises:
        InputError: a bad plan or budget, a plan for another model, or one that leaves no MoE
            layer to compress.
    """
    from qmoe_ray.models.trim import TrimmedFamily

    if cfg.trim_plan is not None:
        plan = read_plan_file(cfg.trim_plan, storage.source)
    elif cfg.trim_budgets():
        plan = _scored_plan(cfg, ckpt, family, inputs, is_calib)
    else:
        return None
    trimmed = TrimmedFamily(family, plan)  # checks it against the model
    if not any(lay.moe for lay in trimmed.layers()):
        raise InputError("the trim plan drops every MoE layer: nothing is left to compress "
                         "(keep at least one MoE layer)")
    return plan
