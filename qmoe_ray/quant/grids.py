"""Quantization grids: which values a quantized weight may take, and how to round onto them.

Why the design is so:

- The grid is an explicit ``Scheme`` value (``ternary`` or ``int{2,3,4,8}``), never a sentinel
  reusing another grid's fields: ternary has two per-row parameters (``lo``, ``hi``), an integer
  grid has ``scale``/``zero`` per row and input group, and each has its own code dtype.
- Ternary follows QMoE: per output row the grid is ``{min(row, 0), 0, max(row, 0)}`` and a value
  goes to ``hi`` above ``hi/2``, to ``lo`` below ``lo/2``, else to 0 (nearest point of the grid).
- Integer grids are asymmetric min-max over the row (or over one group of ``group_size`` input
  columns of the row, MoQE/GPTQ-style), with the range widened to include 0 so that 0 is exactly
  representable (it is the code ``zero``): that keeps the natural sparsity the codec exploits.
- Scales are rounded to ``scale_dtype`` (bfloat16 by default) *before* any value is rounded onto
  the grid, because the checkpoint stores them in bf16: dequantizing with the stored scales then
  gives back exactly the ``Q`` that the quantizer optimised against.
- ``ternary-sym256`` is the symmetric ternary grid ``d * {-1, 0, 1}`` with one ``d = max|w|``
  per 256 input columns of a row: exactly GGUF's TQ2_0/TQ1_0 blocks (llama.cpp's ternary
  types). It is an integer grid with ``bits=2``, ``maxq=2`` (code 3 unused) and ``zero=1``, so
  every integer-grid path (GPTQ's group sweep, the 2-bit rANS codec, the loader) carries it;
  its scales are rounded to values that bf16 *and* f16 both hold (``round_scale_sym``), so the
  bf16 the checkpoint stores and the f16 a TQ2_0 block stores are the same number.

Everything here is elementwise torch on any device; no I/O, no printing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES: tuple[str, ...] = ("ternary", "int2", "int3", "int4", "int8", "ternary-sym256")
_BITS = {"ternary": None, "ternary-sym256": 2, "int2": 2, "int3": 3, "int4": 4, "int8": 8}
#: ``ternary-sym256``: its fixed group (GGUF's super-block QK_K) and the largest scale held
#: exactly by both bf16 and f16 (65504, f16's largest, needs 11 significant bits)
SYM_GROUP = 256
SYM_MAX_SCALE = 65280.0


@dataclass(frozen=True)
class Scheme:
    """A quantization grid.

    Attributes:
        name: ``"ternary"`` | ``"ternary-sym256"`` | ``"int2"`` | ``"int3"`` | ``"int4"`` |
            ``"int8"``.
        bits: bits per code for integer grids, ``None`` for ternary (2 for ``ternary-sym256``).
        group_size: integer grids only: the number of input columns sharing one scale/zero
            (``None``: the whole row shares one; always 256 for ``ternary-sym256``).
    """

    name: str
    bits: int | None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.name not in _BITS:
            raise ValueError(f"scheme name {self.name!r} is unknown; valid names: {SCHEMES}")
        if self.bits != _BITS[self.name]:
            raise ValueError(
                f"scheme {self.name!r} needs bits={_BITS[self.name]}, got bits={self.bits!r}; "
                "use parse_scheme(name) to build it"
            )
        if self.group_size is not None:
            if self.is_ternary:
                raise ValueError(
                    "group_size is only for integer schemes; ternary grids are per row"
                )
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(
                    f"group_size must be a positive int or None, got {self.group_size!r}"
                )
        if self.is_symmetric_ternary and self.group_size != SYM_GROUP:
            raise ValueError(f"scheme 'ternary-sym256' has groups of {SYM_GROUP} input columns, "
                             f"got group_size={self.group_size!r}")

    @property
    def is_symmetric_ternary(self) -> bool:
        """Whether this is the GGUF-exact ``d * {-1, 0, 1}`` grid (an integer grid, zero 1)."""
        return self.name == "ternary-sym256"

    @property
    def is_ternary(self) -> bool:
        """Whether this is QMoE's per-row ternary grid."""
        return self.bits is None

    @property
    def maxq(self) -> int:
        """The largest integer code (``2**bits - 1``); 2 for both ternary grids (three levels)."""
        if self.bits is None or self.is_symmetric_ternary:
            return 2
        return (1 << self.bits) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """``torch.int8`` (codes in {-1, 0, 1}) for ternary, ``torch.uint8`` for integer grids."""
        return torch.int8 if self.is_ternary else torch.uint8

    def num_groups(self, cols: int) -> int:
        """Number of input groups of a matrix with ``cols`` input columns (1 without groups)."""
        if self.group_size is None:
            return 1
        return -(-cols // self.group_size)


def parse_scheme(name: str | Scheme, group_size: int | None = None) -> Scheme:
    """The ``Scheme`` called ``name``.

    Args:
        name: one of ``SCHEMES`` (case-insensitive), or a ``Scheme`` (returned as is when
            ``group_size`` is None).
        group_size: integer schemes: input columns per scale group (``None``: per row;
            ``ternary-sym256``: 256, its only group size).

    Returns:
        The scheme.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or a group size on ternary.
    """
    if isinstance(name, Scheme):
        if group_size is None or group_size == name.group_size:
            return name
        return Scheme(name.name, name.bits, group_size)
    if not isinstance(name, str):
        raise ValueError(
            f"scheme must be a name from {SCHEMES} or a Scheme, got {type(name).__name__}"
        )
    key = name.strip().lower()
    if key not in _BITS:
        raise ValueError(f"unknown quantization scheme {name!r}; valid names: {', '.join(SCHEMES)}")
    if key == "ternary-sym256" and group_size is None:
        group_size = SYM_GROUP
    return Scheme(key, _BITS[key], group_size)


def round_scale(x: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` rounded to the nearest value representable in ``scale_dtype``, kept in float32."""
    if scale_dtype is None or scale_dtype == torch.float32:
        return x.to(torch.float32)
    return x.to(scale_dtype).to(torch.float32)


def round_scale_sym(x: torch.Tensor) -> torch.Tensor:
    """``x >= 0`` rounded to a float32 value that bf16 and f16 both hold exactly.

    bf16 first (8 significant bits), clamped to ``SYM_MAX_SCALE``, then f16: in f16's normal
    range (and down to 2**-17, where f16's subnormal step 2**-24 still holds 8 bits) a bf16 value
    is unchanged by it; below, f16 keeps at most 7 significant bits, which bf16 holds. A scale
    that rounds to 0 becomes 1 (its block holds no value f16 can scale: all codes are 0).
    """
    s = x.to(torch.float32).to(torch.bfloat16).to(torch.float32).clamp(max=SYM_MAX_SCALE)
    s = s.to(torch.float16).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


def range_params(
    xmin: torch.Tensor, xmax: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` of an integer grid for ranges ``[xmin, xmax]``: asymmetric min-max
    (``int_params_from_range``), or for ``ternary-sym256`` ``scale = max(|xmin|, |xmax|)``
    (``round_scale_sym``; ``scale_dtype`` does not apply) and ``zero = 1``."""
    if scheme.is_symmetric_ternary:
        scale = round_scale_sym(torch.maximum(-xmin.to(torch.float32), xmax.to(torch.float32))
                                .clamp(min=0))
        return scale, torch.ones_like(scale)
    return int_params_from_range(xmin, xmax, scheme.bits, scale_dtype)


def ternary_params(
    W: torch.Tensor, scale_dtype: torch.dtype | None = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """QMoE's ternary grid of each row of ``W`` ``[..., rows, cols]``.

    Returns:
        ``{"lo": [..., rows], "hi": [..., rows]}`` float32: ``min(row, 0)`` and ``max(row, 0)``,
        rounded to ``scale_dtype``.
    """
    lo = W.amin(dim=-1).clamp(max=0)
    hi = W.amax(dim=-1).clamp(min=0)
    return {"lo": round_scale(lo, scale_dtype), "hi": round_scale(hi, scale_dtype)}


def int_params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, scale_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max ``(scale, zero)`` for ranges ``[xmin, xmax]`` (any equal shapes).

    The range is widened to contain 0; an all-zero range gets scale 1 (its values are all 0).
    ``scale`` is rounded to ``scale_dtype`` first and ``zero`` is the integer (as float32) that
    makes 0 exact under that rounded scale.
    """
    maxq = (1 << bits) - 1
    xmin = xmin.to(torch.float32).clamp(max=0)
    xmax = xmax.to(torch.float32).clamp(min=0)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = round_scale(scale, scale_dtype)
    # bf16 rounding cannot reach 0 for a positive float32 normal, but guard against subnormals.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def int_params(
    W: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype | None = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The integer grid of ``W`` ``[..., rows, cols]`` from its own values (round-to-nearest).

    Returns:
        ``{"scale": [..., rows, G], "zero": [..., rows, G]}`` float32 with ``G`` input groups.
    """
    cols = W.shape[-1]
    G = scheme.num_groups(cols)
    if G == 1:
        xmin, xmax = W.amin(dim=-1, keepdim=True), W.amax(dim=-1, keepdim=True)
    else:
        gs = scheme.group_size
        pad = G * gs - cols
        Wp = torch.nn.functional.pad(W, (0, pad)) if pad else W  # zero padding: range includes 0
        Wg = Wp.reshape(*W.shape[:-1], G, gs)
        xmin, xmax = Wg.amin(dim=-1), Wg.amax(dim=-1)
    scale, zero = range_params(xmin, xmax, scheme, scale_dtype)
    return {"scale": scale, "zero": zero}


def grid_params(
    W: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype | None = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The grid parameters of ``W`` ``[..., rows, cols]`` under ``scheme`` (see module doc)."""
    if scheme.is_ternary:
        return ternary_params(W, scale_dtype)
    return int_params(W, scheme, scale_dtype)


def quantize_ternary(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Ternary codes (int8 in {-1, 0, 1}) of ``x`` on grids ``{lo, 0, hi}`` (broadcasting).

    A value above ``hi/2`` gets +1 and one below ``lo/2`` gets -1, but only where that grid point
    is nonzero, so a code of +-1 always stands for a nonzero weight.
    """
    t_lo, t_hi = ternary_thresholds(lo, hi)
    return (x > t_hi).to(torch.int8) - (x < t_lo).to(torch.int8)


def ternary_thresholds(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo/2, hi/2)``, with -inf/+inf where the grid point is 0 (no value rounds to it)."""
    inf = torch.full_like(hi, float("inf"))
    return torch.where(lo < 0, lo * 0.5, -inf), torch.where(hi > 0, hi * 0.5, inf)


def dequantize_ternary(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """float32 values of ternary ``codes`` (broadcasting ``lo``/``hi``)."""
    zero = torch.zeros((), dtype=torch.float32, device=codes.device)
    return torch.where(codes > 0, hi, torch.where(codes < 0, lo, zero))


def quantize_int(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Integer codes (uint8 in ``[0, maxq]``) of ``x`` (broadcasting ``scale``/``zero``)."""
    q = torch.round(x / scale) + zero
    return q.clamp_(0, maxq).to(torch.uint8)


def dequantize_int(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 values ``scale * (codes - zero)`` (broadcasting)."""
    return scale * (codes.to(torch.float32) - zero)


def expand_groups(p: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """Per-group parameters ``[..., rows, G]`` broadcast to ``[..., rows, cols]``."""
    if group_size is None or p.shape[-1] == 1:
        return p[..., :1].expand(*p.shape[:-1], cols)
    return p.repeat_interleave(group_size, dim=-1)[..., :cols]


def quantize(
    W: torch.Tensor, scheme: Scheme, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Codes of ``W`` ``[..., rows, cols]`` on the grid ``params`` (round-to-nearest)."""
    if scheme.is_ternary:
        return quantize_ternary(W, params["lo"][..., None], params["hi"][..., None])
    cols = W.shape[-1]
    scale = expand_groups(params["scale"], cols, scheme.group_size)
    zero = expand_groups(params["zero"], cols, scheme.group_size)
    return quantize_int(W, scale, zero, scheme.maxq)


def dequantize(
    scheme: Scheme | str,
    codes: torch.Tensor,
    params: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weights from codes and grid parameters (the inverse of ``quantize`` onto the grid).

    Args:
        scheme: the grid (a ``Scheme`` or a name; pass a ``Scheme`` for group-wise grids).
        codes: ``[..., rows, cols]``: int8 in {-1, 0, 1} (ternary) or uint8 (integer grids).
        params: ``{"lo", "hi"}`` ``[..., rows]`` or ``{"scale", "zero"}`` ``[..., rows, G]``.
        dtype: dtype of the result.

    Returns:
        ``[..., rows, cols]`` weights in ``dtype``.

    Raises:
        ValueError: parameters missing or of the wrong shape for ``codes``.
    """
    scheme = parse_scheme(scheme)
    need = ("lo", "hi") if scheme.is_ternary else ("scale", "zero")
    missing = [k for k in need if k not in params]
    if missing:
        raise ValueError(f"params for scheme {scheme.name!r} need keys {need}; missing {missing}")
    lead = codes.shape[:-1]
    cols = codes.shape[-1]
    if scheme.is_ternary:
        lo, hi = params["lo"], params["hi"]
        if lo.shape != lead or hi.shape != lead:
            raise ValueError(f"ternary lo/hi must have shape {tuple(lead)}, got {tuple(lo.shape)}")
        lo, hi = lo.to(torch.float32)[..., None], hi.to(torch.float32)[..., None]
        out = dequantize_ternary(codes, lo, hi)
    else:
        G = scheme.num_groups(cols)
        scale, zero = params["scale"], params["zero"]
        if scale.shape != (*lead, G) or zero.shape != (*lead, G):
            raise ValueError(
                f"scale/zero must have shape {(*lead, G)} for {cols} columns and group_size "
                f"{scheme.group_size}, got {tuple(scale.shape)}; pass the Scheme with its "
                "group_size"
            )
        scale = expand_groups(scale.to(torch.float32), cols, scheme.group_size)
        zero = expand_groups(zero.to(torch.float32), cols, scheme.group_size)
        out = dequantize_int(codes, scale, zero)
    return out.to(dtype)
