"""``qmoe-ray export URL OUT --format compressed-tensors``: the experts as compressed-tensors
``pack-quantized`` weights (what transformers and vLLM read), everything else bf16.

Each quantized expert matrix ``P.weight`` becomes, under the HF per-expert name ``P``:

- ``P.weight_packed`` int32 ``[rows, ceil(cols * bits / 32)]``: the codes, offset to the signed
  range ``[-2**(bits-1), 2**(bits-1))`` and packed densely along the input dimension (code ``i``
  of a row at bit ``i * bits`` of the row's little-endian word stream, as compressed-tensors'
  ``pack_to_int32`` lays them out);
- ``P.weight_scale`` bf16 ``[rows, G]``: our scales as stored (the quantizer rounded them to bf16
  before rounding any weight, so nothing changes);
- ``P.weight_zero_point`` int32 ``[ceil(rows * bits / 32), G]``: our zero points in the same
  signed offset, packed along the rows (compressed-tensors' layout for asymmetric grids);
- ``P.weight_shape`` int64 ``[rows, cols]``.

compressed-tensors dequantizes ``(q - zp) * scale``; with ``q = code - 2**(bits-1)`` and
``zp = zero - 2**(bits-1)`` that is our ``scale * (code - zero)``, the same float32 product
(exact: ``|code - zero| < 256`` times a bf16 scale fits float32's mantissa), hence the same bf16
weight after rounding. ``check_exact`` recomputes both for every matrix before it is written.

Which grids are expressible (``ct_grid``):

- int2/int3/int4/int8 per row (strategy ``channel``) or with ``quant_group_size`` groups (strategy
  ``group``) that divide the input dimension: compressed-tensors has no partial last group, so a
  matrix whose columns are not a multiple of the group size is refused;
- ternary, as a 2-bit asymmetric grid with one unused level, only for rows whose grid
  ``{lo, 0, hi}`` is evenly spaced with 0 on it: ``hi == -lo`` (levels -1, 0, 1 of ``scale=hi``),
  ``hi == -2 lo`` or ``lo == -2 hi`` (levels -1, 0, 2 / -2, 0, 1), or a row with ``lo`` or ``hi``
  equal to 0. QMoE's grid is ``{min(row, 0), 0, max(row, 0)}``, whose two sides are almost never
  in such a ratio, so a ternary checkpoint is in general refused (naming the matrix and how many
  rows cannot be expressed), never rounded onto another grid.

The ``quantization_config`` (``quantization_config``) targets exactly the expert Linear modules
(a ``re:`` pattern per role) and lists every other Linear module in ``ignore``.

Families: the experts are always written per expert under transformers' per-expert names (a
Qwen3.5-MoE's under ``model.language_model.``, even from its fused Hub layout), which
transformers >= 5 merges into its fused ``gate_up_proj`` / ``down_proj`` while decompressing;
everything else (a vision tower, Gated DeltaNet, shared experts) is carried bf16. gpt-oss is
refused (``family_reason``): transformers has no per-expert modules for it to load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qmoe_ray.errors import InputError
from qmoe_ray.quant import Scheme, dequantize, parse_scheme

FORMAT = "pack-quantized"
FIX = ("compress with --scheme int2/int3/int4/int8 (with a --quant-group-size that divides every "
       "expert's input dimension, or none), or export with --format hf")


def ct_bits(scheme: Scheme) -> int:
    """The compressed-tensors ``num_bits`` of our grid (ternary: 2)."""
    return 2 if scheme.is_ternary else int(scheme.bits)


def pack_int32(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``u`` ``[rows, n]`` (each ``< 2**bits``) along the last axis densely into
    int32 words ``[rows, ceil(n * bits / 32)]``: code ``i`` at bit ``i * bits`` of the row's
    little-endian bit stream (the layout compressed-tensors' ``unpack_from_int32`` reads)."""
    rows, n = u.shape
    bitplanes = np.unpackbits(u.astype(np.uint8)[..., None], axis=-1, count=bits,
                              bitorder="little").reshape(rows, n * bits)
    words = -(-n * bits // 32)
    pad = words * 32 - n * bits
    if pad:
        bitplanes = np.pad(bitplanes, ((0, 0), (0, pad)))
    packed = np.packbits(bitplanes, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32).view(np.int32)


def _ternary_rows(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    """Per row: the 2-bit ``(scale, zero, u)`` (``u[row, c]``: unsigned code of ternary code
    ``c - 1``) and a mask of rows the evenly spaced 2-bit grid can hold exactly."""
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    rows = lo.shape[0]
    scale = torch.ones(rows)
    zero = torch.zeros(rows)
    u = torch.zeros(rows, 3)
    ok = torch.zeros(rows, dtype=torch.bool)

    def put(mask: torch.Tensor, s: torch.Tensor, z: int, codes: tuple[int, int, int]) -> None:
        m = mask & ~ok
        scale[m], zero[m] = s[m], float(z)
        u[m] = torch.tensor(codes, dtype=torch.float32)
        ok[m] = True

    put((lo == 0) & (hi == 0), torch.ones(rows), 0, (0, 0, 0))
    put((lo == 0) & (hi > 0), hi, 0, (0, 0, 1))
    put((hi == 0) & (lo < 0), -lo, 1, (0, 1, 1))
    put(hi == -lo, hi, 1, (0, 1, 2))
    put(hi == -2 * lo, -lo, 1, (0, 1, 3))
    put(lo == -2 * hi, hi, 2, (0, 2, 3))
    return scale, zero, u, ok


def ct_grid(name: str, scheme: Scheme, codes: np.ndarray, params: Mapping[str, torch.Tensor]
            ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Our grid of one matrix as compressed-tensors' ``(unsigned codes, scale, unsigned zero)``.

    Args:
        name: the matrix (for messages).
        scheme: its grid; codes: its decoded codes ``[rows, cols]``; params: its stored grid
            parameters (``lo``/``hi`` or ``scale``/``zero``).

    Returns:
        ``(u [rows, cols] uint8, scale [rows, G] bf16, zero [rows, G] uint8)``.

    Raises:
        InputError: the grid cannot be expressed (a partial last group, a ternary row whose
            grid is not evenly spaced, a scale that is not a bf16 value), naming the reason.
    """
    rows, cols = codes.shape
    if scheme.is_ternary:
        scale, zero, u, ok = _ternary_rows(params["lo"], params["hi"])
        if not bool(ok.all()):
            bad = int((~ok).sum())
            raise InputError(
                f"{name}: {bad} of {rows} ternary rows have a grid {{lo, 0, hi}} that is not "
                "evenly spaced (compressed-tensors holds a ternary row only as a 2-bit grid "
                "with one unused level: hi == -lo, hi == -2*lo, lo == -2*hi, or one side 0); "
                f"the export would not be lossless: {FIX}")
        idx = torch.from_numpy(codes.astype(np.int64) + 1)
        uc = torch.gather(u, 1, idx).to(torch.uint8).numpy()
        return uc, _bf16(name, scale[:, None]), zero[:, None].to(torch.uint8).numpy()
    gs = scheme.group_size
    if gs is not None and scheme.num_groups(cols) > 1 and cols % gs:
        raise InputError(
            f"{name}: {cols} input columns are not a multiple of quant_group_size {gs} (the last "
            "group is partial; compressed-tensors' group strategy has only whole groups): "
            f"{FIX}")
    return (codes.astype(np.uint8), _bf16(name, params["scale"]),
            params["zero"].to(torch.uint8).numpy())


def _bf16(name: str, scale: torch.Tensor) -> torch.Tensor:
    """``scale`` in bf16, refused unless every value is one (a lossless cast)."""
    out = scale.to(torch.bfloat16)
    if not torch.equal(out.to(torch.float32), scale.to(torch.float32)):
        raise InputError(f"{name}: scales stored in {scale.dtype} are not all bf16 values; the "
                         f"compressed-tensors export keeps bf16 scales: {FIX}")
    return out


def check_exact(name: str, scheme: Scheme, codes: np.ndarray, params: Mapping[str, torch.Tensor],
                u: np.ndarray, scale: torch.Tensor, zero: np.ndarray, bits: int) -> None:
    """Refuse unless compressed-tensors' ``(q - zp) * scale`` in float32 equals our float32
    dequantization bit for bit (signed zeros included).

    Raises:
        InputError: naming the matrix and how many weights differ.
    """
    c = torch.from_numpy(codes)[None]
    ours = dequantize(scheme, c, {k: v.float()[None] for k, v in params.items()})[0]
    off = 1 << (bits - 1)
    q = torch.from_numpy(u.astype(np.int32) - off).to(torch.float32)
    zp = torch.from_numpy(zero.astype(np.int32) - off).to(torch.float32)
    G = scale.shape[1]
    gs = -(-codes.shape[1] // G)
    theirs = (q - zp.repeat_interleave(gs, 1)[:, : q.shape[1]]) * \
        scale.to(torch.float32).repeat_interleave(gs, 1)[:, : q.shape[1]]
    diff = int((ours.view(torch.int32) != theirs.view(torch.int32)).sum())
    if diff:
        raise InputError(f"{name}: {diff} weights would dequantize differently in "
                         f"compressed-tensors; refused: {FIX}")


def ct_tensors(name: str, scheme: Scheme, codes: np.ndarray, params: Mapping[str, torch.Tensor],
               symmetric: bool = False) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one matrix (suffixes ``weight_packed``,
    ``weight_scale``, ``weight_zero_point``, ``weight_shape``), checked exact (``check_exact``).

    ``symmetric``: no zero point; the codes ``code - zero`` (in ``[-maxq, maxq]``) in one more
    bit (``ct_bits(scheme) + 1``), for loaders that read no zero points.

    Raises:
        InputError: see ``ct_grid`` and ``check_exact``; ``symmetric`` for 8-bit codes.
    """
    bits = ct_bits(scheme)
    u, scale, zero = ct_grid(name, scheme, codes, params)
    if symmetric:
        if bits >= 8:
            raise InputError(f"{name}: symmetric export needs {bits + 1}-bit codes; "
                             "compressed-tensors packs at most 8: export int8 asymmetric")
        G = scale.shape[1]
        gs = -(-codes.shape[1] // G)
        z = np.repeat(zero.astype(np.int32), gs, axis=1)[:, : u.shape[1]]
        bits += 1
        u = (u.astype(np.int32) - z + (1 << (bits - 1))).astype(np.uint8)
        zero = np.full(zero.shape, 1 << (bits - 1), dtype=np.uint8)
    check_exact(name, scheme, codes, params, u, scale, zero, bits)
    if symmetric:
        return {"weight_packed": torch.from_numpy(pack_int32(u, bits)),
                "weight_scale": scale.contiguous(),
                "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}
    return {
        "weight_packed": torch.from_numpy(pack_int32(u, bits)),
        "weight_scale": scale.contiguous(),
        "weight_zero_point": torch.from_numpy(pack_int32(np.ascontiguousarray(zero.T), bits).T
                                              .copy()),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }


def grid_args(schemes: set[tuple[str, int | None]], symmetric: bool = False) -> dict[str, Any]:
    """The ``weights`` quantization args of the one grid all experts share (``symmetric``: see
    ``ct_tensors``).

    Raises:
        InputError: experts of several grids (one config group per grid is not written).
    """
    if len(schemes) != 1:
        raise InputError(f"the experts use several grids {sorted(schemes, key=str)}; the "
                         "compressed-tensors export writes one: export with --format hf")
    name, gs = next(iter(schemes))
    bits = 2 if name == "ternary" else int(parse_scheme(name).bits)
    return {"num_bits": bits + symmetric, "type": "int", "symmetric": symmetric,
            "dynamic": False,
            "strategy": "channel" if gs is None else "group", "group_size": gs,
            "block_structure": None, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def target_pattern(module: str) -> str:
    """A ``re:`` target matching ``module`` in every layer and expert: its last three name parts
    (``experts.3.w1``, ``experts.expert_3.wi``) with digit runs generalised."""
    tail = re.escape(".".join(module.split(".")[-3:]))
    return "re:.*\\." + re.sub(r"(?<![A-Za-z])\d+", r"\\d+", tail) + "$"


def quantization_config(weights: Mapping[str, Any], expert_modules: list[str],
                        dense_weights: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json``.

    Args:
        weights: the quantization args (``grid_args``).
        expert_modules: the HF module names of every quantized expert matrix.
        dense_weights: names of the bf16 2-D ``*.weight`` tensors (their modules go in
            ``ignore``).
    """
    targets = sorted({target_pattern(m) for m in expert_modules})
    ignore = sorted({n.removesuffix(".weight") for n in dense_weights})
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": targets, "weights": dict(weights),
                                      "input_activations": None, "output_activations": None,
                                      "format": FORMAT}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
    }


def family_reason(family: Any) -> str | None:
    """Why transformers cannot load ``family``'s experts from a compressed-tensors checkpoint, or
    ``None``. compressed-tensors quantizes Linear modules; transformers >= 5 fuses per-expert
    modules into 3-D parameters while loading only where its conversion mapping says how (Mixtral,
    the Qwen MoEs, Qwen3-Next, Qwen3.5 ...). gpt-oss has none: its experts were never per-expert
    modules (``gate_up_proj`` ``[E, D, 2F]``, gate and up interleaved, ``x @ W``, with biases),
    so no per-expert name reaches them and its fused parameters are not ``.weight`` tensors that
    the dequantize step is given."""
    if family.fused_layout == "rows":
        return None
    return (f"transformers' {family.model_type} has no per-expert Linear modules (its experts are "
            "fused 3-D tensors, and it converts no per-expert names into them)")


def export_formats(manifest: Mapping[str, Any]) -> dict[str, str | None]:
    """Which export formats hold the checkpoint losslessly, from its manifest alone: format ->
    ``None`` (lossless) or the reason it is refused. A ternary checkpoint's rows decide (their
    ``lo``/``hi`` values): ``"ternary rows: not checked"`` until ``ternary_rows_refused`` has seen
    them (``inspect`` does so while verifying the checksums)."""
    from qmoe_ray.models import get_family

    out: dict[str, str | None] = {"hf": None}
    quantized = manifest["quantized"]
    grids = {(e["scheme"], e.get("quant_group_size")) for e in quantized.values()}
    reason = family_reason(get_family(manifest["config"]))
    if reason is None and len(grids) != 1:
        reason = f"the experts use several grids {sorted(grids, key=str)}"
    elif reason is None:
        name, gs = next(iter(grids))
        partial = sorted({e["shape"][1] for e in quantized.values()
                          if gs is not None and e["shape"][1] > gs and e["shape"][1] % gs})
        if partial:
            reason = (f"input dimensions {partial} are not multiples of quant_group_size {gs} "
                      "(a partial last group)")
        elif name == "ternary":
            reason = "ternary rows: not checked"
    out["compressed-tensors"] = reason
    sym = reason
    if reason is None and next(iter(grids))[0] == "int8":
        sym = "int8 has no symmetric form (9-bit codes)"
    out["compressed-tensors --symmetric"] = sym
    from qmoe_ray.read.export_gguf import gguf_reason

    out["gguf"] = gguf_reason(manifest)
    return out


def ternary_rows_refused(lo: torch.Tensor, hi: torch.Tensor) -> int:
    """How many ternary rows the compressed-tensors export cannot hold (see the module doc)."""
    return int((~_ternary_rows(lo, hi)[3]).sum())
