"""Quantized source checkpoints, decoded at read time: the schemes the largest MoEs ship in.

Why here, in the storage layer: DeepSeek-V3/R1, Kimi-K2 and the ``-FP8`` releases ship their
linear weights as FP8, Kimi-K2-Thinking as packed INT4. Decoding them once, under the reader
(``qmoe_ray.storage.checkpoint.Checkpoint``), means every family, the job, ``eval``, ``export``
and ``inspect`` see the logical weight under its plain name (``...weight``) and need no change;
the encoding's own tensors (``weight_scale_inv``, ``weight_packed``, ``weight_scale``,
``weight_shape``) are hidden. The loss baseline of such a source is therefore its dequantized
model. Everything is decided from ``config.json`` and the shard headers (``source_view``): a
scale whose shape does not match the blocks, an FP8 weight without its scale, a packed weight
without its scale or shape are refused at open time, naming the tensor, before any data is read.

Decoded (the arithmetic of each scheme's reference decoder, so the values are bit-identical):

- ``quant_method: "fp8"`` (transformers' ``FineGrainedFP8Config``; DeepSeek-V3's
  ``weight_dequant``): a ``float8_e4m3fn`` weight ``[..., R, C]`` times its ``weight_scale_inv``
  ``[..., ceil(R/bm), ceil(C/bn)]``, one scale per ``weight_block_size`` ``[bm, bn]`` block, the
  blocks at the bottom/right edges partial. Scales are float32 or, with ``scale_fmt: "ue8m0"``
  (DeepSeek-V3.1 and later: scales that are powers of two), float32 powers of two or
  ``float8_e8m0fnu`` bytes; both are widened to float32 exactly and the product is formed in
  float32 (the decoded dtype). ``activation_scheme`` must be ``"dynamic"`` (a static scheme ships
  activation scales this reader does not apply); ``modules_to_not_convert`` lists modules that
  must be stored unquantized (a float8 weight there is refused).
- ``quant_method: "compressed-tensors"``, ``format: "pack-quantized"`` (Kimi-K2-Thinking): int4,
  symmetric, ``strategy: "group"`` weights; ``weight_packed`` int32 holds 8 values per word,
  value ``i`` of a row in bits ``4i..4i+3`` of the little-endian words, stored as ``q + 8``;
  ``weight_scale`` ``[..., C / group_size]``; ``weight_shape`` the logical shape (checked on
  every read). The weight is ``q * scale`` in the scale's dtype (the compressed-tensors
  library's ``dequantize``), which is the decoded dtype.

- ``quant_method: "mxfp4"`` (gpt-oss): the experts' ``*_blocks`` uint8 ``[E, R, G, 16]`` hold
  32 FP4 (e2m1) values per block, the low nibble first, ``*_scales`` uint8 ``[E, R, G]`` one E8M0
  exponent per block (``2 ** (s - 127)``); the logical weight is ``[E, G * 32, R]`` (transposed:
  gpt-oss's ``[E, H, 2I]`` / ``[E, I, H]`` expert layout) in bf16, where every such value is
  exact (transformers' ``convert_moe_packed_tensors``).

Anything else (another ``quant_method``, NVFP4 or another ``format``, other bit widths,
asymmetric weights, activation or KV-cache quantization, ``compression_config``) is refused with
an error naming the key, its value and what is supported.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qmoe_ray.errors import CheckpointError
from qmoe_ray.storage.safetensors import DTYPES, TensorInfo

#: The dtypes an unquantized source tensor may have: the ones whose values are the weights.
SOURCE_DTYPES = ("BF16", "F16", "F32", "F64")
#: config.json keys that declare a quantized (or otherwise compressed) checkpoint.
QUANT_KEYS = ("quantization_config", "compression_config")
SUPPORTED = ('quant_method "fp8" (float8_e4m3fn weights, block scales), "compressed-tensors" '
             'with format "pack-quantized" (int4, symmetric, group-wise) or "mxfp4" (FP4 '
             'blocks of 32 with E8M0 scales)')
_SHORT = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}
_NAME_OF = {v: k for k, v in DTYPES.items()}
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_PACKED_PARTS = ("_packed", "_scale", "_shape", "_zero_point", "_g_idx")


def _dt(dtype: torch.dtype) -> str:
    return _NAME_OF.get(dtype, str(dtype).removeprefix("torch."))


def _show(name: str) -> str:
    return repr(name) if len(name) <= 120 else repr(name[:117] + "...")


@dataclass(frozen=True)
class Fp8Block:
    """``quant_method: "fp8"``: float8_e4m3fn weights with one scale per ``block`` (rows, cols)."""

    block: tuple[int, int]
    scale_fmt: str  # "float" or "ue8m0"
    skip: tuple[str, ...]  # modules_to_not_convert


@dataclass(frozen=True)
class PackedInt:
    """compressed-tensors ``pack-quantized``: symmetric int ``bits`` weights, ``group`` columns
    per scale."""

    bits: int
    group: int
    ignore: tuple[str, ...]


@dataclass(frozen=True)
class Mxfp4:
    """``quant_method: "mxfp4"``: FP4 e2m1 values in blocks of 32 with one E8M0 scale each."""

    skip: tuple[str, ...]  # modules_to_not_convert (``*`` wildcards)


Scheme = Fp8Block | PackedInt | Mxfp4
#: e2m1 values by nibble (sign in bit 3).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Decoded:
    """One logical weight and the stored tensors it decodes from (``parts``: role -> name;
    roles ``weight``/``scale`` for FP8, ``packed``/``scale``/``shape`` for packed ints,
    ``blocks``/``scales`` for MXFP4)."""

    kind: str  # "fp8", "packed" or "mxfp4"
    parts: dict[str, str]
    shape: tuple[int, ...]
    dtype: torch.dtype


def _refuse(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: {what}; supported: {SUPPORTED}. Use the model's "
                           "unquantized (bf16) release, or dequantize it first")


def _quant_block(config: Mapping[str, Any], where: str) -> tuple[str, Any]:
    """The one quantization block of a config (``(key path, value)``, value None if none)."""
    found: list[tuple[str, Any]] = []
    scopes: list[tuple[str, Any]] = [("", config)]
    if isinstance(config.get("text_config"), dict):
        scopes.append(("text_config.", config["text_config"]))
    for prefix, scope in scopes:
        for key in QUANT_KEYS:
            if scope.get(key) is not None:
                found.append((prefix + key, scope[key]))
    if not found:
        return "", None
    key, q = found[0]
    method = q.get("quant_method") if isinstance(q, dict) else None
    kind = f" (quant_method {str(method)[:40]!r})" if isinstance(method, str) else ""
    if len(found) > 1:
        raise _refuse(where, f"{found[0][0]} and {found[1][0]} are both set{kind}: one "
                             "quantization block is read")
    if key.endswith("compression_config"):
        raise _refuse(where, f"{key}{kind} is set (an older compressed-tensors layout)")
    if not isinstance(method, str):
        raise _refuse(where, f"{key} is set without a quant_method")
    return key, q


def _check_keys(q: Mapping[str, Any], key: str, where: str, allowed: Mapping[str, Any]) -> None:
    for k, ok in allowed.items():
        v = q.get(k)
        if v is not None and not ok(v):
            raise _refuse(where, f"{key}.{k} is {str(v)[:60]!r}, which is not decoded")


def _fp8_scheme(q: Mapping[str, Any], key: str, where: str) -> Fp8Block:
    _check_keys(q, key, where, {
        "fmt": lambda v: v == "e4m3",
        "activation_scheme": lambda v: str(v).lower() == "dynamic",
        "scale_fmt": lambda v: v in ("float", "ue8m0"),
        "expert_dtype": lambda v: v == "fp8",
        "modules_to_convert": lambda v: not v,
    })
    blk = q.get("weight_block_size")
    if not (isinstance(blk, list) and len(blk) == 2
            and all(type(b) is int and b > 0 for b in blk)):
        raise _refuse(where, f"{key}.weight_block_size is {str(blk)[:60]!r}; expected [rows, "
                             "cols] of positive integers (per-tensor FP8 is not decoded)")
    skip = q.get("modules_to_not_convert") or q.get("ignored_layers") or []
    if not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise _refuse(where, f"{key}.modules_to_not_convert is not a list of module names")
    return Fp8Block((blk[0], blk[1]), q.get("scale_fmt") or "float", tuple(skip))


def _packed_scheme(q: Mapping[str, Any], key: str, where: str) -> PackedInt:
    for k, want in (("format", "pack-quantized"), ("quantization_status", "compressed")):
        if q.get(k, want) != want:
            raise _refuse(where, f"{key}.{k} is {str(q.get(k))[:60]!r} (decoded: {want!r})")
    for k in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if q.get(k):
            raise _refuse(where, f"{key}.{k} is set ({k.split('_')[0]} compression is not "
                                 "decoded)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(where, f"{key}.config_groups is missing or empty")
    schemes = set()
    for g, spec in groups.items():
        at = f"{key}.config_groups.{str(g)[:40]}"
        if not isinstance(spec, dict) or not isinstance(spec.get("weights"), dict):
            raise _refuse(where, f"{at}.weights is missing")
        for k in ("input_activations", "output_activations"):
            if spec.get(k):
                raise _refuse(where, f"{at}.{k} is set (activation quantization is not decoded)")
        if spec.get("format", "pack-quantized") != "pack-quantized":
            raise _refuse(where, f"{at}.format is {str(spec['format'])[:40]!r}")
        w = spec["weights"]
        for k, want in (("num_bits", 4), ("type", "int"), ("strategy", "group"),
                        ("symmetric", True), ("dynamic", False), ("actorder", None),
                        ("block_structure", None)):
            if w.get(k, want) != want or (k in ("num_bits", "strategy") and k not in w):
                raise _refuse(where, f"{at}.weights.{k} is {str(w.get(k))[:40]!r} "
                                     f"(decoded: {want!r})")
        gs = w.get("group_size")
        if type(gs) is not int or gs <= 0:
            raise _refuse(where, f"{at}.weights.group_size is {str(gs)[:40]!r}")
        schemes.add((w["num_bits"], gs))
    if len(schemes) > 1:
        raise _refuse(where, f"{key}.config_groups use different weight schemes {sorted(schemes)}")
    ignore = q.get("ignore") or []
    if not (isinstance(ignore, list) and all(isinstance(s, str) for s in ignore)):
        raise _refuse(where, f"{key}.ignore is not a list of names")
    for pat in ignore:
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                raise _refuse(where, f"{key}.ignore entry {pat[:60]!r} is not a regex ({e})"
                              ) from None
    bits, group = schemes.pop()
    return PackedInt(bits, group, tuple(ignore))


def source_scheme(config: Mapping[str, Any], where: str) -> Scheme | None:
    """The quantization scheme ``config.json`` declares (None: an unquantized source).

    Args:
        config: the parsed ``config.json`` (its ``quantization_config`` at the top level or in
            ``text_config``).
        where: its location, for messages.

    Raises:
        CheckpointError: a scheme or setting that is not decoded; the message names the key and
            its value, and what is supported.
    """
    key, q = _quant_block(config, where)
    if q is None:
        return None
    method = q["quant_method"]
    if method == "fp8":
        return _fp8_scheme(q, key, where)
    if method == "compressed-tensors":
        return _packed_scheme(q, key, where)
    if method == "mxfp4":
        skip = q.get("modules_to_not_convert") or []
        if not (isinstance(skip, list) and all(isinstance(x, str) for x in skip)):
            raise _refuse(where, f"{key}.modules_to_not_convert is not a list of module names")
        return Mxfp4(tuple(skip))
    raise _refuse(where, f"{key}.quant_method is {method[:40]!r}, which is not decoded")


def model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as the decoded model's: the quantization block dropped (the weights a reader
    presents, and the ones an export writes, are unquantized)."""
    out = {k: v for k, v in config.items() if k not in QUANT_KEYS}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k not in QUANT_KEYS}
    return out


def _module_matches(module: str, pattern: str, regex: bool) -> bool:
    if regex and pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    if regex:  # compressed-tensors: an exact module name (class names are not matched here)
        return module == pattern
    # transformers' should_convert_module: a prefix up to a module boundary, or a suffix
    return (module == pattern or module.startswith(pattern + ".")
            or module.endswith("." + pattern))


def check_plain_dtypes(tensors: Mapping[str, TensorInfo], quantized: bool = False) -> None:
    """Refuse a tensor that is neither decoded nor a plain floating-point one.

    Raises:
        CheckpointError: naming the tensor, its file and dtype, and the supported dtypes.
    """
    ok = {DTYPES[d] for d in SOURCE_DTYPES}
    for name in sorted(tensors):
        info = tensors[name]
        if info.dtype in ok:
            continue
        dt = _dt(info.dtype)
        hint = (" (an FP8 checkpoint without a quantization_config saying how to decode it)"
                if dt.startswith("F8") and not quantized
                else " (a quantized or packed encoding this scheme does not have)")
        raise CheckpointError(
            f"{info.file}: tensor {_show(name)} has dtype {dt}{hint}, which the source reader "
            f"does not decode; supported source dtypes: {', '.join(SOURCE_DTYPES)}, or "
            f"{SUPPORTED} declared in config.json. Use the model's unquantized (bf16) release, "
            "or dequantize it first")


def _fp8_view(tensors: Mapping[str, TensorInfo], s: Fp8Block) -> dict[str, Decoded]:
    out: dict[str, Decoded] = {}
    bm, bn = s.block
    scale_ok = {torch.float32} | ({_E8M0} if _E8M0 is not None else set())
    for name in sorted(tensors):
        i = tensors[name]
        if name.endswith("_scale_inv"):
            wname = name.removesuffix("_scale_inv")
            w = tensors.get(wname)
            if w is None or w.dtype != torch.float8_e4m3fn:
                found = "is missing" if w is None else f"has dtype {_dt(w.dtype)}"
                raise CheckpointError(f"{i.file}: block scale {_show(name)} has no float8 "
                                      f"weight: {_show(wname)} {found}; the checkpoint is "
                                      "incomplete or not an FP8 one: re-download it")
            if i.dtype not in scale_ok:
                raise CheckpointError(f"{i.file}: block scale {_show(name)} has dtype "
                                      f"{_dt(i.dtype)}; decoded: F32 or F8_E8M0 (ue8m0)")
            want = (*w.shape[:-2], math.ceil(w.shape[-2] / bm), math.ceil(w.shape[-1] / bn)
                    ) if len(w.shape) >= 2 else None
            if want is None or i.shape != want:
                raise CheckpointError(
                    f"{i.file}: block scale {_show(name)} has shape {list(i.shape)} but weight "
                    f"{_show(wname)} of shape {list(w.shape)} in {bm}x{bn} blocks needs "
                    f"{list(want) if want else 'a 2-D or larger weight'}; the scales do not "
                    "match the blocks (check weight_block_size in config.json)")
            module = wname.rsplit(".", 1)[0]
            if any(_module_matches(module, p, False) for p in s.skip):
                raise CheckpointError(f"{w.file}: {_show(wname)} is float8 but its module is "
                                      "listed in quantization_config.modules_to_not_convert; "
                                      "the config and the weights disagree: re-download them")
            out[wname] = Decoded("fp8", {"weight": wname, "scale": name}, w.shape, torch.float32)
    for name in sorted(tensors):
        i = tensors[name]
        if i.dtype == torch.float8_e4m3fn and name not in out:
            raise CheckpointError(f"{i.file}: FP8 weight {_show(name)} has no block scale "
                                  f"{_show(name + '_scale_inv')}; the checkpoint is incomplete: "
                                  "re-download it")
    return out


def _packed_view(tensors: Mapping[str, TensorInfo], s: PackedInt) -> dict[str, Decoded]:
    out: dict[str, Decoded] = {}
    per_word = 32 // s.bits
    for name in sorted(tensors):
        suffix = next((x for x in _PACKED_PARTS if name.endswith(x)), None)
        if suffix is None:
            continue
        base, i = name.removesuffix(suffix), tensors[name]
        if base + "_packed" not in tensors:
            raise CheckpointError(f"{i.file}: {_show(name)} has no packed weight "
                                  f"{_show(base + '_packed')}; the checkpoint is incomplete")
        if not name.endswith("_packed"):
            continue
        scale, shape = tensors.get(base + "_scale"), tensors.get(base + "_shape")
        for role, other in (("zero point", "_zero_point"), ("g_idx (activation order)", "_g_idx")):
            if base + other in tensors:
                raise CheckpointError(f"{i.file}: {_show(base + other)}: a {role} is not "
                                      f"decoded (symmetric weights without reordering are)")
        if scale is None or shape is None:
            miss = base + ("_scale" if scale is None else "_shape")
            raise CheckpointError(f"{i.file}: packed weight {_show(name)} has no "
                                  f"{_show(miss)}; the checkpoint is incomplete: re-download it")
        if base in tensors:
            raise CheckpointError(f"{i.file}: {_show(base)} is stored both packed and unpacked")
        if i.dtype != torch.int32 or len(i.shape) < 2:
            raise CheckpointError(f"{i.file}: packed weight {_show(name)} is {_dt(i.dtype)}"
                                  f"{list(i.shape)}; decoded: I32 of 2 or more dimensions")
        if scale.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise CheckpointError(f"{scale.file}: scale {_show(base + '_scale')} has dtype "
                                  f"{_dt(scale.dtype)}; decoded: BF16, F16, F32")
        if shape.dtype not in (torch.int32, torch.int64) or shape.shape != (len(i.shape),):
            raise CheckpointError(f"{shape.file}: {_show(base + '_shape')} is "
                                  f"{_dt(shape.dtype)}{list(shape.shape)}; expected an I32/I64 "
                                  f"vector of {len(i.shape)} sizes")
        cols = scale.shape[-1] * s.group if scale.shape else 0
        if (scale.shape[:-1] != i.shape[:-1] or math.ceil(cols / per_word) != i.shape[-1]):
            raise CheckpointError(
                f"{scale.file}: scale {_show(base + '_scale')} has shape {list(scale.shape)}, "
                f"which does not match packed weight {_show(name)} of shape {list(i.shape)} in "
                f"groups of {s.group} columns ({per_word} values per int32 word)")
        module = base.rsplit(".", 1)[0]
        if any(_module_matches(module, p, True) for p in s.ignore):
            raise CheckpointError(f"{i.file}: {_show(name)} is packed but its module is in "
                                  "quantization_config.ignore; the config and the weights "
                                  "disagree: re-download them")
        out[base] = Decoded("packed", {"packed": name, "scale": base + "_scale",
                                       "shape": base + "_shape"},
                            (*i.shape[:-1], cols), scale.dtype)
    return out


def _mxfp4_view(tensors: Mapping[str, TensorInfo], s: Mxfp4) -> dict[str, Decoded]:
    out: dict[str, Decoded] = {}
    for name in sorted(tensors):
        i = tensors[name]
        if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" not in tensors:
            raise CheckpointError(f"{i.file}: MXFP4 scales {_show(name)} have no blocks "
                                  f"{_show(name.removesuffix('_scales') + '_blocks')}; the "
                                  "checkpoint is incomplete: re-download it")
        if not name.endswith("_blocks"):
            continue
        base = name.removesuffix("_blocks")
        sc = tensors.get(base + "_scales")
        if sc is None:
            raise CheckpointError(f"{i.file}: MXFP4 blocks {_show(name)} have no scales "
                                  f"{_show(base + '_scales')}; the checkpoint is incomplete: "
                                  "re-download it")
        if i.dtype != torch.uint8 or len(i.shape) != 4 or i.shape[-1] != 16:
            raise CheckpointError(f"{i.file}: MXFP4 blocks {_show(name)} are {_dt(i.dtype)}"
                                  f"{list(i.shape)}; decoded: U8 [experts, rows, blocks, 16]")
        if sc.dtype != torch.uint8 or sc.shape != i.shape[:-1]:
            raise CheckpointError(f"{sc.file}: MXFP4 scales {_show(base + '_scales')} are "
                                  f"{_dt(sc.dtype)}{list(sc.shape)}; blocks {_show(name)} of "
                                  f"shape {list(i.shape)} need U8{list(i.shape[:-1])}")
        if base in tensors:
            raise CheckpointError(f"{i.file}: {_show(base)} is stored both as MXFP4 blocks and "
                                  "unpacked")
        module = base.rsplit(".", 1)[0]
        if any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*")
               for p in s.skip):
            raise CheckpointError(f"{i.file}: {_show(name)} is MXFP4 but its module is listed "
                                  "in quantization_config.modules_to_not_convert; the config "
                                  "and the weights disagree: re-download them")
        e, rows, g, _ = i.shape
        out[base] = Decoded("mxfp4", {"blocks": name, "scales": base + "_scales"},
                            (e, g * 32, rows), torch.bfloat16)
    return out


def mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of the MXFP4 decoding (to write gpt-oss-layout test and benchmark sources):
    a logical ``[E, C, R]`` tensor as blocks ``uint8 [E, R, C / 32, 16]`` and E8M0 scales
    ``uint8 [E, R, C / 32]``, each block's scale the smallest power of two that fits its largest
    value in e2m1 (6) and each value rounded to the nearest e2m1 value (ties: the lower code)."""
    t = w.transpose(-2, -1).float()
    e, r, c = t.shape
    if c % 32:
        raise ValueError(f"MXFP4 blocks hold 32 values: {c} is not a multiple of 32")
    blk = t.reshape(e, r, c // 32, 32)
    amax = blk.abs().amax(-1).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = blk / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def source_view(tensors: Mapping[str, TensorInfo], scheme: Scheme | None
                ) -> tuple[dict[str, TensorInfo], dict[str, Decoded]]:
    """Split a source's stored tensors into plain ones and decoded weights (from headers only).

    Returns:
        ``(plain, decoded)``: plain tensors by name, and ``logical name -> Decoded``; every stored
        tensor is in exactly one (as itself or as a part).

    Raises:
        CheckpointError: a tensor that is neither decodable nor plain floating point, or a
            weight whose encoding is incomplete or inconsistent; the message names the tensor.
    """
    if scheme is None:
        check_plain_dtypes(tensors)
        return dict(tensors), {}
    decoded = (_fp8_view(tensors, scheme) if isinstance(scheme, Fp8Block)
               else _mxfp4_view(tensors, scheme) if isinstance(scheme, Mxfp4)
               else _packed_view(tensors, scheme))
    parts = {p for d in decoded.values() for p in d.parts.values()}
    plain = {n: i for n, i in tensors.items() if n not in parts}
    check_plain_dtypes(plain, quantized=True)
    return plain, decoded


def precision(tensors: Mapping[str, TensorInfo], scheme: Scheme | None) -> str:
    """The source precision in words, e.g. ``"bf16"``, ``"fp8-block128 (e4m3, float32 scales)"``,
    ``"int4-g32 (compressed-tensors)"``."""
    if isinstance(scheme, PackedInt):
        return f"int{scheme.bits}-g{scheme.group} (compressed-tensors)"
    if isinstance(scheme, Mxfp4):
        return "mxfp4 (e2m1, e8m0 scales per 32)"
    if isinstance(scheme, Fp8Block):
        bm, bn = scheme.block
        e8 = any(i.dtype == _E8M0 for n, i in tensors.items() if n.endswith("_scale_inv"))
        scales = ("ue8m0 scales" if e8 else "ue8m0 scales as float32"
                  if scheme.scale_fmt == "ue8m0" else "float32 scales")
        return f"fp8-block{bm if bm == bn else f'{bm}x{bn}'} (e4m3, {scales})"
    dts = sorted({_SHORT.get(_dt(i.dtype), _dt(i.dtype)) for i in tensors.values()})
    return "+".join(dts) or "empty"


def decode(d: Decoded, parts: Mapping[str, torch.Tensor], scheme: Scheme | None
           ) -> torch.Tensor:
    """The logical weight from its stored ``parts`` (role -> tensor, as read). The parts may
    hold a range of the first dimension only (some fused experts of a 3-D weight): leading
    dimensions pass through; ``d.shape`` is then checked from its second dimension on.

    Raises:
        CheckpointError: a scale that is not finite, or a ``weight_shape`` that disagrees with
            the header shapes; naming the tensor.
    """
    if d.kind == "fp8":
        assert isinstance(scheme, Fp8Block)
        s = parts["scale"].to(torch.float32)
        if not bool(torch.isfinite(s).all()):
            raise CheckpointError(f"block scale {_show(d.parts['scale'])} holds a non-finite "
                                  "value; the checkpoint is corrupt: re-download it")
        q = parts["weight"].to(torch.float32)
        bm, bn = scheme.block
        rows, cols = q.shape[-2:]
        s = s.repeat_interleave(bm, dim=-2)[..., :rows, :]
        return q.mul_(s.repeat_interleave(bn, dim=-1)[..., :cols])
    if d.kind == "mxfp4":
        blocks, scales = parts["blocks"], parts["scales"]
        if bool((scales == 255).any()):
            raise CheckpointError(f"MXFP4 scales {_show(d.parts['scales'])} hold 0xFF (NaN in "
                                  "E8M0); the checkpoint is corrupt: re-download it")
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        vals = torch.stack((lut[(blocks & 0xF).long()], lut[(blocks >> 4).long()]), dim=-1)
        vals = torch.ldexp(vals.flatten(-2), scales.to(torch.int32).sub_(127).unsqueeze(-1))
        return vals.flatten(-2).to(torch.bfloat16).transpose(-2, -1).contiguous()
    assert isinstance(scheme, PackedInt)
    want = list(d.shape)
    got = [int(v) for v in parts["shape"].tolist()]
    if got != want or list(parts["packed"].shape[1:-1]) != want[1:-1]:
        raise CheckpointError(f"{_show(d.parts['shape'])} is {got} but the packed weight and its "
                              f"scale give {want}; the checkpoint is inconsistent: re-save it")
    packed, scale = parts["packed"], parts["scale"]
    cols = d.shape[-1]
    nib = packed.contiguous().view(torch.uint8)  # little-endian words: value 2k low, 2k+1 high
    vals = torch.stack((nib & 0xF, nib >> 4), dim=-1).flatten(-2)[..., :cols]
    q = vals.to(torch.int8) - 8
    return q.to(scale.dtype) * scale.repeat_interleave(scheme.group, dim=-1)
