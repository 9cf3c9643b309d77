"""The safetensors header: the project's one parser, for source checkpoints
(``qmoe_ray.storage.checkpoint``) and compressed shards (``qmoe_ray.format.shards``) alike.

A safetensors file is an 8-byte little-endian header length (``header_length``), a JSON header
giving each tensor's dtype, shape and byte range (``parse_header``), then the raw data. Both are
untrusted: every field is checked, and messages name the file and the tensor, never quote the
file's bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qmoe_ray.errors import CheckpointError

MAX_HEADER = 100 * 2**20  # the safetensors library's own limit

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file (relative name), dtype, shape, absolute byte range."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def parse_header(
    raw: bytes, file: str, file_size: int | None = None, supported: Sequence[str] | None = None
) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors JSON header (untrusted: every field is checked).

    Shapes are lists of non-negative integers (not bools or floats) whose byte size is computed
    in exact integer arithmetic, offsets are two integers ``0 <= begin <= end``, so no shape can
    wrap around to pass the size check. Messages name the file and the tensor, never quote the
    file's bytes. The compressed-checkpoint loader uses this parser too (one parser).

    Args:
        raw: the header bytes (after the 8-byte length).
        file: the shard's name, for messages and ``TensorInfo.file``.
        file_size: the shard's size in bytes, if known (offsets are checked against it).
        supported: the dtypes to name as supported when a dtype is unknown to the parser (default
            every one of ``DTYPES``; the source reader names ``SOURCE_DTYPES``).

    Returns:
        ``name -> TensorInfo`` with absolute byte offsets in the file.

    Raises:
        CheckpointError (a ``ValueError``): the header is not valid JSON or a tensor entry is
            malformed, has an unknown dtype, a byte size that disagrees with its shape, or
            overlaps/exceeds the data.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{file}: safetensors header is not UTF-8 text; the file is corrupt or not a "
            "safetensors file: re-download or re-save it"
        ) from None
    except (json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(
            f"{file}: safetensors header is not valid JSON ({why}); the file is "
            "corrupt or not a safetensors file: re-download or re-save it"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object; re-save the file")
    base = 8 + len(raw)
    data_size = None if file_size is None else file_size - base
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shown = repr(name) if len(name) <= 120 else repr(name[:117] + "...")
        if not isinstance(entry, dict) or not all(
            k in entry for k in ("dtype", "shape", "data_offsets")
        ):
            raise CheckpointError(
                f"{file}: header entry for {shown} lacks dtype/shape/data_offsets; "
                "the file is corrupt: re-save it"
            )
        dt, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise CheckpointError(
                f"{file}: tensor {shown} has unsupported dtype {str(dt)[:16]!r}; supported: "
                f"{', '.join(DTYPES if supported is None else supported)}"
            )
        if (
            not isinstance(shape, list)
            or not all(type(s) is int and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(
                f"{file}: tensor {shown} has a bad shape or data_offsets (shape: a list of "
                "non-negative integers; data_offsets: [begin, end] with 0 <= begin <= end); "
                "the file is corrupt: re-save it"
            )
        b, e = offsets
        dtype = DTYPES[dt]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()  # exact int
        if e - b != nbytes:
            dims = str(shape) if len(str(shape)) <= 80 else f"of {len(shape)} dimensions"
            raise CheckpointError(
                f"{file}: tensor {shown} spans {e - b} bytes but shape {dims} of "
                f"{dt} needs {nbytes}; the file is corrupt: re-save it"
            )
        if data_size is not None and e > data_size:
            raise CheckpointError(
                f"{file}: tensor {shown} ends at byte {e} of the data section but the "
                f"file holds only {data_size}; the file is truncated: re-download it"
            )
        spans.append((b, e, name))
        out[name] = TensorInfo(file, dtype, tuple(shape), base + b, base + e)
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CheckpointError(
                f"{file}: tensors {n0[:120]!r} and {n1[:120]!r} overlap in the data section; "
                "the file is corrupt: re-save it"
            )
    return out


def header_length(head: bytes | bytearray | memoryview, file_size: int, file: str,
                  fix: str = "re-download or re-save it") -> int:
    """The header length a safetensors file declares in its first 8 bytes (``head``: at least
    those), checked against the file's size and ``MAX_HEADER``; the value is never shown (it is
    the file's bytes).

    Raises:
        CheckpointError (a ``ValueError``): the file is shorter than 8 bytes, or the length
            exceeds the file or ``MAX_HEADER`` (``fix`` ends the message).
    """
    if file_size < 8 or len(head) < 8:
        raise CheckpointError(f"{file}: {file_size} bytes, too short for a safetensors file; "
                              f"{fix}")
    (n,) = struct.unpack("<Q", bytes(head[:8]))
    if n > file_size - 8 or n > MAX_HEADER:
        raise CheckpointError(f"{file}: its first 8 bytes declare a safetensors header longer "
                              f"than the file ({file_size} bytes) or than {MAX_HEADER} bytes "
                              f"(an impossible header length); not a safetensors file, or {fix}")
    return n
