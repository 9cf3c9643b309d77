"""The output checkpoint: safetensors shards, checksums, and the manifest written last.

Layout under the output URL::

    config.json                 the source model's config (unchanged)
    tokenizer.json              copied from the source when present
    shards/layer-00003.safetensors   one shard per block: its dense tensors (bf16) and its encoded
                                experts; shards/other.safetensors for embeddings, final norms, head
    progress/                   while the job runs: its record, per-layer completion records and
                                activation checkpoints (resume); removed when the job finishes
    report.json, report.md, report.png
    manifest.json               written LAST: without it the folder is not a checkpoint

The manifest lists every tensor with its shard, dtype, shape and SHA-256 of its raw bytes, the
format version, the source (label and fingerprint of its config and tensor shapes) and options, per-expert statistics and the sizes. A reader refuses a
folder without a manifest, a newer format version, a file name that leaves the folder, and any
checksum mismatch. The full description for other readers: docs/CHECKPOINT.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_NAME = "qmoe-ray"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def checksum(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw bytes."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def serialize_shard(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """Serialize tensors to safetensors bytes (keys sorted, so the bytes are deterministic).

    Returns:
        ``(data, index)``: the file's bytes and, per tensor, ``dtype``, ``shape``, ``sha256`` and
        ``nbytes``.
    """
    ordered = {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}
    index = {
        k: {
            "dtype": str(v.dtype).removeprefix("torch."),
            "shape": list(v.shape),
            "sha256": checksum(v),
            "nbytes": v.numel() * v.element_size(),
        }
        for k, v in ordered.items()
    }
    return st_save(ordered), index


def deserialize_shard(data: bytes, name: str = "shard") -> dict[str, torch.Tensor]:
    """Parse safetensors bytes.

    Raises:
        ValueError: the bytes are not a valid safetensors file (truncated, corrupted header).
    """
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(
            f"{name}: not a valid safetensors file ({exc}); the shard is truncated "
            "or corrupted: re-run the compression job"
        ) from exc


def verify(name: str, t: torch.Tensor, entry: Mapping[str, Any]) -> None:
    """Check a loaded tensor against its manifest entry.

    Raises:
        ValueError: dtype, shape or checksum differ.
    """
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype != entry["dtype"] or list(t.shape) != list(entry["shape"]):
        raise ValueError(
            f"tensor {name!r}: stored as {dtype}{list(t.shape)}, manifest says "
            f"{entry['dtype']}{entry['shape']}"
        )
    got = checksum(t)
    if got != entry["sha256"]:
        raise ValueError(
            f"tensor {name!r} fails its checksum (sha256 {got[:12]}..., manifest "
            f"{entry['sha256'][:12]}...): the checkpoint is corrupted"
        )


def dumps(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no NaN)."""
    return (
        json.dumps(obj, sort_keys=True, indent=1, allow_nan=False, default=_json_default) + "\n"
    ).encode()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def check_version(manifest: Mapping[str, Any], where: str) -> None:
    """Refuse manifests of another format or a newer version.

    Raises:
        ValueError: naming the version found and what to do.
    """
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: not a qmoe-ray manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValueError(
            f"{where}: format version {version!r} is not supported by this qmoe-ray (reads "
            f"versions 1..{FORMAT_VERSION}); upgrade qmoe-ray to read it"
        )
