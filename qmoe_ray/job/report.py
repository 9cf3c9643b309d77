"""The job's report (pure: no I/O). Its sizes are the format's one size accounting,
``qmoe_ray.format.sizes.size_summary`` (the one ``qmoe-ray inspect`` reports too): counted from
the bytes actually written, bits per parameter for the experts alone and for the whole model,
beside the bf16 size, as the paper reports them.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qmoe_ray.format.sizes import size_summary

__all__ = ["order0_entropy_bits", "size_summary", "source_sizes", "layer_rows", "to_markdown",
           "plot_png"]


def source_sizes(stored: Mapping[str, Any], decoded: Mapping[str, Any], expert_names: Sequence[str],
                 sizes: Mapping[str, Any]) -> dict[str, Any]:
    """The output against the source *as stored* (an MXFP4 or FP8 source is not bf16): the
    source's bytes, its routed experts' bytes (a decoded expert: the bytes of its stored parts,
    blocks and scales), and the ratios of the compressed sizes to them.

    Args:
        stored: the source's stored tensors (``TensorInfo`` by name, encodings included).
        decoded: its decoded weights (``qmoe_ray.storage.quantized.source_view``'s second half).
        expert_names: the family's source expert tensors (logical names).
        sizes: ``size_summary`` of the output.
    """
    def nbytes(name: str) -> int:
        if name in decoded:
            return sum(stored[p].end - stored[p].start for p in decoded[name].parts.values())
        return stored[name].end - stored[name].start

    total = sum(i.end - i.start for i in stored.values())
    experts = sum(nbytes(n) for n in set(expert_names))
    out_experts, out_total = sizes["expert_stored_bytes"], sizes["total_bytes"]
    return {"bytes": total, "expert_bytes": experts,
            "expert_bits_per_param": 8 * experts / sizes["expert_params"]
            if sizes["expert_params"] else math.nan,
            "expert_ratio": experts / out_experts if out_experts else math.nan,
            "ratio": total / out_total if out_total else math.nan}


def order0_entropy_bits(counts: Sequence[int]) -> float:
    """Total order-0 entropy (bits) of a symbol stream with these symbol counts."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n == 0:
        return 0.0
    p = c[c > 0] / n
    return float(-(c[c > 0] * np.log2(p)).sum())


def _groups(report: Mapping[str, Any]) -> str:
    g = report.get("grouping")
    if not g or report["options"]["group_size"] != "auto":
        return str(report["options"]["group_size"])
    sizes = ", ".join(str(r["group_size"]) for r in g["layers"].values())
    if g["budget_gib"] is None:
        return f"auto ({sizes} per MoE layer, as the job resumed chose them)"
    return (f"auto ({sizes} per MoE layer, sized to {g['budget_gib']:g} GiB per worker with a "
            f"{g['margin']:.0%} margin: {g['budget_from']}"
            f"{'; as the job resumed chose them' if g['recorded'] else ''})")


def layer_rows(layers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer figures for the report: proxy loss, fallbacks, token coverage, bits."""
    rows = []
    for res in layers:
        if not res["quantized"]:
            continue  # a dense block: nothing quantized
        stats = res["stats"]
        routed = np.asarray(res["routed"], dtype=np.int64)
        q = res["quantized"]
        params = sum(int(np.prod(e["shape"])) for e in q.values())
        nbytes = sum(int(e["code_bytes"]) + int(e["scale_bytes"]) for e in q.values())
        rows.append(
            {
                "file": res["file"],
                "experts": len(stats),
                "tokens_routed": int(routed.sum()),
                "experts_without_tokens": int((routed == 0).sum()),
                "token_share_min": float(routed.min() / max(routed.sum(), 1)),
                "token_share_max": float(routed.max() / max(routed.sum(), 1)),
                "fallbacks": sum(1 for s in stats if s["fallback"]),
                "proxy_loss": float(sum(sum(s["proxy_loss"].values()) for s in stats)),
                "bits_per_param": 8 * nbytes / params if params else math.nan,
                "seconds": float(res.get("seconds", 0.0)),
                "group_size": res.get("group_size"),
                "routed": routed.tolist(),
            }
        )
        alloc = res.get("allocation")
        if alloc:  # a size budget: the layer's budget, its coded bits (tables in) and its mix
            n = sum(a["params"] for a in alloc)
            rows[-1]["budget"] = {
                "target_bits_per_param": sum(a["target_bits_per_param"] * a["params"]
                                             for a in alloc) / n,
                "bits_per_param": sum(a["bits"] for a in alloc) / n,
                "richest": all(a["richest"] for a in alloc),
                # the allocation's stages, summed over the layer's groups (worker seconds)
                "seconds": {k: round(sum(a.get("seconds", {}).get(k, 0.0) for a in alloc), 4)
                            for k in sorted({k for a in alloc for k in a.get("seconds", {})})},
            }
            rows[-1]["mix"] = dict(sorted(Counter(e.get("setting", e["scheme"])
                                                  for e in q.values()).items()))
    return rows


def grouping(info: Mapping[str, Any] | None,
             layers: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """How the expert groups were sized (``plan.resolve_groups``: the budget, its source, the
    margin, each MoE layer's size and predicted worker peak), with each layer's measured worker
    peak (the workers' peak RSS so far, a process maximum) and its heaviest group's routed
    tokens against the uniform routing the prediction takes."""
    if info is None:
        return None
    out = {k: v for k, v in info.items() if k != "layers"}
    rows = {n: dict(r) for n, r in info["layers"].items()}
    for res in layers:
        row = rows.get(res.get("layer", ""))
        if row is None or not res.get("group_size"):
            continue
        g, routed = int(res["group_size"]), np.asarray(res["routed"], dtype=np.int64)
        uniform = max(int(routed.sum()), 1) / len(routed)  # tokens per expert
        row["group_size"] = g  # the size the layer ran with
        row["heaviest_group_vs_uniform"] = round(max(
            routed[i:i + g].sum() / (uniform * len(routed[i:i + g]))
            for i in range(0, len(routed), g)), 3)
        peak = res.get("worker_timings", {}).get("peak_rss_mb")
        row["measured_worker_peak_gib"] = None if peak is None else round(peak / 1024, 4)
    out["layers"] = rows
    return out


def to_markdown(report: Mapping[str, Any]) -> str:
    """A human summary of the report."""
    s = report["sizes"]
    lines = [
        "# qmoe-ray compression report",
        "",
        f"- source: `{report['source']}` ({report['model_type']}, "
        f"{report.get('source_precision') or 'bf16'})",
        f"- scheme: {report['options']['scheme']} / {report['options']['method']}, "
        f"expert groups of {_groups(report)}",
        f"- wall time: {report['seconds']:.1f} s",
        f"- experts: {s['expert_params']:,} params, {s['expert_bits_per_param']:.3f} bits/param "
        f"({s['expert_ratio_vs_bf16']:.2f}x vs bf16)",
        f"- whole model: {s['total_bytes']:,} bytes, {s['bits_per_param']:.3f} bits/param "
        f"({s['ratio_vs_bf16']:.2f}x vs bf16)",
    ]
    src = report.get("source_sizes")
    if src:
        lines.append(
            f"- vs the source as stored ({report.get('source_precision') or 'bf16'}, "
            f"{src['expert_bits_per_param']:.3f} bits per expert param): experts "
            f"{src['expert_ratio']:.2f}x, whole model {src['ratio']:.2f}x smaller")
    o = report["options"]
    if o.get("prune"):
        asked = o["prune_pattern"] or f"{o['sparsity']:.0%} unstructured"
        lines.append(f"- experts pruned: {o['prune']}, {asked} (achieved sparsity per matrix: "
                     "the manifest's `sparsity`, `qmoe-ray inspect`)")
    if report.get("trim"):
        from qmoe_ray.format.trimmed import trim_line

        lines.append(f"- trimmed: {trim_line(report['trim'])}")
    if report.get("heldout_loss") is not None:
        lines.append(
            f"- held-out loss (compressed): {report['heldout_loss']:.4f} over "
            f"{report['heldout_tokens']} tokens"
        )
    lines += [
        "",
        "| layer | tokens | experts w/o tokens | RTN fallbacks | proxy loss | bits/param | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["layers"]:
        lines.append(
            f"| {r['file']} | {r['tokens_routed']} | {r['experts_without_tokens']} | "
            f"{r['fallbacks']} | {r['proxy_loss']:.4g} | {r['bits_per_param']:.3f} | "
            f"{r['seconds']:.1f} |"
        )
    budgeted = [r for r in report["layers"] if r.get("budget")]
    if budgeted:
        lines += [
            "",
            f"Size budget (`--target-bits {o.get('target_bits')}`): each layer's budget (the "
            "job's plus what the layers before it left), its experts' bits per parameter with "
            "the code tables, and the candidate setting of its matrices "
            "(README, `--target-bits`; the plot's last panel: bits per layer).",
            "",
            "| layer | budget bits/param | bits/param (tables in) | matrices per setting |",
            "|---|---|---|---|",
        ]
        for r in budgeted:
            b = r["budget"]
            mix = ", ".join(f"{k} {v}" for k, v in r["mix"].items())
            lines.append(f"| {r['file']} | {b['target_bits_per_param']:.3f} | "
                         f"{b['bits_per_param']:.3f} | {mix} |")
    return "\n".join(lines) + "\n"


def plot_png(report: Mapping[str, Any]) -> bytes:
    """A PNG with per-layer proxy error, per-expert token coverage and bits per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(x, [r["proxy_loss"] for r in rows])
    axes[0].set_title("GPTQ proxy loss per MoE layer")
    axes[0].set_xlabel("MoE layer")
    cov = [np.asarray(r["routed"], dtype=float) / max(sum(r["routed"]), 1) for r in rows]
    if cov:
        width = max(len(c) for c in cov)
        grid = np.full((len(cov), width), np.nan)
        for i, c in enumerate(cov):
            grid[i, : len(c)] = c
        im = axes[1].imshow(grid, aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=axes[1], label="token share")
    axes[1].set_title("token share per expert")
    axes[1].set_xlabel("expert")
    axes[1].set_ylabel("MoE layer")
    axes[2].bar(x, [r["bits_per_param"] for r in rows])
    axes[2].set_title("expert bits / parameter")
    axes[2].set_xlabel("MoE layer")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
