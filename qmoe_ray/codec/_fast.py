"""Compiled (numba) rANS loops: the same coder as ``rans.py``, one segment per loop iteration.

Why: the numpy lock-step coder pays a fixed cost per vector operation per symbol position, which
caps CPU decoding near 50-60M weights/s on c2048-sized matrices; a compiled loop per segment, with
segments spread over cores (``prange``), reaches several hundred M/s. numba is optional: when it is
missing, ``AVAILABLE`` is False and the numpy coder is used (same bytes, same results).
"""

from __future__ import annotations

import numpy as np

try:  # pragma: no cover - exercised when numba is installed
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False


if AVAILABLE:

    @numba.njit(cache=True, parallel=True, nogil=True)
    def _decode_weights(
        stream,
        starts,
        seg_lo,
        seg_hi,
        n_sym_total,
        n_weights,
        w_lo,
        freq,
        cum,
        sym_tab,
        expand,
        prob_bits,
        seg_sym,
        out,
        status,
        lut,
        cols,
        levels,
    ):
        group = expand.shape[1]
        direct = lut.shape[0] == 0
        mask = (1 << prob_bits) - 1
        nwords = stream.shape[0]
        for seg in numba.prange(seg_lo, seg_hi):
            st = starts[seg]
            end = starts[seg + 1]
            x = (np.int64(stream[st]) << 16) | np.int64(stream[st + 1])
            pos = st + 2
            s0 = seg * seg_sym
            s1 = min(s0 + seg_sym, n_sym_total)
            bad = False
            # lut path: the row's base index and column of the symbol's first weight, carried
            # from symbol to symbol (no division in the loop)
            base = (s0 * group // cols) * levels + levels // 2
            col = s0 * group % cols
            for i in range(s0, s1):
                slot = x & mask
                s = sym_tab[slot]
                x = np.int64(freq[s]) * (x >> prob_bits) + slot - np.int64(cum[s])
                if x < 65536:
                    if pos >= end or pos >= nwords:
                        bad = True
                        break
                    x = (x << 16) | np.int64(stream[pos])
                    pos += 1
                w = i * group - w_lo
                inside = w >= 0 and w + group <= n_weights
                if direct:
                    if inside:
                        for j in range(group):
                            out[w + j] = expand[s, j]
                    else:
                        for j in range(group):
                            if 0 <= w + j < n_weights:
                                out[w + j] = expand[s, j]
                elif inside and col + group < cols:  # the common case: one row, all wanted
                    for j in range(group):
                        out[w + j] = lut[base + expand[s, j]]
                    col += group
                else:  # the dequantized value: the row's level for this code (e.g. bf16 bits)
                    for j in range(group):
                        if 0 <= w + j < n_weights:
                            out[w + j] = lut[base + expand[s, j]]
                        col += 1
                        if col == cols:
                            col = 0
                            base += levels
            status[seg - seg_lo] = 1 if (bad or x != 65536 or pos != end) else 0

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
):
    """Decode weights ``w_lo:w_hi`` (they must lie in segments ``seg_lo:seg_hi``) to int8 codes,
    or, given ``lut`` (``int16 [rows * levels]``, ``levels`` = 3 for ternary), straight to the
    value ``lut[row * levels + levels // 2 + code]`` of each weight (``row = index // cols``):
    dequantization fused into the decode loop, no code array in between.

    Raises:
        ValueError: a segment is corrupted (reads past its end or misses its final state).
    """
    f = freqs.astype(np.int64)
    c = np.zeros_like(f)
    np.cumsum(f[:-1], out=c[1:])
    sym_tab = np.repeat(np.arange(freqs.size, dtype=np.uint8), freqs.astype(np.int64))
    direct = lut is None
    out = np.empty(w_hi - w_lo, np.int8 if direct else np.int16)
    lut = np.zeros(0, np.int16) if direct else np.ascontiguousarray(lut, dtype=np.int16)
    status = np.zeros(seg_hi - seg_lo, np.uint8)
    _decode_weights(
        stream,
        starts,
        seg_lo,
        seg_hi,
        n_sym_total,
        w_hi - w_lo,
        w_lo,
        f,
        c,
        sym_tab,
        expand,
        prob_bits,
        segment_symbols,
        out,
        status,
        lut,
        cols,
        levels,
    )
    if status.any():
        bad = seg_lo + int(np.flatnonzero(status)[0])
        raise ValueError(
            f"corrupted stream: segment {bad} reads past its end or does not decode to its "
            "initial state (truncated, corrupted, or decoded with the wrong table)"
        )
    return out
