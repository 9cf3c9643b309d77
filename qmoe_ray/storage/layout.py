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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qmoe_ray import codec
from qmoe_ray.quant import Scheme, dequantize, parse_scheme

CODE_PREFIX = ".q."


def _encoder(scheme: Scheme):
    if scheme.name == "ternary":
        return codec.encode_ternary, codec.decode_ternary, codec.EncodedTernary
    if scheme.name == "int2":
        return codec.encode_int2, codec.decode_int2, codec.EncodedInt2
    return None


def shared_table(scheme: Scheme, codes: torch.Tensor) -> codec.Table | None:
    """One code table fitted to a stack of code matrices ``[G, rows, cols]`` (None for schemes
    stored by plain bit packing).

    Why shared: a table costs ~0.5 KB; fitted to the matrices of one expert group and one role
    (which share their statistics) it is paid once per group instead of once per matrix, which
    matters for small experts and costs nothing measurable for large ones (docs/FORMAT.md).
    """
    kind = {"ternary": "ternary", "int2": "int2"}.get(scheme.name)
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
    table_name: str, tables: Mapping[str, Mapping[str, str]], tensors: Mapping[str, torch.Tensor]
) -> codec.Table:
    """Rebuild a shared table from its tensors and manifest metadata (version and hash checked).

    Raises:
        KeyError: the manifest or the shards lack the table.
        ValueError: unknown version or a hash mismatch.
    """
    if table_name not in tables:
        raise KeyError(f"code table {table_name!r} is not in the manifest's tables")
    prefix = f"{table_name}."
    arrays = {k[len(prefix) :]: t.numpy() for k, t in tensors.items() if k.startswith(prefix)}
    if not arrays:
        raise KeyError(f"code table {table_name!r} has no tensors in the checkpoint")
    return codec.Table.from_tensors(arrays, dict(tables[table_name]))  # checks version and hash


def unpack_matrix(
    name: str,
    entry: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tables: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[Scheme, np.ndarray, dict[str, torch.Tensor]]:
    """Decode one quantized matrix from its stored tensors (``tables``: the manifest's table
    metadata, needed when the matrix uses a shared table).

    Returns:
        ``(scheme, codes [rows, cols], params)`` with params as float32 tensors.

    Raises:
        KeyError: a stored tensor is missing.
        ValueError: the codes do not match the recorded shape.
    """
    scheme = parse_scheme(entry["scheme"], entry.get("quant_group_size"))
    arrays = {f: tensors[f"{name}{CODE_PREFIX}{f}"].numpy() for f in entry["fields"]}
    meta = dict(entry["codec"])
    enc_fns = _encoder(scheme)
    if enc_fns is not None:
        table = load_table(entry["table"], tables or {}, tensors) if entry.get("table") else None
        codes = enc_fns[1](enc_fns[2].from_tensors(arrays, meta, table=table))
    else:
        codes = codec.unpack_bits(codec.PackedCodes.from_tensors(arrays, meta))
    if list(codes.shape) != list(entry["shape"]):
        raise ValueError(
            f"{name}: decoded codes have shape {list(codes.shape)}, manifest says {entry['shape']}"
        )
    params = {p: tensors[f"{name}.{p}"].float() for p in entry["params"]}
    return scheme, codes, params


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
