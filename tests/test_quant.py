"""Tests of the quantization core: grids, RTN and batched GPTQ (CPU, small shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qmoe_ray.quant import (
    SCHEMES,
    QuantResult,
    Scheme,
    dequantize,
    gptq,
    hessian,
    parse_scheme,
    rtn,
)

ALL_SCHEMES = [parse_scheme(s) for s in SCHEMES] + [
    parse_scheme("int2", 16),
    parse_scheme("int4", 32),
    parse_scheme("int3", 24),
]


def ids(s: Scheme) -> str:
    return s.name if s.group_size is None else f"{s.name}g{s.group_size}"


def correlated_activations(E: int, T: int, C: int, seed: int = 0) -> torch.Tensor:
    """Activations like an LLM's: correlated channels and a few large outlier channels."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(E, T, C, generator=g)
    mix = torch.eye(C) + 0.3 * torch.randn(C, C, generator=g) / C**0.5
    X = Z @ mix + 0.8 * Z[..., :1]  # a shared component correlates every channel
    X[..., [1, 5, 9]] *= 25.0  # outlier channels
    return X


def make_group(E: int = 4, R: int = 48, C: int = 64, T: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(E, R, C, generator=g) * 0.05
    H, n = hessian(correlated_activations(E, T, C, seed))
    return W, H, n


def reference_gptq(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, percdamp: float = 0.1):
    """A plain one-expert, one-column-at-a-time GPTQ in float64 (no lazy blocks), per-row grids.

    It follows the textbook form (damp, Cholesky of H^-1, sweep) independently of the code under
    test, except for the grid functions, which are tested separately.
    """
    from qmoe_ray.quant.grids import grid_params, int_params_from_range, quantize

    params = grid_params(W[None], scheme)
    gs = scheme.group_size
    Wd = W.double().clone()
    Hd = H.double().clone()
    Hd += torch.eye(H.shape[0], dtype=torch.float64) * percdamp * torch.diag(Hd).mean()
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    codes = torch.empty(W.shape, dtype=scheme.code_dtype)
    for j in range(W.shape[1]):
        if gs is not None and j % gs == 0:  # the group's grid, from the weights updated so far
            grp = Wd[:, j : j + gs].float()
            lo, hi = grp.amin(1), grp.amax(1)
            scale, zero = int_params_from_range(lo, hi, scheme.bits, torch.bfloat16)
            params = {"scale": scale[None, :, None], "zero": zero[None, :, None]}
        col = Wd[:, j].float()[None, :, None]
        s = parse_scheme(scheme.name)  # one column: per-row form of the current grid
        c = quantize(col, s, params)
        q = dequantize(s, c, params)[0, :, 0].double()
        codes[:, j] = c[0, :, 0]
        err = (Wd[:, j] - q) / U[j, j]
        Wd[:, j:] -= err[:, None] * U[j, j:][None, :]
    return codes


# -- schemes ---------------------------------------------------------------------------------------
def test_parse_scheme_names_and_errors():
    assert parse_scheme("ternary") == Scheme("ternary", None)
    assert parse_scheme("INT4", 128) == Scheme("int4", 4, 128)
    assert parse_scheme("int8").code_dtype == torch.uint8
    assert parse_scheme("ternary").code_dtype == torch.int8
    with pytest.raises(ValueError, match="ternary, int2"):
        parse_scheme("int5")
    with pytest.raises(ValueError, match="group_size"):
        parse_scheme("ternary", 64)
    with pytest.raises(ValueError, match="group_size"):
        parse_scheme("int4", 0)
    with pytest.raises(ValueError, match="bits"):
        Scheme("int4", 3)


# -- GPTQ against RTN and a reference --------------------------------------------------------------
@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=ids)
def test_identity_hessian_gptq_equals_rtn(scheme):
    W, _, _ = make_group(E=3, R=20, C=72)
    I = torch.eye(72).expand(3, 72, 72)
    a = rtn(W, scheme)
    for kw in ({"blocksize": 128}, {"blocksize": 16}, {"actorder": True}):
        b = gptq(W, I, scheme, **kw)
        assert torch.equal(a.codes, b.codes), kw
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k]), (kw, k)
        assert torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=ids)
def test_gptq_beats_rtn_on_correlated_hessians(scheme):
    W, H, _ = make_group()
    r = rtn(W, scheme, H)
    for actorder in (False, True):
        g = gptq(W, H, scheme, actorder=actorder)
        assert g.fallback == [None] * 4
        assert (g.loss < r.loss).all(), (actorder, g.loss, r.loss)
    # GPTQ is much better than RTN on these Hessians, not marginally
    assert (gptq(W, H, scheme).loss < 0.8 * r.loss).all()


@pytest.mark.parametrize(
    "scheme",
    [parse_scheme(n, g) for n, g in (("ternary", None), ("int3", None), ("int2", 12), ("int4", 5))],
    ids=ids,
)
def test_gptq_matches_textbook_reference(scheme):
    W, H, _ = make_group(E=1, R=32, C=60)
    ref = reference_gptq(W[0], H[0], scheme)
    for bs in (8, 128):
        got = gptq(W[0], H[0], scheme, blocksize=bs).codes[0]
        agree = (ref == got).float().mean().item()
        assert agree > 0.99, (bs, agree)


def test_loss_is_the_proxy_trace():
    W, H, _ = make_group(E=2)
    g = gptq(W, H, "int2")
    D = (W - g.dequantize()).double()
    expect = torch.einsum("erc,ecd,erd->e", D, H.double(), D)
    assert torch.allclose(g.loss, expect, rtol=1e-4)
    r = rtn(W, "int2")
    assert torch.allclose(r.loss, ((W - r.dequantize()).double() ** 2).sum((1, 2)))


def test_batched_equals_loop_of_single_experts():
    W, H, n = make_group(E=5, R=24, C=80)
    for scheme in (parse_scheme("ternary"), parse_scheme("int4", 32)):
        for actorder in (False, True):
            joint = gptq(W, H, scheme, blocksize=32, actorder=actorder, tokens=n)
            for e in range(5):
                one = gptq(W[e], H[e], scheme, blocksize=32, actorder=actorder)
                assert one.squeeze and one.dequantize().shape == (24, 80)
                assert torch.equal(joint.codes[e], one.codes[0])
                for k in joint.params:
                    assert torch.equal(joint.params[k][e], one.params[k][0])
                assert torch.allclose(joint.loss[e], one.loss[0], rtol=1e-6)


def test_actorder_is_gptq_on_the_permuted_problem():
    W, H, _ = make_group(E=2, R=16, C=48)
    g = gptq(W, H, "int3", actorder=True, blocksize=16)
    for e in range(2):
        perm = torch.argsort(torch.diagonal(H[e]), descending=True, stable=True)
        p = gptq(W[e][:, perm], H[e][perm][:, perm], "int3", blocksize=16)
        assert torch.equal(g.codes[e][:, perm], p.codes[0])


def test_blocksize_and_group_alignment_do_not_change_the_math():
    W, H, _ = make_group(E=2, R=16, C=96)
    for scheme in (parse_scheme("int2"), parse_scheme("int2", 24)):
        a = gptq(W, H, scheme, blocksize=96)
        for bs in (7, 32, 50):
            b = gptq(W, H, scheme, blocksize=bs)
            assert (a.codes == b.codes).float().mean() > 0.99, (scheme, bs)
            assert torch.allclose(a.loss, b.loss, rtol=0.02)


# -- fallbacks -------------------------------------------------------------------------------------
def test_zero_token_and_singular_experts_fall_back_others_unaffected():
    W, H, n = make_group(E=5, R=16, C=32)
    C = 32
    H2 = H.clone()
    H2[1] = 0  # no tokens
    # not positive definite (eigenvalues 2C-1 and -1): Cholesky fails on every BLAS; a rank-one
    # 2*ones matrix, singular only in exact arithmetic, factorized with tiny positive pivots on
    # some CPUs (Intel Xeon here) and failed on others
    H2[3] = torch.ones(C, C) * 2.0 - torch.eye(C)
    tokens = n.clone()
    tokens[1] = 0
    g = gptq(W, H2, "ternary", percdamp=0.0, damp_floor=0.0, tokens=tokens)
    assert g.fallback == [None, "no_tokens", None, "cholesky_failed", None]
    assert torch.equal(g.tokens, tokens)
    r = rtn(W, "ternary")
    for e in (1, 3):
        assert torch.equal(g.codes[e], r.codes[e])
    good = [0, 2, 4]
    alone = gptq(W[good], H[good], "ternary", percdamp=0.0, damp_floor=0.0)
    assert torch.equal(g.codes[good], alone.codes)
    assert torch.allclose(g.loss[good], alone.loss)
    assert g.loss[1] == 0


def test_indefinite_hessian_falls_back_with_default_damping():
    W, H, _ = make_group(E=3, R=8, C=16)
    H2 = H.clone()
    H2[2] = -torch.eye(16)  # not a Hessian of any data: Cholesky fails even when damped
    g = gptq(W, H2, "int2")
    assert g.fallback == [None, None, "cholesky_failed"]
    assert torch.equal(g.codes[:2], gptq(W[:2], H[:2], "int2").codes)


def test_few_tokens_threshold():
    W, H, _ = make_group(E=2, R=8, C=16)
    g = gptq(W, H, "int4", tokens=[3, 500], min_tokens=16)
    assert g.fallback == ["few_tokens", None]


def test_nonfinite_hessian_raises_or_falls_back():
    W, H, _ = make_group(E=3, R=8, C=16)
    H2 = H.clone()
    H2[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"experts \[0\]"):
        gptq(W, H2, "ternary")
    g = gptq(W, H2, "ternary", on_nonfinite="fallback")
    assert g.fallback == ["nonfinite_hessian", None, None]
    assert torch.isnan(g.loss[0]) and torch.isfinite(g.loss[1:]).all()
    assert torch.equal(g.codes[0], rtn(W[0], "ternary").codes[0])


def test_dead_input_columns_are_rounded_not_dropped():
    W, H, _ = make_group(E=1, R=8, C=16)
    H2 = H.clone()
    H2[:, 4, :] = 0
    H2[:, :, 4] = 0
    g = gptq(W, H2, "int4")
    assert g.fallback == [None]
    assert torch.equal(g.codes[0, :, 4], rtn(W, "int4").codes[0, :, 4])


# -- dtypes, determinism, grids --------------------------------------------------------------------
def test_half_precision_inputs_are_upcast():
    W, H, _ = make_group(E=2, R=16, C=32)
    Wb, Hh = W.to(torch.bfloat16), H.to(torch.float16)
    g = gptq(Wb, Hh, "int4")
    ref = gptq(Wb.float(), Hh.float(), "int4")
    assert torch.equal(g.codes, ref.codes)
    assert g.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(rtn(Wb, "ternary").codes, rtn(Wb.float(), "ternary").codes)


_DIGEST_CHILD = """
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from test_quant import make_group
from qmoe_ray.quant import gptq
W, H, _ = make_group()
r = gptq(W, H, "ternary", actorder=True)
print(hashlib.sha256(r.codes.numpy().tobytes() + r.loss.numpy().tobytes()).hexdigest())
"""


def test_deterministic_across_processes_threads_and_group_order():
    """What byte-identical resumes rest on: the same group quantized in a fresh process with
    another torch thread count gives the same codes and losses to the bit, and so does each
    expert quantized in a group of another order or size (experts do not interact)."""
    import hashlib
    import subprocess
    import sys

    W, H, _ = make_group()
    a = gptq(W, H, "ternary", actorder=True)
    mine = hashlib.sha256(a.codes.numpy().tobytes() + a.loss.numpy().tobytes()).hexdigest()
    here = str(Path(__file__).resolve().parent)
    threads = 1 if torch.get_num_threads() > 1 else 2
    child = subprocess.run([sys.executable, "-c", _DIGEST_CHILD, here, str(threads)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[-1] == mine
    perm = torch.tensor([2, 0, 3, 1])
    b = gptq(W[perm], H[perm], "ternary", actorder=True)
    assert torch.equal(b.codes, a.codes[perm]) and torch.equal(b.loss, a.loss[perm])
    c = gptq(W[1:3], H[1:3], "ternary", actorder=True)
    assert torch.equal(c.codes, a.codes[1:3]) and torch.equal(c.loss, a.loss[1:3])
    # and the digest is a function of the input: another group gives another one
    W2, H2, _ = make_group(seed=5)
    assert not torch.equal(gptq(W2, H2, "ternary", actorder=True).codes, a.codes)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=ids)
def test_codes_in_range_and_values_on_grid(scheme):
    W, H, _ = make_group(E=3, R=16, C=48)
    g = gptq(W, H, scheme)
    Q = g.dequantize()
    assert g.codes.shape == W.shape and g.codes.dtype == scheme.code_dtype
    for v in g.params.values():  # stored in bf16 without loss
        assert torch.equal(v.to(torch.bfloat16).float(), v)
    if scheme.is_ternary:
        assert set(g.codes.unique().tolist()) <= {-1, 0, 1}
        lo, hi = g.params["lo"][..., None], g.params["hi"][..., None]
        assert ((Q == lo) | (Q == 0) | (Q == hi)).all()
        assert (lo <= 0).all() and (hi >= 0).all()
        assert torch.equal(lo[..., 0], W.amin(-1).clamp(max=0).bfloat16().float())
        assert (g.codes == 0).float().mean() > 0.3  # ternary grids are naturally sparse
    else:
        assert int(g.codes.max()) < 2**scheme.bits
        G = scheme.num_groups(48)
        assert g.params["scale"].shape == (3, 16, G)
        z = g.params["zero"]
        assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= scheme.maxq).all()
        # every value is scale * (integer in [0, maxq] - zero), and 0 is on the grid
        from qmoe_ray.quant.grids import expand_groups

        s = expand_groups(g.params["scale"], 48, scheme.group_size)
        zz = expand_groups(z, 48, scheme.group_size)
        k = Q / s + zz
        assert torch.allclose(k, k.round(), atol=1e-3)
        assert (k.round() >= 0).all() and (k.round() <= scheme.maxq).all()
        assert torch.equal(dequantize(scheme, zz.to(torch.uint8), g.params), torch.zeros_like(W))


def test_rtn_ternary_thresholds_at_half():
    W = torch.tensor([[1.0, 0.51, 0.5, 0.0, -0.24, -0.26, -0.5]])
    r = rtn(W, "ternary", scale_dtype=None)
    assert r.codes[0, 0].tolist() == [1, 1, 0, 0, 0, -1, -1]
    assert r.dequantize().tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0, -0.5, -0.5]]
    pos = rtn(torch.tensor([[0.0, 0.3, 1.0]]), "ternary")
    assert pos.params["lo"].item() == 0 and pos.codes.min() == 0


def test_int_grid_keeps_zero_exact_and_all_zero_rows():
    W = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    r = rtn(W, "int2")
    Q = r.dequantize()
    assert torch.equal(Q[0], torch.zeros(4))
    assert torch.allclose(Q[1], W[1], atol=0.4 / 3 / 2 + 1e-3)


# -- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    W, H, _ = make_group(E=2, R=8, C=16)
    with pytest.raises(ValueError, match="H must have shape"):
        gptq(W, H[:, :8, :8], "int4")
    with pytest.raises(ValueError, match="H must have shape"):
        gptq(W, H[:1], "int4")
    bad = W.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        gptq(bad, H, "int4")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        gptq(W, H, "int7")
    with pytest.raises(ValueError, match="W must be a floating"):
        rtn(W.to(torch.int32), "int4")
    with pytest.raises(ValueError, match="H must be a floating"):
        gptq(W, H.to(torch.int64), "int4")
    with pytest.raises(ValueError, match="tokens"):
        gptq(W, H, "int4", tokens=[1, 2, 3])
    with pytest.raises(ValueError, match="blocksize"):
        gptq(W, H, "int4", blocksize=0)
    with pytest.raises(ValueError, match="W must be"):
        rtn(torch.zeros(3), "int4")
    with pytest.raises(ValueError, match="params"):
        dequantize("int4", torch.zeros(2, 3, dtype=torch.uint8), {"lo": torch.zeros(2)})


def test_result_type_and_squeeze():
    W, H, _ = make_group(E=1, R=8, C=16)
    g = gptq(W[0], H[0], "int8")
    assert isinstance(g, QuantResult)
    assert g.squeeze and g.codes.shape == (1, 8, 16) and g.dequantize().shape == (8, 16)
    assert g.loss.dtype == torch.float64 and g.tokens is None
    assert torch.allclose(g.dequantize(), W[0], atol=2e-3)


@pytest.mark.gpu
def test_gptq_on_cuda_matches_cpu():
    W, H, _ = make_group(E=4, R=64, C=128)
    a = gptq(W, H, "ternary")
    b = gptq(W.cuda(), H.cuda(), "ternary")
    assert b.codes.is_cuda
    assert (a.codes == b.codes.cpu()).float().mean() > 0.99
    assert torch.allclose(a.loss, b.loss, rtol=0.02)
