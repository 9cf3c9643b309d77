"""Compiled (numba) rANS loops: the same coder as ``rans.py``, segments spread over cores.

Why: the numpy lock-step coder pays a fixed cost per vector operation per symbol position, which
caps CPU decoding near 50-60M weights/s on c2048-sized matrices; a compiled loop per segment, with
segments spread over cores (``prange``), reaches several hundred M/s per core. The decoder runs two
segments in lock-step with a branch-free renormalisation, and one kernel is compiled per (group,
codes-or-values) so its emit loop unrolls: 1.2-1.5x the one-segment loop on one core (2080x6144,
P(0) 0.885 / 0.95), same output. The hot loops index with unsigned integers (``np.uint64(i)``):
numba adds a negative-index wraparound fix to every access with a signed index, and dropping those
made the decoder 1.4-1.6x faster again (one core, 2048x1024 ternary). numba is optional: when it is
missing, ``AVAILABLE`` is False and the numpy coder is used (same bytes, same results).
"""

from __future__ import annotations

import functools

import numpy as np

try:  # pragma: no cover - exercised when numba is installed
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False


if AVAILABLE:

    @numba.njit(inline="always")
    def _step(x, pos, end, stream, mask, prob_bits, freq, cum, sym_tab):
        """One rANS decode step. The renormalisation is branch-free (a data-dependent branch here
        mispredicts about once in four symbols) and its read is clamped inside the segment, so a
        corrupted segment never reads out of bounds: it ends with ``pos != end`` instead."""
        slot = x & mask
        s = sym_tab[np.uint64(slot)]
        x = np.int64(freq[s]) * (x >> prob_bits) + slot - np.int64(cum[s])
        n = np.int64(x < 65536)
        p = pos if pos < end else end - 1
        x = (x << (n << 4)) | (np.int64(stream[np.uint64(p)]) & -n)
        return s, x, pos + n

    @numba.njit(inline="always")
    def _emit(out, w, d, base, col, cols, levels, lut, group, direct):
        """Write one symbol's ``group`` values. ``direct`` (codes): ``lut`` is the flat expansion
        table and ``d`` the symbol's offset in it. Otherwise ``d`` holds the symbol's 2-bit digits
        and each weight gets ``lut[base + digit]``, the row's base (and column) carried along,
        no division."""
        if direct:
            for j in range(group):
                out[np.uint64(w + j)] = lut[np.uint64(d + j)]
            return base, col
        if col + group < cols:  # the common case: the symbol does not end its row
            for j in range(group):
                out[np.uint64(w + j)] = lut[np.uint64(base + ((d >> (2 * j)) & 3))]
            return base, col + group
        for j in range(group):
            out[np.uint64(w + j)] = lut[np.uint64(base + ((d >> (2 * j)) & 3))]
            col += 1
            if col == cols:
                col = 0
                base += levels
        return base, col

    @numba.njit(inline="always")
    def _seg_start(stream, starts, seg, seg_sym, group, cols, levels):
        st = starts[seg]
        x = (np.int64(stream[st]) << 16) | np.int64(stream[st + 1])
        w0 = seg * seg_sym * group
        return x, st + 2, starts[seg + 1], (w0 // cols) * levels, w0 % cols

    @numba.njit(inline="always")
    def _pair(stream, starts, a, seg_sym, freq, cum, sym_tab, pk, mask, prob_bits, out, w_lo,
              lut, cols, levels, group, direct, status, k):
        """Segments ``a`` and ``a + 1`` (both full and wanted) decoded in lock-step: two
        independent state chains per iteration keep the core busy while each waits on its table
        loads. Inlined with ``group`` and ``direct`` constants, so the emit loops unroll. Their
        status (1 = bad) goes to ``status[k]`` and ``status[k + 1]``."""
        b = a + 1
        xa, pa, ea, base_a, col_a = _seg_start(stream, starts, a, seg_sym, group, cols, levels)
        xb, pb, eb, base_b, col_b = _seg_start(stream, starts, b, seg_sym, group, cols, levels)
        wa = a * seg_sym * group - w_lo
        wb = b * seg_sym * group - w_lo
        for i in range(seg_sym):
            sa, xa, pa = _step(xa, pa, ea, stream, mask, prob_bits, freq, cum, sym_tab)
            sb, xb, pb = _step(xb, pb, eb, stream, mask, prob_bits, freq, cum, sym_tab)
            da = sa * group if direct else pk[np.uint64(sa)]
            db = sb * group if direct else pk[np.uint64(sb)]
            base_a, col_a = _emit(out, wa + i * group, da, base_a, col_a, cols, levels, lut, group,
                                  direct)
            base_b, col_b = _emit(out, wb + i * group, db, base_b, col_b, cols, levels, lut, group,
                                  direct)
        status[k] = 1 if (xa != 65536 or pa != ea) else 0
        status[k + 1] = 1 if (xb != 65536 or pb != eb) else 0

    @numba.njit(inline="always")
    def _single(stream, starts, seg, seg_sym, n_sym_total, freq, cum, sym_tab, pk, mask,
                prob_bits, out, w_lo, n_weights, lut, cols, levels, group, direct):
        """One segment, any length, writing only the wanted weights (the edges of a range)."""
        x, pos, end, base, col = _seg_start(stream, starts, seg, seg_sym, group, cols, levels)
        s0 = seg * seg_sym
        for i in range(s0, min(s0 + seg_sym, n_sym_total)):
            s, x, pos = _step(x, pos, end, stream, mask, prob_bits, freq, cum, sym_tab)
            d = pk[s]
            w = i * group - w_lo
            for j in range(group):
                if 0 <= w + j < n_weights:
                    out[w + j] = lut[s * group + j] if direct else lut[base + ((d >> (2 * j)) & 3)]
                col += 1
                if col == cols:
                    col = 0
                    base += levels
        return x != 65536 or pos != end

    def _make_decoder(group, direct):
        """The decode kernel for one (group, direct): as constants they unroll the emit loops.
        numba caches it on disk per pair (its cache key covers the closure's values)."""

        @numba.njit(cache=True, parallel=True, nogil=True)
        def decoder(stream, starts, seg_lo, seg_hi, n_sym_total, n_weights, w_lo, freq, cum,
                    sym_tab, pk, prob_bits, seg_sym, out, status, lut, cols, levels):
            mask = (1 << prob_bits) - 1
            seg_w = seg_sym * group
            for p in numba.prange((seg_hi - seg_lo + 1) // 2):
                a = seg_lo + 2 * p
                b = a + 1
                if (b < seg_hi and (b + 1) * seg_sym <= n_sym_total and a * seg_w >= w_lo
                        and (b + 1) * seg_w <= w_lo + n_weights):
                    _pair(stream, starts, a, seg_sym, freq, cum, sym_tab, pk, mask, prob_bits,
                          out, w_lo, lut, cols, levels, group, direct, status, a - seg_lo)
                else:
                    for seg in range(a, min(b + 1, seg_hi)):
                        status[seg - seg_lo] = _single(
                            stream, starts, seg, seg_sym, n_sym_total, freq, cum, sym_tab, pk,
                            mask, prob_bits, out, w_lo, n_weights, lut, cols, levels, group,
                            direct)

        return decoder

    @numba.njit(cache=True, parallel=True, nogil=True)
    def _symbols(codes, group, alphabet, ternary, out):
        n = codes.shape[0]
        for i in numba.prange(out.shape[0]):
            acc = 0
            for j in range(group - 1, -1, -1):
                k = i * group + j
                d = 0
                if k < n:
                    v = np.int64(codes[np.uint64(k)])
                    d = (v + 3) % 3 if ternary else v  # ternary digits: 0 -> 0, +1 -> 1, -1 -> 2
                acc = acc * alphabet + d
            out[np.uint64(i)] = acc

    @numba.njit(cache=True, parallel=True, nogil=True)
    def _encode(symbols, freq, cum, prob_bits, seg_sym, nseg, words, counts, states):
        n = symbols.shape[0]
        shift = 32 - prob_bits
        for seg in numba.prange(nseg):
            s0 = seg * seg_sym
            s1 = min(s0 + seg_sym, n)
            x = np.int64(65536)
            k = 0
            base = seg * seg_sym
            for i in range(s1 - 1, s0 - 1, -1):
                s = symbols[i]
                f = np.int64(freq[s])
                if (x >> shift) >= f:
                    words[base + k] = np.uint16(x & 0xFFFF)
                    k += 1
                    x >>= 16
                x = ((x // f) << prob_bits) + (x % f) + np.int64(cum[s])
            counts[seg] = k
            states[seg] = x

    @numba.njit(cache=True, parallel=True, nogil=True)
    def _assemble(words, counts, states, starts, seg_sym, stream):
        for seg in numba.prange(counts.shape[0]):
            st = starts[seg]
            stream[st] = np.uint16(states[seg] >> 16)
            stream[st + 1] = np.uint16(states[seg] & 0xFFFF)
            k = counts[seg]
            base = seg * seg_sym
            for j in range(k):
                stream[st + 2 + j] = words[base + k - 1 - j]


_DECODERS: dict = {}  # (group, direct) -> compiled decode kernel


def encode_segments(symbols, freqs, prob_bits, segment_symbols):
    """Compiled twin of ``rans.encode_segments`` (same outputs)."""
    n = symbols.size
    nseg = max(1, -(-n // segment_symbols))
    f = freqs.astype(np.int64)
    c = np.zeros_like(f)
    np.cumsum(f[:-1], out=c[1:])
    words = np.empty(max(n, 1), np.uint16)
    counts = np.zeros(nseg, np.int64)
    states = np.zeros(nseg, np.int64)
    _encode(
        np.ascontiguousarray(symbols), f, c, prob_bits, segment_symbols, nseg, words, counts, states
    )
    starts = np.zeros(nseg + 1, np.int64)
    np.cumsum(counts + 2, out=starts[1:])
    stream = np.empty(int(starts[-1]), np.uint16)
    _assemble(words, counts, states, starts, segment_symbols, stream)
    return stream, (counts + 2).astype(np.uint16)


def to_symbols(codes, ternary, group, alphabet):
    """Compiled twin of ``encoded.to_symbols`` for checked codes (same symbols, one pass)."""
    flat = np.ascontiguousarray(codes).reshape(-1)
    out = np.empty(-(-flat.size // group), np.uint8)
    _symbols(flat, group, alphabet, ternary, out)
    return out


@functools.lru_cache(maxsize=256)
def _decode_tables(freqs: bytes, dtype: str, expand: bytes, group: int):
    """The decoder's tables for one rANS table and expansion (the same for every matrix that
    shares them, so a load builds them once per table; the kernels only read them):
    frequencies, cumulative frequencies, the symbol of each slot, and each symbol's weights as
    2-bit digits (code - lowest code), one load per symbol instead of ``group``."""
    f = np.frombuffer(freqs, dtype).astype(np.int64)
    c = np.zeros_like(f)
    np.cumsum(f[:-1], out=c[1:])
    sym_tab = np.repeat(np.arange(f.size, dtype=np.uint8), f)
    exp = np.frombuffer(expand, np.int8).reshape(-1, group).astype(np.int64)
    pk = ((exp - exp.min()) << (2 * np.arange(group))).sum(1).astype(np.int32)
    return f, c, sym_tab, pk


def decode_weights(
    stream,
    starts,
    seg_lo,
    seg_hi,
    n_sym_total,
    w_lo,
    w_hi,
    freqs,
    prob_bits,
    segment_symbols,
    expand,
    lut=None,
    cols=1,
    levels=3,
    out=None,
):
    """Decode weights ``w_lo:w_hi`` (they must lie in segments ``seg_lo:seg_hi``) to int8 codes,
    or, given ``lut`` (``int16 [rows * levels]``, ``levels`` = 3 for ternary), straight to the
    value ``lut[row * levels + code - min_code]`` of each weight (``row = index // cols``):
    dequantization fused into the decode loop, no code array in between. ``out`` (values only:
    contiguous ``int16 [w_hi - w_lo]``) receives them when given (the caller's memory).

    Raises:
        ValueError: a segment is corrupted (reads past its end or misses its final state).
    """
    group = expand.shape[1]
    f, c, sym_tab, pk = _decode_tables(np.ascontiguousarray(freqs).tobytes(), freqs.dtype.str,
                                       np.ascontiguousarray(expand, np.int8).tobytes(), group)
    direct = lut is None
    if direct:  # codes: each symbol's codes straight from the flat expansion table
        if out is not None:
            raise ValueError("out is for decoding to values (with a lut), not to codes")
        out = np.empty(w_hi - w_lo, np.int8)
        lut = np.ascontiguousarray(expand, dtype=np.int8).reshape(-1)
        cols, levels = 1 << 62, 0
    else:
        if out is None:  # (a given one is checked by its caller, encoded._decode_lut)
            out = np.empty(w_hi - w_lo, np.int16)
        lut = np.ascontiguousarray(lut, dtype=np.int16)
    status = np.zeros(seg_hi - seg_lo, np.uint8)
    key = (int(group), bool(direct))
    if key not in _DECODERS:
        _DECODERS[key] = _make_decoder(*key)
    _DECODERS[key](stream, starts, seg_lo, seg_hi, n_sym_total, w_hi - w_lo, w_lo, f, c, sym_tab,
                   pk, prob_bits, segment_symbols, out, status, lut, cols, levels)
    if status.any():
        bad = seg_lo + int(np.flatnonzero(status)[0])
        raise ValueError(
            f"corrupted stream: segment {bad} reads past its end or does not decode to its "
            "initial state (truncated, corrupted, or decoded with the wrong table)"
        )
    return out
