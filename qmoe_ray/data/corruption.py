"""Turning token streams into model inputs: causal windows and T5 span corruption (pure numpy).

Why here and pure: the compressor's calibration set and the evaluator's held-out set must be built
the same way on every worker and in every test, so the sampling is a deterministic function of a
``numpy.random.Generator`` and the token ids, with no I/O.

Span corruption follows T5 (Raffel et al. 2020, section 3.1.4), which is how QMoE calibrates the
Switch models (QMoE section 5.1: C4 with noise density 0.15 and mean span length 3): a fraction
``noise_density`` of the tokens is dropped in ``round(noise / mean_span)`` spans, each span replaced
in the encoder input by one sentinel and reproduced after that sentinel in the targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpanCorruption:
    """T5 span-corruption settings (defaults: the paper's 0.15 / 3).

    Raises:
        ValueError: ``noise_density`` outside (0, 1) or ``mean_span`` below 1.
    """

    noise_density: float = 0.15
    mean_span: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span < 1.0:
            raise ValueError(f"mean_span must be >= 1, got {self.mean_span}")

    def counts(self, raw_len: int) -> tuple[int, int]:
        """``(noise tokens, spans)`` for a segment of ``raw_len`` tokens (as T5 rounds them)."""
        noise = min(max(int(round(raw_len * self.noise_density)), 1), raw_len - 1)
        spans = max(int(round(noise / self.mean_span)), 1)
        return noise, spans

    def lengths(self, raw_len: int) -> tuple[int, int]:
        """``(encoder input length, target length)`` of a corrupted ``raw_len`` segment, both
        counting the final EOS."""
        noise, spans = self.counts(raw_len)
        return raw_len - noise + spans + 1, noise + spans + 1

    def raw_length(self, inputs_length: int) -> int:
        """The longest raw segment whose corrupted encoder input fits ``inputs_length`` tokens.

        Raises:
            ValueError: ``inputs_length`` is too short for even one span.
        """
        if inputs_length < 4:
            raise ValueError(f"span corruption needs an input length of at least 4, "
                             f"got {inputs_length}")
        raw = inputs_length
        while raw > 2 and self.lengths(raw)[0] > inputs_length:
            raw -= 1
        while self.lengths(raw + 1)[0] <= inputs_length:
            raw += 1
        return raw


def _segment(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of ``total`` into ``parts`` positive integers."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    sentinels: Sequence[int],
    eos_id: int,
    settings: SpanCorruption = SpanCorruption(),
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one segment.

    Args:
        tokens: ``int64 [L]`` raw token ids, ``L >= 2``.
        rng: the generator that places the spans.
        sentinels: sentinel ids in order (``<extra_id_0>``, ``<extra_id_1>``, ...).
        eos_id: appended to both outputs.
        settings: noise density and mean span length.

    Returns:
        ``(inputs, targets)``: the segment with each noise span replaced by its sentinel, and the
        sentinels each followed by the span they replace; both end with ``eos_id``.

    Raises:
        ValueError: the segment is shorter than 2 tokens or there are too few sentinels.
    """
    length = len(tokens)
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    noise, spans = settings.counts(length)
    if spans > len(sentinels):
        raise ValueError(f"{spans} noise spans need {spans} sentinels, only {len(sentinels)} given")
    noise_lens = _segment(noise, spans, rng)
    keep_lens = _segment(length - noise, spans, rng)
    inputs, targets = [], []
    pos = 0
    for k in range(spans):
        inputs.append(tokens[pos : pos + keep_lens[k]])
        pos += keep_lens[k]
        inputs.append(np.asarray([sentinels[k]], dtype=np.int64))
        targets.append(np.asarray([sentinels[k]], dtype=np.int64))
        targets.append(tokens[pos : pos + noise_lens[k]])
        pos += noise_lens[k]
    eos = np.asarray([eos_id], dtype=np.int64)
    return (np.concatenate([*inputs, eos]).astype(np.int64),
            np.concatenate([*targets, eos]).astype(np.int64))


def choose_windows(
    stream: np.ndarray, num: int | None, length: int, rng: np.random.Generator
) -> np.ndarray:
    """``num`` non-overlapping windows of ``length`` tokens from a 1-D stream, chosen at random and
    returned in stream order (``num=None``: all of them).

    Raises:
        ValueError: the stream holds fewer than ``num`` windows (the message gives the count).
    """
    total = len(stream) // length
    if num is None:
        num = total
    if total < num or num < 1:
        raise ValueError(f"{len(stream)} tokens hold {total} windows of {length} tokens, "
                         f"{num} asked")
    pick = np.sort(rng.choice(total, size=num, replace=False))
    return np.stack([stream[i * length : (i + 1) * length] for i in pick]).astype(np.int64)


def corrupt_batch(
    segments: np.ndarray,
    rng: np.random.Generator,
    sentinels: Sequence[int],
    eos_id: int,
    pad_id: int,
    decoder_start_id: int,
    settings: SpanCorruption = SpanCorruption(),
) -> dict[str, np.ndarray]:
    """Encoder-decoder inputs from raw segments ``[N, L]`` by span corruption.

    Returns:
        ``input_ids``, ``attention_mask`` (encoder), ``decoder_input_ids`` (the targets shifted
        right after ``decoder_start_id``), ``decoder_attention_mask`` and ``labels`` (-100 where
        padded), all ``int64`` and padded to the longest sample.
    """
    pairs = [span_corrupt(s, rng, sentinels, eos_id, settings) for s in segments]
    n = len(pairs)
    s_in = max(len(i) for i, _ in pairs)
    s_out = max(len(t) for _, t in pairs)
    out = {
        "input_ids": np.full((n, s_in), pad_id, np.int64),
        "attention_mask": np.zeros((n, s_in), np.int64),
        "decoder_input_ids": np.full((n, s_out), pad_id, np.int64),
        "decoder_attention_mask": np.zeros((n, s_out), np.int64),
        "labels": np.full((n, s_out), -100, np.int64),
    }
    for r, (inp, tgt) in enumerate(pairs):
        out["input_ids"][r, : len(inp)] = inp
        out["attention_mask"][r, : len(inp)] = 1
        out["labels"][r, : len(tgt)] = tgt
        out["decoder_input_ids"][r, 0] = decoder_start_id
        out["decoder_input_ids"][r, 1 : len(tgt)] = tgt[:-1]
        out["decoder_attention_mask"][r, : len(tgt)] = 1
    return out
