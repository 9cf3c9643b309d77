"""CuPy wrappers around ``kernels/qmoe_codec.cu``: bulk decode, dequantize, fused decode+matvec.

Why this shape: the CUDA source ships as package data (``qmoe_ray.kernels``) and is compiled by
NVRTC on first use, once per device (``functools.lru_cache``), so importing this module never needs
a GPU. Every size, offset and table is validated on the host before a launch (the kernels also
bound every read by its segment and flag corruption, which raises here). Launch geometry comes
from the number of segments and the device's SM count; any shape is accepted.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from qmoe_ray.codec.encoded import EncodedInt2, EncodedTernary, _Encoded, expansion_table
from qmoe_ray.codec.table import Table

SOURCE = "qmoe_codec.cu"
MATVEC_BATCHES = (1, 2, 4, 8, 16)
NVRTC_OPTIONS = ("--std=c++14",)  # what CuPy's RawModule is given (it compiles with NVRTC)
KERNEL_NAMES = ("qmoe_decode_codes", "qmoe_decode_ternary_bf16", "qmoe_decode_int2_bf16",
                *(f"qmoe_matvec_{k}_b{b}" for k in ("ternary", "int2") for b in MATVEC_BATCHES))
_INSTALL = "install the GPU extra: pip install 'qmoe-ray[gpu]' (needs a CUDA device)"


def _cupy():
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - any import failure means no usable cupy
        raise RuntimeError(f"cupy is not importable ({e}); {_INSTALL}") from None
    if not cupy.cuda.is_available():
        raise RuntimeError(f"no CUDA device visible to cupy; {_INSTALL}")
    return cupy


def available() -> bool:
    """True when cupy imports and sees a CUDA device."""
    try:
        _cupy()
    except RuntimeError:
        return False
    return True


def kernel_source() -> str:
    """The CUDA source text shipped with the package (or, run from a source checkout that is
    not installed, the repository's ``kernels/`` folder)."""
    try:
        return resources.files("qmoe_ray.kernels").joinpath(SOURCE).read_text()
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parents[2] / "kernels" / SOURCE).read_text()


@functools.lru_cache(maxsize=8)
def _module(device_id: int):
    cp = _cupy()
    with cp.cuda.Device(device_id):
        mod = cp.RawModule(code=kernel_source(), options=NVRTC_OPTIONS)
        mod.compile()
    return mod


def _kernel(name: str):
    cp = _cupy()
    return _module(cp.cuda.Device().id).get_function(name)


def launch_geometry(num_segments: int, sm_count: int) -> tuple[int, int]:
    """``(grid, block)`` for one thread per segment.

    Blocks of 128 threads, shrunk (to a multiple of 32) when that leaves SMs idle.

    Raises:
        ValueError: no segments or a non-positive SM count.
    """
    if num_segments < 1 or sm_count < 1:
        raise ValueError(f"need >= 1 segment and SM, got {num_segments}, {sm_count}")
    per_sm = -(-num_segments // sm_count)
    block = min(128, max(32, -(-per_sm // 32) * 32))
    return -(-num_segments // block), block


@dataclass(frozen=True)
class DeviceEncoded:
    """An encoded matrix resident on the GPU (what the compressed-resident mode keeps).

    Attributes:
        kind, shape, group, prob_bits, segment_symbols, num_symbols, num_segments: as the host copy.
        stream: ``uint16`` words; seg_start: ``int64[segments + 1]`` word offsets.
        slot_sym, freq, expand: decode tables (uint8, uint16, uint64).
        The arrays are cupy after ``upload``, numpy from ``host_encoded``.
    """

    kind: str
    shape: tuple[int, int]
    group: int
    prob_bits: int
    segment_symbols: int
    num_symbols: int
    num_segments: int
    stream: Any
    seg_start: Any
    slot_sym: Any
    freq: Any
    expand: Any


_TABLE_CACHE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _host_tables(table: Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode tables of ``table``: slot -> symbol (uint8), freqs (uint16), packed codes (uint64)."""
    key = table.hash
    if key not in _TABLE_CACHE:
        exp = expansion_table(table.kind, table.group)
        packed = np.zeros((exp.shape[0], 8), np.int8)
        packed[:, : table.group] = exp
        _TABLE_CACHE[key] = (
            table.slot_symbols(),
            np.asarray(table.freqs),
            packed.view(np.uint64).reshape(-1),
        )
    return _TABLE_CACHE[key]


def host_encoded(enc: _Encoded) -> DeviceEncoded:
    """Validate an encoded matrix and lay it out as the kernels take it, in host (numpy) arrays:
    what ``upload`` copies to the device.

    Raises:
        ValueError: not ternary/int2 data, or segment lengths that do not tile the stream.
    """
    if not isinstance(enc, EncodedTernary | EncodedInt2):
        raise ValueError(f"expected EncodedTernary or EncodedInt2, got {type(enc).__name__}")
    starts = enc.segment_starts()  # raises when lengths do not tile the stream
    slot_sym, freq, expand = _host_tables(enc.table)
    return DeviceEncoded(
        kind=enc.KIND,
        shape=enc.shape,
        group=enc.table.group,
        prob_bits=enc.table.prob_bits,
        segment_symbols=enc.segment_symbols,
        num_symbols=enc.num_symbols,
        num_segments=enc.num_segments,
        stream=np.ascontiguousarray(enc.stream),
        seg_start=starts,
        slot_sym=slot_sym,
        freq=freq,
        expand=expand,
    )


def upload(enc: _Encoded) -> DeviceEncoded:
    """Validate an encoded matrix on the host and copy it to the current device.

    Raises:
        ValueError: inconsistent segment lengths (offsets outside the stream) or table.
        RuntimeError: no cupy/GPU.
    """
    if isinstance(enc, DeviceEncoded):
        return enc
    host = host_encoded(enc)
    cp = _cupy()
    arrays = ("stream", "seg_start", "slot_sym", "freq", "expand")
    return dataclasses.replace(host, **{f: cp.asarray(getattr(host, f)) for f in arrays})


def shared_bytes(prob_bits: int) -> int:
    """Dynamic shared memory per block: packed codes (8 B), freq and cum (4 B each) for up to 256
    symbols, and the slot -> symbol table (1 B per slot)."""
    return 8 * 256 + 4 * 256 * 2 + (1 << prob_bits)


def kernel_args(name: str, d: DeviceEncoded, tail: tuple, err: Any) -> tuple:
    """The argument list of kernel ``name`` for matrix ``d`` (``DECODE_ARGS`` / ``MATVEC_ARGS``
    in the CUDA source): ``tail`` is ``(p0, p1, out)`` for a decode, ``(p0, p1, x, y)`` for a
    product; ``err`` the error flag."""
    rows, cols = d.shape
    head = (d.stream, d.seg_start, np.int64(d.num_segments), np.int32(d.segment_symbols),
            np.int64(d.num_symbols))
    size = ((np.int64(rows * cols), np.int64(cols)) if "decode" in name
            else (np.int64(rows), np.int64(cols)))
    mid = (d.slot_sym, d.freq, d.expand, np.int32(d.freq.size), np.int32(d.prob_bits),
           np.int32(d.group))
    return head + size + mid + tuple(tail) + (err,)


def _launch(name: str, d: DeviceEncoded, tail: tuple) -> None:
    cp = _cupy()
    dev = cp.cuda.Device()
    grid, block = launch_geometry(d.num_segments, dev.attributes["MultiProcessorCount"])
    err = cp.zeros(1, cp.int32)
    _kernel(name)((grid,), (block,), kernel_args(name, d, tail, err),
                  shared_mem=shared_bytes(d.prob_bits))
    if int(err.get()[0]):
        raise ValueError(
            "corrupted stream: a segment read past its end or did not return to its initial "
            "state on the GPU (truncated, corrupted, or decoded with the wrong table)"
        )


def _row_params(v: Any, rows: int, name: str):
    cp = _cupy()
    if hasattr(v, "detach"):  # torch tensor (any dtype/device) -> float32 cupy
        v = v.detach().float().contiguous()
        v = cp.from_dlpack(v) if v.is_cuda else cp.asarray(v.numpy())
    a = cp.asarray(v, dtype=cp.float32).reshape(-1)
    if a.size != rows:
        raise ValueError(f"{name} must have one value per row ({rows}), got {a.size}")
    return cp.ascontiguousarray(a)


def _null(cp):
    return cp.zeros(1, cp.float32)


def decode_codes(enc: _Encoded | DeviceEncoded):
    """Decode to codes on the GPU: cupy ``int8`` (ternary) or ``uint8`` (int2) ``[rows, cols]``.

    Raises:
        ValueError: corrupted data. RuntimeError: no cupy/GPU.
    """
    cp = _cupy()
    d = upload(enc)
    out = cp.empty(d.shape, cp.int8)
    _launch("qmoe_decode_codes", d, (_null(cp), _null(cp), out))
    return out.view(cp.uint8) if d.kind == "int2" else out


def decode_ternary(enc: EncodedTernary | DeviceEncoded):
    """GPU twin of ``qmoe_ray.codec.decode_ternary``: cupy ``int8[rows, cols]``."""
    return decode_codes(enc)


def decode_int2(enc: EncodedInt2 | DeviceEncoded):
    """GPU twin of ``qmoe_ray.codec.decode_int2``: cupy ``uint8[rows, cols]``."""
    return decode_codes(enc)


def _as_torch_bf16(bits):
    try:
        import torch

        return torch.from_dlpack(bits.view("int16")).view(torch.bfloat16)
    except Exception:  # noqa: BLE001 - torch without CUDA: hand back the raw bf16 bits
        return bits


def _dequantize(enc, p0, p1, kind: str, names: tuple[str, str]):
    cp = _cupy()
    d = upload(enc)
    if d.kind != kind:
        raise ValueError(f"data holds {d.kind} codes; use the {d.kind} function")
    rows = d.shape[0]
    a, b = _row_params(p0, rows, names[0]), _row_params(p1, rows, names[1])
    out = cp.empty(d.shape, cp.uint16)
    _launch(f"qmoe_decode_{kind}_bf16", d, (a, b, out))
    return _as_torch_bf16(out)


def dequantize_ternary(enc, lo, hi):
    """Decode and dequantize ternary codes to bf16: ``hi[row]`` if +1, ``lo[row]`` if -1, else 0.

    Args:
        enc: ``EncodedTernary`` or ``DeviceEncoded``.
        lo, hi: per-row values (torch/numpy/cupy, bf16/fp16/fp32), ``[rows]``.

    Returns:
        A CUDA ``torch.bfloat16 [rows, cols]`` (cupy ``uint16`` bf16 bits without CUDA torch).

    Raises:
        ValueError: wrong sizes or corrupted data. RuntimeError: no cupy/GPU.
    """
    return _dequantize(enc, lo, hi, "ternary", ("lo", "hi"))


def dequantize_int2(enc, scale, zero):
    """Decode and dequantize 2-bit codes to bf16: ``bf16(scale[row] * (q - zero[row]))`` in fp32.

    Raises:
        ValueError: wrong sizes or corrupted data. RuntimeError: no cupy/GPU.
    """
    return _dequantize(enc, scale, zero, "int2", ("scale", "zero"))


def _activations(x: Any, cols: int):
    """bf16 activations ``[B, cols]`` as cupy uint16 bits, padded to an instantiated batch."""
    cp = _cupy()
    if hasattr(x, "detach"):
        import torch

        x = x.detach().to(torch.bfloat16).contiguous()
        if x.dim() == 1:
            x = x[None]
        bits = x.view(torch.int16)
        bits = cp.from_dlpack(bits) if bits.is_cuda else cp.asarray(bits.numpy())
        bits = bits.view(cp.uint16)
    else:
        bits = cp.asarray(x)
        if bits.dtype != cp.uint16:
            raise ValueError("x must be a torch tensor, or bf16 bits as a uint16 array")
        if bits.ndim == 1:
            bits = bits[None]
    if bits.ndim != 2 or bits.shape[1] != cols:
        raise ValueError(f"x must be [tokens, {cols}], got {tuple(bits.shape)}")
    n = bits.shape[0]
    if not 1 <= n <= MATVEC_BATCHES[-1]:
        raise ValueError(f"x has {n} tokens; the fused product takes 1..16 (split larger batches)")
    b = next(k for k in MATVEC_BATCHES if k >= n)
    if b != n:
        bits = cp.concatenate([bits, cp.zeros((b - n, cols), cp.uint16)])
    return cp.ascontiguousarray(bits), n, b


def _matvec(enc, p0, p1, x, kind: str, names: tuple[str, str]):
    cp = _cupy()
    d = upload(enc)
    if d.kind != kind:
        raise ValueError(f"data holds {d.kind} codes; use the {d.kind} function")
    rows, cols = d.shape
    a, b = _row_params(p0, rows, names[0]), _row_params(p1, rows, names[1])
    bits, n, batch = _activations(x, cols)
    y = cp.zeros((batch, rows), cp.float32)
    _launch(f"qmoe_matvec_{kind}_b{batch}", d, (a, b, bits, y))
    return y[:n]


def matvec_ternary(enc, lo, hi, x):
    """Fused decode + product ``y[B, rows] = x[B, cols] @ W.T`` with fp32 accumulation.

    Args:
        enc: ``EncodedTernary`` or ``DeviceEncoded`` (keep a ``DeviceEncoded`` for repeated use).
        lo, hi: per-row ternary values ``[rows]``.
        x: bf16 activations ``[B, cols]``, ``1 <= B <= 16`` (torch tensor or uint16 bf16 bits).

    Returns:
        cupy ``float32 [B, rows]``.

    Raises:
        ValueError: wrong sizes, too many tokens, corrupted data. RuntimeError: no cupy/GPU.
    """
    return _matvec(enc, lo, hi, x, "ternary", ("lo", "hi"))


def matvec_int2(enc, scale, zero, x):
    """Fused decode + product for 2-bit codes, ``W = scale * (q - zero)``; see matvec_ternary."""
    return _matvec(enc, scale, zero, x, "int2", ("scale", "zero"))
