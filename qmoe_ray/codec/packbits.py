"""Plain fixed-width bit packing (int1..int8 codes), for schemes that need no entropy coding.

Why: 3/4/8-bit codes gain little from entropy coding and are read by simple kernels; they still
need the same artifact shape as the rANS format (named arrays + string metadata) so storage treats
every codec alike. Layout: the row-major codes as one little-endian bit stream (code ``i`` occupies
bits ``i*bits .. i*bits+bits-1``, bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``),
zero-padded to a whole byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qmoe_ray.codec.table import _meta, _tensor

PACK_FORMAT = "qmoe-packbits"
PACK_VERSION = 1


@dataclass(frozen=True)
class PackedCodes:
    """Fixed-width packed codes.

    Attributes:
        shape: ``(rows, cols)``.
        bits: bits per code, 1..8.
        data: ``uint8`` packed bytes.
    """

    shape: tuple[int, int]
    bits: int
    data: np.ndarray = field(repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed data."""
        return int(self.data.nbytes)

    def to_tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Named arrays: ``{prefix}packed`` (uint8)."""
        return {f"{prefix}packed": self.data}

    def metadata(self, prefix: str = "") -> dict[str, str]:
        """String metadata: format, version, shape, bits."""
        return {
            f"{prefix}format": PACK_FORMAT,
            f"{prefix}version": str(PACK_VERSION),
            f"{prefix}shape": f"{self.shape[0]},{self.shape[1]}",
            f"{prefix}bits": str(self.bits),
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, np.ndarray], metadata: dict[str, str], prefix: str = ""
    ) -> PackedCodes:
        """Rebuild from ``to_tensors``/``metadata``.

        Raises:
            KeyError: missing array or key. ValueError: other format/version, wrong sizes.
        """
        if _meta(metadata, prefix, "format") != PACK_FORMAT:
            raise ValueError(f"format {metadata[prefix + 'format']!r} is not {PACK_FORMAT!r}")
        if _meta(metadata, prefix, "version") != str(PACK_VERSION):
            raise ValueError(f"{PACK_FORMAT} version {metadata[prefix + 'version']!r} is unknown")
        rows, cols = (int(v) for v in _meta(metadata, prefix, "shape").split(","))
        bits = int(_meta(metadata, prefix, "bits"))
        data = np.asarray(_tensor(tensors, prefix, "packed"))
        if not 1 <= bits <= 8 or rows < 1 or cols < 1:
            raise ValueError(f"bad packed metadata: shape={rows},{cols} bits={bits}")
        if data.dtype != np.uint8 or data.shape != (-(-rows * cols * bits // 8),):
            raise ValueError(
                f"packed data is {data.dtype}{list(data.shape)}, shape ({rows}, {cols}) at {bits} "
                f"bits needs uint8[{-(-rows * cols * bits // 8)}]: truncated or corrupted"
            )
        return cls((rows, cols), bits, data)


def pack_bits(codes: Any, bits: int) -> PackedCodes:
    """Pack unsigned codes of ``bits`` bits each.

    Args:
        codes: ``uint8[rows, cols]`` (any integer dtype) with values in ``0 .. 2**bits - 1``.
        bits: 1..8.

    Returns:
        The ``PackedCodes``.

    Raises:
        ValueError: bad ``bits``, rank, dtype, or values out of range.
    """
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: need an int in 1..8")
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.size == 0 or codes.dtype.kind not in "iu":
        raise ValueError(
            f"codes must be a non-empty 2-D integer array, got {codes.dtype}{codes.shape}"
        )
    if int(codes.min()) < 0 or int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must lie in 0..{(1 << bits) - 1} for bits={bits}")
    c = codes.reshape(-1).astype(np.uint8)
    if bits == 8:
        return PackedCodes(codes.shape, 8, c.copy())
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return PackedCodes(codes.shape, bits, np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: PackedCodes) -> np.ndarray:
    """Unpack to ``uint8[rows, cols]``.

    Raises:
        ValueError: data of the wrong size.
    """
    rows, cols = packed.shape
    n, bits = rows * cols, packed.bits
    if packed.data.dtype != np.uint8 or packed.data.size != -(-n * bits // 8):
        raise ValueError("packed data size does not match its shape and bits: truncated")
    if bits == 8:
        return packed.data.reshape(rows, cols).copy()
    planes = np.unpackbits(packed.data, bitorder="little", count=n * bits).reshape(n, bits)
    weights = (1 << np.arange(bits)).astype(np.uint8)
    out = np.zeros(n, np.uint8)
    for k in range(bits):
        out |= planes[:, k] * weights[k]
    return out.reshape(rows, cols)
