"""The job's report and the size accounting of a compressed checkpoint (pure: no I/O).

Sizes are counted from the bytes actually written: for quantized experts the encoded codes
(``code_bytes``, including segment offsets and per-matrix tables) plus the per-row grid parameters
(``scale_bytes``); for everything else the stored tensor bytes. Bits per parameter are reported for
the experts alone and for the whole model, beside the bf16 size, as the paper reports them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def order0_entropy_bits(counts: Sequence[int]) -> float:
    """Total order-0 entropy (bits) of a symbol stream with these symbol counts."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n == 0:
        return 0.0
    p = c[c > 0] / n
    return float(-(c[c > 0] * np.log2(p)).sum())


def size_summary(
    tensors: Mapping[str, Mapping[str, Any]],
    quantized: Mapping[str, Mapping[str, Any]],
    tables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Sizes by tensor kind and bits per parameter.

    Args:
        tensors: manifest tensor index (name -> dtype, shape, nbytes, ...).
        quantized: manifest entries of quantized matrices (name -> shape, code_bytes, ...).
        tables: names of shared code tables (their bytes count as expert code bytes).

    Returns:
        A dict of parameter counts, bytes, bits/parameter and ratios vs bf16.
    """
    expert_params = sum(int(np.prod(e["shape"])) for e in quantized.values())
    q_prefixes = tuple(f"{n}." for n in list(quantized) + list(tables or {}))
    table_bytes = sum(
        int(t["nbytes"])
        for n, t in tensors.items()
        if n.startswith(tuple(f"{n}." for n in tables or {}))
    )
    code_bytes = sum(int(e["code_bytes"]) for e in quantized.values()) + table_bytes
    scale_bytes = sum(int(e["scale_bytes"]) for e in quantized.values())
    dense = {n: t for n, t in tensors.items() if not n.startswith(q_prefixes)}
    dense_params = sum(int(np.prod(t["shape"])) for t in dense.values())
    dense_bytes = sum(int(t["nbytes"]) for t in dense.values())
    stored_expert_bytes = sum(
        int(t["nbytes"]) for n, t in tensors.items() if n.startswith(q_prefixes)
    )
    total_params = expert_params + dense_params
    total_bytes = stored_expert_bytes + dense_bytes
    expert_bits = 8 * (code_bytes + scale_bytes) / expert_params if expert_params else math.nan
    return {
        "expert_params": expert_params,
        "dense_params": dense_params,
        "total_params": total_params,
        "expert_code_bytes": code_bytes,
        "expert_table_bytes": table_bytes,
        "expert_scale_bytes": scale_bytes,
        "expert_stored_bytes": stored_expert_bytes,
        "dense_bytes": dense_bytes,
        "total_bytes": total_bytes,
        "bf16_bytes": 2 * total_params,
        "expert_bits_per_param": expert_bits,
        "expert_code_bits_per_param": 8 * code_bytes / expert_params if expert_params else math.nan,
        "bits_per_param": 8 * total_bytes / total_params if total_params else math.nan,
        "expert_ratio_vs_bf16": 16 / expert_bits if expert_params else math.nan,
        "ratio_vs_bf16": 2 * total_params / total_bytes if total_bytes else math.nan,
    }


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
                "routed": routed.tolist(),
            }
        )
    return rows


def to_markdown(report: Mapping[str, Any]) -> str:
    """A human summary of the report."""
    s = report["sizes"]
    lines = [
        "# qmoe-ray compression report",
        "",
        f"- source: `{report['source']}` ({report['model_type']})",
        f"- scheme: {report['options']['scheme']} / {report['options']['method']}, "
        f"expert groups of {report['options']['group_size']}",
        f"- wall time: {report['seconds']:.1f} s",
        f"- experts: {s['expert_params']:,} params, {s['expert_bits_per_param']:.3f} bits/param "
        f"({s['expert_ratio_vs_bf16']:.2f}x vs bf16)",
        f"- whole model: {s['total_bytes']:,} bytes, {s['bits_per_param']:.3f} bits/param "
        f"({s['ratio_vs_bf16']:.2f}x vs bf16)",
    ]
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
