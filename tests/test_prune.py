"""Expert pruning: masks (magnitude, Wanda, SparseGPT; unstructured, N:M), pruning joint with GPTQ,
the job's options and bad input, the manifest record, inspect, resume; on the embedded Mixtral the
held-out loss ordering of the methods and what pruning saves on top of ternary."""

from __future__ import annotations

import plain_reader
import pytest
import torch

from qmoe_ray.errors import InputError
from qmoe_ray.job.config import CompressConfig
from qmoe_ray.quant import gptq
from qmoe_ray.quant.prune import PruneSpec, parse_pattern, prune_mask, sparsegpt

pytestmark = pytest.mark.usefixtures("module_ray")  # every job here runs in-process


def _layer(R: int = 48, C: int = 256, T: int = 2048, seed: int = 0):
    """A matrix with correlated inputs and a few outlier channels (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(C, C, generator=g) * 0.3 + torch.eye(C)
    X = torch.randn(T, C, generator=g) @ A
    X[:, :8] *= 10.0
    W = torch.randn(R, C, generator=g)
    return W, X, X.T @ X / T


def _err(W, Wp, X) -> float:
    return float(((W - Wp) @ X.T).norm())


def _masks(W, H, spec):
    if spec.method == "sparsegpt":
        return sparsegpt(W, H, spec)[1]
    return prune_mask(W, H, spec)


# -- masks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_exactly_n_zeros_in_every_m(method, pattern):
    W, _, H = _layer()
    n, m = parse_pattern(pattern)
    mask = _masks(W, H, PruneSpec(method, pattern=pattern))
    per_group = mask.reshape(W.shape[0], -1, m).sum(-1)
    assert (per_group == n).all()
    if method == "sparsegpt":
        Wp, mask = sparsegpt(W, H, PruneSpec(method, pattern=pattern))
        assert (Wp[mask] == 0).all() and (Wp[~mask] != 0).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_exact_ratio_per_row(method, s):
    W, _, H = _layer(C=200)  # 200 columns: not a multiple of SparseGPT's 128-column block
    mask = _masks(W, H, PruneSpec(method, sparsity=s))
    assert (mask.sum(dim=1) == round(s * 200)).all()


def test_nm_trailing_partial_group_stays_dense():
    W = torch.randn(3, 10)
    mask = prune_mask(W, None, PruneSpec("magnitude", pattern="2:4"))
    assert mask[:, :8].reshape(3, 2, 4).sum(-1).eq(2).all() and not mask[:, 8:].any()


def test_output_error_sparsegpt_below_wanda_below_magnitude():
    for seed in range(3):
        W, X, H = _layer(seed=seed)
        errs = {}
        for method in ("magnitude", "wanda"):
            errs[method] = _err(W, W.masked_fill(prune_mask(W, H, PruneSpec(method, 0.5)), 0), X)
        errs["sparsegpt"] = _err(W, sparsegpt(W, H, PruneSpec("sparsegpt", 0.5))[0], X)
        assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


# -- joint with GPTQ ------------------------------------------------------------------------------
@pytest.mark.parametrize("actorder", [False, True])
def test_joint_ternary_sparsegpt_keeps_zeros_and_beats_quantize_then_zero(actorder):
    W, X, H = _layer()
    C = W.shape[1]
    joint = gptq(W, H, "ternary", actorder=actorder, prune=PruneSpec("sparsegpt", 0.5))
    Q = joint.dequantize()
    assert float(joint.pruned[0]) == 0.5
    assert ((Q == 0).sum(dim=1) >= C // 2).all()  # the mask's half, plus ternary's own zeros
    plain = gptq(W, H, "ternary", actorder=actorder).dequantize()
    mask = sparsegpt(W, H, PruneSpec("sparsegpt", 0.5))[1]
    then_zero = plain.masked_fill(mask, 0.0)
    assert _err(W, Q, X) < _err(W, then_zero, X)
    # a fixed (Wanda) mask: exactly zero where pruned, and better than zeroing after GPTQ
    wmask = prune_mask(W, H, PruneSpec("wanda", 0.5))
    Qw = gptq(W, H, "ternary", actorder=actorder, mask=wmask).dequantize()
    assert (Qw[wmask] == 0).all()
    assert _err(W, Qw, X) < _err(W, plain.masked_fill(wmask, 0.0), X)


@pytest.mark.parametrize("scheme,gs", [("int2", None), ("int4", None), ("int4", 64),
                                       ("int8", 32), ("ternary", None)])
def test_pruned_positions_are_exact_zeros_of_every_grid(scheme, gs):
    from qmoe_ray.quant import parse_scheme

    W, _, H = _layer(R=16)
    W = W + 3.0  # rows far from zero: the asymmetric grid still holds an exact 0
    mask = prune_mask(W, H, PruneSpec("magnitude", pattern="2:4"))
    for kw in ({"mask": mask}, {"prune": PruneSpec("sparsegpt", pattern="2:4")}):
        res = gptq(W, H, parse_scheme(scheme, gs), actorder=False, **kw)
        Q = res.dequantize()
        assert (Q.reshape(16, -1, 4) == 0).sum(-1).ge(2).all()
        assert float(res.pruned[0]) == 0.5
    assert (gptq(W, H, parse_scheme(scheme, gs), mask=mask).dequantize()[mask] == 0).all()


def test_rate_aware_with_mask_keeps_zeros():
    W, _, H = _layer(R=16)
    mask = prune_mask(W, H, PruneSpec("wanda", 0.5))
    Q = gptq(W, H, "ternary", mask=mask, rate_lambda=0.05).dequantize()
    assert (Q[mask] == 0).all()


def test_prune_spec_and_mask_bad_input():
    with pytest.raises(ValueError, match="N:M with 1 <= N < M"):
        parse_pattern("4:4")
    with pytest.raises(ValueError, match="N:M"):
        parse_pattern("2-4")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PruneSpec("magnitude", sparsity=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        PruneSpec("magnitude", sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="unknown"):
        PruneSpec("random", sparsity=0.5)
    W, _, H = _layer(R=8)
    with pytest.raises(ValueError, match="does not match"):
        gptq(W, H, "ternary", mask=torch.zeros(4, W.shape[1], dtype=torch.bool))
    with pytest.raises(ValueError, match="column sweep"):
        prune_mask(W, H, PruneSpec("sparsegpt", 0.5))
    with pytest.raises(ValueError, match="actorder=False"):
        gptq(W, H, "ternary", actorder=True, prune=PruneSpec("sparsegpt", pattern="2:4"))


# -- the job's options ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,flag", [
    (dict(prune="sparsegpt", prune_pattern="4:2", actorder=False), "--prune-pattern"),
    (dict(prune="wanda", prune_pattern="2:2"), "--prune-pattern"),
    (dict(prune="wanda", sparsity=1.0), "--sparsity"),
    (dict(prune="wanda", sparsity=-0.1), "--sparsity"),
    (dict(prune="wanda", sparsity=0.5, prune_pattern="2:4"), "--prune"),
    (dict(prune="wanda"), "--prune"),
    (dict(sparsity=0.5), "--sparsity"),
    (dict(prune_pattern="2:4"), "--prune-pattern"),
    (dict(prune="random", sparsity=0.5), "--prune"),
    (dict(prune="sparsegpt", sparsity=0.5, method="rtn"), "--prune"),
    (dict(prune="sparsegpt", prune_pattern="2:4"), "--no-actorder"),
])
def test_config_bad_prune_options_name_the_flag(kw, flag):
    with pytest.raises(InputError, match=flag):
        CompressConfig(**kw)


def test_cli_prune_flags_and_missing_method(capsys):
    import argparse

    from qmoe_ray.job.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg, _ = config_from_args(parser.parse_args(
        ["--prune", "wanda", "--sparsity", "0.5", "--scheme", "int4"]))
    assert (cfg.prune, cfg.sparsity, cfg.prune_pattern) == ("wanda", 0.5, None)
    cfg, _ = config_from_args(parser.parse_args(
        ["--prune", "sparsegpt", "--prune-pattern", "2:4", "--no-actorder"]))
    assert cfg.prune_pattern == "2:4"
    with pytest.raises(SystemExit):
        parser.parse_args(["--prune", "--sparsity", "0.5"])
    assert "--prune" in capsys.readouterr().err


def test_group_rtn_and_gptq_record_sparsity():
    import numpy as np

    from qmoe_ray.job.group import ExpertTokens, QuantOptions, quantize_group
    from qmoe_ray.models.base import ExpertSpec, swiglu_hidden
    from qmoe_ray.quant import parse_scheme

    spec = ExpertSpec(("gate", "up"), ("down",), swiglu_hidden)
    g = torch.Generator().manual_seed(0)
    G, d, ff = 2, 16, 24
    W = {"gate": torch.randn(G, ff, d, generator=g), "up": torch.randn(G, ff, d, generator=g),
         "down": torch.randn(G, d, ff, generator=g)}
    toks = [ExpertTokens(torch.randn(n, d, generator=g).numpy(), np.ones(n, dtype=bool))
            for n in (40, 0)]
    for method, prune in (("gptq", "sparsegpt"), ("gptq", "wanda"), ("rtn", "magnitude")):
        opts = QuantOptions(parse_scheme("int4"), method=method, actorder=prune != "sparsegpt",
                            prune=PruneSpec(prune, pattern="2:4"))
        res = quantize_group(spec, W, toks, opts)
        for st in res.stats:
            assert st["sparsity"] == {"gate": 0.5, "up": 0.5, "down": 0.5}
        for r in res.results.values():
            Q = r.dequantize()
            assert (Q.reshape(G, Q.shape[1], -1, 4) == 0).sum(-1).ge(2).all()
            assert np.isfinite(r.loss.numpy()).all()


def test_manifest_refuses_a_bad_sparsity_record():
    from qmoe_ray.errors import CheckpointError
    from qmoe_ray.format.manifest import _check_quantized

    entry = {"scheme": "ternary", "shape": [4, 4], "fields": [], "params": [], "codec": {}}
    _check_quantized("m", {**entry, "sparsity": 0.5}, "manifest.json")
    with pytest.raises(CheckpointError, match="sparsity"):
        _check_quantized("m", {**entry, "sparsity": 1.5}, "manifest.json")


def test_resume_refuses_another_pruning_setting():
    from qmoe_ray.format import manifest as mf
    from qmoe_ray.job.progress import check_same_job

    def job(**kw):
        return {"format": mf.FORMAT_NAME, "format_version": mf.PLAIN_VERSION, "source": "s",
                "source_fingerprint": "f", "options": CompressConfig(**kw).output_options()}

    a = job(prune="wanda", sparsity=0.5)
    check_same_job(a, job(prune="wanda", sparsity=0.5), "out")
    for other in (job(), job(prune="magnitude", sparsity=0.5), job(prune="wanda", sparsity=0.6),
                  job(prune="wanda", prune_pattern="2:4")):
        with pytest.raises(ValueError, match="prune|sparsity"):
            check_same_job(a, other, "out")
    # a record written before pruning existed (no prune keys) resumes an unpruned run
    old = job()
    for k in ("prune", "sparsity", "prune_pattern"):
        del old["options"][k]
    check_same_job(old, job(), "out")


# -- the embedded Mixtral through the Ray job -----------------------------------------------------
_SMALL = dict(num_samples=32, seq_len=32, eval_samples=8, batch_size=16, group_size=8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Held-out loss and expert bits/param of the embedded model for each pruning setting."""
    from qmoe_ray.job.driver import run_compression

    settings = {
        "int8": dict(scheme="int8"),
        "int8+magnitude": dict(scheme="int8", prune="magnitude", sparsity=0.5),
        "int8+wanda": dict(scheme="int8", prune="wanda", sparsity=0.5),
        "int8+sparsegpt": dict(scheme="int8", prune="sparsegpt", sparsity=0.5),
        "ternary": dict(scheme="ternary"),
    }
    out = {}
    for name, kw in settings.items():
        path = tmp_path_factory.mktemp("prune") / "ckpt"
        rep = run_compression(CompressConfig(output=str(path), **_SMALL, **kw), progress=False)
        proxy: dict[str, float] = {}
        for stats in plain_reader.load_manifest(path)["experts"].values():
            for st in stats:
                for role, v in st["proxy_loss"].items():
                    proxy[role] = proxy.get(role, 0.0) + v
        out[name] = {"loss": rep["heldout_loss"], "proxy": proxy,
                     "bits": rep["sizes"]["expert_bits_per_param"], "path": path}
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_sparsegpt_costs_less_than_magnitude(runs):
    """50% unstructured on the int8 grid (near-lossless: the rise is the pruning's).

    Measured here: SparseGPT has the lowest layer-wise (proxy) loss in every role and the lowest
    held-out rise, though by little over magnitude. Wanda does *not* beat magnitude on this model
    (held-out rise about twice magnitude's; lower proxy loss for ``down`` only, higher for
    ``gate``/``up`` once GPTQ compensates the mask): its figures are printed, not asserted.
    """
    base = runs["int8"]["loss"]
    rise = {m: runs[f"int8+{m}"]["loss"] - base for m in ("magnitude", "wanda", "sparsegpt")}
    print("held-out loss rise at 50% (int8 grid):", rise)
    print("proxy loss per role:", {m: runs[f"int8+{m}"]["proxy"] for m in rise})
    assert 0 < rise["sparsegpt"] < rise["magnitude"]
    assert rise["wanda"] > 0
    sg, mag = runs["int8+sparsegpt"]["proxy"], runs["int8+magnitude"]["proxy"]
    assert all(sg[r] < mag[r] for r in mag)
    assert runs["int8+wanda"]["proxy"]["down"] < mag["down"]


@pytest.mark.ray
@pytest.mark.slow
def test_cli_ternary_sparsegpt_job_manifest_and_inspect(runs, tmp_path, capsys):
    """One real job through the CLI and Ray: the manifest records the pruning, inspect shows it,
    and it has more zeros and fewer bits per parameter than ternary alone."""
    from qmoe_ray.cli import main
    from qmoe_ray.quant.prune import sparsity
    from qmoe_ray.read.loader import load

    out = tmp_path / "ckpt"
    args = ["compress", "--output", str(out), "--prune", "sparsegpt", "--sparsity", "0.5",
            "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in _SMALL.items()]
    assert main(args) == 0
    capsys.readouterr()
    m = plain_reader.load_manifest(out)
    assert m["options"]["prune"] == "sparsegpt" and m["options"]["sparsity"] == 0.5
    assert m["quantized"] and all(e["sparsity"] == 0.5 for e in m["quantized"].values())
    stats = [s for v in m["experts"].values() for s in v]
    assert stats and all(set(s["sparsity"].values()) == {0.5} for s in stats)
    assert main(["inspect", str(out), "--no-verify"]) == 0
    text = capsys.readouterr().out
    assert "pruning: sparsegpt, 50% unstructured" in text and "mean 0.5000" in text
    assert "experts pruned: sparsegpt, 50% unstructured" in (out / "report.md").read_text()

    pruned, plain = load(str(out)), load(str(runs["ternary"]["path"]))
    names = list(m["quantized"])
    zp = sum(sparsity(pruned.W(n)) for n in names) / len(names)
    z0 = sum(sparsity(plain.W(n)) for n in names) / len(names)
    bits = m["sizes"]["expert_bits_per_param"]
    print(f"ternary: loss {runs['ternary']['loss']:.4f}, {runs['ternary']['bits']:.3f} bits; "
          f"+sparsegpt 50%: loss {m['heldout_loss']:.4f}, {bits:.3f} bits; zeros {z0:.3f} -> "
          f"{zp:.3f}")
    assert zp > z0 and zp >= 0.5
    assert bits < runs["ternary"]["bits"]
