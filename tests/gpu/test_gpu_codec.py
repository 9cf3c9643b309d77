"""GPU kernels against the numpy decoder (bit-exact) and torch (bf16 tolerance). Needs a device."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_refs import int2_weights, ternary_codes, ternary_weights  # noqa: E402

from qmoe_ray import codec  # noqa: E402

pytestmark = pytest.mark.gpu

SHAPES = [(1, 1), (3, 7), (37, 515), (64, 4099), (2080, 614)]


@pytest.fixture(scope="module")
def gpu():
    import cupy

    if not cupy.cuda.is_available():
        pytest.skip("no CUDA device")
    from qmoe_ray import gpu

    return gpu


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seg", [1, 37, 4096])
def test_decode_codes_bit_exact(gpu, shape, seg):
    rng = np.random.default_rng(shape[0] * 7 + seg)
    c = ternary_codes(rng, shape)
    enc = codec.encode_ternary(c, segment_symbols=seg)
    np.testing.assert_array_equal(gpu.decode_ternary(enc).get(), codec.decode_ternary(enc))
    q = rng.integers(0, 4, shape, dtype=np.uint8)
    e2 = codec.encode_int2(q, segment_symbols=seg)
    np.testing.assert_array_equal(gpu.decode_int2(e2).get(), codec.decode_int2(e2))


def test_dequantize_matches_torch(gpu):
    import torch

    rng = np.random.default_rng(1)
    rows, cols = 97, 1031
    c = ternary_codes(rng, (rows, cols))
    lo = -torch.rand(rows).to(torch.bfloat16)
    hi = torch.rand(rows).to(torch.bfloat16)
    w = gpu.dequantize_ternary(codec.encode_ternary(c), lo.cuda(), hi)
    ref = ternary_weights(c, lo, hi).to(torch.bfloat16)
    assert w.dtype == torch.bfloat16
    assert torch.equal(w.cpu().view(torch.int16), ref.view(torch.int16))

    q = rng.integers(0, 4, (rows, cols), dtype=np.uint8)
    scale, zero = torch.rand(rows), torch.full((rows,), 1.0)
    w2 = gpu.dequantize_int2(codec.encode_int2(q), scale, zero)
    ref2 = int2_weights(q, scale, zero).to(torch.bfloat16)
    assert torch.equal(w2.cpu().view(torch.int16), ref2.view(torch.int16))


@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
@pytest.mark.parametrize("shape", [(2080, 614), (61, 4099)])
def test_matvec_matches_torch(gpu, tokens, shape):
    import torch

    rng = np.random.default_rng(tokens)
    rows, cols = shape
    c = ternary_codes(rng, shape)
    lo, hi = -torch.rand(rows), torch.rand(rows)
    x = torch.randn(tokens, cols).to(torch.bfloat16).cuda()
    enc = codec.encode_ternary(c, segment_symbols=512)
    y = torch.from_dlpack(gpu.matvec_ternary(gpu.upload(enc), lo, hi, x))
    ref = x.float() @ ternary_weights(c, lo, hi).cuda().T
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3 * cols**0.5)

    q = rng.integers(0, 4, shape, dtype=np.uint8)
    scale, zero = torch.rand(rows), torch.full((rows,), 1.5)
    y2 = torch.from_dlpack(gpu.matvec_int2(codec.encode_int2(q), scale, zero, x))
    w2 = int2_weights(q, scale, zero).cuda()
    torch.testing.assert_close(y2, x.float() @ w2.T, rtol=2e-3, atol=2e-3 * cols**0.5)


def test_gpu_refuses_corruption_and_bad_sizes(gpu):
    import torch

    c = ternary_codes(np.random.default_rng(2), (64, 300))
    enc = codec.encode_ternary(c, segment_symbols=500)
    t = enc.to_tensors()
    w = t["seg_words"].copy()
    w[0] += 3
    w[1] -= 3
    bad = codec.EncodedTernary.from_tensors({**t, "seg_words": w}, enc.metadata())
    with pytest.raises(ValueError, match="corrupted"):
        gpu.decode_ternary(bad)
    with pytest.raises(ValueError, match="one value per row"):
        gpu.dequantize_ternary(enc, torch.zeros(3), torch.zeros(64))
    with pytest.raises(ValueError, match="1..16"):
        gpu.matvec_ternary(enc, torch.zeros(64), torch.zeros(64), torch.zeros(17, 300))
    with pytest.raises(ValueError, match=r"\[tokens, 300\]"):
        gpu.matvec_ternary(enc, torch.zeros(64), torch.zeros(64), torch.zeros(2, 299))
