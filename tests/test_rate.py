"""Rate-aware GPTQ rounding (``qmoe_ray.quant.rate``): lambda 0 is plain GPTQ, a vanishing lambda
takes the same decisions through the rate-aware path, larger lambda gives monotonically more zeros
and fewer coded bytes, the codes decode exactly, and bad lambdas are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmoe_ray.format.matrices import pack_matrix, shared_table
from qmoe_ray.job.config import CompressConfig
from qmoe_ray.quant import HessianAccumulator, gptq

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Three experts of 96x128 with correlated, outlier-heavy inputs (as LLM activations are)."""
    g = torch.Generator().manual_seed(0)
    E, R, C, T = 3, 96, 128, 1024
    W = torch.randn(E, R, C, generator=g) * C**-0.5
    acc = HessianAccumulator(E, C)
    for e in range(E):
        x = torch.randn(T, C, generator=g)
        x += 0.5 * x[:, :1]
        x[:, :3] *= 10
        acc.add(e, x)
    return W, acc.result()[0]


def _coded_bytes(res) -> int:
    table = shared_table(res.scheme, res.codes)
    total = 0
    for e in range(res.codes.shape[0]):
        params = {k: v[e] for k, v in res.params.items()}
        tensors, _ = pack_matrix(f"m{e}", res.scheme, res.codes[e], params, table,
                                 "t" if table is not None else None)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    return total


@pytest.mark.parametrize("scheme", ["ternary", "int2", "int3"])
def test_vanishing_lambda_takes_plain_gptq_decisions(problem, scheme):
    W, H = problem
    plain = gptq(W, H, scheme, actorder=True)
    assert torch.equal(gptq(W, H, scheme, actorder=True, rate_lambda=0.0).codes, plain.codes)
    # the rate-aware path with a negligible rate term must reproduce the nearest-point rule
    tiny = gptq(W, H, scheme, actorder=True, rate_lambda=1e-12)
    assert (tiny.codes != plain.codes).float().mean().item() < 1e-4


def test_larger_lambda_more_zeros_fewer_bytes(problem):
    W, H = problem
    zeros, sizes, losses = [], [], []
    for lam in (0.0, 0.02, 0.05, 0.1, 0.2):
        r = gptq(W, H, "ternary", rate_lambda=lam)
        zeros.append((r.codes == 0).float().mean().item())
        sizes.append(_coded_bytes(r))
        losses.append(r.loss.sum().item())
    assert all(a < b for a, b in zip(zeros[:-1], zeros[1:], strict=True)), zeros
    assert all(a > b for a, b in zip(sizes[:-1], sizes[1:], strict=True)), sizes
    assert all(a < b for a, b in zip(losses[:-1], losses[1:], strict=True)), losses  # the price is paid in loss
    # the trade is worth it at small lambda: a sixth fewer bytes (scales included) for +4% loss
    assert sizes[2] < 0.9 * sizes[0] and losses[2] < 1.06 * losses[0], (sizes, losses)


@pytest.mark.parametrize("scheme,group", [("int2", None), ("int2", 32)])
def test_int_grids_get_cheaper(problem, scheme, group):
    from qmoe_ray.quant import parse_scheme

    W, H = problem
    s = parse_scheme(scheme, group)
    base, rated = gptq(W, H, s), gptq(W, H, s, rate_lambda=0.2)
    assert _coded_bytes(rated) < _coded_bytes(base)
    assert rated.codes.max().item() <= s.maxq
    assert base.loss.sum() <= rated.loss.sum()  # bytes are bought with loss, never free


@pytest.mark.parametrize("scheme", ["ternary", "int2"])
def test_rate_aware_codes_decode_exactly(problem, scheme):
    from qmoe_ray.format.matrices import table_tensors, unpack_matrix

    W, H = problem
    r = gptq(W, H, scheme, rate_lambda=0.1)
    table = shared_table(r.scheme, r.codes)
    tensors, tables = table_tensors("t", table)
    tables = {"t": tables}
    for e in range(W.shape[0]):
        params = {k: v[e] for k, v in r.params.items()}
        t, entry = pack_matrix(f"m{e}", r.scheme, r.codes[e], params, table, "t")
        _, codes, _ = unpack_matrix(f"m{e}", entry, {**tensors, **t}, tables)
        assert np.array_equal(codes, r.codes[e].numpy())


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), True])
def test_bad_lambda_refused(problem, lam):
    W, H = problem
    with pytest.raises(ValueError, match="rate_lambda"):
        gptq(W[:1], H[:1], "ternary", rate_lambda=lam)


def test_config_validates_rate_lambda():
    with pytest.raises(ValueError, match=r"rate_lambda=-1.*--rate-lambda"):
        CompressConfig(rate_lambda=-1)
    with pytest.raises(ValueError, match="0 with --method rtn"):
        CompressConfig(rate_lambda=0.1, method="rtn")
    with pytest.raises(ValueError, match="bit-packed"):
        CompressConfig(rate_lambda=0.1, scheme="int4")
    assert CompressConfig(rate_lambda=0.05).output_options()["rate_lambda"] == 0.05
