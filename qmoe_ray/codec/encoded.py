"""Encoded code matrices: encode/decode, row access, serialization to named arrays + metadata.

Why this shape: an encoded matrix is a handful of flat arrays (the rANS word stream, the per-segment
word counts, and, unless a shared table is used, the table's frequencies) plus string metadata
(format, version, shape, parameters, table hash). That is exactly what a safetensors file holds, so
storage needs no knowledge of the codec beyond ``to_tensors``/``metadata``/``from_tensors``. The
format is specified in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from qmoe_ray.codec import _fast, rans
from qmoe_ray.codec.table import (
    DEFAULT_GROUP,
    DEFAULT_PROB_BITS,
    KINDS,
    Table,
    _meta,
    _tensor,
    build_table,
    check_format,
    count_symbols,
)

DEFAULT_SEGMENT_SYMBOLS = 4096
MAX_SEGMENT_SYMBOLS = 65533  # a segment holds at most segment_symbols + 2 words in a uint16 count


def _as_numpy(codes: Any, name: str = "codes") -> np.ndarray:
    if hasattr(codes, "detach") and hasattr(
        codes, "numpy"
    ):  # torch.Tensor, without importing torch
        if getattr(codes, "device", None) is not None and str(codes.device) != "cpu":
            raise ValueError(f"{name} is on {codes.device}: move it to the CPU with .cpu() first")
        codes = codes.detach().numpy()
    if not isinstance(codes, np.ndarray):
        raise ValueError(
            f"{name} must be a numpy array or torch tensor, got {type(codes).__name__}"
        )
    return codes


def _check_codes(codes: Any, kind: str) -> np.ndarray:
    codes = _as_numpy(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [rows, cols], got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise ValueError(
            f"codes must be an integer array (int8 for ternary, uint8 for int2), got {codes.dtype}"
        )
    if codes.size == 0:
        raise ValueError(f"codes must not be empty, got shape {codes.shape}")
    lo, hi = (-1, 1) if kind == "ternary" else (0, 3)
    cmin, cmax = int(codes.min()), int(codes.max())
    if cmin < lo or cmax > hi:
        raise ValueError(f"{kind} codes must lie in {lo}..{hi}, found values in {cmin}..{cmax}")
    return codes


def _digits(codes: np.ndarray, kind: str) -> np.ndarray:
    c = codes.reshape(-1)
    if kind == "ternary":
        return (c.astype(np.int8, copy=False) % 3).astype(np.uint8)  # 0->0, +1->1, -1->2
    return c.astype(np.uint8, copy=False)


def to_symbols(codes: np.ndarray, kind: str, group: int) -> np.ndarray:
    """Group row-major weights into symbols (``uint8[ceil(n / group)]``), zero-digit padded."""
    if _use_fast():
        return _fast.to_symbols(codes, kind == "ternary", group, KINDS[kind])
    d = _digits(codes, kind)
    n = d.size
    nsym = -(-n // group)
    if nsym * group != n:
        d = np.concatenate([d, np.zeros(nsym * group - n, np.uint8)])
    d = d.reshape(nsym, group)
    a = np.uint8(KINDS[kind])
    sym = d[:, group - 1].copy()
    for j in range(group - 2, -1, -1):
        sym *= a
        sym += d[:, j]
    return sym


def expansion_table(kind: str, group: int) -> np.ndarray:
    """``int8[alphabet**group, group]``: the codes each symbol stands for (ternary: -1/0/+1)."""
    return _expansion_table(kind, group).copy()  # a load asks once per matrix: built once


@functools.lru_cache(maxsize=32)
def _expansion_table(kind: str, group: int) -> np.ndarray:
    a = KINDS[kind]
    s = np.arange(a**group)
    d = np.stack([(s // a**j) % a for j in range(group)], axis=1)
    if kind == "ternary":
        d = np.array([0, 1, -1])[d]
    return d.astype(np.int8)


def symbol_counts(codes: Any, kind: str = "ternary", group: int | None = None) -> np.ndarray:
    """Symbol histogram of a code matrix, to sum over matrices and pass to ``build_table``.

    Raises:
        ValueError: codes of the wrong dtype, rank or alphabet.
    """
    group = DEFAULT_GROUP[kind] if group is None else group
    codes = _check_codes(codes, kind)
    return count_symbols(to_symbols(codes, kind, group), KINDS[kind] ** group)


@dataclass(frozen=True)
class _Encoded:
    """An encoded code matrix (see ``EncodedTernary``)."""

    KIND: ClassVar[str] = ""
    shape: tuple[int, int]
    table: Table = field(repr=False)
    stream: np.ndarray = field(repr=False)
    seg_words: np.ndarray = field(repr=False)
    segment_symbols: int
    table_embedded: bool

    @property
    def num_weights(self) -> int:
        """rows * cols."""
        return self.shape[0] * self.shape[1]

    @property
    def num_symbols(self) -> int:
        """Symbols encoded (weights / group, rounded up)."""
        return -(-self.num_weights // self.table.group)

    @property
    def num_segments(self) -> int:
        """Independent rANS segments (units of parallel decoding)."""
        return int(self.seg_words.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays needed to decode this matrix: stream, segment lengths, and the table
        when it is embedded (a shared table is counted once by its owner, per-row scales by the
        caller). Metadata strings (~200 bytes, mostly constant) are not counted."""
        n = self.stream.nbytes + self.seg_words.nbytes
        return int(n + (self.table.nbytes if self.table_embedded else 0))

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / num_weights``."""
        return 8.0 * self.nbytes / self.num_weights

    def segment_starts(self) -> np.ndarray:
        """Word offsets of the segments (``int64[segments + 1]``), validated against the stream."""
        return rans.segment_starts(self.seg_words, self.stream.size)

    def to_tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Named arrays: ``stream`` (uint16), ``seg_words`` (uint16), ``freqs`` if embedded."""
        out = {f"{prefix}stream": self.stream, f"{prefix}seg_words": self.seg_words}
        if self.table_embedded:
            out.update(self.table.to_tensors(prefix))
        return out

    def metadata(self, prefix: str = "") -> dict[str, str]:
        """String metadata: format, version, kind, shape, parameters, table hash and placement."""
        md = self.table.metadata(prefix)
        md.update(
            {
                f"{prefix}shape": f"{self.shape[0]},{self.shape[1]}",
                f"{prefix}segment_symbols": str(self.segment_symbols),
                f"{prefix}table": "embedded" if self.table_embedded else "shared",
            }
        )
        return md

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, np.ndarray],
        metadata: dict[str, str],
        table: Table | None = None,
        prefix: str = "",
    ):
        """Rebuild from ``to_tensors``/``metadata``; refuses unknown versions and foreign tables.

        Args:
            tensors: the named arrays.
            metadata: the string metadata.
            table: the shared table, required when the data was encoded with one.
            prefix: the prefix used when writing.

        Raises:
            KeyError: a needed array or key is missing, or a shared table was not given.
            ValueError: unknown version, wrong kind, table hash mismatch, inconsistent sizes.
        """
        check_format(metadata, prefix)
        kind = _meta(metadata, prefix, "kind")
        if kind != cls.KIND:
            raise ValueError(f"data holds {kind!r} codes; use the {kind} decoder, not {cls.KIND}")
        placement = _meta(metadata, prefix, "table")
        want_hash = _meta(metadata, prefix, "table_hash")
        if placement == "embedded":
            tab = Table.from_tensors(tensors, metadata, prefix)
        elif placement == "shared":
            if table is None:
                raise KeyError(
                    f"data was encoded with shared table {want_hash[:16]}...: pass table="
                )
            tab = table
        else:
            raise ValueError(f"metadata {prefix}table={placement!r}: expected embedded or shared")
        if tab.hash != want_hash:
            raise ValueError(
                f"table hash mismatch: data needs {want_hash[:16]}..., given table is "
                f"{tab.hash[:16]}...: load the table saved with this data"
            )
        try:
            rows, cols = (int(v) for v in _meta(metadata, prefix, "shape").split(","))
            seg_sym = int(_meta(metadata, prefix, "segment_symbols"))
        except ValueError as e:
            raise ValueError(f"bad shape/segment_symbols metadata: {e}") from None
        stream = np.asarray(_tensor(tensors, prefix, "stream"))
        seg_words = np.asarray(_tensor(tensors, prefix, "seg_words"))
        return cls._make((rows, cols), tab, stream, seg_words, seg_sym, placement == "embedded")

    @classmethod
    def _make(cls, shape, table, stream, seg_words, segment_symbols, embedded):
        rows, cols = shape
        if rows < 1 or cols < 1:
            raise ValueError(f"shape {shape} must be positive")
        if table.kind != cls.KIND:
            raise ValueError(f"table is for {table.kind!r} codes, data is {cls.KIND!r}")
        if not 1 <= segment_symbols <= MAX_SEGMENT_SYMBOLS:
            raise ValueError(f"segment_symbols={segment_symbols} not in 1..{MAX_SEGMENT_SYMBOLS}")
        if stream.dtype != np.uint16 or stream.ndim != 1:
            raise ValueError(
                f"stream must be uint16[words], got {stream.dtype}{list(stream.shape)}"
            )
        if seg_words.dtype != np.uint16 or seg_words.ndim != 1:
            raise ValueError(f"seg_words must be uint16[segments], got {seg_words.dtype}")
        nsym = -(-rows * cols // table.group)
        nseg = -(-nsym // segment_symbols)
        if seg_words.size != nseg:
            raise ValueError(
                f"{seg_words.size} segments stored, shape {shape} needs {nseg}: corrupted metadata"
            )
        rans.segment_starts(seg_words, stream.size)  # raises on lengths not tiling the stream
        return cls((rows, cols), table, stream, seg_words, segment_symbols, embedded)


@dataclass(frozen=True)
class EncodedTernary(_Encoded):
    """A ternary code matrix (values -1/0/+1) in the rANS format.

    Attributes:
        shape: ``(rows, cols)``.
        table: the frequency table (embedded or shared).
        stream: ``uint16`` words of all segments, back to back.
        seg_words: ``uint16`` words per segment (2-word state included).
        segment_symbols: symbols per segment (last one may be shorter).
        table_embedded: whether ``to_tensors`` carries the table.
    """

    KIND: ClassVar[str] = "ternary"


@dataclass(frozen=True)
class EncodedInt2(_Encoded):
    """A 2-bit code matrix (values 0..3) in the rANS format; fields as ``EncodedTernary``."""

    KIND: ClassVar[str] = "int2"


def _encode(cls, codes, table, segment_symbols, group, prob_bits):
    kind = cls.KIND
    codes = _check_codes(codes, kind)
    if not isinstance(segment_symbols, int) or not 1 <= segment_symbols <= MAX_SEGMENT_SYMBOLS:
        raise ValueError(
            f"segment_symbols={segment_symbols!r}: need an int in 1..{MAX_SEGMENT_SYMBOLS}"
        )
    if table is not None:
        if table.kind != kind:
            raise ValueError(f"table is for {table.kind!r} codes, not {kind!r}")
        group = table.group
    else:
        group = DEFAULT_GROUP[kind] if group is None else group
    sym = to_symbols(codes, kind, group)
    counts = count_symbols(sym, KINDS[kind] ** group)
    embedded = table is None
    if embedded:
        table = build_table(counts, kind, group, prob_bits, cover_all=False)
    elif np.any(table.freqs[counts > 0] == 0):
        missing = np.flatnonzero((counts > 0) & (table.freqs == 0))
        raise ValueError(
            f"shared table {table.hash[:16]}... cannot encode symbols {missing[:8].tolist()}: "
            "build it with cover_all=True or from counts that include this matrix"
        )
    coder = _fast if _use_fast() else rans
    stream, seg_words = coder.encode_segments(sym, table.freqs, table.prob_bits, segment_symbols)
    return cls._make(codes.shape, table, stream, seg_words, segment_symbols, embedded)


def encode_ternary(
    codes: Any,
    table: Table | None = None,
    segment_symbols: int = DEFAULT_SEGMENT_SYMBOLS,
    group: int | None = None,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> EncodedTernary:
    """Encode a ternary code matrix.

    Args:
        codes: ``int8[rows, cols]`` (any integer dtype) with values in {-1, 0, +1}.
        table: a shared ``Table``; ``None`` builds a per-matrix table and embeds it.
        segment_symbols: symbols per independent segment (size vs. decode parallelism).
        group: weights per symbol for a per-matrix table (default 5).
        prob_bits: precision of a per-matrix table.

    Returns:
        The ``EncodedTernary``.

    Raises:
        ValueError: wrong dtype/rank/values, bad parameters, or a table that cannot encode it.
    """
    return _encode(EncodedTernary, codes, table, segment_symbols, group, prob_bits)


def encode_int2(
    codes: Any,
    table: Table | None = None,
    segment_symbols: int = DEFAULT_SEGMENT_SYMBOLS,
    group: int | None = None,
    prob_bits: int = DEFAULT_PROB_BITS,
) -> EncodedInt2:
    """Encode a 2-bit code matrix (``uint8[rows, cols]`` values 0..3); see ``encode_ternary``."""
    return _encode(EncodedInt2, codes, table, segment_symbols, group, prob_bits)


def _use_fast() -> bool:
    return _fast.AVAILABLE and os.environ.get("QMOE_CODEC_BACKEND", "") != "numpy"


def _decode_range(enc: _Encoded, w_lo: int, w_hi: int) -> np.ndarray:
    t = enc.table
    g, S = t.group, enc.segment_symbols
    starts = enc.segment_starts()
    s_lo, s_hi = w_lo // g, -(-w_hi // g)
    seg_lo, seg_hi = s_lo // S, -(-s_hi // S)
    if _use_fast():
        return _fast.decode_weights(
            enc.stream,
            starts,
            seg_lo,
            seg_hi,
            enc.num_symbols,
            w_lo,
            w_hi,
            t.freqs,
            t.prob_bits,
            S,
            expansion_table(t.kind, g),
        )
    sym = rans.decode_segments(
        enc.stream, starts, seg_lo, seg_hi, enc.num_symbols, t.freqs, t.prob_bits, S
    )
    exp = expansion_table(t.kind, g)
    if g == 4:
        flat = exp.view(np.uint32).reshape(-1)[sym].view(np.int8)
    else:
        flat = exp[sym].reshape(-1)
    off = w_lo - seg_lo * S * g
    return flat[off : off + (w_hi - w_lo)]


def decode_ternary(enc: EncodedTernary) -> np.ndarray:
    """Decode to ``int8[rows, cols]`` codes in {-1, 0, +1}, bit-exact.

    Raises:
        ValueError: not ternary data, or a corrupted/truncated stream.
    """
    if not isinstance(enc, EncodedTernary):
        raise ValueError(f"decode_ternary needs an EncodedTernary, got {type(enc).__name__}")
    return _decode_range(enc, 0, enc.num_weights).reshape(enc.shape).copy()


def decode_ternary_lut(enc: EncodedTernary, lut: np.ndarray, out: np.ndarray | None = None
                       ) -> np.ndarray:
    """Decode straight to per-row values: ``out[r, c] = lut[r, code[r, c] + 1]``.

    The load path's dequantization: ``lut`` holds each row's values for codes -1 / 0 / +1 (e.g.
    the bf16 bits of ``lo``, 0, ``hi`` viewed as ``int16``), so no code matrix is materialised.

    Args:
        enc: ternary data.
        lut: ``int16 [rows, 3]``.
        out: where to write (contiguous ``int16 [rows, cols]``, e.g. a torch tensor's
            ``.numpy()``: memory the caller allocated its own way); a new array when omitted.

    Returns:
        ``int16 [rows, cols]`` (``out`` when given), bit-identical to indexing ``lut`` with
        ``decode_ternary``'s codes.

    Raises:
        ValueError: not ternary data, a ``lut`` or ``out`` of the wrong shape or dtype, or a
            corrupted stream.
    """
    return _decode_lut(enc, lut, EncodedTernary, "decode_ternary_lut", out)


def decode_int2_lut(enc: EncodedInt2, lut: np.ndarray, out: np.ndarray | None = None
                    ) -> np.ndarray:
    """Decode 2-bit codes straight to per-row values: ``out[r, c] = lut[r, q[r, c]]``.

    Args:
        enc: int2 data.
        lut: ``int16 [rows, 4]`` (e.g. the bf16 bits of ``scale * (q - zero)`` for q = 0..3).
        out: as ``decode_ternary_lut``'s.

    Returns:
        ``int16 [rows, cols]`` (``out`` when given), bit-identical to indexing ``lut`` with
        ``decode_int2``'s codes.

    Raises:
        ValueError: not int2 data, a ``lut`` or ``out`` of the wrong shape or dtype, or a
            corrupted stream.
    """
    return _decode_lut(enc, lut, EncodedInt2, "decode_int2_lut", out)


def _decode_lut(enc: _Encoded, lut: np.ndarray, cls: type, fn: str,
                out: np.ndarray | None = None) -> np.ndarray:
    if not isinstance(enc, cls):
        raise ValueError(f"{fn} needs an {cls.__name__}, got {type(enc).__name__}")
    rows, cols = enc.shape
    levels = KINDS[enc.KIND]
    lut = np.asarray(lut)
    if lut.dtype != np.int16 or lut.shape != (rows, levels):
        raise ValueError(f"lut must be int16 [{rows}, {levels}], got {lut.dtype}{list(lut.shape)}")
    if out is not None and (not isinstance(out, np.ndarray) or out.dtype != np.int16
                            or out.shape != (rows, cols) or not out.flags.c_contiguous
                            or not out.flags.writeable):
        raise ValueError(f"out must be a writeable contiguous int16 [{rows}, {cols}] array, got "
                         f"{getattr(out, 'dtype', type(out).__name__)}"
                         f"{list(getattr(out, 'shape', []))}")
    flat = np.ascontiguousarray(lut).reshape(-1)
    low = -1 if enc.KIND == "ternary" else 0  # the code that indexes column 0
    if not _use_fast():
        codes = _decode_range(enc, 0, enc.num_weights).reshape(rows, cols).astype(np.int32)
        base = (np.arange(rows, dtype=np.int32) * levels - low)[:, None]
        return np.take(flat, base + codes, out=out)
    t, S = enc.table, enc.segment_symbols
    res = _fast.decode_weights(enc.stream, enc.segment_starts(), 0, enc.seg_words.size,
                               enc.num_symbols, 0, enc.num_weights, t.freqs, t.prob_bits, S,
                               expansion_table(t.kind, t.group), lut=flat, cols=cols,
                               levels=levels, out=None if out is None else out.reshape(-1))
    return res.reshape(rows, cols)


def decode_int2(enc: EncodedInt2) -> np.ndarray:
    """Decode to ``uint8[rows, cols]`` codes 0..3, bit-exact.

    Raises:
        ValueError: not int2 data, or a corrupted/truncated stream.
    """
    if not isinstance(enc, EncodedInt2):
        raise ValueError(f"decode_int2 needs an EncodedInt2, got {type(enc).__name__}")
    return _decode_range(enc, 0, enc.num_weights).reshape(enc.shape).view(np.uint8).copy()


def decode_rows(enc: _Encoded, start: int, stop: int) -> np.ndarray:
    """Decode rows ``start:stop`` only (just the segments that hold them).

    Returns:
        ``int8`` (ternary) or ``uint8`` (int2) ``[stop - start, cols]``.

    Raises:
        ValueError: an empty or out-of-range row range, or corrupted data.
    """
    rows, cols = enc.shape
    if not 0 <= start < stop <= rows:
        raise ValueError(f"row range {start}:{stop} is empty or outside 0:{rows}")
    out = _decode_range(enc, start * cols, stop * cols).reshape(stop - start, cols).copy()
    return out.view(np.uint8) if enc.KIND == "int2" else out
