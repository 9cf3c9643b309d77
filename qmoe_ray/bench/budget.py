"""Bit allocation under a size budget, measured: ``python jobs/benchmark.py budget``.

On the embedded tiny Mixtral, in one in-process Ray cluster, the same calibration and held-out
samples for every run: held-out loss rise over the uncompressed model against bits per expert
parameter (as ``inspect`` counts them) for uniform ternary, int2 and int3 GPTQ, rate-aware
ternary at a few lambdas, and ``--target-bits`` at 0.6 ... 3.0 (a Pareto table), plus
``--target-bits`` at exactly uniform ternary's bits. From them the issue's two ratios (at uniform
ternary's bytes, the allocation's loss rise over ternary's; at ternary's loss rise, the
allocation's bits over ternary's, interpolated on the ``--target-bits`` curve) and the encode
cost: the ``--target-bits`` jobs' wall time over the plain ternary job's, and their workers'
quantization seconds over its.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from qmoe_ray.bench import BenchResult
from qmoe_ray.job.config import CompressConfig

TARGETS = (0.6, 0.8, 1.0, 1.5, 2.0, 3.0)


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=int, default=256, help="calibration samples")
    parser.add_argument("--eval-samples", type=int, default=64, help="held-out samples")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample")


def _worker_seconds(rep: dict[str, Any]) -> float:
    w = rep["worker_timings"]
    return sum(v for k, v in w.items() if k in ("hessian", "quantize", "forward", "encode"))


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Linear interpolation of ``y(x)`` on points sorted by ``x`` (NaN outside)."""
    pts = sorted(zip(xs, ys, strict=True))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return math.nan


def run(args) -> BenchResult:
    from qmoe_ray.bench.job import _baseline_loss
    from qmoe_ray.data import embedded_model_path
    from qmoe_ray.job.cluster import ray_init, shutdown
    from qmoe_ray.job.driver import run_compression

    tmp = Path(tempfile.mkdtemp(prefix="qmoe-bench-budget-"))
    base = dict(source="embedded", data="embedded", num_samples=args.samples,
                seq_len=args.seq_len, eval_samples=args.eval_samples, overwrite=True)
    runs: dict[str, dict[str, Any]] = {}

    def job(label: str, **kw: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        rep = run_compression(CompressConfig(**base, output=str(tmp / f"r{len(runs)}"), **kw),
                              progress=False)
        runs[label] = {"loss": rep["heldout_loss"], "rise": rep["heldout_loss"] - base_loss,
                       "bits": rep["sizes"]["expert_bits_per_param"],
                       "wall": time.perf_counter() - t0, "worker_s": _worker_seconds(rep),
                       "kind": kw.get("target_bits") and "target" or "uniform",
                       "target": kw.get("target_bits")}
        return runs[label]

    try:
        base_loss = _baseline_loss(str(embedded_model_path()), "embedded", args.eval_samples,
                                   args.seq_len)
        ray_init(CompressConfig())
        job("warm-up ternary")  # Ray's workers started and the caches warm before timing
        tern = job("ternary gptq")
        job("int2 gptq", scheme="int2")
        job("int3 gptq", scheme="int3")
        for lam in (0.05, 0.1, 0.2):
            job(f"ternary gptq, rate-aware {lam:g}", rate_lambda=lam)
        at_tern = job(f"--target-bits {tern['bits']:.3f} (ternary's bits)",
                      target_bits=round(tern["bits"], 3))
        tern2 = job("ternary gptq (again, for the cost ratio)")
        for b in TARGETS:
            job(f"--target-bits {b:g}", target_bits=b)
    finally:
        shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    runs.pop("warm-up ternary")

    targ = [r for r in runs.values() if r["kind"] == "target"]
    plain_wall = statistics.median([tern["wall"], tern2["wall"]])
    plain_worker = statistics.median([tern["worker_s"], tern2["worker_s"]])
    figures: dict[str, Any] = {
        "baseline_loss": base_loss,
        "runs": runs,
        "loss_rise_ratio_at_ternary_bytes": at_tern["rise"] / tern["rise"],
        "bits_ratio_at_ternary_rise": _interp([r["rise"] for r in targ],
                                              [r["bits"] for r in targ], tern["rise"])
        / tern["bits"],
        "wall_ratio_median": statistics.median(r["wall"] for r in targ) / plain_wall,
        "worker_ratio_median": statistics.median(r["worker_s"] for r in targ) / plain_worker,
        "max_target_miss": max(abs(r["bits"] / r["target"] - 1) for r in targ
                               if r["target"] in TARGETS),
    }
    return BenchResult(figures, _markdown(figures, args))


def _markdown(f: dict[str, Any], args) -> str:
    lines = [
        f"Embedded tiny Mixtral (4 MoE layers x 8 experts of 128x192), {args.samples} calibration "
        f"/ {args.eval_samples} held-out samples of {args.seq_len} tokens, the same for every "
        "run; one in-process Ray cluster, one worker. Uncompressed held-out loss: "
        f"**{f['baseline_loss']:.4f}**. Bits per expert parameter as `inspect` counts them "
        "(codes, scales, tables).",
        "",
        "| variant | expert bits/param | held-out loss | rise | job wall s |",
        "|---|---|---|---|---|",
    ]
    for label, r in sorted(f["runs"].items(), key=lambda kv: kv[1]["bits"]):
        lines.append(f"| {label} | {r['bits']:.3f} | {r['loss']:.4f} | {r['rise']:+.4f} | "
                     f"{r['wall']:.1f} |")
    lines += [
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| loss rise at uniform ternary's bytes, `--target-bits` / ternary | "
        f"**{f['loss_rise_ratio_at_ternary_bytes']:.2f}** | <= 0.8 |",
        f"| bits at uniform ternary's loss rise, `--target-bits` / ternary (interpolated) | "
        f"**{f['bits_ratio_at_ternary_rise']:.2f}** | <= 0.85 |",
        f"| job wall time, `--target-bits` / plain ternary (medians) | "
        f"**{f['wall_ratio_median']:.2f}** | <= 1.5 |",
        f"| worker seconds (Hessians, GPTQ, forward, encode), `--target-bits` / plain (medians) | "
        f"{f['worker_ratio_median']:.2f} | |",
        f"| largest miss of the budget, \\|bits / B - 1\\| | {100 * f['max_target_miss']:.2f}% | "
        "<= 2% |",
    ]
    return "\n".join(lines)
