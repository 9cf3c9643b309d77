"""A reader of qmoe-ray checkpoints written from docs/CHECKPOINT.md and docs/FORMAT.md alone, with
nothing but json, hashlib, numpy and the safetensors file layout: no qmoe_ray import, so that it
is an independent oracle for the package's loader (and a check that the docs suffice).

Everything here follows the docs' wording; where a step is not in the docs it is not done."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from pathlib import Path

import numpy as np

# safetensors dtype names as a manifest records them -> numpy storage dtype (bf16 kept as uint16)
_NP = {"bfloat16": np.uint16, "float32": np.float32, "float16": np.float16, "uint8": np.uint8,
       "uint16": np.uint16, "int8": np.int8, "int32": np.int32, "int64": np.int64}


def _rows(stored: dict) -> dict:
    """A version-3 collection (CHECKPOINT.md, Columns) as name -> entry object; a null value is
    a key the entry lacks."""
    names = stored["names"]
    out: dict = {name: {} for name in names}
    for key, col in stored["columns"].items():
        # each entry its own copy of a pooled value (the tests edit entries one at a time)
        values = ([copy.deepcopy(col["pool"][j]) for j in col["index"]] if isinstance(col, dict)
                  else col)
        assert len(values) == len(names), key
        for name, v in zip(names, values, strict=True):
            if v is not None:
                out[name][key] = v
    assert len(out) == len(names), "a name repeats"
    return out


def parse_manifest(raw: bytes) -> dict:
    """manifest.json's bytes, refusing another format or a newer version (CHECKPOINT.md,
    Reading 1); version 3's columns as the entry objects of versions 1 and 2."""
    m = json.loads(raw)
    assert m["format"] == "qmoe-ray", m["format"]
    assert m["format_version"] in (1, 2, 3), m["format_version"]
    if m["format_version"] == 3:
        m = {k: _rows(v) if k in ("tensors", "quantized") else v for k, v in m.items()}
    return m


def load_manifest(root: Path) -> dict:
    """``parse_manifest`` of ``root/manifest.json``."""
    return parse_manifest((root / "manifest.json").read_bytes())


def read_manifest(root: Path) -> dict:
    """``load_manifest`` of an untrimmed checkpoint (this reader does not apply trim records),
    and the folder's config.json must be the manifest's config."""
    m = load_manifest(root)
    assert "trim" not in m, "a trimmed checkpoint"
    assert json.loads((root / "config.json").read_bytes()) == m["config"]
    return m


def raw_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """The safetensors file as name -> (dtype, shape, raw bytes): an 8-byte little-endian header
    length, a JSON header, then the data (offsets relative to the data's start)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    return {name: (h["dtype"], h["shape"], data[h["data_offsets"][0]:h["data_offsets"][1]])
            for name, h in header.items()}


def read_verified(root: Path, manifest: dict) -> dict[str, np.ndarray]:
    """Every tensor the manifest lists, its SHA-256 checked over its raw stored bytes (Reading 3);
    bf16 tensors come back as float32 (exact)."""
    by_file: dict[str, dict] = {}
    for name in manifest["files"]:
        assert not name.startswith("/") and ".." not in name.split("/"), name
        by_file[name] = raw_tensors(root / name)
    out = {}
    for name, t in manifest["tensors"].items():
        dtype, shape, data = by_file[t["file"]][name]
        assert len(data) == t["nbytes"], name
        assert hashlib.sha256(data).hexdigest() == t["sha256"], f"checksum of {name}"
        arr = np.frombuffer(data, dtype=np.dtype(_NP[t["dtype"]]).newbyteorder("<"))
        arr = arr.reshape(t["shape"])
        assert list(arr.shape) == list(shape)
        if t["dtype"] == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out


def table_hash(kind: str, group: int, prob_bits: int, freqs: np.ndarray) -> str:
    """FORMAT.md section 2."""
    head = f"qmoe-rans/1/{kind}/{group}/{prob_bits}\n".encode("ascii")
    return hashlib.sha256(head + freqs.astype("<u2").tobytes()).hexdigest()


def rans_decode(stream: np.ndarray, seg_words: np.ndarray, n_symbols: int, freqs: np.ndarray,
                prob_bits: int, seg_symbols: int) -> np.ndarray:
    """FORMAT.md section 3: the symbols of all segments, each segment's end state checked."""
    freqs = [int(f) for f in freqs]
    m = 1 << prob_bits
    cum = np.concatenate([[0], np.cumsum(freqs)]).astype(np.int64).tolist()
    assert cum[-1] == m
    slot_sym = np.repeat(np.arange(len(freqs)), freqs).tolist()  # slot k -> its symbol
    words = [int(w) for w in stream]
    n_seg = -(-n_symbols // seg_symbols)
    assert len(seg_words) == n_seg and int(np.sum(seg_words, dtype=np.int64)) == len(words)
    out = np.empty(n_symbols, np.int64)
    start = 0
    for j in range(n_seg):
        w = words[start:start + int(seg_words[j])]
        x, p = w[0] << 16 | w[1], 2
        for k in range(j * seg_symbols, min((j + 1) * seg_symbols, n_symbols)):
            slot = x & (m - 1)
            s = slot_sym[slot]
            x = freqs[s] * (x >> prob_bits) + slot - cum[s]
            if x < 1 << 16:
                x = (x << 16) | w[p]
                p += 1
            out[k] = s
        assert x == 1 << 16 and p == len(w), f"segment {j} is corrupt"
        start += int(seg_words[j])
    return out


def rans_codes(entry: dict, tensors: dict[str, np.ndarray], manifest: dict,
               name: str) -> np.ndarray:
    """The codes ``[rows, cols]`` of a ``qmoe-rans`` matrix (FORMAT.md 1-4): int8 {-1, 0, 1}
    for ternary, uint8 0..3 for int2."""
    c = entry["codec"]
    assert c["format"] == "qmoe-rans" and c["version"] == "1" and c["kind"] in ("ternary", "int2")
    kind = c["kind"]
    alphabet = 3 if kind == "ternary" else 4
    rows, cols = (int(v) for v in c["shape"].split(","))
    group, prob_bits, seg = int(c["group"]), int(c["prob_bits"]), int(c["segment_symbols"])
    if c["table"] == "shared":
        table = manifest["tables"][entry["table"]]
        freqs = tensors[f"{entry['table']}.freqs"]
        assert table["table_hash"] == c["table_hash"]
    else:
        freqs = tensors[f"{name}.q.freqs"]
    assert table_hash(kind, group, prob_bits, freqs) == c["table_hash"], "table hash"
    n = rows * cols
    sym = rans_decode(tensors[f"{name}.q.stream"], tensors[f"{name}.q.seg_words"],
                      -(-n // group), freqs, prob_bits, seg)
    digits = (sym[:, None] // alphabet ** np.arange(group)) % alphabet  # first = lowest digit
    digits = digits.reshape(-1)[:n].reshape(rows, cols)
    if kind == "int2":
        return digits.astype(np.uint8)
    return np.where(digits == 2, -1, digits).astype(np.int8)


def ternary_codes(entry: dict, tensors: dict[str, np.ndarray], manifest: dict,
                  name: str) -> np.ndarray:
    """The int8 {-1, 0, 1} codes ``[rows, cols]`` of a ternary matrix."""
    assert entry["codec"]["kind"] == "ternary"
    return rans_codes(entry, tensors, manifest, name)


def packed_codes(entry: dict, tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The uint8 codes of a ``qmoe-packbits`` matrix (FORMAT.md 5)."""
    c = entry["codec"]
    assert c["format"] == "qmoe-packbits" and c["version"] == "1"
    rows, cols = (int(v) for v in c["shape"].split(","))
    bits = int(c["bits"])
    stream = np.unpackbits(tensors[f"{name}.q.packed"], bitorder="little")
    n = rows * cols
    b = stream[:n * bits].reshape(n, bits).astype(np.uint32)
    return (b << np.arange(bits, dtype=np.uint32)).sum(1).astype(np.uint8).reshape(rows, cols)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bf16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def dense_weight(name: str, manifest: dict, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Quantized matrix ``name`` dequantized as CHECKPOINT.md says, rounded to bf16 (float32)."""
    entry = manifest["quantized"][name]
    if entry["scheme"] == "ternary":
        q = ternary_codes(entry, tensors, manifest, name)
        lo, hi = tensors[f"{name}.lo"][:, None], tensors[f"{name}.hi"][:, None]
        return to_bf16(np.where(q == 1, hi, np.where(q == -1, lo, np.float32(0))))
    if entry["codec"]["format"] == "qmoe-rans":  # int2
        q = rans_codes(entry, tensors, manifest, name).astype(np.float32)
    else:
        q = packed_codes(entry, tensors, name).astype(np.float32)
    scale, zero = tensors[f"{name}.scale"], tensors[f"{name}.zero"].astype(np.float32)
    cols = q.shape[1]
    gs = entry.get("quant_group_size") or cols  # null: absent in version 3
    idx = np.arange(cols) // gs  # group g covers input columns g*gs .. (g+1)*gs - 1
    return to_bf16((scale[:, idx] * (q - zero[:, idx])).astype(np.float32))
