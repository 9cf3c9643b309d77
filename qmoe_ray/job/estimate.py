"""``qmoe-ray plan CONFIG``: what a compression job of a model will hold and write, from its
``config.json`` alone (no weights are read).

Parameters are counted from the family's own tensor table (``MoEFamily.expected_shapes``, the
shapes the job checks a source against), so the count is the family's, not a second model of it:
every tensor goes to one kind (``KINDS``; the routed experts are the family's
``source_expert_names``). From the counts:

- the source size, from ``torch_dtype`` (bf16 when absent) or, for a quantized source, from its
  ``quantization_config`` (FP8 128x128 blocks: 1 byte + a float32 scale per block; a
  compressed-tensors group-quantized INT4/INT8: the packed bits + a bf16 scale per group; MXFP4,
  gpt-oss: 4.25 bits per routed-expert weight), applied to the weights the quantization covers;
- the compressed size per scheme: the routed experts at the scheme's bits per parameter, the rest
  as the checkpoint stores it (bf16). Bit-packed schemes (int3/int4/int8) are exact arithmetic:
  the code bits plus a bf16 scale and a uint8 zero per row (or per ``--quant-group-size``
  columns). The entropy-coded schemes (ternary, int2) depend on the weights: the figure is a
  measured bits-per-parameter rate (``CODED_RATES``, with where it was measured);
- multi-token-prediction layers (``num_nextn_predict_layers``: DeepSeek-V3, GLM) are counted
  apart: the job carries them through unchanged, so they stay at bf16 in every scheme's size;
- the job's memory: the Hessians of one expert group (``--group-size`` experts, one
  ``cols x cols`` per matrix input, their sums in ``--hessian-dtype``: float32 by default,
  float64 twice that) and the calibration activations the stores hold (float32
  ``samples x seq_len x hidden``, shared among the stores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from qmoe_ray.data.samples import text_view
from qmoe_ray.errors import InputError
from qmoe_ray.job import grouping
from qmoe_ray.job.config import HESSIAN_DTYPES, SCHEMES, CompressConfig
from qmoe_ray.job.costmodel import GPUS as _GPUS

GPU_KINDS = tuple(_GPUS)

KINDS = ("routed experts", "shared experts", "dense ffn", "attention", "router",
         "embeddings/head", "norms and biases", "other", "mtp layers", "vision tower")

#: Bits per routed-expert parameter of the entropy-coded schemes as written (codes, segment
#: lengths, tables, bf16 row scales), and where each rate was measured (BENCHMARKS.md).
CODED_RATES: dict[str, tuple[float, str]] = {
    "ternary": (0.838, "switch-base-shaped layer, 16 experts of 768x3072, correlated calibration "
                       "with outlier channels, 8192 tokens per expert (BENCHMARKS.md, job); the "
                       "paper reports 0.807 on switch-c-2048"),
    "ternary-sym256": (1.220, "embedded tiny Mixtral, 128x192 experts (BENCHMARKS.md, gguf): "
                              "an upper bound, as for int2"),
    "int2": (1.835, "embedded tiny Mixtral, 128x192 experts (BENCHMARKS.md, job): an upper bound "
                    "at real shapes, where the per-row scales weigh less"),
}
PACKED_BITS = {"int3": 3, "int4": 4, "int8": 8}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


class _SourceNames:
    """A tensor-name lookup for a source with every tensor of the per-expert layout (each tensor
    a ``...weight`` or a bias), as transformers saves it: binds a family without a checkpoint.
    The counts do not depend on the layout (fused tensors hold the same weights); the per-expert
    one gives each expert matrix's own shape. A Switch checkpoint's stacks share
    ``shared.weight`` (transformers ties their ``embed_tokens`` to it and saves it once)."""

    _TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

    def __contains__(self, name: object) -> bool:
        return (isinstance(name, str) and name.endswith(("weight", "bias"))
                and name not in self._TIED)


def _kind(name: str, shape: tuple[int, ...], routed: set[str], routers: set[str]) -> str:
    if name in routed:
        return "routed experts"
    if name in routers:
        return "router"
    low = name.lower()
    if "embed" in low or "lm_head" in low or name == "shared.weight":
        return "embeddings/head"
    if len(shape) < 2 or name.endswith(("bias", "sinks")):  # gpt-oss: [E, F] expert biases
        return "norms and biases"
    if "shared_expert" in low:
        return "shared experts"
    if any(k in low for k in ("attn", "attention")):
        return "attention"
    if any(k in low for k in ("mlp", "densereludense", "ffn", "experts")):
        return "dense ffn"
    return "other"


def count_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters by kind (every one of ``KINDS``), the MoE structure and the routed matrices'
    shapes, from a parsed ``config.json``.

    Raises:
        ValueError: the model type is not supported, or a field is missing or out of bounds.
    """
    from qmoe_ray.models import get_family

    family = get_family(dict(config)).bind(_SourceNames())
    shapes = family.expected_shapes()
    moe = [lay for lay in family.layers() if lay.moe]
    routed = {n for lay in moe for n in family.source_expert_names(lay)}
    routers = set(family.router_names())
    params = dict.fromkeys(KINDS, 0)
    linear = 0  # 2-D weights outside embeddings, norms and routers (what FP8 sources quantize)
    for name, shape in shapes.items():
        kind = _kind(name, shape, routed, routers)
        params[kind] += math.prod(shape)
        if len(shape) >= 2 and kind not in ("embeddings/head", "router"):
            linear += math.prod(shape)
    text = text_view(config)
    mtp = config.get("num_nextn_predict_layers")
    own_head = True
    if not isinstance(mtp, int) and isinstance(text.get("mtp_num_hidden_layers"), int):
        mtp, own_head = text["mtp_num_hidden_layers"], False  # Qwen3-Next / 3.5: shared head
    if isinstance(mtp, int) and mtp > 0 and moe:
        # each multi-token-prediction layer: a copy of an MoE block (Qwen: of the last, a full
        # attention block), its own embeddings and head (DeepSeek, GLM), the projection of
        # [embedding; hidden] (2d -> d) and its norms; the job carries it through unchanged
        # (bf16, its experts not quantized)
        d = _hidden_size(config, 0)
        block = sum(math.prod(v) for k, v in shapes.items() if k.startswith(moe[-1].name + "."))
        per = block + params["embeddings/head"] * own_head + 2 * d * d + 3 * d
        params["mtp layers"] = mtp * per
        linear += mtp * per
    params["vision tower"] = vision_params(config)
    linear += params["vision tower"]
    # (rows, cols) of each matrix of one routed expert
    matrices = list(grouping.source_matrices(family, moe[0], shapes)) if moe else []
    return {
        "model_type": family.model_type,
        "params": params,
        "total": sum(params.values()),
        "linear": linear,
        "moe_layers": len(moe),
        "blocks": len(family.layers()),
        "experts_per_layer": sorted({lay.num_experts for lay in moe}),
        "top_k": sorted({lay.top_k for lay in moe}),
        "expert_matrices": matrices,
        "expert_layout": family.expert_layout,
    }


def source_bytes(config: Mapping[str, Any], counts: Mapping[str, Any]) -> tuple[int, str]:
    """The source's size in bytes and its precision in words.

    Raises:
        InputError: a ``quantization_config`` this estimate does not know (named).
    """
    q = config.get("quantization_config") or config.get("compression_config")
    total, linear = counts["total"], counts["linear"]
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    width = _DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)
    if not q:
        return total * width, dtype
    method = q.get("quant_method")
    if method == "fp8":
        br, bc = (q.get("weight_block_size") or [128, 128])[:2]
        scales = linear / (br * bc)  # approximately: edge blocks round up
        return int(linear + 4 * scales + (total - linear) * 2), f"fp8 e4m3, {br}x{bc} blocks"
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        w = next((g.get("weights") or {} for g in groups.values()), {})
        bits, size = w.get("num_bits"), w.get("group_size")
        if not isinstance(bits, int) or not isinstance(size, int) or size <= 0:
            raise InputError("quantization_config.config_groups: no weights num_bits and "
                             "group_size to size the source from")
        routed = counts["params"]["routed experts"]
        quantized = routed * (bits / 8 + 2 / size)
        return int(quantized + (total - routed) * 2), f"int{bits} group {size} (compressed-tensors)"
    if method == "mxfp4":  # gpt-oss: the routed expert matrices, 4 bits + an E8M0 per 32
        routed = counts["params"]["routed experts"]
        return int(routed * 4.25 / 8 + (total - routed) * 2), "mxfp4 (e2m1, e8m0 scales per 32)"
    raise InputError(f"quantization_config.quant_method {method!r}: plan sizes sources of "
                     "quant_method fp8, compressed-tensors or mxfp4 (or unquantized ones)")


def expert_bits(scheme: str, rows: int, cols: int, quant_group: int | None) -> float:
    """Bits per routed-expert parameter of ``scheme`` for a ``rows x cols`` matrix."""
    if scheme in CODED_RATES:
        return CODED_RATES[scheme][0]
    groups = math.ceil(cols / quant_group) if quant_group else 1
    return PACKED_BITS[scheme] + groups * (16 + 8) / cols  # bf16 scale + uint8 zero per group


def estimate(config: Mapping[str, Any], *, group_size: int, num_samples: int, seq_len: int,
             num_stores: int = 1, quant_group_size: int | None = None,
             hessian_dtype: str = CompressConfig.hessian_dtype) -> dict[str, Any]:
    """The ``qmoe-ray plan`` figures for a parsed ``config.json`` (see the module docstring).

    Raises:
        InputError: an unknown ``hessian_dtype`` (the known ones named).
    """
    if hessian_dtype not in HESSIAN_DTYPES:
        raise InputError(f"--hessian-dtype {hessian_dtype!r}: expected one of "
                         f"{', '.join(HESSIAN_DTYPES)}")
    counts = count_parameters(config)
    src, precision = source_bytes(config, counts)
    routed = counts["params"]["routed experts"]
    rest = counts["total"] - routed
    mats = counts["expert_matrices"]
    per_expert = sum(r * c for r, c in mats) or 1
    schemes = {}
    for scheme in SCHEMES:
        bits = sum(expert_bits(scheme, r, c, quant_group_size) * r * c
                   for r, c in mats) / per_expert if mats else 0.0
        size = routed * bits / 8 + rest * 2
        schemes[scheme] = {"expert_bits_per_param": round(bits, 4), "bytes": int(size),
                           "vs_source": round(src / size, 2) if size else None,
                           "basis": CODED_RATES[scheme][1] if scheme in CODED_RATES
                           else "exact: packed code bits + bf16 scale + uint8 zero per group"}
    hidden = max((c for _, c in mats), default=0)
    # one Hessian's sums per distinct input of an expert (the input matrices share theirs)
    hessian = group_size * sum(c * c for c in {c for _, c in mats}) * _DTYPE_BYTES[hessian_dtype]
    acts = num_samples * seq_len * _hidden_size(config, hidden) * 4
    return {
        **counts,
        "hidden_size": _hidden_size(config, hidden),
        "expert_share": round(routed / counts["total"], 4) if counts["total"] else 0.0,
        "source_bytes": src,
        "source_precision": precision,
        "schemes": schemes,
        "hessian_bytes_per_group": hessian,
        "hessian_dtype": hessian_dtype,
        "group_size": group_size,
        "activation_bytes": acts,
        "activation_bytes_per_store": math.ceil(acts / max(num_stores, 1)),
        "calibration": {"samples": num_samples, "seq_len": seq_len, "stores": num_stores},
    }


def vision_params(config: Mapping[str, Any]) -> int:
    """Parameters of a multimodal wrapper's vision tower (``vision_config``, the Qwen3-VL /
    Qwen3.5 ViT: a Conv3d patch embedding, learned positions, ``depth`` pre-norm blocks with
    biases, a 2x2 patch merger into the text width), 0 without one. Carried through unchanged by
    the job, so bf16 in every scheme's size."""
    v = config.get("vision_config")
    if not isinstance(v, Mapping) or not isinstance(v.get("hidden_size"), int):
        return 0
    h, i = int(v["hidden_size"]), int(v.get("intermediate_size") or 4 * v["hidden_size"])
    p, t = int(v.get("patch_size") or 16), int(v.get("temporal_patch_size") or 2)
    m = int(v.get("spatial_merge_size") or 2) ** 2 * h
    out = int(v.get("out_hidden_size") or _hidden_size(config, h))
    block = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h  # qkv+proj, fc1+fc2, 2 layer norms
    return (int(v.get("depth") or 0) * block + (int(v.get("in_channels") or 3) * t * p * p + 1) * h
            + int(v.get("num_position_embeddings") or 0) * h + 2 * h + m * m + m + m * out + out)


def _hidden_size(config: Mapping[str, Any], fallback: int) -> int:
    d = grouping.hidden_size(config)
    return fallback if d is None else d


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def format_text(p: Mapping[str, Any]) -> str:
    """``estimate``'s figures as the text ``qmoe-ray plan`` prints."""
    lines = [f"{p['model_type']}: {p['total'] / 1e9:,.3f}B parameters, {p['blocks']} blocks, "
             f"{p['moe_layers']} MoE layers x {'/'.join(map(str, p['experts_per_layer']))} "
             f"experts (top-{'/'.join(map(str, p['top_k']))}); routed experts "
             f"{100 * p['expert_share']:.1f}% of the parameters",
             "", "| kind | parameters | share |", "|---|---|---|"]
    for kind, n in p["params"].items():
        if n:
            lines.append(f"| {kind} | {n:,} | {100 * n / p['total']:.2f}% |")
    lines += ["", f"source: {_gb(p['source_bytes'])} ({p['source_precision']})", "",
              "| scheme | expert bits/param | compressed | vs source | basis |",
              "|---|---|---|---|---|"]
    for scheme, s in p["schemes"].items():
        lines.append(f"| {scheme} | {s['expert_bits_per_param']:.3f} | {_gb(s['bytes'])} | "
                     f"{s['vs_source']}x | {s['basis']} |")
    c = p["calibration"]
    lines += ["", f"Hessians of one group of {p['group_size']} experts "
              f"({p.get('hessian_dtype', 'float64')} sums): "
              f"{_gb(p['hessian_bytes_per_group'])}",
              f"calibration activations ({c['samples']} x {c['seq_len']} tokens, float32): "
              f"{_gb(p['activation_bytes'])} in all, {_gb(p['activation_bytes_per_store'])} per "
              f"store ({c['stores']} stores)"]
    if p.get("auto_group_size"):
        lines.append(_auto_text(p["auto_group_size"]))
    return "\n".join(lines)


def read_config(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` at ``url`` (the file, or a folder holding it), parsed.

    Raises:
        InputError: nothing there, or not a JSON object.
    """
    from qmoe_ray.storage.fs import join, read_small, url_to_fs

    opts = dict(storage_options or {})
    fs, path = url_to_fs(url, **opts)
    if fs.isdir(path):
        url, path = join(url, "config.json"), join(path, "config.json")
    if not fs.isfile(path):
        raise InputError(f"CONFIG {url}: no such file (give a config.json or a folder with one)")
    raw = read_small(fs, path, 16 * 2**20, url, url=url, storage_options=opts)
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"CONFIG {url}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"CONFIG {url}: expected a JSON object, got {type(config).__name__}")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``qmoe-ray plan`` options (defaults: the job's, ``CompressConfig``)."""
    from qmoe_ray.cli import add_storage_options

    d = {f.name: f.default for f in dataclasses.fields(CompressConfig)}
    parser.add_argument("config", metavar="CONFIG", help="a config.json (path or URL) or a "
                        "folder holding one")
    parser.add_argument("--group-size", type=_group_arg, default=d["group_size"],
                        help="experts quantized together by one worker call, or auto: show the "
                             "size the job would choose per layer for --worker-memory")
    parser.add_argument("--calib-samples", type=int, default=d["num_samples"],
                        help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per sample")
    parser.add_argument("--num-stores", type=int, default=d["num_stores"],
                        help="activation store actors")
    parser.add_argument("--quant-group-size", type=int, default=d["quant_group_size"],
                        help="int schemes: input columns per scale group (default: per row)")
    parser.add_argument("--hessian-dtype", choices=HESSIAN_DTYPES, default=d["hessian_dtype"],
                        help="dtype of the Hessians' running sums, as the job's option")
    parser.add_argument("--eval-samples", type=int, default=d["eval_samples"],
                        help="held-out samples (they pass through every layer too)")
    parser.add_argument("--workers", type=int, default=None,
                        help="quantization workers: predict the job's wall time, GPU-hours and "
                             "memory on this many (the cost model, qmoe_ray.job.costmodel)")
    parser.add_argument("--gpu", choices=[*GPU_KINDS, "none"], default=None,
                        help="one GPU per worker of this kind, or none (CPU workers); GPU "
                             "rates are assumptions from published peaks (default: none)")
    parser.add_argument("--worker-memory-gb", type=float, default=None,
                        help="memory per worker in GB (default: the GPU's; CPU workers: 64)")
    parser.add_argument("--worker-memory", type=float, default=None, metavar="GIB",
                        help="memory per worker in GiB, as the job's option: --group-size auto "
                             "sizes the groups to it (default: --worker-memory-gb, the GPU's, "
                             "else this machine's available memory over --workers)")
    parser.add_argument("--max-hours", type=float, default=72.0,
                        help="the cheapest cluster shape searched must finish within this")
    parser.add_argument("--scheme", choices=SCHEMES, default=d["scheme"],
                        help="the scheme whose output size the cost model writes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_storage_options(parser, "CONFIG")


def _group_arg(value: str) -> int | str:
    return int(value) if value.strip().lstrip("-").isdigit() else value


def auto_groups(config: Mapping[str, Any], *, tokens: int, hessian_dtype: str, budget: float,
                where: str, workers: int) -> dict[str, Any]:
    """The group size ``--group-size auto`` would choose for each MoE layer of ``config`` with
    ``budget`` bytes per worker (``qmoe_ray.job.grouping``, as the job chooses them).

    Raises:
        InputError: a layer where one expert does not fit (what it needs named).
    """
    from qmoe_ray.job.costmodel import load_constants
    from qmoe_ray.models import get_family

    family = get_family(dict(config)).bind(_SourceNames())
    shapes = grouping.shapes_of(family, family.layers(), config, tokens, hessian_dtype)
    base = load_constants().worker_base_bytes
    sizes = grouping.choose(shapes, budget, base, workers, where, "--calib-samples")
    return {"budget_gib": budget / grouping.GIB, "budget_from": where, "margin": grouping.MARGIN,
            "tokens": tokens, "layers": grouping.summary(shapes, sizes, base)}


def _auto_budget(args: argparse.Namespace) -> tuple[float, str]:
    if args.worker_memory is not None:
        return args.worker_memory * grouping.GIB, f"--worker-memory {args.worker_memory:g}"
    if args.worker_memory_gb is not None:
        return args.worker_memory_gb * 1e9, f"--worker-memory-gb {args.worker_memory_gb:g}"
    if args.gpu not in (None, "none"):
        return _GPUS[args.gpu]["memory_gb"] * 1e9, f"--gpu {args.gpu}'s memory"
    return grouping.local_budget(args.workers or 1)


def _auto_text(a: Mapping[str, Any]) -> str:
    by: dict[tuple[int, float], list[str]] = {}
    for name, r in a["layers"].items():
        by.setdefault((r["group_size"], r["predicted_worker_gib"]), []).append(name)
    parts = [f"groups of {g} ({len(n)} layer{'s' * (len(n) > 1)}: {n[0]}"
             f"{' ...' if len(n) > 1 else ''}; predicted worker peak {gib:.2f} GiB)"
             for (g, gib), n in by.items()]
    return (f"--group-size auto for {a['budget_gib']:.2f} GiB per worker ({a['budget_from']}; "
            f"predicted peak + {a['margin']:.0%} must fit, {a['tokens']} tokens): "
            + "; ".join(parts))


def main(args: argparse.Namespace) -> int:
    """Run ``qmoe-ray plan``."""
    from qmoe_ray.cli import storage_options

    if args.group_size != "auto" and not isinstance(args.group_size, int):
        raise InputError(f"--group-size {args.group_size}: expected a positive integer or auto")
    if args.worker_memory is not None and args.worker_memory_gb is not None:
        raise InputError("--worker-memory and --worker-memory-gb: give one (GiB or GB)")
    for flag, value in (("--group-size", 1 if args.group_size == "auto" else args.group_size),
                        ("--calib-samples", args.calib_samples),
                        ("--seq-len", args.seq_len), ("--num-stores", args.num_stores),
                        ("--workers", 1 if args.workers is None else args.workers)):
        if value < 1:
            raise InputError(f"{flag} {value}: expected a positive integer")
    if args.eval_samples < 0:
        raise InputError(f"--eval-samples {args.eval_samples}: expected 0 or more")
    for flag, v in (("--max-hours", args.max_hours), ("--worker-memory-gb",
                                                       args.worker_memory_gb),
                    ("--worker-memory", args.worker_memory)):
        if v is not None and not v > 0:
            raise InputError(f"{flag} {v}: expected a positive number")
    if args.quant_group_size is not None and args.quant_group_size < 1:
        raise InputError(f"--quant-group-size {args.quant_group_size}: expected a positive "
                         "integer (or leave it out: one scale per row)")
    config = read_config(args.config, storage_options(args))
    auto = None
    try:
        if args.group_size == "auto":
            budget = _auto_budget(args)
            auto = auto_groups(config, tokens=(args.calib_samples + args.eval_samples)
                               * args.seq_len, hessian_dtype=args.hessian_dtype,
                               budget=budget[0], where=budget[1], workers=args.workers or 1)
            args.worker_memory_gb = budget[0] / 1e9  # the cost model sizes its search by it
            args.group_size = min(r["group_size"] for r in auto["layers"].values())
        p = estimate(config, group_size=args.group_size, num_samples=args.calib_samples,
                     seq_len=args.seq_len, num_stores=args.num_stores,
                     quant_group_size=args.quant_group_size,
                     hessian_dtype=args.hessian_dtype)
    except InputError:
        raise
    except ValueError as exc:  # get_family: an unsupported model type (the supported named)
        raise InputError(f"CONFIG {args.config}: {exc}") from None
    if auto is not None:
        p["auto_group_size"] = auto
    if args.workers is not None or args.gpu is not None:
        from qmoe_ray.job.costmodel import cluster_plan, format_cost

        gpu = None if args.gpu in (None, "none") else args.gpu
        p["cost"] = cluster_plan(p, workers=args.workers or 1, gpu=gpu,
                                 eval_samples=args.eval_samples, scheme=args.scheme,
                                 memory_gb=args.worker_memory_gb, max_hours=args.max_hours)
        if not args.json:
            print(format_text(p) + "\n\n" + format_cost(p["cost"]))
            return 0
    print(json.dumps(p, indent=1) if args.json else format_text(p))
    return 0
