"""rANS over fixed-length segments, vectorized across segments (numpy only, no I/O).

Why rANS: at P(0)=0.95 a ternary weight carries 0.336 bits, and the target is to stay within 5%
of that. A prefix code per weight cannot go below 1 bit; a variable-to-fixed dictionary (QMoE's
reference) loses ~17% at P(0)=0.885 with 2**16 entries. rANS over groups of weights, with
frequencies quantized to 2**14, loses well under 1%.

Why segments of a fixed symbol count: every independent stream costs a 32-bit final state plus a
16-bit length, so streams must be long (thousands of weights) yet many (a GPU decodes one per
thread). A fixed count spanning row boundaries keeps the overhead the same for any shape, makes
the segment holding weight ``i`` computable (``(i // group) // segment_symbols``), and lets the
CPU decoder advance all segments in lock-step with numpy: one vector operation per symbol
position over all segments, instead of a Python loop per symbol.

Coder (per segment; state x is 32 bits, I/O in 16-bit words, L = 2**16, M = 2**prob_bits):
  encode s (symbols taken last to first): if x >> (32 - prob_bits) >= f[s]: emit x & 0xFFFF,
      x >>= 16; then x = (x // f[s]) << prob_bits + x % f[s] + c[s].
  segment words: [x >> 16, x & 0xFFFF, then the emitted words, last emitted first].
  decode: x = w0 << 16 | w1; per symbol: slot = x & (M-1); s = sym[slot];
      x = f[s] * (x >> prob_bits) + slot - c[s]; if x < L: x = x << 16 | next word.
  A segment is valid only if, after its last symbol, x == L and every word was read: a free
  integrity check that catches truncation and most corruption.
"""

from __future__ import annotations

import numpy as np

RANS_L = 1 << 16
_U32 = np.uint32


def encode_segments(
    symbols: np.ndarray, freqs: np.ndarray, prob_bits: int, segment_symbols: int
) -> tuple[np.ndarray, np.ndarray]:
    """rANS-encode ``symbols`` in segments of ``segment_symbols``.

    Args:
        symbols: ``uint8[n]``; every symbol must have ``freqs[s] > 0`` (checked by the caller).
        freqs: ``uint16`` quantized frequencies summing to ``2**prob_bits``.
        prob_bits: precision.
        segment_symbols: symbols per segment (the last segment may be shorter).

    Returns:
        ``(stream uint16[words], seg_words uint16[segments])``.
    """
    n = symbols.size
    S = segment_symbols
    nseg = max(1, -(-n // S))
    last = n - (nseg - 1) * S  # symbols in the last segment (0 only when n == 0)
    padded = np.zeros(nseg * S, dtype=np.uint8)
    padded[:n] = symbols
    sym_t = np.ascontiguousarray(padded.reshape(nseg, S).T)  # [S, nseg]
    f_tab = freqs.astype(_U32)
    c_tab = np.zeros_like(f_tab)
    np.cumsum(f_tab[:-1], out=c_tab[1:])
    x = np.full(nseg, RANS_L, dtype=_U32)
    words = np.empty((S, nseg), dtype=np.uint16)  # words[k, seg]: k-th word that seg emitted
    count = np.zeros(nseg, dtype=np.int64)
    shift = _U32(32 - prob_bits)
    pb = _U32(prob_bits)
    for t in range(S - 1, -1, -1):
        k = nseg if t < last else nseg - 1  # the short last segment is the last lane
        xs = x[:k]
        s = sym_t[t, :k]
        f = f_tab[s]
        emit = np.flatnonzero((xs >> shift) >= f)
        if emit.size:
            words[count[emit], emit] = xs[emit]  # truncates to the low 16 bits
            count[emit] += 1
            xs[emit] >>= _U32(16)
        q, r = np.divmod(xs, f)
        x[:k] = (q << pb) + r + c_tab[s]
    seg_len = count + 2
    starts = np.zeros(nseg + 1, dtype=np.int64)
    np.cumsum(seg_len, out=starts[1:])
    stream = np.empty(int(starts[-1]), dtype=np.uint16)
    stream[starts[:-1]] = x >> _U32(16)
    stream[starts[:-1] + 1] = x
    total = int(count.sum())
    if total:
        lane = np.repeat(np.arange(nseg), count)
        j = np.arange(total) - np.repeat(np.cumsum(count) - count, count)  # index within lane
        stream[np.repeat(starts[:-1] + 2, count) + j] = words[count[lane] - 1 - j, lane]
    return stream, seg_len.astype(np.uint16)


def segment_starts(seg_words: np.ndarray, stream_words: int) -> np.ndarray:
    """Word offsets (``int64[segments + 1]``) of the segments; checks they tile the stream.

    Raises:
        ValueError: a segment shorter than its 2-word state, or lengths not summing to the stream.
    """
    lens = seg_words.astype(np.int64)
    if np.any(lens < 2):
        raise ValueError("corrupted segment table: a segment is shorter than its 2-word state")
    starts = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    if starts[-1] != stream_words:
        raise ValueError(
            f"segment lengths sum to {int(starts[-1])} words but the stream has {stream_words}: "
            "truncated or corrupted data"
        )
    return starts


def decode_segments(
    stream: np.ndarray,
    starts: np.ndarray,
    seg_lo: int,
    seg_hi: int,
    n_symbols_total: int,
    freqs: np.ndarray,
    prob_bits: int,
    segment_symbols: int,
) -> np.ndarray:
    """Decode segments ``seg_lo .. seg_hi-1`` to their symbols (``uint8``), in order.

    Raises:
        ValueError: a segment does not end in the initial state or reads past its end. Reads
            are clipped to the stream, so corrupted data never reads out of bounds.
    """
    S = segment_symbols
    nseg_total = starts.size - 1
    lanes = seg_hi - seg_lo
    last_full = seg_hi < nseg_total or n_symbols_total == nseg_total * S
    last = S if last_full else n_symbols_total - (nseg_total - 1) * S
    f_tab = freqs.astype(_U32)
    c_tab = np.zeros_like(f_tab)
    np.cumsum(f_tab[:-1], out=c_tab[1:])
    sym_tab = np.repeat(np.arange(freqs.size, dtype=np.uint8), freqs.astype(np.int64))
    st = starts[seg_lo:seg_hi]
    end = starts[seg_lo + 1 : seg_hi + 1]
    s32 = stream.astype(_U32) if stream.dtype != _U32 else stream
    x = (s32[st] << _U32(16)) | s32[st + 1]
    pos = st + 2
    out = np.empty((S, lanes), dtype=np.uint8)
    mask = _U32((1 << prob_bits) - 1)
    pb = _U32(prob_bits)
    L = _U32(RANS_L)
    for t in range(S if lanes else 0):
        k = lanes if t < last else lanes - 1
        if k == 0:
            break
        xs = x[:k]
        slot = xs & mask
        s = sym_tab[slot]
        out[t, :k] = s
        xs = f_tab[s] * (xs >> pb) + slot - c_tab[s]
        need = np.flatnonzero(xs < L)
        if need.size:
            p = pos[need]
            xs[need] = (xs[need] << _U32(16)) | s32.take(p, mode="clip")
            pos[need] = p + 1
        x[:k] = xs
    if np.any(x != L) or np.any(pos != end):
        bad = int(np.flatnonzero((x != L) | (pos != end))[0])
        raise ValueError(
            f"corrupted stream: segment {seg_lo + bad} does not decode to its initial state "
            "(truncated, corrupted, or decoded with the wrong table)"
        )
    sym = out.T.reshape(-1)
    n_here = min(seg_hi * S, n_symbols_total) - seg_lo * S
    return sym[:n_here]
