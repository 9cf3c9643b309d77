"""Expert pruning on the embedded Mixtral: method x sparsity -> held-out loss and bits/param.

One job per row (``qmoe_ray.job``, the same calibration and held-out samples): pruning "alone" is
measured on the int8 grid (near-lossless, so the rise is the pruning's), and joint with ternary
GPTQ, where the zeros are what the entropy code makes cheap. The loss rise is over the
uncompressed model on the job's held-out samples.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from qmoe_ray.bench import BenchResult
from qmoe_ray.job.config import CompressConfig


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out samples")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sample")


def _variants() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("int8", dict(scheme="int8"))]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for s in (0.25, 0.5):
            out.append((f"int8 + {method} {s:.0%}", dict(scheme="int8", prune=method,
                                                         sparsity=s)))
        out.append((f"int8 + {method} 2:4", dict(scheme="int8", prune=method,
                                                  prune_pattern="2:4", actorder=False)))
    out.append(("ternary", dict(scheme="ternary")))
    for method in ("wanda", "sparsegpt"):
        for s in (0.25, 0.5):
            out.append((f"ternary + {method} {s:.0%}", dict(scheme="ternary", prune=method,
                                                            sparsity=s)))
    return out


def run(args) -> BenchResult:
    from qmoe_ray.bench.job import _baseline_loss, _variant_runs
    from qmoe_ray.data import embedded_model_path
    from qmoe_ray.job.cluster import ray_init, shutdown

    tmp = Path(tempfile.mkdtemp(prefix="qmoe-bench-prune-"))
    base = dict(source="embedded", data="embedded", num_samples=args.samples,
                seq_len=args.seq_len, eval_samples=args.eval_samples, overwrite=True)
    base_loss = _baseline_loss(str(embedded_model_path()), "embedded", args.eval_samples,
                               args.seq_len)
    try:
        ray_init(CompressConfig())
        runs = _variant_runs(base, _variants(), base_loss, tmp)
    finally:
        shutdown()
    rows = {k: {kk: v[kk] for kk in ("loss", "rise", "bits", "wall")} for k, v in runs.items()}
    lines = [f"Embedded Mixtral, {args.samples} calibration / {args.eval_samples} held-out "
             f"samples of {args.seq_len} tokens; uncompressed held-out loss {base_loss:.4f}.",
             "", "| variant | held-out loss | rise | expert bits/param |", "|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['loss']:.4f} | {r['rise']:+.4f} | {r['bits']:.3f} |")
    for kind in ("50%", "2:4"):
        got = {m: rows[f"int8 + {m} {kind}"]["rise"] for m in ("magnitude", "wanda", "sparsegpt")}
        lines.append(f"{'' if kind == '2:4' else chr(10)}Lowest rise at {kind} (int8 grid): "
                     f"{min(got, key=got.get)}; order " + " < ".join(sorted(got, key=got.get))
                     + ".")
    notes = ["int8 is bit-packed: its zeros cost the same 8 bits, so its bits/param do not move; "
             "ternary's entropy code is where pruned zeros pay off.",
             "The 2:4 rows run without act-order (SparseGPT needs it off for N:M: N:M groups are consecutive input columns)."]
    return BenchResult({"baseline_loss": base_loss, "runs": rows}, "\n".join(lines), notes)
