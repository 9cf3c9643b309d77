"""Frequency tables of the sub-1-bit code: built from measured statistics, hashed, serializable.

Why a table object of its own: QMoE's reference code built its dictionary from a prior fixed in the
source (P(0)=0.885) and stored it nowhere, so data could not outlive the code that wrote it. Here a
``Table`` is built from counts of the symbols actually encoded (one matrix, a layer, a whole
checkpoint: the caller chooses by what it counts), travels with the data (embedded in an encoded
matrix or saved once beside many), and is named by a SHA-256 content hash that the decoder checks.

A symbol is a group of ``group`` consecutive weights of one matrix in row-major order (rows run
into each other), each weight a digit in ``0 .. alphabet-1``; the symbol value is
``sum(d[j] * alphabet**j)``, the first weight in the lowest digit. Ternary codes map to digits by
``code mod 3`` (0 -> 0, +1 -> 1, -1 -> 2); 2-bit codes are their own digits.

Frequencies are quantized to sum to ``2**prob_bits`` (the rANS precision). Quantization minimises
the coding loss greedily: every symbol that must be codable gets at least 1, then single units move
to or from the symbols where they change the expected code length the least.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field

import numpy as np

FORMAT_NAME = "qmoe-rans"
FORMAT_VERSION = 1
KINDS = {"ternary": 3, "int2": 4}
DEFAULT_GROUP = {"ternary": 5, "int2": 4}
DEFAULT_PROB_BITS = 14
MIN_PROB_BITS, MAX_PROB_BITS = 8, 15


def _check_params(kind: str, group: int, prob_bits: int) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(KINDS)}")
    alphabet = KINDS[kind]
    if not isinstance(group, int) or group < 1 or alphabet**group > 256:
        raise ValueError(
            f"group={group!r} for kind {kind!r}: need an int >= 1 with {alphabet}**group <= 256 "
            f"(ternary: 1..5, int2: 1..4)"
        )
    if not isinstance(prob_bits, int) or not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise ValueError(
            f"prob_bits={prob_bits!r}: need an int in {MIN_PROB_BITS}..{MAX_PROB_BITS}"
        )
    return alphabet**group


@dataclass(frozen=True)
class Table:
    """A quantized symbol-frequency table.

    Attributes:
        kind: ``"ternary"`` or ``"int2"``.
        group: weights per symbol.
        prob_bits: frequencies sum to ``2**prob_bits``.
        freqs: ``uint16[alphabet**group]``; 0 marks a symbol this table cannot encode.
    """

    kind: str
    group: int
    prob_bits: int
    freqs: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        nsym = _check_params(self.kind, self.group, self.prob_bits)
        f = np.ascontiguousarray(self.freqs)
        if f.dtype != np.uint16 or f.shape != (nsym,):
            raise ValueError(
                f"table freqs must be uint16[{nsym}] for kind={self.kind} group={self.group}, "
                f"got {f.dtype}{list(f.shape)}"
            )
        if int(f.sum(dtype=np.int64)) != 1 << self.prob_bits:
            raise ValueError(
                f"table freqs sum to {int(f.sum(dtype=np.int64))}, need 2**{self.prob_bits}: "
                "the table is corrupted; rebuild it with build_table()"
            )
        f.setflags(write=False)
        object.__setattr__(self, "freqs", f)

    @property
    def alphabet(self) -> int:
        """Digits per weight (3 for ternary, 4 for int2)."""
        return KINDS[self.kind]

    @property
    def num_symbols(self) -> int:
        """Size of the symbol alphabet, ``alphabet**group``."""
        return self.alphabet**self.group

    @property
    def hash(self) -> str:
        """SHA-256 (hex) of the format version, parameters and frequencies."""
        h = hashlib.sha256()
        h.update(
            f"{FORMAT_NAME}/{FORMAT_VERSION}/{self.kind}/{self.group}/{self.prob_bits}\n".encode()
        )
        h.update(self.freqs.astype("<u2").tobytes())
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        """Bytes of the table's arrays as stored."""
        return int(self.freqs.nbytes)

    def cum(self) -> np.ndarray:
        """Exclusive prefix sums of ``freqs`` (``uint32[num_symbols]``)."""
        c = np.zeros(self.num_symbols, dtype=np.uint32)
        np.cumsum(self.freqs[:-1], out=c[1:])
        return c

    def slot_symbols(self) -> np.ndarray:
        """The decode table: ``uint8[2**prob_bits]``, symbol owning each slot."""
        return np.repeat(np.arange(self.num_symbols, dtype=np.uint8), self.freqs.astype(np.int64))

    def bits_per_weight(self, counts: np.ndarray) -> float:
        """Ideal code length (bits/weight) of data with symbol ``counts`` under this table.

        Raises:
            ValueError: if a counted symbol has frequency 0 here.
        """
        counts = np.asarray(counts, dtype=np.float64)
        used = counts > 0
        if np.any(self.freqs[used] == 0):
            raise ValueError("counts contain symbols this table cannot encode")
        bits = -(counts[used] * np.log2(self.freqs[used] / float(1 << self.prob_bits))).sum()
        return float(bits / max(counts.sum() * self.group, 1.0))

    def to_tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Named arrays for a safetensors file (``{prefix}freqs``)."""
        return {f"{prefix}freqs": np.asarray(self.freqs, dtype=np.uint16)}

    def metadata(self, prefix: str = "") -> dict[str, str]:
        """String metadata for a safetensors file."""
        return {
            f"{prefix}format": FORMAT_NAME,
            f"{prefix}version": str(FORMAT_VERSION),
            f"{prefix}kind": self.kind,
            f"{prefix}group": str(self.group),
            f"{prefix}prob_bits": str(self.prob_bits),
            f"{prefix}table_hash": self.hash,
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, np.ndarray], metadata: dict[str, str], prefix: str = ""
    ) -> Table:
        """Rebuild a table written by ``to_tensors``/``metadata``; checks version and hash.

        Raises:
            KeyError: a needed array or metadata key is missing.
            ValueError: unknown format/version, or the content does not match its hash.
        """
        check_format(metadata, prefix)
        t = cls(
            kind=_meta(metadata, prefix, "kind"),
            group=int(_meta(metadata, prefix, "group")),
            prob_bits=int(_meta(metadata, prefix, "prob_bits")),
            freqs=np.asarray(_tensor(tensors, prefix, "freqs")),
        )
        want = _meta(metadata, prefix, "table_hash")
        if t.hash != want:
            raise ValueError(
                f"table hash mismatch: content hashes to {t.hash[:16]}..., metadata says "
                f"{want[:16]}...: the table is corrupted or belongs to other data"
            )
        return t


def _meta(metadata: dict[str, str], prefix: str, key: str) -> str:
    try:
        return metadata[prefix + key]
    except KeyError:
        raise KeyError(
            f"metadata key {prefix + key!r} missing: not a {FORMAT_NAME} artifact"
        ) from None


def _tensor(tensors: dict[str, np.ndarray], prefix: str, key: str) -> np.ndarray:
    try:
        return tensors[prefix + key]
    except KeyError:
        raise KeyError(f"tensor {prefix + key!r} missing from the encoded data") from None


def check_format(metadata: dict[str, str], prefix: str = "") -> None:
    """Refuse metadata of another format or of a version this decoder does not know.

    Raises:
        KeyError: the format keys are missing.
        ValueError: another format name or an unknown version.
    """
    name = _meta(metadata, prefix, "format")
    version = _meta(metadata, prefix, "version")
    if name != FORMAT_NAME:
        raise ValueError(f"format {name!r} is not {FORMAT_NAME!r}")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{FORMAT_NAME} version {version!r} is unknown to this decoder (knows "
            f"{FORMAT_VERSION}); upgrade qmoe-ray"
        )


def count_symbols(symbols: np.ndarray, num_symbols: int) -> np.ndarray:
    """Histogram (``int64[num_symbols]``) of a symbol array."""
    return np.bincount(symbols.ravel(), minlength=num_symbols).astype(np.int64)


def quantize_freqs(counts: np.ndarray, prob_bits: int, cover_all: bool) -> np.ndarray:
    """Frequencies summing to ``2**prob_bits`` that nearly minimise the code length of ``counts``.

    Args:
        counts: non-negative symbol counts.
        prob_bits: precision of the result.
        cover_all: give every symbol frequency >= 1 (a table shared with unseen data); otherwise
            only symbols with a positive count can be encoded.

    Returns:
        ``uint16`` frequencies.

    Raises:
        ValueError: negative counts, or nothing to cover.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if np.any(counts < 0):
        raise ValueError("symbol counts must be non-negative")
    total_slots = 1 << prob_bits
    n = counts.size
    need = np.ones(n, bool) if cover_all else counts > 0
    if not need.any():
        raise ValueError("no symbols to build a table from: pass counts of the data to encode")
    # Symbols that must be codable but were never seen get a pseudo-count far below any seen one.
    w = counts.astype(np.float64)
    w[need & (counts == 0)] = 1e-3
    w[~need] = 0.0
    freqs = np.where(need, np.maximum(1, np.floor(w / w.sum() * total_slots)), 0).astype(np.int64)
    # Greedy exchange: remove units where removal costs least, add where it gains most.
    excess = int(freqs.sum()) - total_slots
    if excess > 0:
        heap = [(w[s] * math.log2(freqs[s] / (freqs[s] - 1)), s) for s in range(n) if freqs[s] > 1]
        heapq.heapify(heap)
        while excess > 0:
            _, s = heapq.heappop(heap)
            freqs[s] -= 1
            excess -= 1
            if freqs[s] > 1:
                heapq.heappush(heap, (w[s] * math.log2(freqs[s] / (freqs[s] - 1)), s))
    elif excess < 0:
        heap = [(-w[s] * math.log2((freqs[s] + 1) / freqs[s]), s) for s in range(n) if need[s]]
        heapq.heapify(heap)
        while excess < 0:
            _, s = heapq.heappop(heap)
            freqs[s] += 1
            excess += 1
            heapq.heappush(heap, (-w[s] * math.log2((freqs[s] + 1) / freqs[s]), s))
    if np.any(freqs > 0xFFFF):  # only when one symbol takes all 2**16 slots: impossible (<= 2**15)
        raise ValueError("frequency overflow")
    return freqs.astype(np.uint16)


def build_table(
    counts: np.ndarray,
    kind: str = "ternary",
    group: int | None = None,
    prob_bits: int = DEFAULT_PROB_BITS,
    cover_all: bool = True,
) -> Table:
    """Build a table from symbol counts (e.g. summed ``symbol_counts`` of many matrices).

    Args:
        counts: ``int[alphabet**group]`` symbol counts (see ``symbol_counts``).
        kind: ``"ternary"`` or ``"int2"``.
        group: weights per symbol; default 5 (ternary) / 4 (int2).
        prob_bits: rANS precision, 8..15.
        cover_all: let the table encode every symbol (needed for a table shared with matrices it
            was not counted on); ``False`` gives the tightest table for exactly this data.

    Returns:
        The ``Table``.

    Raises:
        ValueError: bad parameters or counts of the wrong length.
    """
    group = DEFAULT_GROUP.get(kind, 0) if group is None else group
    nsym = _check_params(kind, group, prob_bits)
    counts = np.asarray(counts)
    if counts.shape != (nsym,):
        raise ValueError(
            f"counts must have shape ({nsym},) for kind={kind} group={group}, got {counts.shape}"
        )
    return Table(kind, group, prob_bits, quantize_freqs(counts, prob_bits, cover_all))
