"""Trimming x quantization x pruning on the embedded Mixtral (``--model switch``: the embedded
SwitchTransformers, ``benchmark.py trim_switch``), like Table 3 of He, Dong et al. 2024: Expert
Drop (E), Layer Drop (L), Block Drop (B) alone and with ternary / int2 / int4 GPTQ, and SparseGPT
pruning alone and with ternary. The budgets take the same share of each model (``MODELS``).

One pass of ``qmoe-ray analyze`` on the job's calibration samples gives the scores; each trim's
plan is chosen from them (``plan_from_scores``) and every row is one compression job
(``compress --trim-plan``) on the same calibration and held-out samples. "Alone" rows use the
int8 grid, near-lossless, so that every row is loaded and timed by the same loader. Per row:

- held-out loss (the job's, on the same held-out samples) and its rise over the uncompressed,
  untrimmed model;
- size: the whole checkpoint's bytes, and bits per parameter of the *untrimmed* model (a dropped
  expert costs 0 bits);
- FLOPs per token: 2 x the weights a token touches (the 2-D dense weights of the kept blocks:
  attention projections, for Switch cross-attention too; top-k experts and the kept router rows
  of each MoE layer left; the head; attention scores and the relative position bias lookup
  excluded). For Switch, a "token" is one encoder token and one decoder token: every block;
- CPU latency: Mixtral, median seconds per generated token of ``CompressedModel.generate``
  (batch 1, 16-token prompt, no KV cache); Switch, median seconds of one forward
  (``CompressedModel.logits``) of a held-out sample cut to 16 tokens; one torch thread, experts
  decoded at load, every model timed in turn in each round, so it moves with the trim only, not
  with the grid.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from qmoe_ray.bench import BenchResult
from qmoe_ray.job.config import CompressConfig

#: per model: the source, its description, and the trims (a quarter of the experts, of the MoE
#: layers and of the blocks of the embedded Mixtral: 4 blocks x 8 experts; Switch: 4 + 4 blocks x
#: 8 experts, top-1)
MODELS = {
    "mixtral": ("embedded", "Embedded Mixtral (4 MoE blocks x 8 experts, top-2)",
                {"none": {}, "E": {"drop_experts": 8}, "L": {"drop_layers": 1},
                 "B": {"drop_blocks": 1}}),
    "switch": ("embedded-switch", "Embedded SwitchTransformers (4 encoder + 4 decoder MoE blocks "
               "x 8 experts, top-1)",
               {"none": {}, "E": {"drop_experts": 16}, "L": {"drop_layers": 2},
                "B": {"drop_blocks": 2}}),
}
SCHEMES = ("int8", "ternary", "int2", "int4")


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out samples")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sample")
    parser.add_argument("--repeat", type=int, default=9, help="latency rounds (median)")
    parser.add_argument("--model", choices=sorted(MODELS), default="mixtral",
                        help="which embedded model")


def _flops_per_token(model: Any) -> int:
    fam, dense, params = model.family, model.dense, 0
    for lay in fam.layers():
        router = fam.router_name(lay) if lay.moe else None
        params += sum(t.numel() for n, t in dense.items()
                      if n.startswith(f"{lay.name}.") and t.dim() == 2 and n != router
                      and "relative_attention_bias" not in n)
        if lay.moe:
            one = sum(model.experts[n].numel() for n in fam.expert_names(lay, 0).values())
            params += lay.top_k * one + dense[router].numel()  # the kept router rows
    params += dense["lm_head.weight"].numel()
    return 2 * params


def _latencies(models: dict[str, Any], ids: Any, repeat: int) -> dict[str, float]:
    """Median seconds per generated token (``ids``: a prompt) or per forward (``ids``: a
    Switch sample's inputs) of each model, timed in turn (one round over every model,
    ``repeat`` rounds), so that a shared machine's noise hits all rows alike."""
    import statistics

    import torch

    def step(m: Any) -> None:
        if isinstance(ids, dict):
            m.logits(ids)
        else:
            m.generate(ids, max_new_tokens=4)

    per = 1 if isinstance(ids, dict) else 4
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {k: [] for k in models}
    try:
        for m in models.values():
            step(m)  # warm-up
        for _ in range(repeat):
            for k, m in models.items():
                t0 = time.perf_counter()
                step(m)
                times[k].append((time.perf_counter() - t0) / per)
    finally:
        torch.set_num_threads(n)
    return {k: statistics.median(v) for k, v in times.items()}


def _plans(args) -> dict[str, Any]:
    from qmoe_ray.data import resolve_source
    from qmoe_ray.models import get_family
    from qmoe_ray.models.trim_plan import plan_from_scores
    from qmoe_ray.read.analyze import analyze
    from qmoe_ray.storage.checkpoint import open_checkpoint

    source, _, trims = MODELS[args.model]
    ckpt = open_checkpoint(resolve_source(source))
    fam = get_family(ckpt.config, ckpt)
    scores = analyze(source, num_samples=args.samples, seq_len=args.seq_len,
                     batch_size=32).scores
    args.moe_layers = sum(lay.moe for lay in fam.layers())
    return {k: plan_from_scores(fam, scores, **kw) if kw else None for k, kw in trims.items()}


def _variants(plans: dict[str, Any], tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for trim, plan in plans.items():
        extra = {}
        if plan is not None:
            path = tmp / f"plan-{trim}.json"
            path.write_text(plan.to_json())
            extra["trim_plan"] = str(path)
        for scheme in SCHEMES:
            label = scheme if plan is None else f"{trim} + {scheme}"
            out.append((label, dict(scheme=scheme, **extra)))
    for scheme in ("int8", "ternary"):
        out.append((f"SparseGPT 50% + {scheme}", dict(scheme=scheme, prune="sparsegpt",
                                                      sparsity=0.5)))
    return out


def run(args) -> BenchResult:
    import numpy as np
    import torch

    from qmoe_ray.bench.job import _baseline_loss
    from qmoe_ray.data import embedded_model_path, load_samples, resolve_data, resolve_source
    from qmoe_ray.job.cluster import ray_init, shutdown
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.loader import load

    source = MODELS[args.model][0]
    path = resolve_source(source)
    tmp = Path(tempfile.mkdtemp(prefix="qmoe-bench-trim-"))
    base = dict(source=source, data="embedded", num_samples=args.samples,
                seq_len=args.seq_len, eval_samples=args.eval_samples, overwrite=True)
    base_loss = _baseline_loss(path, resolve_data("embedded", source), args.eval_samples,
                               args.seq_len)
    plans = _plans(args)
    if args.model == "mixtral":
        ids: Any = torch.from_numpy(np.load(embedded_model_path() / "heldout.npy")[:1, :16]
                                    .astype(np.int64))
    else:  # a Switch forward needs the family's inputs (encoder and decoder ids)
        from qmoe_ray.storage.checkpoint import open_checkpoint

        held = load_samples(resolve_data("embedded", source), open_checkpoint(path).config, 1,
                            16, seed=0, split="heldout", tokenizer_source=path)
        ids = {k: torch.from_numpy(np.array(v[:1])) for k, v in held.items()}
    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    total_params = None
    try:
        ray_init(CompressConfig())
        for label, kw in _variants(plans, tmp):
            out = tmp / label.replace(" ", "_").replace("%", "").replace("+", "")
            t0 = time.perf_counter()
            rep = run_compression(CompressConfig(**base, output=str(out), **kw), progress=False)
            wall = time.perf_counter() - t0
            model = models[label] = load(str(out))
            if total_params is None:  # the untrimmed model's (the first row is untrimmed)
                total_params = rep["sizes"]["total_params"]
            size = rep["sizes"]["total_bytes"]
            rows[label] = {"loss": rep["heldout_loss"], "rise": rep["heldout_loss"] - base_loss,
                           "bytes": size, "bits": 8 * size / total_params,
                           "flops": _flops_per_token(model), "wall": wall}
    finally:
        shutdown()
    for k, v in _latencies(models, ids, args.repeat).items():
        rows[k]["latency"] = v
    return _result(args, base_loss, plans, rows)


def _pareto(rows: dict[str, dict[str, Any]]) -> list[str]:
    best, out = math.inf, []
    for label, r in sorted(rows.items(), key=lambda kv: (kv[1]["bytes"], kv[1]["loss"])):
        if r["loss"] < best:
            best = r["loss"]
            out.append(f"{r['bytes'] / 2**10:.0f} KiB: {label} ({r['loss']:.4f})")
    return out


def _result(args, base_loss: float, plans: dict[str, Any],
            rows: dict[str, dict[str, Any]]) -> BenchResult:
    per_layer = 8  # both embedded models: 8 experts in every MoE layer
    what = {k: (f"{len(p.drop_blocks)} block(s) {list(p.drop_blocks)}" if p.drop_blocks else
                f"{len(p.drop_layers)} MoE layer(s) {list(p.drop_layers)}" if p.drop_layers
                else f"{sum(per_layer - len(v) for v in p.keep_experts.values())} of "
                     f"{per_layer * args.moe_layers} experts "
                     f"(per layer kept: {[len(v) for v in p.keep_experts.values()]})")
            for k, p in plans.items() if p is not None}
    f0, l0 = rows["int8"]["flops"], rows["int8"]["latency"]
    unit = "decode ms/token" if args.model == "mixtral" else "forward ms (16 tokens)"
    lines = [f"{MODELS[args.model][1]}, {args.samples} calibration / "
             f"{args.eval_samples} held-out samples of {args.seq_len} tokens; uncompressed "
             f"held-out loss {base_loss:.4f}. Dropped: "
             + "; ".join(f"{k}: {v}" for k, v in what.items()) + ".", "",
             "| variant | held-out loss | rise | size KiB | bits/param | FLOPs/token | vs int8 "
             f"| {unit} | vs int8 |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['loss']:.4f} | {r['rise']:+.4f} | "
                     f"{r['bytes'] / 2**10:.0f} | {r['bits']:.3f} | {r['flops'] / 1e6:.2f} M | "
                     f"{r['flops'] / f0:.2f} | {1e3 * r['latency']:.2f} | "
                     f"{r['latency'] / l0:.2f} |")
    lines += ["", "Lowest loss at each size (each row: smaller than the next, and the lowest "
              "loss of all rows up to its size):", ""]
    lines += [f"- {p}" for p in _pareto(rows)]
    notes = ["bits/param: the whole checkpoint's bits over the parameters of the untrimmed model "
             "(a dropped expert or block costs 0 bits; embeddings, head and attention stay bf16, "
             "which is most of this tiny model).",
             "Latency: experts decoded at load, so the grid does not change it; the trim does "
             "(fewer blocks, top-k over fewer experts only when k > kept).",
             "Trim first, then quantize (the job's order): the plans are scored on the "
             "uncompressed model."]
    return BenchResult({"baseline_loss": base_loss, "rows": rows,
                        "pareto": _pareto(rows)}, "\n".join(lines), notes)
