"""``qmoe-ray inspect URL``: what is inside a compressed checkpoint.

Reports the model family and shape, the quantization scheme and options, sizes by tensor kind,
bits per parameter (experts and whole model) and the ratio to bf16, the experts that fell back to
round-to-nearest and why, calibration token coverage per MoE layer, and the checksum status.

Why it recomputes sizes from the manifest's tensor list instead of quoting the job's report: the
tensor list is what a reader actually gets (and what the checksums cover), so the figures hold
for a checkpoint whose report was lost or written by another version. The accounting is the
job report's own (``qmoe_ray.format.sizes``). Checksums are verified by streaming every shard
through ``qmoe_ray.format.shards.iter_shards`` (``verify=False`` skips the download and reports
``"not checked"``). Named ``inspect_cmd`` so it never shadows the standard library's
``inspect``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping
from typing import Any

from qmoe_ray.data.samples import text_view
from qmoe_ray.format.sizes import by_kind, size_summary
from qmoe_ray.storage.fs import redact


def summarize(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Everything ``inspect`` reports that the manifest alone tells (no shard is read).

    Returns:
        A JSON-able dict: ``model``, ``options``, ``sizes`` (per kind and totals),
        ``bits_per_param``, ``fallbacks``, ``coverage``.
    """
    from qmoe_ray.format.trimmed import bind_stored, manifest_family, trim_summary

    cfg = manifest["config"]
    family = manifest_family(manifest)  # a trimmed checkpoint: the kept blocks and experts
    bind_stored(family, set(manifest["tensors"]) | set(manifest["quantized"]))
    layers = family.layers()
    moe = [lay for lay in layers if lay.moe]
    quantized = manifest["quantized"]
    kinds = by_kind(manifest["tensors"], quantized, manifest.get("tables", {}))
    sz = size_summary(manifest["tensors"], quantized, kinds=kinds)
    expert_params, total_params = sz["expert_params"], sz["total_params"]
    expert_bytes, total_bytes = sz["expert_stored_bytes"], sz["total_bytes"]
    schemes = sorted({e["scheme"] for e in quantized.values()})
    mix = _mix(quantized)
    fallbacks, coverage = _experts(manifest)
    from qmoe_ray.read.export_ct import export_formats

    return {
        "model": {
            "model_type": family.model_type,
            "architectures": cfg.get("architectures"),
            "layers": len(layers),
            "moe_layers": len(moe),
            "experts_per_layer": sorted({lay.num_experts for lay in moe}),
            "top_k": sorted({lay.top_k for lay in moe}),
            "source": manifest.get("source"),
            "source_precision": manifest.get("source_precision"),
        },
        "format": {"name": manifest.get("format"), "version": manifest.get("format_version"),
                   "created_by": manifest.get("created_by")},
        "scheme": schemes[0] if len(schemes) == 1 else schemes,
        "mix": mix,
        "options": manifest.get("options", {}),
        "sizes": {
            "by_kind": {k: v for k, v in kinds.items() if v["tensors"]},
            "files": len(manifest["files"]),
            "tensors": len(manifest["tensors"]),
            "expert_params": expert_params,
            "dense_params": sz["dense_params"],
            "total_params": total_params,
            "expert_bytes": expert_bytes,
            "dense_bytes": sz["dense_bytes"],
            "total_bytes": total_bytes,
            "bf16_bytes": sz["bf16_bytes"],
        },
        "bits_per_param": {
            "experts": 8 * expert_bytes / max(expert_params, 1),
            "expert_codes_only": 8 * kinds["expert codes"]["bytes"] / max(expert_params, 1),
            "whole_model": 8 * total_bytes / max(total_params, 1),
            "experts_ratio_vs_bf16": 16 * expert_params / max(8 * expert_bytes, 1),
            "whole_ratio_vs_bf16": 16 * total_params / max(8 * total_bytes, 1),
        },
        "heldout_loss": manifest.get("heldout_loss"),
        "pruning": _pruning(manifest),
        "trim": trim_summary(manifest["trim"]) if manifest.get("trim") else None,
        "export_formats": _trimmed_formats(family, cfg, export_formats(manifest)),
        "fallbacks": fallbacks,
        "coverage": coverage,
        "mtp": mtp_summary(family, manifest),
    }


def _trimmed_formats(family: Any, config: Mapping[str, Any],
                     formats: dict[str, str | None]) -> dict[str, str | None]:
    """``export_formats`` of a trimmed checkpoint: hf when transformers can express the trim
    (``qmoe_ray.read.export_trim``), else the reason; compressed-tensors not yet."""
    from qmoe_ray.errors import InputError
    from qmoe_ray.models.trim import TrimmedFamily
    from qmoe_ray.read.export_trim import trim_export

    if not isinstance(family, TrimmedFamily):
        return formats
    out = dict.fromkeys(formats, "a trimmed checkpoint: not supported yet")
    try:
        trim_export(family, config)
        out["hf"] = None
    except InputError as exc:
        out["hf"] = str(exc).split("refused: ", 1)[-1]
    return out


def mtp_summary(family: Any, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The multi-token-prediction layers: how many the config declares, what the job did with
    them (``"carried"``: unchanged, bf16, unquantized; ``"dropped"``: ``--drop-mtp``;
    ``"none"``), and the tensors and bytes they hold in this checkpoint."""
    names = family.mtp_names(list(manifest["tensors"]))
    cfg = text_view(manifest["config"])  # Qwen3-Next / 3.5: mtp_num_hidden_layers
    declared = cfg.get("num_nextn_predict_layers", cfg.get("mtp_num_hidden_layers"))
    declared = declared if isinstance(declared, int) and declared > 0 else 0
    if names:
        policy = "carried"
    else:
        policy = "dropped" if declared and manifest.get("options", {}).get("drop_mtp") else "none"
    nbytes = sum(int(manifest["tensors"][n].get("nbytes", 0)) for n in names)
    return {"layers": declared, "policy": policy, "tensors": len(names), "bytes": nbytes}


def _pruning(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pruning asked (method, sparsity or N:M pattern) and the sparsity each quantized
    matrix achieved (``sparsity`` of its manifest entry): mean, min, max, per role; None when
    the checkpoint was not pruned."""
    opts = manifest.get("options", {})
    got = [(e.get("role"), e["sparsity"]) for e in manifest["quantized"].values()
           if e.get("sparsity") is not None]
    if not opts.get("prune") and not got:
        return None
    vals = [v for _, v in got]
    roles: dict[str, list[float]] = {}
    for r, v in got:
        roles.setdefault(str(r), []).append(v)
    return {"method": opts.get("prune"), "sparsity": opts.get("sparsity"),
            "pattern": opts.get("prune_pattern"), "matrices": len(vals),
            "mean": statistics.fmean(vals) if vals else None,
            "min": min(vals, default=None), "max": max(vals, default=None),
            "by_role": {r: statistics.fmean(v) for r, v in sorted(roles.items())}}


def _experts(manifest: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fallbacks and per-layer token coverage from the manifest's per-expert statistics."""
    items: list[dict[str, Any]] = []
    coverage = []
    experts = manifest.get("experts") or {}
    pairs = experts.items() if isinstance(experts, Mapping) else experts
    for file, stats in pairs:
        routed = [int(s.get("routed_tokens", 0)) for s in stats]
        hess = [int(s.get("hessian_tokens", 0)) for s in stats]
        for s in stats:
            if s.get("fallback"):
                reasons = sorted(set(s["fallback"].values()))
                items.append({"file": file, "expert": s.get("expert"),
                              "matrices": sorted(s["fallback"]), "reasons": reasons})
        coverage.append({
            "file": file,
            "experts": len(stats),
            "with_tokens": sum(r > 0 for r in routed),
            "routed_min": min(routed, default=0),
            "routed_median": statistics.median(routed) if routed else 0,
            "routed_max": max(routed, default=0),
            "hessian_tokens": sum(hess),
        })
    reasons: dict[str, int] = {}
    for it in items:
        for r in it["reasons"]:
            reasons[r] = reasons.get(r, 0) + 1
    total = sum(c["experts"] for c in coverage)
    return {"experts": len(items), "of": total, "by_reason": reasons, "list": items}, coverage


def inspect(url: str, verify: bool = True, progress: bool = False,
            **storage_options: Any) -> dict[str, Any]:
    """What is inside the compressed checkpoint at ``url``.

    Args:
        url: the checkpoint folder (any fsspec URL).
        verify: stream every shard and verify every checksum (else ``"not checked"``).
        progress: show a progress bar of the verification on stderr.
        **storage_options: fsspec options.

    Returns:
        ``summarize(manifest)`` plus ``url`` and ``checksums``: ``{"status": "ok" | "failed" |
        "not checked", "files", "tensors", "bytes", "error"}``.

    Raises:
        FileNotFoundError / PermissionError: no readable manifest.
        CheckpointError: a manifest that is malformed, too large, of an unknown format version or
            inconsistent with its config (``qmoe_ray.format.manifest.read_manifest``; nothing is reported
            from a manifest that fails these checks). A shard that fails verification is reported
            in ``checksums``, not raised.
    """
    from qmoe_ray.format.manifest import read_manifest
    from qmoe_ray.format.shards import Timings, iter_shards
    from qmoe_ray.read.export_ct import ternary_rows_refused

    manifest = read_manifest(url, **storage_options)  # checked once: check_manifest
    info = {"url": redact(url), **summarize(manifest)}
    status: dict[str, Any] = {"status": "not checked", "files": 0, "tensors": 0, "bytes": 0}
    formats = info["export_formats"]
    ternary = formats["compressed-tensors"] == "ternary rows: not checked"
    refused = rows = 0
    if verify:
        t = Timings()
        try:
            for _, part in iter_shards(url, manifest, timings=t,
                                       progress="verifying" if progress else False,
                                       checked=True, **storage_options):
                status["files"] += 1
                status["tensors"] += len(part)
                for n in manifest["quantized"] if ternary else ():
                    if f"{n}.lo" in part:
                        refused += ternary_rows_refused(part[f"{n}.lo"], part[f"{n}.hi"])
                        rows += part[f"{n}.lo"].shape[0]
            status["status"] = "ok"
            if ternary:
                why = (f"{refused} of {rows} ternary rows are not an evenly spaced 2-bit grid"
                       if refused else None)
                formats["compressed-tensors"] = formats["compressed-tensors --symmetric"] = why
        except (ValueError, FileNotFoundError, PermissionError) as exc:
            status.update(status="failed", error=str(exc))
        status["bytes"] = t.bytes
    info["checksums"] = status
    return info


def _mix(quantized: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per candidate setting (``setting`` of a ``--target-bits`` job's entries, else the
    scheme): how many expert matrices use it, their parameters, and their bits per parameter
    (codes and scales; the shared tables are not split among matrices)."""
    out: dict[str, dict[str, Any]] = {}
    for e in quantized.values():
        m = out.setdefault(e.get("setting", e["scheme"]),
                           {"scheme": e["scheme"], "matrices": 0, "params": 0, "bytes": 0})
        m["matrices"] += 1
        m["params"] += int(e["shape"][0]) * int(e["shape"][1])
        m["bytes"] += int(e["code_bytes"]) + int(e["scale_bytes"])
    for m in out.values():
        m["bits_per_param"] = 8 * m["bytes"] / max(m["params"], 1)
    return dict(sorted(out.items(), key=lambda kv: kv[1]["bits_per_param"]))


def _mib(b: float) -> str:
    return f"{b / 2**20:,.2f} MiB"


def format_text(info: Mapping[str, Any]) -> str:
    """A human-readable report of ``inspect``'s result."""
    m, s, b = info["model"], info["sizes"], info["bits_per_param"]
    opts = info.get("options", {})
    lines = [
        f"{info['url']}: {m['model_type']} ({', '.join(m['architectures'] or [])}), "
        f"{m['layers']} layers, {m['moe_layers']} MoE x {m['experts_per_layer']} experts "
        f"(top-{m['top_k']})",
        f"format {info['format']['name']} v{info['format']['version']} "
        f"({info['format']['created_by']}); scheme {info['scheme']}, method "
        f"{opts.get('method', '?')}, source {m['source']}"
        + (f" ({m['source_precision']})" if m.get("source_precision") else ""),
        "",
        f"{'kind':<26}{'tensors':>8}{'params':>14}{'size':>16}",
    ]
    for kind, v in s["by_kind"].items():
        params = f"{v['params']:,}" if v["params"] else ""
        lines.append(f"{kind:<26}{v['tensors']:>8}{params:>14}{_mib(v['bytes']):>16}")
    lines += [
        f"{'total':<26}{s['tensors']:>8}{s['total_params']:>14,}{_mib(s['total_bytes']):>16}",
        "",
        f"bits/param: experts {b['experts']:.3f} (codes only {b['expert_codes_only']:.3f}), "
        f"whole model {b['whole_model']:.3f}",
        f"vs bf16: experts {b['experts_ratio_vs_bf16']:.2f}x, whole model "
        f"{b['whole_ratio_vs_bf16']:.2f}x ({_mib(s['bf16_bytes'])} -> {_mib(s['total_bytes'])})",
    ]
    if info.get("heldout_loss") is not None:
        lines.append(f"held-out loss reported by the job: {info['heldout_loss']:.4f}")
    mix = info.get("mix") or {}
    if len(mix) > 1 or opts.get("target_bits") is not None:
        head = (f"size budget --target-bits {opts['target_bits']:g}; "
                if opts.get("target_bits") is not None else "")
        lines.append(f"{head}expert matrices per setting (bits/param of codes and scales):")
        for k, m in mix.items():
            lines.append(f"  {k:<16}{m['matrices']:>6} matrices {m['params']:>14,} params "
                         f"{m['bits_per_param']:>8.3f} bits/param")
    mtp = info.get("mtp") or {}
    if mtp.get("policy") == "carried":
        lines.append(f"multi-token-prediction layers: {mtp['layers']}, carried through unchanged "
                     f"({mtp['tensors']} tensors, {_mib(mtp['bytes'])}, bf16, unquantized; "
                     "compress with --drop-mtp to leave them out)")
    elif mtp.get("policy") == "dropped":
        lines.append(f"multi-token-prediction layers: {mtp['layers']}, dropped (--drop-mtp)")
    pr = info.get("pruning")
    if pr:
        asked = (f"{pr['pattern']} (N:M)" if pr["pattern"] else
                 f"{pr['sparsity']:.0%} unstructured" if pr["sparsity"] is not None else "?")
        lines.append(f"pruning: {pr['method']}, {asked}; achieved sparsity of {pr['matrices']} "
                     "expert matrices: " + (f"mean {pr['mean']:.4f} (min {pr['min']:.4f}, max "
                     f"{pr['max']:.4f}); by role " + ", ".join(
                         f"{r} {v:.4f}" for r, v in pr["by_role"].items())
                     if pr["matrices"] else "not recorded"))
    if info.get("trim"):
        from qmoe_ray.format.trimmed import trim_line

        lines.append(f"trimmed: {trim_line(info['trim'])}")
        for name, kept in info["trim"]["kept_experts"].items():
            lines.append(f"  {name}: kept experts {kept}")
    lines.append("")
    lines.append("lossless export formats (qmoe-ray export --format):")
    for fmt, why in info.get("export_formats", {}).items():
        lines.append(f"  {fmt}: " + ("yes" if why is None else f"no ({why})"))
    fb = info["fallbacks"]
    lines += ["", f"fallbacks to round-to-nearest: {fb['experts']} of {fb['of']} experts "
                  f"{fb['by_reason'] or ''}".rstrip()]
    for it in fb["list"][:20]:
        lines.append(f"  {it['file']} expert {it['expert']}: {', '.join(it['reasons'])} "
                     f"({', '.join(it['matrices'])})")
    if len(fb["list"]) > 20:
        lines.append(f"  ... {len(fb['list']) - 20} more (see --json)")
    lines += ["", "token coverage (calibration tokens routed per expert):"]
    for c in info["coverage"]:
        lines.append(f"  {c['file']}: {c['with_tokens']}/{c['experts']} experts with tokens, "
                     f"min {c['routed_min']}, median {c['routed_median']}, max {c['routed_max']}")
    cs = info["checksums"]
    lines.append("")
    if cs["status"] == "ok":
        lines.append(f"checksums: ok ({cs['tensors']} tensors in {cs['files']} files, "
                     f"{_mib(cs['bytes'])} read)")
    elif cs["status"] == "failed":
        lines.append(f"checksums: FAILED: {cs['error']}")
    else:
        lines.append("checksums: not checked (--no-verify)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``qmoe-ray inspect`` options."""
    from qmoe_ray.cli import add_storage_options

    parser.add_argument("url", help="compressed checkpoint folder or URL")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not read the shards to verify their checksums")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_storage_options(parser, "the checkpoint")


def main(args: argparse.Namespace) -> int:
    """Run ``qmoe-ray inspect``; exit status 0, 1 when a checksum fails. Bad input (a bad
    checkpoint: ``CheckpointError``) is raised, and ``qmoe_ray.cli.run`` shows it as one line
    with exit status 2."""
    from qmoe_ray.cli import storage_options

    opts = storage_options(args)
    info = inspect(args.url, verify=not args.no_verify, progress=not args.quiet, **opts)
    print(json.dumps(info, indent=1) if args.json else format_text(info))
    return 1 if info["checksums"]["status"] == "failed" else 0
