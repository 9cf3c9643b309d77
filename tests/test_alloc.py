"""Bit allocation under a size budget (``compress --target-bits``, issue 17 item 2): the
knapsack, the shared-factor GPTQ of the candidates, a group under a budget, bad input, and
jobs on the embedded model (budget met within 2% and never exceeded; the mixed-scheme checkpoint
loads, evaluates, exports and inspects; resume refuses another budget)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import plain_reader
import pytest
import torch

from qmoe_ray.errors import InputError
from qmoe_ray.job.config import CompressConfig
from qmoe_ray.quant import gptq, gptq_multi
from qmoe_ray.quant.alloc import CANDIDATES, BudgetTooSmall, allocate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the knapsack ---------------------------------------------------------------------------------
def _problem(rng: np.random.Generator, M: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Matrices whose candidates cost more bits for less loss, at random rates."""
    bits = np.cumsum(rng.uniform(0.2, 1.0, size=(M, K)), axis=1) * rng.uniform(1, 5, (M, 1))
    loss = np.cumsum(rng.uniform(0.1, 1.0, size=(M, K))[:, ::-1], axis=1)[:, ::-1]
    return bits, loss * rng.uniform(0.1, 10, (M, 1))


def test_allocation_is_within_budget_and_near_the_exhaustive_optimum():
    rng = np.random.default_rng(0)
    for trial in range(12):
        bits, loss = _problem(rng, 6, 4)
        lo, hi = bits[:, 0].sum(), bits[:, -1].sum()
        budget = lo + (hi - lo) * (trial + 0.5) / 12
        choice = allocate(bits, loss, budget)
        spent = bits[np.arange(6), choice].sum()
        assert spent <= budget
        best = min(loss[np.arange(6), c].sum()
                   for c in itertools.product(range(4), repeat=6)
                   if bits[np.arange(6), c].sum() <= budget)
        assert loss[np.arange(6), choice].sum() <= 1.05 * best


def test_allocation_spends_more_bits_for_less_loss_as_the_budget_grows():
    bits, loss = _problem(np.random.default_rng(1), 40, 8)
    prev = np.inf
    for frac in (0.1, 0.3, 0.6, 0.9):
        budget = bits[:, 0].sum() + frac * (bits[:, -1].sum() - bits[:, 0].sum())
        c = allocate(bits, loss, budget)
        total = loss[np.arange(40), c].sum()
        assert bits[np.arange(40), c].sum() <= budget and total < prev
        assert budget - bits[np.arange(40), c].sum() < 0.05 * budget  # spends what it has
        prev = total


def test_budget_below_the_cheapest_names_the_minimum():
    bits, loss = _problem(np.random.default_rng(2), 5, 3)
    with pytest.raises(BudgetTooSmall) as exc:
        allocate(bits, loss, 0.5 * bits[:, 0].sum())
    assert exc.value.minimum == pytest.approx(bits.min(axis=1).sum())


# -- the candidates share one factorization -------------------------------------------------------
def test_gptq_multi_gives_each_setting_what_gptq_gives():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 24, 32, generator=g)
    X = torch.randn(3, 96, 32, generator=g)
    H = torch.einsum("etc,etd->ecd", X, X) / 96
    settings = [("ternary", 0.0), ("ternary", 0.2), ("int2", 0.0), ("int3", 0.0)]
    multi = gptq_multi(W, H, settings, actorder=True, tokens=[96] * 3)
    for (scheme, lam), m in zip(settings, multi, strict=True):
        one = gptq(W, H, scheme, actorder=True, tokens=[96] * 3, rate_lambda=lam)
        assert m.scheme.name == scheme and torch.equal(m.codes, one.codes)
        assert all(torch.equal(m.params[k], one.params[k]) for k in one.params)
        assert torch.equal(m.loss, one.loss)
    # the lambdas change the ternary codes (a test of nothing otherwise)
    assert not torch.equal(multi[0].codes, multi[1].codes)


def _hessians(E: int, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(E, 128, C, generator=g)
    X[..., :2] *= 6  # outlier channels: the rate-aware lanes then differ from plain rounding
    return torch.randn(E, 40, C, generator=g), torch.einsum("etc,etd->ecd", X, X) / 128


def test_lanes_of_one_sweep_are_each_settings_own_sweep(monkeypatch):
    """Settings of one family share a sweep (``quant.sweep``): rate-aware int lanes of different
    widths (per-row largest codes, per-lane code tables) beside a lambda-0 lane, and a stack
    split when it passes ``LANE_ROWS``, each give what ``gptq`` of that setting alone gives."""
    import sys

    gq = sys.modules["qmoe_ray.quant.gptq"]  # the module (the package re-exports the function)

    W, H = _hessians(3, 48, 1)
    settings = [("int2", 0.3), ("int3", 0.0), ("int4", 0.1), ("ternary", 0.6), ("ternary", 0.0)]
    for lane_rows in (2048, 80):  # 80: two 40-row settings per sweep, so the ints split 2 + 1
        monkeypatch.setattr(gq, "LANE_ROWS", lane_rows)
        assert gq._batches([(gq.parse_scheme(s), lam) for s, lam in settings], False, None,
                           40) == ([[0, 1, 2], [3, 4]] if lane_rows == 2048 else
                                   [[0, 1], [2], [3, 4]])
        multi = gptq_multi(W, H, settings, actorder=True)
        for (scheme, lam), m in zip(settings, multi, strict=True):
            one = gptq(W, H, scheme, actorder=True, rate_lambda=lam)
            assert torch.equal(m.codes, one.codes), (lane_rows, scheme, lam)
            assert torch.equal(m.loss, one.loss)
    assert not torch.equal(multi[0].codes, gptq(W, H, "int2", actorder=True).codes)


def test_assigned_settings_are_each_expert_subsets_own_gptq():
    """``assign``: each expert under its own setting, in one sweep per family; a setting's
    result is ``gptq`` of its experts alone (their own rate-aware code table)."""
    W, H = _hessians(5, 32, 2)
    settings = [("ternary", 0.0), ("ternary", 0.6), ("int2", 0.0), ("int3", 0.2), ("int4", 0.0)]
    assign = [1, 3, 1, 0, 3]
    out = gptq_multi(W, H, settings, actorder=True, tokens=[128] * 5, assign=assign)
    assert out[2] is None and out[4] is None  # no expert has them
    for k in (0, 1, 3):
        ix = [e for e, a in enumerate(assign) if a == k]
        one = gptq(W[ix], H[ix], settings[k][0], actorder=True, tokens=[128] * len(ix),
                   rate_lambda=settings[k][1])
        assert out[k].codes.shape[0] == len(ix) and torch.equal(out[k].codes, one.codes)
        assert all(torch.equal(out[k].params[p], one.params[p]) for p in one.params)
        assert torch.equal(out[k].loss, one.loss) and torch.equal(out[k].tokens, one.tokens)
    with pytest.raises(ValueError, match="assign must give each of the 5 experts"):
        gptq_multi(W, H, settings, assign=[0, 1, 2])
    with pytest.raises(ValueError, match="without mask or prune"):
        gptq_multi(W, H, settings, assign=assign, mask=torch.zeros_like(W, dtype=torch.bool))


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(target_bits=0), "target_bits=0: expected a number of bits"),
    (dict(target_bits=float("nan")), "target_bits=nan"),
    (dict(target_bits=1.5, scheme="int4"), "scheme='int4': expected left out with --target-bits"),
    (dict(target_bits=1.5, rate_lambda=0.1), "rate_lambda=0.1: expected 0 with --target-bits"),
    (dict(target_bits=1.5, method="rtn"), "method='rtn': expected gptq with --target-bits"),
    (dict(target_bits=1.5, scheme="ternary", quant_group_size=64), "quant_group_size"),
    (dict(target_bits=1.5, prune="magnitude", sparsity=0.5), "prune='magnitude'"),
])
def test_target_bits_refuses_what_it_conflicts_with(kw, match):
    with pytest.raises(InputError, match=match):
        CompressConfig(**kw)


def test_budget_is_recorded_only_when_set():
    assert "target_bits" not in CompressConfig().output_options()  # old records still resume
    assert CompressConfig(target_bits=0.8).output_options()["target_bits"] == 0.8


def test_layer_budget_carries_what_earlier_layers_left():
    from qmoe_ray.job.driver import layer_budget

    assert layer_budget(None, []) is None
    assert layer_budget(1.5, []) == 1.5
    done = [{"allocation": [{"params": 1000, "bits": 1400.0}, {"params": 1000, "bits": 1500.0}]},
            {"routed": []}]  # a dense layer between: no allocation
    assert layer_budget(1.5, done) == pytest.approx(1.5 + 100 / 2000)
    over = [{"allocation": [{"params": 1000, "bits": 1500.0}]}]
    assert layer_budget(1.5, over) == 1.5


# -- one group under a budget, through the worker (no Ray) ----------------------------------------
@pytest.fixture(scope="module")
def worker_group():
    from qmoe_ray.data import embedded_model_path
    from qmoe_ray.job.group import QuantOptions
    from qmoe_ray.job.workers import QuantWorker

    def make(target: float) -> QuantWorker:
        opts = QuantOptions.from_config(CompressConfig(target_bits=target))
        return QuantWorker(str(embedded_model_path()), None, opts)

    w = make(1.0)
    layer = next(lay for lay in w.family.layers() if lay.moe)
    rng = np.random.default_rng(0)
    d = w.family.read_experts(layer, w.ckpt, [0])[w.family.expert_spec.in_roles[0]].shape[2]
    experts = [0, 1, 2, 3]
    parts = [[(rng.standard_normal((64, d)).astype(np.float32), np.ones(64, dtype=bool))
              for _ in experts]]
    return make, layer, experts, parts


def _group_bits(enc) -> float:
    return 8 * sum(t.numel() * t.element_size() for t in enc.tensors.values())


@pytest.mark.parametrize("target", [0.8, 2.0])
def test_group_meets_its_budget_with_mixed_settings(worker_group, target):
    make, layer, experts, parts = worker_group
    enc, _ = make(target).run(layer, 0, experts, parts, None)
    params = sum(int(np.prod(e["shape"])) for e in enc.entries.values())
    bits = _group_bits(enc)  # codes, scales and the shared tables: all the group stores
    assert bits == enc.allocation["bits"] and bits <= target * params
    # 12 matrices, whose settings differ by up to 1/12 of the group's bits: a step short at most
    assert bits >= 0.9 * target * params
    settings = {e["setting"] for e in enc.entries.values()}
    assert len(settings) > 1 and settings <= {
        (s if not lam else f"{s}@{lam:g}") for s, lam in CANDIDATES}
    assert all(e["scheme"] == e["setting"].split("@")[0] for e in enc.entries.values())


def test_group_budget_below_the_minimum_or_above_the_richest(worker_group):
    make, layer, experts, parts = worker_group
    with pytest.raises(InputError, match=r"--target-bits 0.05: below what the cheapest "
                       r"candidate settings reach .* the minimum is 0\.\d+ bits per expert "
                       r"parameter; give --target-bits 0\.\d+ or more"):
        make(0.05).run(layer, 0, experts, parts, None)
    enc, _ = make(9.0).run(layer, 0, experts, parts, None)
    assert enc.allocation["richest"] and {e["setting"] for e in enc.entries.values()} == {"int4"}


def test_large_matrices_estimate_on_sampled_rows_and_run_the_choice_whole():
    """Rows >= 4 x SAMPLE_MIN_ROWS: candidates on a row sample; each chosen setting then runs on
    the whole matrix of the experts that chose it (exactly gptq_multi on that subset), and the
    budget still holds on the coded bits."""
    from types import SimpleNamespace

    from qmoe_ray.job.allocation import SAMPLE_MIN_ROWS, group_hessians
    from qmoe_ray.job.group import ExpertTokens, QuantOptions, quantize_group
    from qmoe_ray.job.workers import _pack_mixed
    from qmoe_ray.models.base import ExpertSpec, relu_hidden
    from qmoe_ray.quant import parse_scheme

    g = torch.Generator().manual_seed(3)
    G, d, ff, T = 3, 48, 4 * SAMPLE_MIN_ROWS, 256
    spec = ExpertSpec(("wi",), ("wo",), relu_hidden("wi"))
    W = {"wi": torch.randn(G, ff, d, generator=g) * d**-0.5,
         "wo": torch.randn(G, d, ff, generator=g) * ff**-0.5}
    xs = [torch.randn(T, d, generator=g) for _ in range(G)]
    toks = [ExpertTokens(x.numpy(), np.ones(T, dtype=bool)) for x in xs]
    params = sum(w[0].numel() for w in W.values()) * G
    layer, names = SimpleNamespace(name="l", index=0), [{"wi": f"{i}.wi", "wo": f"{i}.wo"}
                                                        for i in range(G)]

    def measure(results, choices):
        t, _, _ = _pack_mixed(layer, 0, list(range(G)), names, results, choices, 4096)
        return 8 * sum(v.numel() * v.element_size() for v in t.values())

    opts = QuantOptions(parse_scheme("ternary"), target_bits=1.2)
    res = quantize_group(spec, W, toks, opts, measure=measure)
    assert res.allocation["sampled_rows"] == {"wi": ff // 4 if ff // 16 < SAMPLE_MIN_ROWS
                                              else ff // 16, "wo": None}
    assert res.allocation["bits"] == measure(res.results, res.choices) <= 1.2 * params
    assert res.allocation["bits"] >= 0.9 * 1.2 * params
    # the in matrices' results: the chosen setting over the whole matrix of its experts
    H, _ = group_hessians(xs, d)
    labels = [(s if not lam else f"{s}@{lam:g}") for s, lam in CANDIDATES]
    for lab in set(res.choices["wi"]):
        idx = [i for i, c in enumerate(res.choices["wi"]) if c == lab]
        sc, lam = CANDIDATES[labels.index(lab)]
        ref = gptq_multi(W["wi"][idx], H[idx], [(sc, lam)], actorder=opts.actorder,
                         percdamp=opts.percdamp, blocksize=opts.blocksize)[0]
        for j, i in enumerate(idx):
            assert res.results["wi"][i].codes.shape == (1, ff, d)
            assert torch.equal(res.results["wi"][i].codes[0], ref.codes[j])


def test_a_choice_that_leaves_budget_unspent_is_loosened_and_never_exceeds():
    """A coder cheaper than the estimate (here: told 0.8x the true bits) leaves budget unspent:
    the choice is made again with it (more bits, less loss), and still never over the budget."""
    from qmoe_ray.job.group import ExpertTokens, QuantOptions, quantize_group
    from qmoe_ray.models.base import ExpertSpec, relu_hidden
    from qmoe_ray.quant import parse_scheme
    from qmoe_ray.quant.alloc import estimate_bits

    g = torch.Generator().manual_seed(5)
    G, d, ff, T = 6, 32, 48, 128
    spec = ExpertSpec(("wi",), ("wo",), relu_hidden("wi"))
    W = {"wi": torch.randn(G, ff, d, generator=g), "wo": torch.randn(G, d, ff, generator=g)}
    toks = [ExpertTokens(torch.randn(T, d, generator=g).numpy(), np.ones(T, dtype=bool))
            for _ in range(G)]
    params = 2 * G * d * ff
    seen = []

    def measure(results, choices):
        seen.append(0.8 * float(sum(estimate_bits(q).sum() for per in results.values()
                                    for q in per)))
        return seen[-1]

    opts = QuantOptions(parse_scheme("ternary"), target_bits=1.5)
    res = quantize_group(spec, W, toks, opts, measure=measure)
    a = res.allocation
    assert a["loosened"] >= 1 and len(seen) >= 2
    assert a["bits"] == seen[-1] <= 1.5 * params
    assert a["bits"] > seen[0]  # the loosened choice spends what the first left


# -- jobs on the embedded model -------------------------------------------------------------------
_JOB = dict(num_samples=32, seq_len=32, eval_samples=4, batch_size=16, group_size=8)


@pytest.fixture(scope="module")
def ray_local():
    from qmoe_ray.job.cluster import ray_init, shutdown

    ray_init(CompressConfig())
    yield
    shutdown()


@pytest.fixture(scope="module")
def budget_jobs(ray_local, tmp_path_factory) -> dict[float, Path]:
    """``--target-bits`` 0.8, 1.5 and 3 on the embedded model; the 1.5 job is stopped after its
    first layer, a rerun with another budget refused, and then resumed to the end."""
    from qmoe_ray.job.driver import run_compression

    root = tmp_path_factory.mktemp("budget")
    outs: dict[float, Path] = {}

    def stop(event, info):
        if event == "layer_done" and info["layer"].moe:
            raise KeyboardInterrupt  # stands in for a lost driver

    out = root / "b1.5"
    with pytest.raises(KeyboardInterrupt):
        run_compression(CompressConfig(**_JOB, output=str(out), target_bits=1.5),
                        progress=False, hook=stop)
    with pytest.raises(ValueError, match=r"target_bits=1.5 \(now 0.8\).*--overwrite"):
        run_compression(CompressConfig(**_JOB, output=str(out), target_bits=0.8),
                        progress=False)
    run_compression(CompressConfig(**_JOB, output=str(out), target_bits=1.5), progress=False)
    outs[1.5] = out
    for b in (0.8, 3.0):
        outs[b] = root / f"b{b}"
        run_compression(CompressConfig(**_JOB, output=str(outs[b]), target_bits=b),
                        progress=False)
    return outs


@pytest.mark.slow
@pytest.mark.ray
def test_budget_lands_within_two_percent_and_never_above(budget_jobs):
    from qmoe_ray.read.inspect import summarize

    for b, out in budget_jobs.items():
        manifest = plain_reader.load_manifest(out)
        info = summarize(manifest)
        bits = info["bits_per_param"]["experts"]  # the number inspect prints
        assert bits <= b and bits >= 0.98 * b, (b, bits)
        report = json.loads((out / "report.json").read_text())
        assert report["sizes"]["expert_bits_per_param"] == pytest.approx(bits)
        assert all(r["budget"]["bits_per_param"] <= r["budget"]["target_bits_per_param"]
                   for r in report["layers"])
        assert len(info["mix"]) > 1  # a mix, not one setting
    # 3 bits per parameter is mostly int3/int4, 0.8 almost all (sparse) ternary
    mix3 = summarize(plain_reader.load_manifest(budget_jobs[3.0]))["mix"]
    mix08 = summarize(plain_reader.load_manifest(budget_jobs[0.8]))["mix"]
    assert sum(m["params"] for k, m in mix3.items() if k in ("int3", "int4")) > sum(
        m["params"] for m in mix3.values()) / 2
    assert sum(m["params"] for k, m in mix08.items() if k.startswith("ternary")) > 0.9 * sum(
        m["params"] for m in mix08.values())


@pytest.mark.slow
@pytest.mark.ray
def test_mixed_checkpoint_loads_evaluates_exports_and_inspects(budget_jobs, tmp_path, capsys):
    import transformers as tf

    from qmoe_ray.data import load_samples
    from qmoe_ray.read.export import export
    from qmoe_ray.read.inspect import main as inspect_main
    from qmoe_ray.read.loader import load

    ckpt = budget_jobs[1.5]
    manifest = plain_reader.load_manifest(ckpt)
    # one layer mixes schemes within a role: ternary, int2 and bit-packed matrices side by side
    by_layer: dict[int, set[str]] = {}
    for e in manifest["quantized"].values():
        by_layer.setdefault(e["layer"], set()).add(e["scheme"])
    assert any(len(s) >= 2 for s in by_layer.values()), by_layer

    # load: every matrix decodes to what an independent reader makes of the stored bytes
    ref_manifest = plain_reader.read_manifest(ckpt)
    tensors = plain_reader.read_verified(ckpt, ref_manifest)
    decoded, resident = load(str(ckpt)), load(str(ckpt), mode="resident")
    for n in manifest["quantized"]:
        ref = torch.from_numpy(plain_reader.dense_weight(n, ref_manifest, tensors))
        assert torch.equal(decoded.experts[n].float(), ref), n
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 2000, size=(2, 10)))
    logits = decoded.logits(ids)
    torch.testing.assert_close(resident.logits(ids), logits, rtol=0, atol=1e-5)

    # evaluate: the held-out loss of the loaded model is the job's
    held = load_samples("embedded", decoded.config, _JOB["eval_samples"], _JOB["seq_len"],
                        split="heldout")
    loss, _ = decoded.loss({k: torch.from_numpy(v) for k, v in held.items()})
    assert loss == pytest.approx(manifest["heldout_loss"], rel=1e-4)

    # export: transformers loads the HF folder and gives our logits
    out = tmp_path / "hf"
    export(str(ckpt), str(out))
    model = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)

    # inspect: the mix, by setting, and the budget
    assert inspect_main(_inspect_args(ckpt)) == 0
    text = capsys.readouterr().out
    assert "size budget --target-bits 1.5" in text
    for k in {e["setting"] for e in manifest["quantized"].values()}:
        assert f"  {k} " in text
    assert "Size budget (`--target-bits 1.5`)" in (ckpt / "report.md").read_text()


def _inspect_args(ckpt: Path):
    import argparse

    from qmoe_ray.read.inspect import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args([str(ckpt), "--no-verify"])
