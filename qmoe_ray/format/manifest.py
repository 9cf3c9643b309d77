"""The manifest of a compressed checkpoint: its schema, its limits, and reading it, once per load.

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
checksum mismatch. The full description for other readers: docs/CHECKPOINT.md (which names the
module of each part: the shards are ``qmoe_ray.format.shards``, the stored matrices
``qmoe_ray.format.matrices``, what a config implies ``qmoe_ray.format.expected``).

The reading side treats a manifest as untrusted input (a bucket is not a trusted source, and
whoever can write the manifest can recompute every checksum in it), so before any shard is read:

- its size is bounded before it is read (``manifest_size_limit``): ``MANIFEST_FLOOR`` plus
  ``MANIFEST_PER_TENSOR`` bytes for each tensor the model's config implies (``implied_tensors``:
  six stored tensors per expert matrix, with its entry and statistics, plus a generous allowance
  per layer), never more than ``MANIFEST_CEILING``. A manifest of versions 1-2 takes about 450
  bytes per stored tensor (190 KB for the embedded model, about 200 MB for a 1T-parameter
  model), version 3 (columns) about a third of that, so the limit is 5x or more above what a
  compression job writes;
- it is parsed with a nesting limit (``MAX_DEPTH``; a real manifest nests 5 deep); version 3's
  columns (``qmoe_ray.format.columns``) are expanded to the entry objects of versions 1-2, their
  layout checked, so every check below and every reader sees one shape of manifest;
- ``check_schema`` checks the type of every field any reader uses, once, in one place, and
  raises ``qmoe_ray.errors.CheckpointError`` naming the key, so no reader meets a ``KeyError``,
  ``TypeError`` or ``AttributeError`` later;
- ``check_config`` bounds the config's sizes before a model family parses it (layers, experts and
  dimensions: a hostile config could otherwise make the family enumerate billions of tensors);
- ``check_manifest`` adds every matrix's stored tensors and every declared shape against the
  config; ``read_manifest`` does all of this, and readers pass the manifest it returns along.
Speed (``bench.scale``): a sound tensor entry is tested in one expression, and what version 3
pools (a group's one codec object, shapes) is checked once per object.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from qmoe_ray.errors import CheckpointError, shorten
from qmoe_ray.format import columns
from qmoe_ray.format import matrices as layout
from qmoe_ray.format.columns import COLUMNS_VERSION as COLUMNS_VERSION  # re-exported: mf.*
from qmoe_ray.format.columns import manifest_bytes as manifest_bytes
from qmoe_ray.format.expected import check_against_config, implied_counts
from qmoe_ray.format.jsonio import MAX_DEPTH as MAX_DEPTH  # re-exported: callers write mf.*
from qmoe_ray.format.jsonio import dumps as dumps
from qmoe_ray.format.jsonio import parse_json
from qmoe_ray.format.trimmed import TRIM_KEY, read_trim
from qmoe_ray.storage.fs import check_relname, fs_errors, read_small, redact, url_to_fs

FORMAT_NAME = "qmoe-ray"
FORMAT_VERSION = 3  # the newest version this reader reads, and what the job writes
PLAIN_VERSION = 1  # untrimmed checkpoints before version 3 (1 and 2: entries as objects)
MANIFEST = "manifest.json"

MANIFEST_FLOOR = 4 * 2**20  # whatever the config: room for any small model's manifest
MANIFEST_PER_TENSOR = 2 * 2**10  # per tensor the config implies (a real one: ~450 bytes)
MANIFEST_CEILING = 512 * 2**20  # never parse more (a 1T-parameter model's: ~200 MB)
CONFIG_MAX_BYTES = 2**20  # a config.json is a few KB
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
SHA256 = re.compile(r"[0-9a-f]{64}")  # a SHA-256 in hex, as the manifest records it (fullmatch)
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok")
_DIM_KEYS = (
    "hidden_size", "intermediate_size", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "relative_attention_num_buckets",
    "relative_attention_max_distance", "expert_capacity", "decoder_sparse_step",
    "encoder_sparse_step", "max_window_layers", "sliding_window", "max_position_embeddings",
)


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


# -- reading a checkpoint's manifest: once per load ------------------------------------------------
def config_implied_tensors(config: Mapping[str, Any], where: str) -> int:
    """``implied_tensors`` of the model a (bounded, ``check_config``) config describes."""
    return implied_tensors(*implied_counts(config, where))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def read_manifest(url: str, **storage_options: Any) -> dict[str, Any]:
    """The manifest of the checkpoint at ``url``, fully checked (``check_manifest``): readers
    (load, export, inspect, evaluate) call this once and pass the manifest along.

    Read with a size limit (``manifest_size_limit``: proportionate to the tensors the folder's
    ``config.json`` implies, compared with the store's file size before a byte is read) and a
    nesting limit; the folder's ``config.json``, when present, must be the manifest's ``config``.

    Raises:
        FileNotFoundError: no ``manifest.json`` (an unfinished or foreign folder), or the store
            cannot be reached.
        PermissionError: access denied / bad credentials.
        CheckpointError: too large, not JSON, another format, a newer format version, or any
            problem ``check_manifest`` finds.
    """
    fs, root = url_to_fs(url, **storage_options)
    base = root.rstrip("/")
    where = f"{redact(url)}/{MANIFEST}"
    cfg_where = f"{redact(url)}/config.json"
    try:
        with fs_errors(url, "read", storage_options):
            fs.info(f"{base}/{MANIFEST}")
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{redact(url)} has no readable {MANIFEST}: not a (finished) qmoe-ray checkpoint "
            f"({exc}). A job that did not finish leaves no manifest: re-run it to complete the "
            "output, or check the URL."
        ) from None
    limits = "(see qmoe_ray.format.manifest for the limits)"
    try:
        raw_cfg = read_small(fs, f"{base}/config.json", CONFIG_MAX_BYTES, cfg_where, url=url,
                             storage_options=storage_options,
                             what=f"a config.json may have {limits}")
    except FileNotFoundError:
        config = None
        limit = manifest_size_limit(None)
    else:
        config = parse_json(raw_cfg, cfg_where)
        check_config(config, cfg_where)
        limit = manifest_size_limit(config_implied_tensors(config, cfg_where))
    what = ("a manifest of the model config.json describes may have" if config
            else "a manifest may have without a config.json")
    raw = read_small(fs, f"{base}/{MANIFEST}", limit, where, url=url,
                     storage_options=storage_options, what=f"{what} {limits}")
    manifest = stored_to_logical(parse_json(raw, where), where)
    check_manifest(manifest, where)
    if config is not None and _canonical(config) != _canonical(manifest["config"]):
        raise CheckpointError(f"{where}: its config differs from the folder's config.json; the "
                              "checkpoint is inconsistent: copy it again or re-run the job")
    return manifest


def stored_to_logical(manifest: Any, where: str) -> Any:
    """The manifest as every check and reader sees it: a version-3 manifest's columns expanded
    to the entry objects of versions 1 and 2 (``qmoe_ray.format.columns``, its layout checked);
    anything else unchanged (``check_schema`` judges it).

    Raises:
        CheckpointError: a version-3 manifest whose columns are malformed, naming the key.
    """
    if (isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME
            and _is_int(manifest.get("format_version"))
            and manifest["format_version"] >= COLUMNS_VERSION):
        check_version(manifest, where)  # a newer version's columns are not ours to read
        return columns.from_stored(manifest, where)
    return manifest


def check_manifest(manifest: Any, where: str = "manifest") -> None:
    """Check a manifest before any shard is read; after it, readers index it without guarding.

    Checks, in order: the schema (``check_schema``: the type of every field used, every file
    name relative and inside the folder); every code table and quantized matrix against the
    format (``qmoe_ray.format.matrices.check_matrix``: scheme, codec version, and the exact dtype
    and shape of every stored tensor its shape implies); and every declared shape against the
    model config (``qmoe_ray.format.expected.check_against_config``). Nothing is allocated or
    decoded from a declared shape that has not passed these checks.

    Raises:
        CheckpointError: the first problem found, naming the key, tensor or matrix.
    """
    check_schema(manifest, where)
    tensors, tables = manifest["tensors"], manifest.get("tables", {})
    try:
        checked = {tname: layout.check_table(tname, meta, tensors)
                   for tname, meta in tables.items()}
        memo: dict[Any, Any] = {}  # what matrices share, checked once (check_matrix)
        for name, entry in manifest["quantized"].items():
            layout.check_matrix(name, entry, tensors, tables, checked, memo)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    check_against_config(manifest, where)


# -- reading an untrusted manifest ---------------------------------------------------------------
def _short(value: Any, limit: int = 40) -> str:
    return shorten(value, limit)


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
    "source_precision": ((str, type(None)), False),
    "trim": ((dict,), False),  # a trimmed checkpoint's record (qmoe_ray.format.trimmed)
}


def check_schema(manifest: Any, where: str = MANIFEST) -> None:
    """Check the type of every manifest field a reader uses (``qmoe_ray.read``: the loader,
    ``inspect``, ``export``), once and up front: after it, readers index the manifest without guarding.

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
    used = _check_tensors(m["tensors"], listed, where)
    empty = sorted(listed - used)
    if empty:
        _fail(where, f"file {empty[0]!r} holds no tensor of the manifest")
    for tname, meta in m.get("tables", {}).items():
        _name(tname, where, "code table")
        _str_map(meta, where, f"code table {_short(tname, 120)}")
    seen: set[int] = set()  # ids of the (pooled, shared) codec objects already checked
    for name, e in m["quantized"].items():
        _check_quantized(name, e, where, seen)
    _check_experts(m.get("experts"), where)
    read_trim(m, where)  # the trim record and the version agree; the plan parses
    # copied_files: only its type here; its names and entries are checked by their one reader,
    # qmoe_ray.read.export_files (check_copied_name / copied_files), before any is used as a path


def _check_tensors(tensors: dict[str, Any], listed: set[str], where: str) -> set[str]:
    """Check every tensor entry (``check_schema``); returns the files they name. The test that
    an entry is sound is one expression (a c2048-sized manifest lists 600,000 tensors); an entry
    that fails it takes ``_check_tensor``, which names what is wrong."""
    used: set[str] = set()
    shapes: set[int] = set()  # ids of shape lists already checked (version 3 pools them)
    sizes, sha = DTYPE_SIZES, SHA256.fullmatch
    for name, e in tensors.items():
        if type(e) is dict and type(name) is str and 0 < len(name) <= MAX_NAME:
            f, s, nb, h = e.get("file"), e.get("shape"), e.get("nbytes"), e.get("sha256")
            size = sizes.get(e.get("dtype"), 0) if type(e.get("dtype")) is str else 0
            if (type(f) is str and f in listed and size and type(s) is list
                    and (id(s) in shapes or _shape_ok(s, shapes)) and type(nb) is int
                    and nb == math.prod(s) * size and type(h) is str and sha(h)):
                used.add(f)
                continue
        _check_tensor(name, e, listed, where)
        used.add(e["file"])
    return used


def _shape_ok(s: list[Any], shapes: set[int]) -> bool:
    if len(s) <= MAX_NDIM and all(type(x) is int and x >= 0 for x in s):
        shapes.add(id(s))
        return True
    return False


def _check_tensor(name: Any, e: Any, listed: set[str], where: str) -> None:
    """One tensor entry, every check in turn; raises naming the first problem."""
    _name(name, where, "tensor")
    what = f"tensor {_short(name, 120)}"
    e = _obj(e, where, what)
    if not isinstance(e.get("file"), str) or e["file"] not in listed:
        _fail(where, f"{what} names file {_short(e.get('file'))}, which is not in the "
                     "manifest's file list")
    size = DTYPE_SIZES.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
    if size is None:
        _fail(where, f"{what} has dtype {_short(e.get('dtype'))}; known: "
                     f"{', '.join(DTYPE_SIZES)}")
    shape = _shape(e.get("shape"), where, f"{what} shape")
    _count(e.get("nbytes"), where, f"{what} nbytes")
    if e["nbytes"] != math.prod(shape) * size:
        _fail(where, f"{what} has nbytes {e['nbytes']}, but {e['dtype']}{shape} is "
                     f"{math.prod(shape) * size} bytes")
    if not isinstance(e.get("sha256"), str) or not SHA256.fullmatch(e["sha256"]):
        _fail(where, f"{what} has no sha256 of 64 lowercase hex digits")


def _check_quantized(name: Any, e: Any, where: str, seen: set[int] | None = None) -> None:
    """One entry's types; ``seen``: ids of the codec objects checked (version 3 shares them)."""
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
    if seen is None or id(e["codec"]) not in seen:
        _str_map(e["codec"], where, f"{what} codec")
        seen is not None and seen.add(id(e["codec"]))
    if e.get("table") is not None:
        _name(e["table"], where, f"{what} table")
    for key in ("code_bytes", "scale_bytes", "layer", "expert"):
        _count(e.get(key), where, f"{what} {key}", optional=True)
    if e.get("role") is not None and not isinstance(e["role"], str):
        _fail(where, f"{what} role is {_short(e['role'])}, expected a string")
    _fraction(e.get("sparsity"), where, f"{what} sparsity")


def _fraction(value: Any, where: str, what: str) -> None:
    """An optional fraction in [0, 1] (a pruned matrix's achieved sparsity)."""
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not 0 <= value <= 1):
        _fail(where, f"{what} is {_short(value)}, expected a fraction in [0, 1]")


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
            for k, v in _obj(s.get("sparsity") or {}, where, f"{what} sparsity").items():
                _fraction(v, where, f"{what} sparsity[{_short(k)}]")


def build_manifest(*, created_by: str, source: str, source_fingerprint: str, model_type: str,
                   expert_layout: str, config: dict[str, Any], options: dict[str, Any],
                   copied_files: dict[str, Any], tensors: dict[str, Any],
                   quantized: dict[str, Any], tables: dict[str, Any], experts: dict[str, Any],
                   sizes: dict[str, Any], heldout_loss: float | None,
                   source_precision: str | None = None,
                   trim: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a compressed checkpoint, as the job writes it (``dumps`` it, last).

    ``expert_layout`` is the source's (per-expert or fused 3-D tensors); ``files`` is every
    shard a tensor lives in. ``source_precision`` says how the source stored its weights
    (``"bf16"``, ``"fp8-block128 (e4m3, float32 scales)"``...); ``config`` is the decoded
    model's (no quantization block). ``trim`` is a trimmed model's record
    (``qmoe_ray.format.trimmed.trim_record``). The manifest is format version 3, trimmed or not
    (write it with ``manifest_bytes``: its columns).
    """
    out = {
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
        "source_precision": source_precision,
    }
    if trim is not None:
        out[TRIM_KEY] = trim
    return out
