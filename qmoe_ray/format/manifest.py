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

The reading side treats a manifest as untrusted input (a bucket is not a trusted source, and
whoever can write the manifest can recompute every checksum in it), so before any shard is read:

- its size is bounded before it is read (``manifest_size_limit``): ``MANIFEST_FLOOR`` plus
  ``MANIFEST_PER_TENSOR`` bytes for each tensor the model's config implies (``implied_tensors``:
  six stored tensors per expert matrix, with its entry and statistics, plus a generous allowance
  per layer), never more than ``MANIFEST_CEILING``. A real manifest takes about 450 bytes per
  stored tensor (190 KB for the embedded model, about 200 MB for a 1T-parameter model), so the
  limit is 5x or more above what a compression job writes;
- it is parsed with a nesting limit (``MAX_DEPTH``; a real manifest nests 5 deep);
- ``check_schema`` checks the type of every field any reader uses, once, in one place, and
  raises ``qmoe_ray.errors.CheckpointError`` naming the key, so no reader meets a ``KeyError``,
  ``TypeError`` or ``AttributeError`` later;
- ``check_config`` bounds the config's sizes before a model family parses it (layers, experts and
  dimensions: a hostile config could otherwise make the family enumerate billions of tensors).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from qmoe_ray.errors import CheckpointError
from qmoe_ray.storage.fs import check_relname

FORMAT_NAME = "qmoe-ray"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

MANIFEST_FLOOR = 4 * 2**20  # whatever the config: room for any small model's manifest
MANIFEST_PER_TENSOR = 2 * 2**10  # per tensor the config implies (a real one: ~450 bytes)
MANIFEST_CEILING = 512 * 2**20  # never parse more (a 1T-parameter model's: ~200 MB)
CONFIG_MAX_BYTES = 2**20  # a config.json is a few KB
MAX_DEPTH = 32  # JSON nesting (a manifest nests 5 deep, configs a few levels more)
MAX_NAME = 1024  # characters of a tensor, matrix, table or file name
MAX_NDIM = 8
MAX_LAYERS = 4096  # config bounds, far above any released model (61 layers, 384 experts)
MAX_EXPERTS = 2**16
MAX_DIM = 2**24

#: bytes per element of every dtype a manifest may name (torch names, as ``serialize_shard``
#: writes them)
DTYPE_SIZES = {
    "bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1,
    "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok")
_DIM_KEYS = (
    "hidden_size", "intermediate_size", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "relative_attention_num_buckets",
    "relative_attention_max_distance", "expert_capacity", "decoder_sparse_step",
    "encoder_sparse_step", "max_window_layers", "sliding_window", "max_position_embeddings",
)


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
        CheckpointError: naming the version found and what to do.
    """
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: not a qmoe-ray manifest (format="
                              f"{_short(manifest.get('format'))})")
    version = manifest.get("format_version")
    if not _is_int(version) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{where}: format version {_short(version)} is not supported by this qmoe-ray (reads "
            f"versions 1..{FORMAT_VERSION}); upgrade qmoe-ray to read it"
        )


# -- reading an untrusted manifest ---------------------------------------------------------------
def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters (messages quote names, never whole values)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float


def _fail(where: str, msg: str) -> NoReturn:
    raise CheckpointError(f"{where}: {msg}; the checkpoint is damaged or was not written by "
                          "qmoe-ray: copy it again or re-run the compression job")


def implied_tensors(expert_matrices: int, layers: int) -> int:
    """The number of manifest entries a model can legitimately need: six per expert matrix (its
    stored tensors, its ``quantized`` entry and its share of tables and statistics) and 32 per
    layer (dense tensors), plus 16 (embeddings, head, final norms)."""
    return 6 * max(0, expert_matrices) + 32 * max(0, layers) + 16


def manifest_size_limit(tensors: int | None) -> int:
    """The most bytes a manifest may have: ``MANIFEST_FLOOR`` plus ``MANIFEST_PER_TENSOR`` per
    implied tensor (``implied_tensors``; None when the folder has no config.json to count from),
    capped at ``MANIFEST_CEILING``."""
    if tensors is None:
        return MANIFEST_FLOOR
    return min(MANIFEST_CEILING, MANIFEST_FLOOR + MANIFEST_PER_TENSOR * max(0, tensors))


def check_depth(value: Any, where: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``max_depth`` (iteratively: no recursion of our own).

    Raises:
        CheckpointError: too deep.
    """
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > max_depth:
            raise CheckpointError(f"{where}: JSON nested more than {max_depth} levels deep; "
                                  "refused (a qmoe-ray manifest nests 5 levels)")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values() if isinstance(x, (dict, list)))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))


def parse_json(raw: bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON bytes (a manifest, a config.json) with a nesting limit.

    Raises:
        CheckpointError: not UTF-8 JSON, or nested too deeply (the message never quotes the
            bytes).
    """
    try:
        value = json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply to parse; refused") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: not UTF-8 text, so not JSON") from None
    except ValueError as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    check_depth(value, where, max_depth)
    return value


def check_config(config: Any, where: str) -> None:
    """Bound a model config before a family parses it: an object with a string ``model_type``,
    and every size a family reads (layers, experts, dimensions) an integer in range.

    Raises:
        CheckpointError: naming the key and its bound.
    """
    if not isinstance(config, dict):
        _fail(where, f"config is {type(config).__name__}, not an object")
    if not isinstance(config.get("model_type"), str):
        _fail(where, f"config.model_type is {_short(config.get('model_type'))}, not a string")
    for keys, top in ((_LAYER_KEYS, MAX_LAYERS), (_EXPERT_KEYS, MAX_EXPERTS), (_DIM_KEYS, MAX_DIM)):
        for key in keys:
            v = config.get(key)
            if v is not None and not (_is_int(v) and 0 <= v <= top):
                _fail(where, f"config.{key} is {_short(v)}: expected an integer in 0..{top}")
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        _fail(where, "config.architectures is not a list of strings")


def _name(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        _fail(where, f"{what} name {_short(value)} is not a string of 1..{MAX_NAME} characters")
    return value


def _obj(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(where, f"{what} is {type(value).__name__}, expected an object")
    return value


def _list(value: Any, where: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(where, f"{what} is {type(value).__name__}, expected a list")
    return value


def _count(value: Any, where: str, what: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < 0:
        _fail(where, f"{what} is {_short(value)}, expected a non-negative integer")


def _shape(value: Any, where: str, what: str) -> list[int]:
    shape = _list(value, where, what)
    if len(shape) > MAX_NDIM or not all(_is_int(s) and s >= 0 for s in shape):
        _fail(where, f"{what} {_short(shape)} is not a list of at most {MAX_NDIM} non-negative "
                     "integers")
    return shape


def _strings(value: Any, where: str, what: str) -> list[str]:
    items = _list(value, where, what)
    for v in items:
        _name(v, where, what)
    if len(set(items)) != len(items):
        _fail(where, f"{what} repeats a name")
    return items


def _str_map(value: Any, where: str, what: str) -> dict[str, str]:
    d = _obj(value, where, what)
    for k, v in d.items():
        if not isinstance(v, str) or len(v) > MAX_NAME:
            _fail(where, f"{what}[{_short(k)}] is {_short(v)}, expected a short string")
    return d


_TOP: dict[str, tuple[tuple[type, ...], bool]] = {  # key -> (allowed types, required)
    "config": ((dict,), True), "files": ((list,), True), "tensors": ((dict,), True),
    "quantized": ((dict,), True), "tables": ((dict,), False), "experts": ((dict, list), False),
    "copied_files": ((list, dict), False), "options": ((dict,), False),
    "sizes": ((dict,), False), "source": ((str, type(None)), False),
    "source_fingerprint": ((str, type(None)), False), "created_by": ((str, type(None)), False),
    "model_type": ((str, type(None)), False), "expert_layout": ((str, type(None)), False),
    "heldout_loss": ((int, float, type(None)), False),
}


def check_schema(manifest: Any, where: str = MANIFEST) -> None:
    """Check the type of every manifest field a reader uses (``qmoe_ray.read.loader``, ``inspect``,
    ``export``), once and up front: after it, readers index the manifest without guarding.

    Checked: the format and version; the top-level keys (``_TOP``); every file name (relative,
    inside the folder, each holding at least one tensor); every tensor entry (``file`` listed,
    ``dtype`` known, ``shape`` a list of non-negative integers, ``nbytes`` equal to what dtype and
    shape need, ``sha256`` 64 hex digits); every quantized entry (``scheme`` a string,
    ``quant_group_size`` a positive integer or null, ``shape`` two positive integers, ``fields``
    and ``params`` lists of names, ``codec`` and every table's metadata string maps, ``table`` a
    name or null); the per-expert statistics; and the config's sizes (``check_config``).

    Raises:
        CheckpointError: the first problem found, naming the key.
    """
    m = _obj(manifest, where, "the manifest")
    check_version(m, where)
    for key, (types, required) in _TOP.items():
        if key not in m:
            if required:
                _fail(where, f"key {key!r} is missing")
            continue
        v = m[key]
        if not isinstance(v, types) or isinstance(v, bool):
            _fail(where, f"{key!r} is {type(v).__name__}, expected "
                         f"{' or '.join(t.__name__ for t in types)}")
    check_config(m["config"], where)
    files = _strings(m["files"], where, "files")
    for f in files:
        try:
            check_relname(f)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    listed = set(files)
    used: set[str] = set()
    for name, e in m["tensors"].items():
        _name(name, where, "tensor")
        what = f"tensor {_short(name, 120)}"
        e = _obj(e, where, what)
        if e.get("file") not in listed:
            _fail(where, f"{what} names file {_short(e.get('file'))}, which is not in the "
                         "manifest's file list")
        used.add(e["file"])
        size = DTYPE_SIZES.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
        if size is None:
            _fail(where, f"{what} has dtype {_short(e.get('dtype'))}; known: "
                         f"{', '.join(DTYPE_SIZES)}")
        shape = _shape(e.get("shape"), where, f"{what} shape")
        _count(e.get("nbytes"), where, f"{what} nbytes")
        if e["nbytes"] != math.prod(shape) * size:
            _fail(where, f"{what} has nbytes {e['nbytes']}, but {e['dtype']}{shape} is "
                         f"{math.prod(shape) * size} bytes")
        if not isinstance(e.get("sha256"), str) or not _SHA256.match(e["sha256"]):
            _fail(where, f"{what} has no sha256 of 64 lowercase hex digits")
    empty = sorted(listed - used)
    if empty:
        _fail(where, f"file {empty[0]!r} holds no tensor of the manifest")
    for tname, meta in m.get("tables", {}).items():
        _name(tname, where, "code table")
        _str_map(meta, where, f"code table {_short(tname, 120)}")
    for name, e in m["quantized"].items():
        _check_quantized(name, e, where)
    _check_experts(m.get("experts"), where)
    # copied_files: only its type here; its names and entries are checked by their one reader,
    # qmoe_ray.read.export (check_copied_name / copied_files), before any is used as a path


def _check_quantized(name: Any, e: Any, where: str) -> None:
    _name(name, where, "quantized matrix")
    what = f"quantized matrix {_short(name, 120)}"
    e = _obj(e, where, what)
    for key in ("scheme", "shape", "fields", "params", "codec"):
        if key not in e:
            _fail(where, f"{what} lacks key {key!r}")
    if not isinstance(e["scheme"], str):
        _fail(where, f"{what} scheme is {_short(e['scheme'])}, expected a name")
    gs = e.get("quant_group_size")
    if gs is not None and not (_is_int(gs) and gs > 0):
        _fail(where, f"{what} quant_group_size is {_short(gs)}, expected a positive integer or "
                     "null")
    shape = _shape(e["shape"], where, f"{what} shape")
    if len(shape) != 2 or min(shape) < 1:
        _fail(where, f"{what} shape {shape} is not [rows, cols] of positive integers")
    _strings(e["fields"], where, f"{what} fields")
    _strings(e["params"], where, f"{what} params")
    _str_map(e["codec"], where, f"{what} codec")
    if e.get("table") is not None:
        _name(e["table"], where, f"{what} table")
    for key in ("code_bytes", "scale_bytes", "layer", "expert"):
        _count(e.get(key), where, f"{what} {key}", optional=True)
    if e.get("role") is not None and not isinstance(e["role"], str):
        _fail(where, f"{what} role is {_short(e['role'])}, expected a string")


def _check_experts(experts: Any, where: str) -> None:
    if experts is None:
        return
    if isinstance(experts, dict):
        pairs = list(experts.items())
    else:
        pairs = []
        for p in experts:
            if not (isinstance(p, list) and len(p) == 2):
                _fail(where, "experts is a list, but not of [file, statistics] pairs")
            pairs.append((p[0], p[1]))
    for file, stats in pairs:
        what = f"experts[{_short(file, 120)}]"
        _name(file, where, "experts file")
        for s in _list(stats, where, what):
            s = _obj(s, where, f"an entry of {what}")
            for key in ("routed_tokens", "hessian_tokens", "expert"):
                _count(s.get(key), where, f"{what} {key}", optional=True)
            fb = s.get("fallback")
            if fb is not None:
                _str_map(fb, where, f"{what} fallback")
            loss = s.get("proxy_loss")
            if loss is not None:
                for k, v in _obj(loss, where, f"{what} proxy_loss").items():
                    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                        _fail(where, f"{what} proxy_loss[{_short(k)}] is not a number")


def build_manifest(*, created_by: str, source: str, source_fingerprint: str, model_type: str,
                   expert_layout: str, config: dict[str, Any], options: dict[str, Any],
                   copied_files: dict[str, Any], tensors: dict[str, Any],
                   quantized: dict[str, Any], tables: dict[str, Any], experts: dict[str, Any],
                   sizes: dict[str, Any], heldout_loss: float | None) -> dict[str, Any]:
    """The manifest of a compressed checkpoint, as the job writes it (``dumps`` it, last).

    ``expert_layout`` is the source's (per-expert or fused 3-D tensors); ``files`` is every
    shard a tensor lives in.
    """
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": created_by,
        "source": source,
        "source_fingerprint": source_fingerprint,
        "model_type": model_type,
        "expert_layout": expert_layout,
        "config": config,
        "options": options,
        "files": sorted({t["file"] for t in tensors.values()}),
        "copied_files": copied_files,
        "tensors": tensors,
        "quantized": quantized,
        "tables": tables,
        "experts": experts,
        "sizes": sizes,
        "heldout_loss": heldout_loss,
    }
