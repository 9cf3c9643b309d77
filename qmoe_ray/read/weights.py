"""Quantized experts as the loader hands them out: dense bf16 or kept encoded.

- ``encoded_matrix`` opens a stored matrix (``qmoe_ray.format.matrices.open_matrix``, the
  format's one open path) as an ``EncodedWeight``; ``decode_matrix`` decodes it into a dense bf16
  weight (CuPy kernels on a GPU, the numpy/numba decoder on a CPU).
- ``EncodedWeight`` honours ``x @ w.T`` (via ``__rmatmul__``) and decodes on the fly: through the
  fused decode+product kernel on a GPU, by decoding per call on a CPU (nothing cached: the CPU path
  exists to test the GPU one against decode mode). So the families' expert code
  (``ExpertSpec.forward``) runs unchanged on dense and encoded experts.
- ``Bf16Product``: a dense bf16 weight used in bf16 (decode mode with ``compute="bf16"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qmoe_ray import codec
from qmoe_ray.errors import CheckpointError
from qmoe_ray.format.matrices import decode_codes, open_matrix
from qmoe_ray.quant import Scheme, dequantize

DEVICES = ("cpu", "cuda")
FUSED_MAX_TOKENS = 64  # resident mode on GPU: above this, decode transiently and use a GEMM
GPU_INSTALL = ("install the GPU extra: pip install 'qmoe-ray[gpu]' (CuPy for CUDA 12, which CUDA 13 "
               "drivers run too; 'qmoe-ray[gpu-cuda13]' for a CUDA 13 toolkit) on a machine with "
               "an NVIDIA GPU, or load with device='cpu'")


def check_device(device: str) -> None:
    """Refuse an unknown device, and ``"cuda"`` without a GPU CuPy and torch can use (the
    message says what to install)."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: expected one of {DEVICES}")
    if device == "cuda":
        from qmoe_ray import gpu

        if not gpu.available():
            raise RuntimeError(f"device='cuda' needs an NVIDIA GPU visible to CuPy; {GPU_INSTALL}")
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda': CuPy sees a GPU but this torch build has no CUDA; "
                               "install a CUDA build of torch, or load with device='cpu'")


@dataclass(frozen=True)
class EncodedWeight:
    """A quantized matrix kept encoded; ``x @ w.T`` decodes it on the fly (resident mode).

    Attributes:
        name: canonical tensor name.
        scheme: the quantization grid.
        enc: ``EncodedTernary`` / ``EncodedInt2`` / ``PackedCodes`` (host copy).
        params: grid parameters as stored (``lo``/``hi`` bf16 or ``scale`` bf16 / ``zero`` uint8).
        device: ``"cpu"`` (decode per call) or ``"cuda"`` (fused decode + product).
    """

    name: str
    scheme: Scheme
    enc: Any = field(repr=False)
    params: Mapping[str, torch.Tensor] = field(repr=False)
    device: str = "cpu"
    _dev: Any = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.enc.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def nbytes(self) -> int:
        """Bytes held: encoded codes plus grid parameters (a shared table counted once apart)."""
        scales = sum(p.numel() * p.element_size() for p in self.params.values())
        return int(self.enc.nbytes) + scales

    @property
    def T(self) -> _Transposed:
        """A transposed view: ``x @ w.T`` computes ``x W^T`` without keeping ``W`` dense."""
        return _Transposed(self)

    def codes(self) -> np.ndarray:
        """The decoded codes on the host (numpy decoder)."""
        return decode_codes(self.enc)

    def dense(self) -> torch.Tensor:
        """The bf16 weight ``[rows, cols]``, decoded now (on the GPU when resident there).

        Raises:
            CheckpointError: the stored codes do not decode (a corrupted stream, a wrong table).
        """
        try:
            if self.device == "cuda" and self._gpu_ok():
                return _gpu_dequantize(self)
            if isinstance(self.enc, codec.EncodedTernary):
                w = _ternary_bf16(self.enc, self.params["lo"], self.params["hi"])
            elif isinstance(self.enc, codec.EncodedInt2) and self.scheme.group_size is None:
                w = _int2_bf16(self.enc, self.scheme, self.params)
            else:
                codes = self.codes()
                p = {k: v.float()[None] for k, v in self.params.items()}
                w = dequantize(self.scheme, torch.from_numpy(codes)[None], p)[0].to(torch.bfloat16)
        except CheckpointError:
            raise
        except ValueError as exc:
            raise CheckpointError(f"quantized matrix {self.name!r}: {exc}") from None
        return w.to(self.device) if self.device != "cpu" else w

    def _gpu_ok(self) -> bool:
        return (isinstance(self.enc, codec.EncodedTernary | codec.EncodedInt2)
                and self.scheme.group_size is None)

    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` ``[..., cols]`` -> ``[..., rows]`` in ``x``'s dtype."""
        if self.device == "cuda" and self._gpu_ok() and self._dev is not None:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            if 0 < x2.shape[0] <= FUSED_MAX_TOKENS:
                y = _gpu_matvec(self, x2)
                return y.to(x.dtype).reshape(*lead, -1)
        return x @ self.dense().to(device=x.device, dtype=x.dtype).T


def _ternary_bf16(enc: Any, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """bf16 ``hi[row]`` / 0 / ``lo[row]`` for codes +1 / 0 / -1, decoded straight from the stream
    through a per-row lookup table (lo/hi are stored in bf16, so this equals the float32
    dequantization rounded to bf16, bit for bit; no code matrix, no ``torch.where``)."""
    lut = torch.stack([lo.to(torch.bfloat16), torch.zeros_like(lo, dtype=torch.bfloat16),
                       hi.to(torch.bfloat16)], 1).view(torch.int16).numpy()
    # torch allocates the weights, as a bf16 loader would: numpy asks for transparent huge pages
    # on large arrays, and where the kernel cannot give them every first-touch fault tries to
    # compact memory first (a fresh-process load ran 1.2-1.7x slower that way on the 2-core VM)
    out = torch.empty(tuple(enc.shape), dtype=torch.int16)
    codec.decode_ternary_lut(enc, lut, out=out.numpy())
    return out.view(torch.bfloat16)


def _int2_bf16(enc: Any, scheme: Any, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """bf16 weights of per-row 2-bit codes through a per-row table of the four values, each
    computed by ``dequantize`` itself (so equal, bit for bit, to dequantizing the code matrix)."""
    rows = enc.shape[0]
    q = torch.arange(4, dtype=torch.uint8).expand(rows, 4)
    lut = dequantize(scheme, q, dict(params)).to(torch.bfloat16).view(torch.int16).numpy()
    out = torch.empty(tuple(enc.shape), dtype=torch.int16)  # see _ternary_bf16
    codec.decode_int2_lut(enc, lut, out=out.numpy())
    return out.view(torch.bfloat16)


class Bf16Product:
    """A dense bf16 weight used in bf16: ``x @ w.T`` casts ``x`` to bf16, multiplies, and
    returns ``x``'s dtype (decode mode with ``compute="bf16"``)."""

    __slots__ = ("w",)

    def __init__(self, w: torch.Tensor):
        self.w = w

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)  # type: ignore[return-value]

    @property
    def T(self) -> _Transposed:
        return _Transposed(self)

    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.bfloat16) @ self.w.T).to(x.dtype)


class _Transposed:
    """``w.T`` of an ``EncodedWeight`` or ``Bf16Product``: only ``x @ w.T`` is supported."""

    __slots__ = ("w",)

    def __init__(self, w: EncodedWeight | Bf16Product):
        self.w = w

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.matmul_t(x)

    @property
    def shape(self) -> tuple[int, int]:
        r, c = self.w.shape
        return c, r


def _gpu_dequantize(w: EncodedWeight) -> torch.Tensor:
    from qmoe_ray import gpu

    src = w._dev if w._dev is not None else w.enc
    if w.scheme.name == "ternary":
        return gpu.dequantize_ternary(src, w.params["lo"], w.params["hi"])
    return gpu.dequantize_int2(src, w.params["scale"], w.params["zero"])


def _gpu_matvec(w: EncodedWeight, x: torch.Tensor) -> torch.Tensor:
    from qmoe_ray import gpu

    fn = gpu.matvec_ternary if w.scheme.name == "ternary" else gpu.matvec_int2
    a, b = (("lo", "hi") if w.scheme.name == "ternary" else ("scale", "zero"))
    outs = []
    for i in range(0, x.shape[0], 16):  # the kernel takes 1..16 tokens per launch
        y = fn(w._dev, w.params[a], w.params[b], x[i : i + 16])
        outs.append(torch.from_dlpack(y))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def encoded_matrix(
    name: str,
    entry: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tables: Mapping[str, Mapping[str, str]],
    table_cache: dict[str, codec.Table] | None = None,
    device: str = "cpu",
) -> EncodedWeight:
    """An ``EncodedWeight`` from a stored quantized matrix (nothing decoded yet).

    Args:
        name, entry: the matrix and its manifest entry (of a manifest that passed
            ``check_manifest``: its declared shapes are the config's).
        tensors: verified stored tensors holding the matrix's pieces (``iter_shards``).
        tables: the manifest's table metadata; table_cache: tables rebuilt so far, by name.
        device: where the parameters (and, with the GPU extra, the codes) go.

    Raises:
        CheckpointError: a stored tensor or table is missing, an unknown codec version, a table
            hash mismatch, inconsistent sizes (the message names the matrix).
    """
    # copies: an encoded matrix must not keep its whole shard buffer alive
    scheme, enc, params = open_matrix(name, entry, tensors, tables,
                                      table_cache if table_cache is not None else {}, copy=True)
    w = EncodedWeight(name, scheme, enc, params, device)
    if device == "cuda":
        params = {k: v.to("cuda") for k, v in params.items()}
        dev = None
        if w._gpu_ok():
            from qmoe_ray import gpu

            dev = gpu.upload(enc)
        w = EncodedWeight(name, scheme, enc, params, device, dev)
    return w


def decode_matrix(w: EncodedWeight) -> torch.Tensor:
    """Dense bf16 weight of an encoded matrix (GPU kernels when on cuda, else numpy decoder)."""
    return w.dense()
