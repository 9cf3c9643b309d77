"""The size accounting of a compressed checkpoint (pure: no I/O): one for the job's report
(``qmoe_ray.job.report``) and ``qmoe-ray inspect`` (``qmoe_ray.read.inspect``).

Sizes are counted from the tensor index a manifest holds (name -> dtype, shape, nbytes), which is
what a reader gets and what the checksums cover: every stored tensor has one kind (``KINDS``,
``tensor_kind``). A quantized expert costs its encoded codes (``N.q.*``: streams, segment
offsets, embedded tables) plus its per-row grid parameters (``N.lo``/``N.hi``, ``N.scale``/
``N.zero``) plus its share of the shared code tables; everything else costs its stored bytes.
Bits per parameter are reported for the experts alone and for the whole model, beside the bf16
size, as the paper reports them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from qmoe_ray.format.matrices import CODE_PREFIX

KINDS = ("expert codes", "expert scales", "code tables", "router", "embeddings/head",
         "attention", "norms", "dense ffn/shared experts", "other")
EXPERT_KINDS = ("expert codes", "expert scales", "code tables")
_PARAMS = ("lo", "hi", "scale", "zero")

_PATTERNS = (
    ("router", re.compile(r"(\.gate\.weight$|router\.classifier|shared_expert_gate)")),
    ("embeddings/head", re.compile(r"(embed|lm_head|^shared\.weight$|wte|wpe)")),
    ("norms", re.compile(r"(norm|layer_norm|ln_)")),
    ("attention", re.compile(r"(attn|attention|SelfAttention|EncDecAttention|relative_attention)")),
    ("dense ffn/shared experts",
     re.compile(r"(mlp|DenseReluDense|shared_expert|ffn|\.wi\.|\.wo\.)")),
)


def tensor_kind(name: str, quantized: Mapping[str, Any], tables: Mapping[str, Any]) -> str:
    """The kind of a stored tensor (one of ``KINDS``)."""
    if CODE_PREFIX in name and name.split(CODE_PREFIX)[0] in quantized:
        return "expert codes"
    base, _, leaf = name.rpartition(".")
    if base in quantized and leaf in _PARAMS:
        return "expert scales"
    if base in tables:
        return "code tables"
    for kind, pat in _PATTERNS:
        if pat.search(name):
            return kind
    return "other"


def by_kind(tensors: Mapping[str, Mapping[str, Any]], quantized: Mapping[str, Mapping[str, Any]],
            tables: Mapping[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """Per kind (every one of ``KINDS``): stored ``tensors``, their ``bytes`` and ``params``
    (the weights they hold: a dense tensor's elements; for ``"expert codes"`` the elements of
    the quantized matrices; none for scales and tables)."""
    tables = tables or {}
    kinds = {k: {"tensors": 0, "bytes": 0, "params": 0} for k in KINDS}
    for name, entry in tensors.items():
        k = tensor_kind(name, quantized, tables)
        kinds[k]["tensors"] += 1
        kinds[k]["bytes"] += int(entry["nbytes"])
        if k not in EXPERT_KINDS:
            kinds[k]["params"] += math.prod(int(s) for s in entry["shape"])
    kinds["expert codes"]["params"] = sum(math.prod(int(s) for s in e["shape"])
                                          for e in quantized.values())
    return kinds


def size_summary(
    tensors: Mapping[str, Mapping[str, Any]],
    quantized: Mapping[str, Mapping[str, Any]],
    tables: Mapping[str, Any] | None = None,
    kinds: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """Parameter counts, bytes, bits per parameter and ratios vs bf16 (from ``by_kind``).

    Args:
        tensors: manifest tensor index (name -> dtype, shape, nbytes, ...).
        quantized: manifest entries of quantized matrices (name -> shape, ...).
        tables: the shared code tables, by name (their bytes count as expert code bytes).
        kinds: ``by_kind(tensors, quantized, tables)`` when the caller has it already.

    Returns:
        ``expert_params``, ``dense_params``, ``total_params``; ``expert_code_bytes`` (codes and
        tables), ``expert_table_bytes``, ``expert_scale_bytes``, ``expert_stored_bytes`` (all
        three), ``dense_bytes``, ``total_bytes``, ``bf16_bytes``; ``expert_bits_per_param``,
        ``expert_code_bits_per_param``, ``bits_per_param`` (whole model),
        ``expert_ratio_vs_bf16``, ``ratio_vs_bf16`` (NaN where a count is zero).
    """
    if kinds is None:
        kinds = by_kind(tensors, quantized, tables)
    expert_params = kinds["expert codes"]["params"]
    dense_params = sum(v["params"] for k, v in kinds.items() if k != "expert codes")
    table_bytes = kinds["code tables"]["bytes"]
    code_bytes = kinds["expert codes"]["bytes"] + table_bytes
    scale_bytes = kinds["expert scales"]["bytes"]
    stored_expert_bytes = code_bytes + scale_bytes
    dense_bytes = sum(v["bytes"] for k, v in kinds.items() if k not in EXPERT_KINDS)
    total_params = expert_params + dense_params
    total_bytes = stored_expert_bytes + dense_bytes
    expert_bits = 8 * stored_expert_bytes / expert_params if expert_params else math.nan
    return {
        "expert_params": expert_params,
        "dense_params": dense_params,
        "total_params": total_params,
        "expert_code_bytes": code_bytes,
        "expert_table_bytes": table_bytes,
        "expert_scale_bytes": scale_bytes,
        "expert_stored_bytes": stored_expert_bytes,
        "dense_bytes": dense_bytes,
        "total_bytes": total_bytes,
        "bf16_bytes": 2 * total_params,
        "expert_bits_per_param": expert_bits,
        "expert_code_bits_per_param": 8 * code_bytes / expert_params if expert_params else math.nan,
        "bits_per_param": 8 * total_bytes / total_params if total_params else math.nan,
        "expert_ratio_vs_bf16": 16 / expert_bits if expert_params else math.nan,
        "ratio_vs_bf16": 2 * total_params / total_bytes if total_bytes else math.nan,
    }
