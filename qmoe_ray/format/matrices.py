"""How quantized expert matrices become named tensors in the output checkpoint, and back.

A quantized matrix ``N`` (our canonical per-expert name, e.g.
``model.layers.3.mlp.experts.5.down_proj.weight``) is stored as:

- ``N.q.<field>``: the arrays of its encoded codes (``qmoe_ray.codec``: the sub-1-bit code for
  ternary and int2, plain bit-packing for int3/int4/int8);
- ``N.lo`` / ``N.hi`` (ternary) or ``N.scale`` / ``N.zero`` (int schemes): the per-row grid, bf16
  for scales (the quantizer rounded them to bf16 before quantizing, so this is exact) and uint8
  for integer zero points.

The codec's string metadata and the matrix shape go into the manifest entry of ``N``, so the
safetensors files hold tensors only. Everything here is pure (no I/O).

``check_matrix`` / ``check_table`` are the reading side's guard: from a matrix's declared shape
they derive the exact dtype and shape (for ``stream``, a bound: at most one word per symbol) of
every stored tensor, so a manifest that declares more than its matrix can hold is refused before
a byte is read or allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qmoe_ray import codec
from qmoe_ray.codec.encoded import MAX_SEGMENT_SYMBOLS
from qmoe_ray.codec.packbits import PACK_FORMAT, PACK_VERSION
from qmoe_ray.codec.table import KINDS, MAX_PROB_BITS, MIN_PROB_BITS
from qmoe_ray.errors import CheckpointError
from qmoe_ray.quant import Scheme, dequantize, parse_scheme

CODE_PREFIX = ".q."


def _encoder(scheme: Scheme):
    if scheme.name == "ternary":
        return codec.encode_ternary, codec.decode_ternary, codec.EncodedTernary
    if scheme.name in ("int2", "ternary-sym256"):  # sym256: codes 0..2 of a 2-bit grid
        return codec.encode_int2, codec.decode_int2, codec.EncodedInt2
    return None


def shared_table(scheme: Scheme, codes: torch.Tensor) -> codec.Table | None:
    """One code table fitted to a stack of code matrices ``[G, rows, cols]`` (None for schemes
    stored by plain bit packing).

    Why shared: a table costs ~0.5 KB; fitted to the matrices of one expert group and one role
    (which share their statistics) it is paid once per group instead of once per matrix, which
    matters for small experts and costs nothing measurable for large ones (docs/FORMAT.md).
    """
    kind = {"ternary": "ternary", "int2": "int2", "ternary-sym256": "int2"}.get(scheme.name)
    if kind is None:
        return None
    c = codes.cpu().numpy()
    counts = sum(codec.symbol_counts(c[i], kind) for i in range(c.shape[0]))
    return codec.build_table(counts, kind, cover_all=False)


def table_tensors(
    table_name: str, table: codec.Table
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A shared table's tensors (``{table_name}.freqs``) and its metadata for the manifest."""
    arrays = table.to_tensors(f"{table_name}.")
    return (
        {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()},
        table.metadata(),
    )


def pack_matrix(
    name: str,
    scheme: Scheme,
    codes: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    table: codec.Table | None = None,
    table_name: str | None = None,
    segment_symbols: int = codec.DEFAULT_SEGMENT_SYMBOLS,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode one quantized matrix.

    Args:
        name: the matrix's canonical name.
        scheme: its grid.
        codes: ``[rows, cols]`` codes (int8 ternary / uint8 int).
        params: its grid parameters for this matrix (``lo``/``hi`` ``[rows]`` or
            ``scale``/``zero`` ``[rows, groups]``).
        table: a shared code table (see ``shared_table``); None embeds a per-matrix table.
        table_name: the name the shared table is stored under (required with ``table``).
        segment_symbols: symbols per rANS segment (ternary/int2).

    Returns:
        ``(tensors, entry)``: tensors to write (name -> tensor) and the manifest entry, with
        ``code_bytes`` (encoded codes) and ``scale_bytes`` (grid parameters) for the size report.
    """
    codes_np = codes.cpu().numpy()
    rows, cols = codes_np.shape
    tensors: dict[str, torch.Tensor] = {}
    enc_fns = _encoder(scheme)
    if enc_fns is not None:
        if table is not None and not table_name:
            raise ValueError("pack_matrix: a shared table needs its table_name")
        enc = enc_fns[0](codes_np, table=table, segment_symbols=segment_symbols)
        arrays, meta, code_bytes = enc.to_tensors(), enc.metadata(), int(enc.nbytes)
    else:
        packed = codec.pack_bits(codes_np.astype(np.uint8), scheme.bits)
        arrays, meta, code_bytes = packed.to_tensors(), packed.metadata(), int(packed.nbytes)
    for field, arr in arrays.items():
        tensors[f"{name}{CODE_PREFIX}{field}"] = torch.from_numpy(np.array(arr, copy=True))
    scale_bytes = 0
    for pname, p in params.items():
        p = p.cpu()
        t = p.round().to(torch.uint8) if pname == "zero" else p.to(torch.bfloat16)
        tensors[f"{name}.{pname}"] = t.contiguous()
        scale_bytes += t.numel() * t.element_size()
    entry = {
        "kind": "quantized",
        "scheme": scheme.name,
        "quant_group_size": scheme.group_size,
        "shape": [rows, cols],
        "codec": meta,
        "fields": sorted(arrays),
        "params": sorted(params),
        "table": table_name if (enc_fns is not None and table is not None) else None,
        "code_bytes": code_bytes,
        "scale_bytes": scale_bytes,
    }
    return tensors, entry


def load_table(
    table_name: str,
    tables: Mapping[str, Mapping[str, str]],
    tensors: Mapping[str, torch.Tensor],
    cache: dict[str, codec.Table] | None = None,
) -> codec.Table:
    """Rebuild a shared table from its ``{table_name}.freqs`` tensor and manifest metadata
    (version and hash checked); ``cache`` keeps the tables rebuilt so far, by name.

    Raises:
        KeyError: the manifest or the shards lack the table.
        ValueError: unknown version or a hash mismatch.
    """
    if cache is not None and table_name in cache:
        return cache[table_name]
    if table_name not in tables:
        raise KeyError(f"code table {table_name!r} is not in the manifest's tables")
    freqs = tensors.get(f"{table_name}.freqs")
    if freqs is None:
        raise KeyError(f"code table {table_name!r} has no tensors in the checkpoint")
    table = codec.Table.from_tensors({"freqs": freqs.numpy()}, dict(tables[table_name]))
    if cache is not None:
        cache[table_name] = table
    return table


def open_matrix(
    name: str,
    entry: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tables: Mapping[str, Mapping[str, str]] | None = None,
    table_cache: dict[str, codec.Table] | None = None,
    copy: bool = False,
) -> tuple[Scheme, Any, dict[str, torch.Tensor]]:
    """A stored quantized matrix, opened but not decoded: the format's one path from stored
    tensors back to an encoded matrix (the loader's ``encoded_matrix``, ``unpack_matrix`` and the
    benches go through it).

    Args:
        name, entry: the matrix and its manifest entry.
        tensors: stored tensors holding its pieces (verified ones: ``format.shards``).
        tables: the manifest's table metadata (needed when the matrix uses a shared table);
            table_cache: tables rebuilt so far, by name.
        copy: copy the arrays and parameters (so that the result does not keep a shard buffer
            alive).

    Returns:
        ``(scheme, encoded, params)``: ``EncodedTernary`` / ``EncodedInt2`` / ``PackedCodes`` and
        the grid parameters as stored (bf16 / uint8).

    Raises:
        CheckpointError: a stored tensor or table is missing, an unknown codec version, a table
            hash mismatch, an encoded shape other than the entry's (naming the matrix).
    """
    try:
        scheme = parse_scheme(entry["scheme"], entry.get("quant_group_size"))
        arrays = {f: tensors[f"{name}{CODE_PREFIX}{f}"].numpy() for f in entry["fields"]}
        if copy:
            arrays = {f: a.copy() for f, a in arrays.items()}
        meta = dict(entry["codec"])
        enc_fns = _encoder(scheme)
        if enc_fns is not None:
            table = (load_table(entry["table"], tables or {}, tensors, table_cache)
                     if entry.get("table") else None)
            enc = enc_fns[2].from_tensors(arrays, meta, table=table)
        else:
            enc = codec.PackedCodes.from_tensors(arrays, meta)
        params = {p: tensors[f"{name}.{p}"] for p in entry["params"]}
        if copy:
            params = {p: t.clone() for p, t in params.items()}
    except (KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"quantized matrix {name!r}: {msg}") from None
    if list(enc.shape) != list(entry["shape"]):
        raise CheckpointError(f"quantized matrix {name!r}: encoded shape {list(enc.shape)}, "
                              f"manifest says {entry['shape']}")
    return scheme, enc, params


def decode_codes(enc: Any) -> np.ndarray:
    """The code matrix of an opened matrix (``open_matrix``), decoded on the host."""
    if isinstance(enc, codec.EncodedTernary):
        return codec.decode_ternary(enc)
    if isinstance(enc, codec.EncodedInt2):
        return codec.decode_int2(enc)
    return codec.unpack_bits(enc)


def unpack_matrix(
    name: str,
    entry: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tables: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[Scheme, np.ndarray, dict[str, torch.Tensor]]:
    """Decode one quantized matrix from its stored tensors (``open_matrix``, then its codes).

    Returns:
        ``(scheme, codes [rows, cols], params)`` with params as float32 tensors.

    Raises:
        CheckpointError: see ``open_matrix``, or codes that do not decode.
    """
    scheme, enc, params = open_matrix(name, entry, tensors, tables)
    try:
        codes = decode_codes(enc)
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"quantized matrix {name!r}: {exc}") from None
    return scheme, codes, {p: t.float() for p, t in params.items()}


def dequantize_matrix(
    name: str,
    entry: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tables: Mapping[str, Mapping[str, str]] | None = None,
) -> torch.Tensor:
    """The float32 weight ``[rows, cols]`` of a stored quantized matrix."""
    scheme, codes, params = unpack_matrix(name, entry, tensors, tables)
    c = torch.from_numpy(codes)[None]
    return dequantize(scheme, c, {k: v[None] for k, v in params.items()})[0]


# -- reading side: what a declared matrix may store ----------------------------------------------
RANS_SCHEMES = ("ternary", "int2", "ternary-sym256")


def stored_names(name: str, entry: Mapping[str, Any]) -> list[str]:
    """The stored tensors of quantized matrix ``name``: its code fields, its grid parameters and
    its shared table's frequencies (an entry that passed ``manifest.check_schema``)."""
    out = [f"{name}{CODE_PREFIX}{f}" for f in entry["fields"]]
    out += [f"{name}.{p}" for p in entry["params"]]
    if entry.get("table"):
        out.append(f"{entry['table']}.freqs")
    return out


def _meta_int(meta: Mapping[str, str], key: str, lo: int, hi: int, what: str) -> int:
    v = meta.get(key)
    if not isinstance(v, str) or not v.isdigit() or len(v) > 6 or not lo <= int(v) <= hi:
        raise CheckpointError(f"{what}: codec {key} is {str(v)[:20]!r}, expected an integer in "
                              f"{lo}..{hi}")
    return int(v)


def _rans_params(meta: Mapping[str, str], what: str) -> tuple[str, int, int]:
    """``(kind, group, prob_bits)`` of qmoe-rans metadata (a matrix's or a shared table's)."""
    try:
        codec.check_format(dict(meta))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{what}: {exc.args[0] if exc.args else exc}") from None
    kind = meta.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{what}: codec kind {str(kind)[:20]!r} is not one of "
                              f"{sorted(KINDS)}")
    group = _meta_int(meta, "group", 1, int(math.log(256, KINDS[kind]) + 1e-9), what)
    prob_bits = _meta_int(meta, "prob_bits", MIN_PROB_BITS, MAX_PROB_BITS, what)
    hash_ = meta.get("table_hash")
    if not isinstance(hash_, str) or len(hash_) != 64:
        raise CheckpointError(f"{what}: codec table_hash is not 64 hex digits")
    return kind, group, prob_bits


def _check_tensor(tensors: Mapping[str, Mapping[str, Any]], tname: str, dtype: str,
                  shape: list[int] | None, what: str, max_len: int | None = None) -> None:
    """``tname`` listed with ``dtype`` and ``shape`` (or 1-D of at most ``max_len``)."""
    e = tensors.get(tname)
    if e is None:
        raise CheckpointError(f"{what} needs tensor {tname!r}, which the manifest does not list")
    got = list(e["shape"])
    ok = e["dtype"] == dtype and (got == shape if shape is not None
                                  else len(got) == 1 and got[0] <= (max_len or 0))
    if not ok:
        want = f"{dtype}{shape}" if shape is not None else f"{dtype}[<= {max_len}]"
        raise CheckpointError(f"{what}: tensor {tname!r} is declared {e['dtype']}{got}, but the "
                              f"matrix's shape needs {want}")


def check_table(tname: str, meta: Mapping[str, str],
                tensors: Mapping[str, Mapping[str, Any]]) -> tuple[str, int, int]:
    """Check a shared code table's metadata and its stored ``freqs`` (``uint16[A**group]``).

    Returns:
        ``(kind, group, prob_bits)``.

    Raises:
        CheckpointError: an unknown format or version, bad parameters, a missing or misshapen
            ``freqs``.
    """
    what = f"code table {tname!r}"
    kind, group, prob_bits = _rans_params(meta, what)
    _check_tensor(tensors, f"{tname}.freqs", "uint16", [KINDS[kind] ** group], what)
    return kind, group, prob_bits


def check_matrix(name: str, entry: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]],
                 tables: Mapping[str, Mapping[str, str]],
                 checked: Mapping[str, tuple[str, int, int]] | None = None,
                 memo: dict[Any, list[Any]] | None = None) -> None:
    """Check what a quantized matrix declares against its own shape (after
    ``manifest.check_schema``; the shape itself is checked against the model's config elsewhere).

    The scheme is known and matches the codec (``qmoe-rans`` for ternary/int2, ``qmoe-packbits``
    with the scheme's bits otherwise); the codec metadata's shape is the entry's; the code fields
    and grid parameters are exactly the scheme's, each listed with the dtype and shape the matrix
    implies: ``seg_words`` ``uint16[ceil(ceil(rows*cols/group)/segment_symbols)]``, ``stream``
    ``uint16`` of at most two words per segment plus one per symbol, an embedded ``freqs``
    ``uint16[A**group]``, ``packed`` ``uint8[ceil(rows*cols*bits/8)]``, ``lo``/``hi`` ``bfloat16
    [rows]``, ``scale`` ``bfloat16`` / ``zero`` ``uint8`` ``[rows, groups]``; a shared table is
    listed, with the matrix's kind, group, precision and hash. ``checked``: ``check_table``'s
    result per table name for tables already checked (a manifest's thousands of matrices share a
    few hundred tables). ``memo``: one dict per manifest, kept by the caller while the manifest
    lives: the checks that depend only on what matrices share (scheme, shape, the codec object,
    fields, params, table) run once per distinct combination, the stored tensors per matrix.

    Raises:
        CheckpointError: the first mismatch, naming the matrix and the tensor.
    """
    what = f"quantized matrix {name!r}"
    spec = key = None
    if memo is not None:  # id(): the very codec object, alive as long as the manifest
        key = (entry["scheme"], entry.get("quant_group_size"), tuple(entry["shape"]),
               id(entry["codec"]), tuple(entry["fields"]), tuple(entry["params"]),
               entry.get("table"))
        spec = memo.get(key)
    if spec is None:
        spec = _matrix_spec(what, entry, tensors, tables, checked)
        if memo is not None:
            memo[key] = spec
    for suffix, dtype, shape, max_len in spec:
        _check_tensor(tensors, f"{name}{suffix}", dtype, shape, what, max_len)


def _matrix_spec(what: str, entry: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]],
                 tables: Mapping[str, Mapping[str, str]],
                 checked: Mapping[str, tuple[str, int, int]] | None) -> list[Any]:
    """``check_matrix``'s checks of the entry alone; returns its stored tensors to check,
    ``(name suffix, dtype, shape or None, max length or None)``."""
    try:
        scheme = parse_scheme(entry["scheme"], entry.get("quant_group_size"))
    except ValueError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    rows, cols = entry["shape"]
    meta, fields = entry["codec"], set(entry["fields"])
    if meta.get("shape") != f"{rows},{cols}":
        raise CheckpointError(f"{what}: codec shape {str(meta.get('shape'))[:40]!r} is not the "
                              f"entry's shape {rows},{cols}")
    code = CODE_PREFIX
    n = rows * cols
    spec: list[Any] = []
    if scheme.name in RANS_SCHEMES:
        kind, group, prob_bits = _rans_params(meta, what)
        if kind != ("int2" if scheme.is_symmetric_ternary else scheme.name):
            raise CheckpointError(f"{what}: codec kind {kind!r} for a {scheme.name} matrix")
        seg = _meta_int(meta, "segment_symbols", 1, MAX_SEGMENT_SYMBOLS, what)
        nsym = -(-n // group)
        nseg = -(-nsym // seg)
        placement = meta.get("table")
        if placement == "shared":
            want_fields, table = {"seg_words", "stream"}, entry.get("table")
            if not table or table not in tables:
                raise CheckpointError(f"{what} uses code table {str(table)[:120]!r}, which is not "
                                      "in the manifest's tables")
            tmeta = tables[table]
            if tmeta.get("table_hash") != meta["table_hash"]:
                raise CheckpointError(
                    f"{what}: table hash mismatch: the matrix needs {meta['table_hash'][:16]}..., "
                    f"code table {table!r} is {str(tmeta.get('table_hash'))[:16]}...")
            params = checked.get(table) if checked is not None else None
            if params is None:
                params = check_table(table, tmeta, tensors)
            if params != (kind, group, prob_bits):
                raise CheckpointError(f"{what}: its codec parameters differ from code table "
                                      f"{table!r}'s")
        elif placement == "embedded":
            want_fields = {"seg_words", "stream", "freqs"}
            if entry.get("table"):
                raise CheckpointError(f"{what}: an embedded table and a shared one "
                                      f"({entry['table']!r})")
            spec.append((f"{code}freqs", "uint16", [KINDS[kind] ** group], None))
        else:
            raise CheckpointError(f"{what}: codec table {str(placement)[:20]!r}, expected "
                                  "'embedded' or 'shared'")
        if fields != want_fields:
            raise CheckpointError(f"{what}: fields {sorted(fields)}, expected "
                                  f"{sorted(want_fields)}")
        spec.append((f"{code}seg_words", "uint16", [nseg], None))
        spec.append((f"{code}stream", "uint16", None, 2 * nseg + nsym))
    else:
        if meta.get("format") != PACK_FORMAT or meta.get("version") != str(PACK_VERSION):
            raise CheckpointError(f"{what}: a {scheme.name} matrix needs codec {PACK_FORMAT} "
                                  f"version {PACK_VERSION}")
        if meta.get("bits") != str(scheme.bits):
            raise CheckpointError(f"{what}: codec bits {str(meta.get('bits'))[:8]!r} for a "
                                  f"{scheme.name} matrix")
        if fields != {"packed"} or entry.get("table"):
            raise CheckpointError(f"{what}: fields {sorted(fields)}, expected ['packed'] and no "
                                  "table")
        spec.append((f"{code}packed", "uint8", [-(-n * scheme.bits // 8)], None))
    if scheme.is_ternary:
        want_params = {"lo": ("bfloat16", [rows]), "hi": ("bfloat16", [rows])}
    else:
        g = scheme.num_groups(cols)
        want_params = {"scale": ("bfloat16", [rows, g]), "zero": ("uint8", [rows, g])}
    if set(entry["params"]) != set(want_params):
        raise CheckpointError(f"{what}: params {sorted(entry['params'])}, a {scheme.name} matrix "
                              f"has {sorted(want_params)}")
    return spec + [(f".{p}", dtype, shape, None) for p, (dtype, shape) in want_params.items()]
