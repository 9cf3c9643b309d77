"""``ternary-sym256``: the symmetric ternary grid with one scale per 256 input columns (GGUF's
TQ2_0/TQ1_0 block), whose scales bf16 and f16 both hold, through GPTQ, the format and the
loader's dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmoe_ray.errors import InputError
from qmoe_ray.format.matrices import check_matrix, pack_matrix, shared_table, unpack_matrix
from qmoe_ray.quant import dequantize, gptq, parse_scheme, rtn
from qmoe_ray.quant.grids import round_scale_sym

SYM = parse_scheme("ternary-sym256")


def _problem(E=2, R=8, C=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, R, C, generator=g) * 0.05
    W[0, 0, :256] = 0.0  # an all-zero block: scale 1, every code the zero code
    X = torch.randn(E, 2048, C, generator=g)
    return W, X.transpose(1, 2) @ X / 2048


def test_scheme_is_a_three_level_integer_grid_of_256_groups():
    assert SYM.bits == 2 and SYM.maxq == 2 and SYM.group_size == 256 and not SYM.is_ternary
    assert parse_scheme("Ternary-Sym256", 256) == SYM
    with pytest.raises(ValueError, match="groups of 256"):
        parse_scheme("ternary-sym256", 128)
    from qmoe_ray.job.config import CompressConfig

    with pytest.raises(InputError, match="256"):
        CompressConfig(scheme="ternary-sym256", quant_group_size=64)


def test_scales_are_exact_in_bf16_and_f16():
    x = torch.tensor([0.0, 1e-9, 3e-7, 7e-6, 2.1e-5, 6.2e-5, 0.0123456, 1.7, 7e4, 1e30])
    s = round_scale_sym(x)
    assert torch.equal(s, s.to(torch.bfloat16).float())
    assert torch.equal(s, s.to(torch.float16).float())
    assert s[0] == 1 and s[-1] == 65280 and abs(s[6] / x[6] - 1) < 2 ** -8


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-actorder"])
def test_codes_scales_and_zeros(method):
    W, H = _problem()
    if method == "rtn":
        res = rtn(W, SYM)
    else:
        res = gptq(W, H, SYM, actorder=method == "gptq-actorder")
    codes, scale, zero = res.codes, res.params["scale"], res.params["zero"]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2
    assert scale.shape == (2, 8, 2) and torch.equal(zero, torch.ones_like(zero))
    assert torch.equal(scale, scale.to(torch.float16).float())
    assert torch.equal(scale, scale.to(torch.bfloat16).float())
    Q = dequantize(SYM, codes, res.params)
    # every block's weights are exactly d * {-1, 0, 1}
    d = scale.repeat_interleave(256, dim=-1)
    assert torch.equal(Q.abs() * (Q != 0), d * (Q != 0))
    assert (Q[0, 0, :256] == 0).all() and scale[0, 0, 0] == 1
    if method == "rtn":  # RTN: d = max|w| of the block, rounded
        want = round_scale_sym(W.reshape(2, 8, 2, 256).abs().amax(-1))
        assert torch.equal(scale[:, :, 1], want[:, :, 1])
        assert torch.equal(scale[1], want[1])
    else:  # GPTQ beats round-to-nearest on its own proxy loss
        assert (res.loss < rtn(W, SYM, H).loss).all()


def test_stored_as_2bit_rans_and_read_back_exactly():
    W, H = _problem(C=320)  # a partial last group (64 columns)
    res = gptq(W, H, SYM)
    table = shared_table(SYM, res.codes)
    for e in range(2):
        params = {k: v[e] for k, v in res.params.items()}
        tensors, entry = pack_matrix("m.weight", SYM, res.codes[e], params, table=table,
                                     table_name="t")
        assert entry["scheme"] == "ternary-sym256" and entry["quant_group_size"] == 256
        tt, tmeta = table.to_tensors("t."), table.metadata()
        tensors.update({k: torch.from_numpy(np.array(v)) for k, v in tt.items()})
        specs = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                 for k, v in tensors.items()}
        check_matrix("m.weight", entry, specs, {"t": tmeta})
        scheme, codes, p = unpack_matrix("m.weight", entry, tensors, {"t": tmeta})
        assert scheme == SYM and np.array_equal(codes, res.codes[e].numpy())
        assert torch.equal(p["scale"].float(), params["scale"])
        got = dequantize(scheme, torch.from_numpy(codes)[None],
                         {k: v.float()[None] for k, v in p.items()})[0]
        assert torch.equal(got, dequantize(SYM, res.codes[e][None],
                                           {k: v[None] for k, v in params.items()})[0])
