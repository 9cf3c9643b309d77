"""``--group-size auto`` / ``--worker-memory`` without a cluster: the choice against the cost
model's formula on real shapes (the bound case: a budget of exactly k experts' need gives k, a
byte less k - 1), the cap by the workers, the refusals (one expert too big, a fixed group too big,
a bad value), what ``prepare`` records, and ``qmoe-ray plan --group-size auto`` choosing as the
job does."""

from __future__ import annotations

import json
import math

import pytest

from qmoe_ray.bench.realshape import released_config
from qmoe_ray.cli import main
from qmoe_ray.errors import InputError
from qmoe_ray.job import costmodel as cm
from qmoe_ray.job import grouping
from qmoe_ray.job.config import CompressConfig
from qmoe_ray.job.costmodel import load_constants
from qmoe_ray.job.estimate import auto_groups
from qmoe_ray.job.plan import prepare

BASE = load_constants().worker_base_bytes
GIB = 2**30
#: (name, expert matrices, experts, top_k, hidden): Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-V3,
#: switch-base-128 (one input matrix)
SHAPES = [
    ("qwen3", [(768, 2048), (768, 2048), (2048, 768)], 128, 8, 2048),
    ("mixtral", [(14336, 4096), (14336, 4096), (4096, 14336)], 8, 2, 4096),
    ("deepseek", [(2048, 7168), (2048, 7168), (7168, 2048)], 256, 8, 7168),
    ("switch", [(3072, 768), (768, 3072)], 128, 1, 768),
]


def _shape(mats, experts, top_k, hidden, tokens=32768, dtype="float32"):
    return grouping.layer_shape(mats, experts=experts, top_k=top_k, hidden=hidden,
                                tokens=tokens, hessian_dtype=dtype)


def _formula(s: cm.Shape, g: int) -> float:
    """The worker peak written out from the cost model's terms (not by calling it)."""
    p = sum(r * c for r, c in s.matrices)
    t_e = s.all_tokens * s.top_k / s.experts
    d_ff = max(r for r, c in s.matrices if c == s.hidden)
    per = max(s.sum_bytes + 4, 4 * (1 + cm.GPTQ_COPIES))
    hess = max(g * c * c * per for _, c in s.matrices)
    return BASE + g * p * 11 + hess + g * t_e * (s.hidden * 12 + d_ff * 4)


@pytest.mark.parametrize("name,mats,experts,top_k,hidden", SHAPES)
def test_choice_is_the_largest_group_the_formula_fits(name, mats, experts, top_k, hidden):
    s = _shape(mats, experts, top_k, hidden)
    for g in (1, 2, 5, experts):
        assert cm.worker_bytes(s, g, BASE) == pytest.approx(_formula(s, g), rel=1e-12)
    for k in sorted({1, 3, max(experts // 2, 1), experts - 1, experts} - {0}):
        exact = _formula(s, k) * (1 + grouping.MARGIN)  # a budget that fits exactly k experts
        assert grouping.largest_group(s, exact, BASE) == k, (name, k)
        assert grouping.largest_group(s, exact * (1 - 1e-9), BASE) == k - 1, (name, k)
    # against a brute force over every size, at a budget between two sizes
    budget = _formula(s, max(experts // 3, 1)) * 1.2
    brute = max(g for g in range(1, experts + 1)
                if _formula(s, g) * (1 + grouping.MARGIN) <= budget)
    assert grouping.largest_group(s, budget, BASE) == brute
    assert grouping.choose({"L": s}, budget, BASE, 1, "test") == {"L": brute}


def test_the_choice_follows_the_shape_and_the_hessian_dtype():
    q = _shape(*SHAPES[0][1:])
    budget = 6 * GIB
    assert grouping.largest_group(_shape(*SHAPES[0][1:], tokens=4 * 32768), budget, BASE) < (
        grouping.largest_group(q, budget, BASE))  # more tokens: smaller groups
    assert grouping.largest_group(_shape(*SHAPES[0][1:], dtype="float64"), budget, BASE) <= (
        grouping.largest_group(q, budget, BASE))
    assert grouping.largest_group(q, 1e15, BASE) == 128  # never more than the layer's experts


def test_every_worker_gets_a_group():
    s = _shape(*SHAPES[0][1:])
    huge = 1e15
    assert grouping.choose({"L": s}, huge, BASE, 1, "x") == {"L": 128}
    assert grouping.choose({"L": s}, huge, BASE, 8, "x") == {"L": 16}
    assert grouping.choose({"L": s}, huge, BASE, 3, "x") == {"L": math.ceil(128 / 3)}


def test_one_expert_that_does_not_fit_is_refused_with_what_it_needs():
    s = _shape(*SHAPES[1][1:])  # Mixtral-8x7B: one expert's Hessians alone are ~3.8 GiB
    need = _formula(s, 1) * (1 + grouping.MARGIN)
    with pytest.raises(InputError) as exc:
        grouping.choose({"model.layers.7": s}, 2 * GIB, BASE, 1, "--worker-memory 2")
    msg = str(exc.value)
    assert msg.startswith("layer model.layers.7: one expert needs ")
    assert f"{need / GIB:.2f} GiB" in msg and "the workers have 2.00 GiB (--worker-memory 2)" in msg
    assert f"--worker-memory {math.ceil(need / GIB * 100) / 100:g}" in msg
    assert grouping.choose({"L": s}, math.ceil(need / GIB * 100) / 100 * GIB, BASE, 1, "x") == {
        "L": 1}  # the memory the message names is enough


def _cfg(tmp_path, **kw):
    return CompressConfig(output=str(tmp_path / "out"), num_samples=32, seq_len=64,
                          eval_samples=8, **kw)


def test_prepare_chooses_per_layer_and_records_the_sizes(tmp_path):
    probe = prepare(_cfg(tmp_path, group_size="auto", worker_memory=1000))
    assert set(probe.group_sizes.values()) == {8}  # the embedded Mixtral: 4 layers x 8 experts
    s = probe.shapes["model.layers.0"]
    assert s.all_tokens == (32 + 8) * 64 and s.experts == 8 and s.top_k == 2
    # w1, w3 [intermediate 192, hidden 128] and w2 [128, 192] of the embedded config
    assert sorted(s.matrices) == [(128, 192), (192, 128), (192, 128)] and s.hidden == 128
    wm = grouping.need_bytes(s, 3, BASE) / GIB  # exactly three experts fit
    plan = prepare(_cfg(tmp_path, group_size="auto", worker_memory=wm))
    assert plan.group_sizes == dict.fromkeys(probe.group_sizes, 3)
    assert plan.job["group_sizes"] == plan.group_sizes  # the record a resume is held to
    info = plan.grouping
    assert info["budget_from"] == f"--worker-memory {wm:g}" and info["margin"] == 0.1
    assert info["layers"]["model.layers.2"]["predicted_worker_gib"] == pytest.approx(
        cm.worker_bytes(s, 3, BASE) / GIB, abs=1e-4)
    fixed = prepare(_cfg(tmp_path, group_size=4))
    assert set(fixed.group_sizes.values()) == {4} and "group_sizes" not in fixed.job


def test_prepare_refuses_what_does_not_fit(tmp_path):
    with pytest.raises(InputError, match=r"^layer model.layers.0: one expert needs 0\.\d+ GiB"):
        prepare(_cfg(tmp_path, group_size="auto", worker_memory=0.5))
    s = prepare(_cfg(tmp_path, group_size="auto", worker_memory=1000)).shapes["model.layers.0"]
    wm = grouping.need_bytes(s, 3, BASE) / GIB
    with pytest.raises(InputError, match=r"a group of 8 experts needs .* the largest group that "
                                         r"fits is 3 \(--group-size 3, or --group-size auto\)"):
        prepare(_cfg(tmp_path, group_size=16, worker_memory=wm))
    prepare(_cfg(tmp_path, group_size=3, worker_memory=wm))  # what it names is accepted
    with pytest.raises(InputError, match="give --worker-memory GIB"):
        prepare(_cfg(tmp_path, group_size="auto", gpus_per_worker=1))


@pytest.mark.parametrize("value,ok", [("auto", "auto"), ("8", 8), (8, 8), ("big", None),
                                      (0, None), (True, None)])
def test_group_size_values(value, ok):
    if ok is None:
        with pytest.raises(InputError, match="group_size=.*an integer >= 1 or auto"):
            CompressConfig(group_size=value)
    else:
        assert CompressConfig(group_size=value).group_size == ok
    for bad in (0, -1, float("nan"), "4GiB"):
        with pytest.raises(InputError, match="worker_memory"):
            CompressConfig(worker_memory=bad)
    opts = CompressConfig(group_size="auto", worker_memory=3).output_options()
    assert opts["group_size"] == "auto" and "worker_memory" not in opts


def test_plan_shows_the_choice_of_the_job(tmp_path, capsys):
    from qmoe_ray.data import resolve_source

    src = resolve_source("embedded")
    s = prepare(_cfg(tmp_path, group_size="auto", worker_memory=1000)).shapes["model.layers.0"]
    wm = grouping.need_bytes(s, 5, BASE) / GIB
    assert main(["plan", src, "--group-size", "auto", "--worker-memory", repr(wm),
                 "--calib-samples", "32", "--seq-len", "64", "--eval-samples", "8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    job = prepare(_cfg(tmp_path, group_size="auto", worker_memory=wm))
    assert {n: r["group_size"] for n, r in out["auto_group_size"]["layers"].items()} == (
        job.group_sizes) == dict.fromkeys(job.group_sizes, 5)
    assert out["group_size"] == 5
    cfg = tmp_path / "q.json"
    cfg.write_text(json.dumps(released_config("qwen3-30b-a3b")))
    assert main(["plan", str(cfg), "--group-size", "auto", "--worker-memory", "4"]) == 0
    text = capsys.readouterr().out
    want = auto_groups(released_config("qwen3-30b-a3b"), tokens=(256 + 64) * 128,
                       hessian_dtype="float32", budget=4 * GIB, where="x", workers=1)
    g = want["layers"]["model.layers.0"]["group_size"]
    assert f"--group-size auto for 4.00 GiB per worker" in text and f"groups of {g} (48 layers" in text
    assert main(["plan", str(cfg), "--group-size", "auto", "--worker-memory", "0.5"]) == 2
    assert "one expert needs" in capsys.readouterr().err
