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


def pack_matrix(
    name: str, scheme: Scheme, codes: torch.Tensor, params: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode one quantized matrix.

    Args:
        name: the matrix's canonical name.
        scheme: its grid.
        codes: ``[rows, cols]`` codes (int8 ternary / uint8 int).
        params: its grid parameters for this matrix (``lo``/``hi`` ``[rows]`` or
            ``scale``/``zero`` ``[rows, groups]``).

    Returns:
        ``(tensors, entry)``: tensors to write (name -> tensor) and the manifest entry, with
        ``code_bytes`` (encoded codes) and ``scale_bytes`` (grid parameters) for the size report.
    """
    codes_np = codes.cpu().numpy()
    rows, cols = codes_np.shape
    tensors: dict[str, torch.Tensor] = {}
    enc_fns = _encoder(scheme)
    if enc_fns is not None:
        enc = enc_fns[0](codes_np)
        arrays, meta, code_bytes = enc.to_tensors(), enc.metadata(), int(enc.nbytes)
    else:
        packed = codec.pack_bits(codes_np.astype(np.uint8), scheme.bits)
        arrays, meta, code_bytes = packed.to_tensors(), packed.metadata(), int(packed.nbytes)
    for field, arr in arrays.items():
        tensors[f"{name}{CODE_PREFIX}{field}"] = torch.from_numpy(np.array(arr, copy=True))
    scale_bytes = 0
    for pname, p in params.items():
        if pname == "zero":
            t = p.round().to(torch.uint8)
        else:
            t = p.to(torch.bfloat16)
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
        "code_bytes": code_bytes,
        "scale_bytes": scale_bytes,
    }
    return tensors, entry


def unpack_matrix(
    name: str, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> tuple[Scheme, np.ndarray, dict[str, torch.Tensor]]:
    """Decode one quantized matrix from its stored tensors.

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
        codes = enc_fns[1](enc_fns[2].from_tensors(arrays, meta))
    else:
        codes = codec.unpack_bits(codec.PackedCodes.from_tensors(arrays, meta))
    if list(codes.shape) != list(entry["shape"]):
        raise ValueError(
            f"{name}: decoded codes have shape {list(codes.shape)}, manifest says {entry['shape']}"
        )
    params = {p: tensors[f"{name}.{p}"].float() for p in entry["params"]}
    return scheme, codes, params


def dequantize_matrix(
    name: str, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The float32 weight ``[rows, cols]`` of a stored quantized matrix."""
    scheme, codes, params = unpack_matrix(name, entry, tensors)
    c = torch.from_numpy(codes)[None]
    return dequantize(scheme, c, {k: v[None] for k, v in params.items()})[0]
