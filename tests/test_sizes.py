"""The format's one size accounting (``qmoe_ray.format.sizes``), used by the job's report and
``qmoe-ray inspect``: counted by hand on a small tensor index."""

from __future__ import annotations

import math

import pytest

from qmoe_ray.format.sizes import KINDS, by_kind, size_summary, tensor_kind
from qmoe_ray.job import report
from qmoe_ray.read import inspect as inspect_cmd

E = "m.layers.0.mlp.experts.0.down_proj.weight"  # a 4 x 8 ternary expert
T = "m.layers.0.qmoe_table.down"


def _t(shape: list[int], nbytes: int) -> dict:
    return {"shape": shape, "nbytes": nbytes}


TENSORS = {
    f"{E}.q.stream": _t([3], 6),
    f"{E}.q.seg_words": _t([1], 2),
    f"{E}.lo": _t([4], 8),
    f"{E}.hi": _t([4], 8),
    f"{T}.freqs": _t([27], 54),
    "m.layers.0.mlp.gate.weight": _t([1, 8], 16),
    "m.embed_tokens.weight": _t([10, 8], 160),
    "m.norm.weight": _t([8], 16),
}
QUANTIZED = {E: {"shape": [4, 8]}}
TABLES = {T: {}}


def test_by_kind_counts_every_stored_tensor_once():
    kinds = by_kind(TENSORS, QUANTIZED, TABLES)
    assert list(kinds) == list(KINDS)
    assert sum(v["tensors"] for v in kinds.values()) == len(TENSORS)
    assert sum(v["bytes"] for v in kinds.values()) == sum(t["nbytes"] for t in TENSORS.values())
    assert kinds["expert codes"] == {"tensors": 2, "bytes": 8, "params": 32}
    assert kinds["expert scales"] == {"tensors": 2, "bytes": 16, "params": 0}
    assert kinds["code tables"] == {"tensors": 1, "bytes": 54, "params": 0}
    assert kinds["router"] == {"tensors": 1, "bytes": 16, "params": 8}
    assert kinds["embeddings/head"]["params"] == 80 and kinds["norms"]["params"] == 8
    assert tensor_kind(f"{E}.q.stream", QUANTIZED, TABLES) == "expert codes"


def test_size_summary_by_hand():
    s = size_summary(TENSORS, QUANTIZED, TABLES)
    assert s["expert_params"] == 32 and s["dense_params"] == 8 + 80 + 8
    assert s["total_params"] == 128 and s["bf16_bytes"] == 256
    assert s["expert_code_bytes"] == 8 + 54 and s["expert_table_bytes"] == 54
    assert s["expert_scale_bytes"] == 16 and s["expert_stored_bytes"] == 78
    assert s["dense_bytes"] == 192 and s["total_bytes"] == 270
    assert s["expert_bits_per_param"] == pytest.approx(8 * 78 / 32)
    assert s["expert_code_bits_per_param"] == pytest.approx(8 * 62 / 32)
    assert s["bits_per_param"] == pytest.approx(8 * 270 / 128)
    assert s["expert_ratio_vs_bf16"] == pytest.approx(16 / (8 * 78 / 32))
    assert s["ratio_vs_bf16"] == pytest.approx(256 / 270)
    assert math.isnan(size_summary({}, {})["bits_per_param"])


def test_report_and_inspect_use_the_one_accounting():
    assert report.size_summary is size_summary
    assert inspect_cmd.by_kind is by_kind and inspect_cmd.size_summary is size_summary
    kinds = by_kind(TENSORS, QUANTIZED, TABLES)
    assert size_summary(TENSORS, QUANTIZED, kinds=kinds) == size_summary(TENSORS, QUANTIZED, TABLES)
