"""The CUDA kernels, compiled for the host with tests/cuda_host_shim.h and run one thread per
segment, against the numpy decoder, the CPU loader and torch: bit-exact decode and dequantization,
the fused product within fp32 tolerance, corruption flagged. The arguments are built by the GPU
wrapper itself (``host_encoded`` + ``kernel_args``), so their order and types are checked too.

This is no substitute for tests/gpu (warps, shared-memory limits, atomics under contention, speed),
but it runs the kernels' own arithmetic and indexing on every machine with a C++ compiler.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_refs import int2_weights, ternary_codes, ternary_weights

from qmoe_ray import codec
from qmoe_ray.gpu import kernels as K
from qmoe_ray.quant import parse_scheme
from qmoe_ray.read.weights import EncodedWeight

SHIM = Path(__file__).with_name("cuda_host_shim.h")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or clang++) to build the host emulation of the kernels")
    d = tmp_path_factory.mktemp("host_kernels")
    src = d / "qmoe_codec.cu"
    src.write_text(K.kernel_source())
    out = d / "qmoe_codec_host.so"
    r = subprocess.run([cxx, "-std=c++14", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas",
                        "-include", str(SHIM), "-x", "c++", str(src), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(out))


def _c(a):
    if isinstance(a, np.ndarray):
        assert a.flags.c_contiguous
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    raise TypeError(f"unexpected kernel argument {type(a).__name__}")


def _run(lib, name: str, d: K.DeviceEncoded, tail: tuple) -> int:
    """Launch ``name`` one thread per segment (plus one past the end, which must do nothing);
    returns the error flag."""
    err = np.zeros(1, np.int32)
    args = [_c(a) for a in K.kernel_args(name, d, tail, err)]
    fn = getattr(lib, name)
    fn.restype = None
    for seg in range(d.num_segments + 1):
        lib.qmoe_host_set_thread(seg, 1, 0)
        fn(*args)
    return int(err[0])


def _none() -> np.ndarray:
    return np.zeros(1, np.float32)


@pytest.mark.parametrize("shape,seg", [((1, 1), 1), ((3, 7), 1), ((37, 515), 37),
                                       ((64, 4099), 4096), ((5, 4099), 3)])
def test_decode_codes_bit_exact(lib, shape, seg):
    rng = np.random.default_rng(shape[0] * 7 + seg)
    enc = codec.encode_ternary(ternary_codes(rng, shape), segment_symbols=seg)
    out = np.full(shape, 9, np.int8)
    assert _run(lib, "qmoe_decode_codes", K.host_encoded(enc), (_none(), _none(), out)) == 0
    np.testing.assert_array_equal(out, codec.decode_ternary(enc))
    e2 = codec.encode_int2(rng.integers(0, 4, shape, dtype=np.uint8), segment_symbols=seg)
    out2 = np.full(shape, 9, np.int8)
    assert _run(lib, "qmoe_decode_codes", K.host_encoded(e2), (_none(), _none(), out2)) == 0
    np.testing.assert_array_equal(out2.view(np.uint8), codec.decode_int2(e2))


def test_dequantize_equals_the_cpu_loader_bit_for_bit(lib):
    rng = np.random.default_rng(1)
    rows, cols = 97, 1031
    c = ternary_codes(rng, (rows, cols))
    enc = codec.encode_ternary(c, segment_symbols=300)
    lo = -torch.rand(rows).to(torch.bfloat16)
    hi = torch.rand(rows).to(torch.bfloat16)
    out = np.zeros((rows, cols), np.uint16)
    tail = (lo.float().numpy(), hi.float().numpy(), out)
    assert _run(lib, "qmoe_decode_ternary_bf16", K.host_encoded(enc), tail) == 0
    # what a CPU load builds
    cpu = EncodedWeight("w", parse_scheme("ternary"), enc, {"lo": lo, "hi": hi}, "cpu").dense()
    assert torch.equal(torch.from_numpy(out.view(np.int16)), cpu.view(torch.int16))

    q = rng.integers(0, 4, (rows, cols), dtype=np.uint8)
    # scales exactly halfway between two bf16 values: with zero = 1 most products are ties, so
    # round-to-nearest-even is checked, not just rounding
    tie = (rng.integers(0x3C00, 0x3F80, rows).astype(np.uint32) << 16) | 0x8000
    scale, zero = torch.from_numpy(tie.view(np.float32)), torch.full((rows,), 1.0)
    out2 = np.zeros((rows, cols), np.uint16)
    e2 = codec.encode_int2(q, segment_symbols=64)
    assert _run(lib, "qmoe_decode_int2_bf16", K.host_encoded(e2),
                (scale.numpy(), zero.numpy(), out2)) == 0
    ref2 = int2_weights(q, scale, zero).to(torch.bfloat16)
    assert torch.equal(torch.from_numpy(out2.view(np.int16)), ref2.view(torch.int16))


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("shape", [(130, 614), (7, 4099)])
def test_fused_product_matches_torch(lib, tokens, shape):
    rng = np.random.default_rng(tokens)
    rows, cols = shape
    c = ternary_codes(rng, shape)
    lo, hi = -torch.rand(rows), torch.rand(rows)
    x = torch.randn(tokens, cols).to(torch.bfloat16)
    batch = next(b for b in K.MATVEC_BATCHES if b >= tokens)
    bits = np.zeros((batch, cols), np.uint16)  # padded like the wrapper pads
    bits[:tokens] = x.view(torch.int16).numpy().view(np.uint16)
    enc = codec.encode_ternary(c, segment_symbols=97)
    y = np.zeros((batch, rows), np.float32)
    assert _run(lib, f"qmoe_matvec_ternary_b{batch}", K.host_encoded(enc),
                (lo.numpy(), hi.numpy(), bits, y)) == 0
    ref = x.float() @ ternary_weights(c, lo, hi).T
    torch.testing.assert_close(torch.from_numpy(y[:tokens]), ref, rtol=2e-3, atol=2e-3 * cols**0.5)
    assert not y[tokens:].any()

    q = rng.integers(0, 4, shape, dtype=np.uint8)
    scale, zero = torch.rand(rows), torch.full((rows,), 1.5)
    y2 = np.zeros((batch, rows), np.float32)
    assert _run(lib, f"qmoe_matvec_int2_b{batch}", K.host_encoded(codec.encode_int2(q)),
                (scale.numpy(), zero.numpy(), bits, y2)) == 0
    w2 = int2_weights(q, scale, zero)
    torch.testing.assert_close(torch.from_numpy(y2[:tokens]), x.float() @ w2.T, rtol=2e-3,
                               atol=2e-3 * cols**0.5)


def test_corrupted_segments_set_the_error_flag(lib):
    c = ternary_codes(np.random.default_rng(2), (64, 300))
    enc = codec.encode_ternary(c, segment_symbols=500)
    t = enc.to_tensors()
    w = t["seg_words"].copy()
    w[0] += 3  # segment boundaries moved: both segments still tile the stream
    w[1] -= 3
    bad = codec.EncodedTernary.from_tensors({**t, "seg_words": w}, enc.metadata())
    out = np.zeros(c.shape, np.int8)
    assert _run(lib, "qmoe_decode_codes", K.host_encoded(bad), (_none(), _none(), out)) == 1
    flipped = enc.stream.copy()
    flipped[len(flipped) // 2] ^= 0x5A5A
    broken = codec.EncodedTernary.from_tensors({**t, "stream": flipped}, enc.metadata())
    assert _run(lib, "qmoe_decode_codes", K.host_encoded(broken), (_none(), _none(), out)) == 1
    with pytest.raises(ValueError, match="expected EncodedTernary or EncodedInt2"):
        K.host_encoded(codec.pack_bits(c + 1, 2))
