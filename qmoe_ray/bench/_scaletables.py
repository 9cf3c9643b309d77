"""The ``scale`` benchmark's job tables: what each real-shaped job measured, the cost model's
constants fitted from one of them, and the model's predictions of the others (which it did not
see) as measured / predicted ratios."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

from qmoe_ray.job import costmodel as cm
from qmoe_ray.job.estimate import estimate


def shape_of_run(run: Mapping[str, Any]) -> cm.Shape:
    """The cost model's ``Shape`` of a measured run (its config, calibration, one store)."""
    p = estimate(run["config"], group_size=run["group_size"], num_samples=run["samples"],
                 seq_len=run["seq_len"], num_stores=1)
    return cm.shape_of(p, eval_samples=0)


def fitted(jobs: Mapping[str, Mapping[str, Any]], fit: str) -> cm.Constants:
    """The constants fitted from run ``fit``, with where they were measured."""
    from qmoe_ray.bench import machine_description

    run = jobs[fit]
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    where = (f"scale benchmark {day}, run {fit} ({run['model']} at true shapes, {run['layers']} "
             f"layer(s) x {run['experts']} experts, {run['samples']} x {run['seq_len']} tokens, "
             f"1 CPU worker of 1 thread, 1 store, local disk) on {machine_description()}")
    return cm.fit(run, shape_of_run(run), where)


def tables(jobs: Mapping[str, Mapping[str, Any]], fit: str
           ) -> tuple[str, dict[str, Any], list[str]]:
    """Markdown, figures and notes for the job runs (``fit`` fits the model)."""
    consts = fitted(jobs, fit)
    lines = ["Real compression jobs (real Ray, local disk) over real-shaped checkpoints "
             "(`realshape`: the released matrix shapes, fewer layers and experts), ternary GPTQ, "
             "1 worker (1 thread), 1 store, no held-out samples:", "",
             "| run | expert matrices | experts x top-k | tokens | group | wall | per MoE layer "
             "| dense | routing | read | Hessians | GPTQ | forward | encode | write |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in jobs.items():
        s = shape_of_run(r)
        t, w = r["timings"], r["worker_timings"]
        layer = sum(r["layer_seconds"]) / len(r["layer_seconds"])
        lines.append(
            f"| {name} | {'/'.join(f'{a}x{b}' for a, b in sorted(set(s.matrices)))} | "
            f"{s.experts} x {s.top_k} | {r['samples']} x {r['seq_len']} | {r['group_size']} | "
            f"{r['wall_s']:.1f} s | {layer:.1f} s | {t['store_dense']:.1f} | "
            f"{t['store_routing']:.2f} | {w['read']:.1f} | {w['hessian']:.1f} | "
            f"{w['quantize']:.1f} | {w['forward']:.1f} | {w['encode']:.1f} | {t['write']:.1f} |")
    lines += ["", "Stage seconds are summed over the run's layers (workers: over their groups). "
              "Memory (peak RSS: `VmHWM` of each actor's process; the driver's own), object store "
              "(Ray's memory summary after each layer, the maximum), output (all of it: experts, "
              "the bf16 dense part, tables) and the experts' bits per parameter (ternary):", "",
              "| run | driver | worker | store | writer | object store | spilled | output "
              "| expert bits/param |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in jobs.items():
        m, o = r["peak_rss_mb"], r["object_store"]
        lines.append(f"| {name} | {m['driver']:.0f} MB | {m.get('worker', 0):.0f} MB | "
                     f"{m.get('store', 0):.0f} MB | {m.get('writer', 0):.0f} MB | "
                     f"{o['plasma_mb_max']:.0f} MB | {o['spilled_mb_max']:.0f} MB | "
                     f"{r['output_bytes'] / 1e6:.1f} MB | "
                     f"{r.get('expert_bits_per_param', float('nan')):.3f} |")
    lines += ["", f"Cost model constants (`qmoe_ray/job/cost_constants.json`), fitted from "
              f"{fit}:", "", "| stage | rate | units |", "|---|---|---|"]
    for k, v in consts.rates.items():
        lines.append(f"| {k} | {v:.4g} /s | {cm.UNITS[k]} |")
    lines.append(f"| fixed | {consts.fixed_s:.1f} s | Ray start, data, actors, the end |")
    lines += ["", "Predictions of the runs not used for fitting (measured / predicted; "
              "target within 25%):", "",
              "| run | wall | per MoE layer | Hessians | GPTQ | forward | encode | worker RSS "
              "| store RSS | output |", "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = {}
    for name, r in jobs.items():
        if name == fit:
            continue
        s = shape_of_run(r)
        pr = cm.predict(s, consts, workers=1, gpu=None, group=r["group_size"])
        w, st = r["worker_timings"], pr["stage_totals"]
        layer = sum(r["layer_seconds"]) / len(r["layer_seconds"])
        q = {"wall": r["wall_s"] / pr["seconds"], "layer": layer / pr["layer_seconds"],
             "hessian": w["hessian"] / st["hessian"], "gptq": w["quantize"] / st["gptq"],
             "forward": w["forward"] / st["forward"], "encode": w["encode"] / st["encode"],
             "worker_rss": r["peak_rss_mb"]["worker"] * 2**20 / pr["worker_bytes"],
             "store_rss": r["peak_rss_mb"]["store"] * 2**20 / pr["store_bytes"],
             "output": r["output_bytes"] / _output_pred(r)}
        ratios[name] = q
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in q.values()) + " |")
    notes = [f"cost model fitted on {fit} only; the other runs are predictions it did not see",
             "calibration: the runs with the issue's 256 x 512 tokens are named -c256; the "
             "others use 32 x 512 (Qwen3, DeepSeek) or 8 x 512 (Mixtral) and fewer experts, so "
             "that every run takes minutes on this 2-core machine shared with other jobs; "
             "Mixtral: 1 expert per layer (top-1), its GPTQ of the 14336-column down matrix "
             "alone is minutes",
             "one run each on a shared, noisy machine (other jobs were running)"]
    if any(r.get("driver_rss") != "VmHWM" for r in jobs.values()):
        notes.append("driver column: ru_maxrss, which Linux carries over exec from the benchmark "
                     "process (it grew while writing the checkpoints): an upper bound, not the "
                     "driver's own peak (later runs measure VmHWM)")
    return "\n".join(lines), {"constants": consts.to_json(), "ratios": ratios}, notes


def _output_pred(run: Mapping[str, Any]) -> float:
    p = estimate(run["config"], group_size=run["group_size"], num_samples=run["samples"],
                 seq_len=run["seq_len"])
    return p["schemes"]["ternary"]["bytes"]
