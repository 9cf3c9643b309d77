"""The cost model behind ``qmoe-ray plan --workers N --gpu KIND``: wall time, GPU-hours, memory.

A compression job walks the layers in order; per MoE layer (see ``qmoe_ray.job.driver``):

- the stores run the block up to the router over their share of the tokens (``dense``: CPU, the
  stores' own processes), then the router and the bucketing (``routing``);
- the expert groups go to the workers; one group costs ``read`` (its source bytes) + ``hessian``
  (the float32 ``x x^T`` products of its Hessian tokens, and the hidden activation through the quantized
  input matrices) + ``gptq`` (per matrix: the sweep's updates ``rows x cols^2``, the in-block ones
  ``2 x rows x cols x blocksize``, and the ``cols^3`` of the Cholesky factors and inverse) +
  ``forward`` (every routed token through the quantized expert) + ``encode`` (codes to the
  entropy-coded format, per weight, on the worker's CPU); groups run side by side on the
  workers, so a layer takes ``ceil(groups / workers)`` group times, plus the moving of the
  tokens and outputs between stores and workers (``transfer``, per byte);
- the writer writes the layer's shard (``write``, per output byte); the stores checkpoint
  their stream (``checkpoint``, per byte).

A job adds a fixed start (Ray, data, actors) and the dense blocks. Every constant is a rate of
work units per second fitted from a measured real-shaped job on this project's machine (the
``scale`` benchmark: ``python jobs/benchmark.py scale --write-constants``, which writes
``cost_constants.json`` next to this module with where and when it was measured). On a GPU the
worker's ``hessian`` / ``gptq`` / ``forward`` rates are *assumptions*, never measurements: the
GPU's published peak throughput (FP32: the Hessian products are float32 whatever
``--hessian-dtype`` sums them in, so the A6000's 1/64-rate FP64 does not apply) times an
assumed efficiency (``GPUS``, ``GPU_EFFICIENCY``); ``read``, ``encode``, ``dense`` (the stores
stay on CPUs) and the rest keep their CPU figures.

Memory: a worker holds one group (its weights read in bf16 and as float32, the dequantized
copies and codes, the larger of the Hessians being formed (their ``--hessian-dtype`` sums, then
the float32 mean) and the float32 Hessians under GPTQ with its working copies, the group's
tokens, hidden activations and outputs) over a fitted process base; a store its share of the
tokens (the gathered MoE inputs, the summed outputs, the re-scattered stream) and one block's
dense weights; the object store every store's stream (fitted bytes per token).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from qmoe_ray.errors import InputError

#: Published peak throughput (TFLOP/s, dense, no sparsity) and memory (GB) of each GPU kind.
#: FP64 is the tensor-core rate where DGEMM uses it (A100, H100, H200); the A6000 (GA102) runs
#: FP64 at 1/64 of FP32. Sources: NVIDIA's data sheets (A100 80GB SXM, H100 SXM5, H200 SXM,
#: RTX A6000).
GPUS: dict[str, dict[str, float]] = {
    "H100": {"fp32": 66.9, "fp64": 66.9, "memory_gb": 80.0},
    "H200": {"fp32": 66.9, "fp64": 66.9, "memory_gb": 141.0},
    "A100": {"fp32": 19.5, "fp64": 19.5, "memory_gb": 80.0},
    "A6000": {"fp32": 38.7, "fp64": 0.6, "memory_gb": 48.0},
}
#: Assumed share of the peak the worker's stages reach on a GPU (not measured: no GPU was lent):
#: the Hessian sums and the forward are large GEMMs; the GPTQ sweep is column by column, small
#: kernels and triangular solves.
GPU_EFFICIENCY = {"hessian": 0.5, "forward": 0.5, "gptq": 0.1}
#: ``[E, cols, cols]`` float32 working copies GPTQ holds besides the Hessians it is given (the
#: Cholesky factor and its flip, then the flip and its inverse, and the products of the
#: blocked inverse): measured 2.6-2.8x (8 x 2048^2) to 3.7x (2 x 4096^2, where one
#: ``cols x cols`` identity weighs more) the Hessians' bytes (BENCHMARKS.md, ``hessian``).
GPTQ_COPIES = 3
#: The cheapest-shape search gives each worker up to this many stores (CPU actors: it assumes a
#: node has that many cores per GPU for them); stores split the dense forward and the tokens.
STORES_PER_WORKER = 8
STAGES = ("dense", "routing", "read", "hessian", "gptq", "forward", "encode", "transfer",
          "write", "checkpoint")
#: The units each stage's rate counts (per second).
UNITS = {"dense": "FLOP (2 x block params + 2 x seq x hidden, per token)",
         "routing": "token-expert pairs", "read": "source bytes", "hessian": "FLOP (float32 products)",
         "gptq": "FLOP", "forward": "FLOP", "encode": "weights", "transfer": "bytes",
         "write": "output bytes", "checkpoint": "bytes"}


@dataclass(frozen=True)
class Constants:
    """Fitted rates (units per second, ``UNITS``), fixed seconds, memory bases, and provenance."""

    rates: dict[str, float]
    fixed_s: float
    worker_base_bytes: float
    store_base_bytes: float
    driver_bytes: float
    plasma_bytes_per_token: float
    measured: str

    def to_json(self) -> dict[str, Any]:
        return {"rates": self.rates, "fixed_s": self.fixed_s,
                "worker_base_bytes": self.worker_base_bytes,
                "store_base_bytes": self.store_base_bytes, "driver_bytes": self.driver_bytes,
                "plasma_bytes_per_token": self.plasma_bytes_per_token, "measured": self.measured}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Constants:
        return cls(rates=dict(d["rates"]), fixed_s=float(d["fixed_s"]),
                   worker_base_bytes=float(d["worker_base_bytes"]),
                   store_base_bytes=float(d["store_base_bytes"]),
                   driver_bytes=float(d["driver_bytes"]),
                   plasma_bytes_per_token=float(d["plasma_bytes_per_token"]),
                   measured=str(d["measured"]))


def load_constants() -> Constants:
    """The constants the ``scale`` benchmark fitted (``cost_constants.json``)."""
    text = (resources.files("qmoe_ray.job") / "cost_constants.json").read_text()
    return Constants.from_json(json.loads(text))


@dataclass(frozen=True)
class Shape:
    """What one job's costs follow from (``shape_of``)."""

    moe_layers: int
    dense_blocks: int
    experts: int
    top_k: int
    hidden: int
    matrices: tuple[tuple[int, int], ...]  # (rows, cols) of each matrix of one routed expert
    block_params: float  # non-routed parameters of one block (attention, router, shared, norms)
    dense_ffn_params: float  # dense FFN parameters of one dense block
    source_bytes_per_weight: float
    output_bytes: float  # the compressed checkpoint
    calib_tokens: int
    all_tokens: int  # calibration + held-out tokens (all pass through every layer)
    seq_len: int
    sum_bytes: int = 4  # bytes per element of the Hessians' running sums (--hessian-dtype)

    @property
    def expert_params(self) -> int:
        return sum(r * c for r, c in self.matrices)

    @property
    def in_matrices(self) -> list[tuple[int, int]]:
        return [(r, c) for r, c in self.matrices if c == self.hidden]

    @property
    def d_ff(self) -> int:
        return max((r for r, c in self.in_matrices), default=self.hidden)


def shape_of(plan: Mapping[str, Any], *, eval_samples: int, scheme: str = "ternary") -> Shape:
    """The ``Shape`` of a job from ``estimate``'s figures (``qmoe_ray.job.estimate``)."""
    p = plan["params"]
    moe, blocks = int(plan["moe_layers"]), int(plan["blocks"])
    if not moe or not plan["expert_matrices"]:
        raise InputError(f"{plan['model_type']}: no routed experts to compress")
    non_routed = (p["attention"] + p["router"] + p["shared experts"] + p["norms and biases"]
                  + p["other"])
    c = plan["calibration"]
    hidden = int(plan["hidden_size"])
    return Shape(
        moe_layers=moe, dense_blocks=max(blocks - moe, 0),
        experts=max(plan["experts_per_layer"]), top_k=max(plan["top_k"]), hidden=hidden,
        matrices=tuple(tuple(m) for m in plan["expert_matrices"]),
        block_params=non_routed / max(blocks, 1),
        dense_ffn_params=p["dense ffn"] / max(blocks - moe, 1),
        source_bytes_per_weight=plan["source_bytes"] / max(plan["total"], 1),
        output_bytes=plan["schemes"][scheme]["bytes"],
        calib_tokens=c["samples"] * c["seq_len"],
        all_tokens=(c["samples"] + eval_samples) * c["seq_len"], seq_len=c["seq_len"],
        sum_bytes=8 if plan.get("hessian_dtype") == "float64" else 4)


def layer_work(s: Shape, blocksize: int = 128) -> dict[str, float]:
    """Work units of one MoE layer per stage (``UNITS``), routing uniform over the experts."""
    pairs = s.all_tokens * s.top_k
    hpairs = s.calib_tokens * s.top_k
    inputs = {c for _, c in s.matrices}
    hess = hpairs * (sum(2 * c * c for c in inputs)
                     + sum(2 * r * c for r, c in s.in_matrices))
    gptq = s.experts * sum(r * c * c + 2 * r * c * min(blocksize, c) + c ** 3
                           for r, c in s.matrices)
    return {
        "dense": s.all_tokens * (2 * s.block_params + 2 * s.seq_len * s.hidden),
        "routing": pairs,
        "read": s.experts * s.expert_params * s.source_bytes_per_weight,
        "hessian": hess,
        "gptq": gptq,
        "forward": pairs * 2 * s.expert_params,
        "encode": s.experts * s.expert_params,
        "transfer": pairs * s.hidden * 4 * 2,  # inputs out to the workers, outputs back
        "write": s.output_bytes / max(s.moe_layers + s.dense_blocks, 1),
        "checkpoint": s.all_tokens * s.hidden * 4,
    }


def worker_rates(c: Constants, gpu: str | None) -> dict[str, float]:
    """The rates a worker's stages run at: measured on CPU, assumed on ``gpu`` (``GPUS``)."""
    rates = dict(c.rates)
    if gpu:
        g = GPUS[gpu]
        rates["hessian"] = g["fp32"] * 1e12 * GPU_EFFICIENCY["hessian"]
        rates["gptq"] = g["fp32"] * 1e12 * GPU_EFFICIENCY["gptq"]
        rates["forward"] = g["fp32"] * 1e12 * GPU_EFFICIENCY["forward"]
    return rates


def worker_bytes(s: Shape, group: int, base: float) -> float:
    """Peak bytes of a worker quantizing a group of ``group`` experts (module doc)."""
    p = s.expert_params
    t_e = s.all_tokens * s.top_k / s.experts  # tokens routed to one expert (uniform)
    weights = group * p * (2 + 4 + 4 + 1)  # bf16 read, float32, dequantized, codes
    # forming: the sums, then the float32 mean (divided in place); under GPTQ: H + its copies
    per = max(s.sum_bytes + 4, 4 * (1 + GPTQ_COPIES))
    hess = max(group * c * c * per for _, c in s.matrices)
    tokens = group * t_e * (s.hidden * 4 * 3 + s.d_ff * 4)  # inputs x2, outputs, hidden
    return base + weights + hess + tokens


def store_bytes(s: Shape, stores: int, group: int, base: float) -> float:
    """Peak bytes of one of ``stores`` activation stores: its tokens' MoE inputs, summed
    outputs and re-scattered stream (3 copies), every routed output of the layer (held until
    the layer's last group is in), one group's gathered inputs (``expert_tokens``) and one
    block's dense weights (bf16 read and float32)."""
    tokens = s.all_tokens / stores
    pairs = tokens * s.top_k
    one_group = pairs * min(group, s.experts) / s.experts
    return (base + tokens * s.hidden * 4 * 3 + pairs * s.hidden * 4 + one_group * s.hidden * 4
            + (s.block_params + s.dense_ffn_params) * 6)


def object_store_bytes(s: Shape, c: Constants, workers: int, group: int) -> float:
    """Ray's object store at its fullest: every store's stream (fitted bytes per token) and the
    groups in flight (two per worker: their inputs and outputs)."""
    groups = math.ceil(s.experts / group)
    in_flight = min(2 * workers, groups) * group * s.all_tokens * s.top_k / s.experts
    return s.all_tokens * c.plasma_bytes_per_token + in_flight * s.hidden * 4 * 2


def predict(s: Shape, c: Constants, *, workers: int, gpu: str | None, group: int,
            stores: int = 1, blocksize: int = 128) -> dict[str, Any]:
    """Predicted seconds per stage and in all, and the memory, of a job of shape ``s``."""
    rates = worker_rates(c, gpu)
    w = layer_work(s, blocksize)
    groups = math.ceil(s.experts / group)
    rounds = math.ceil(groups / workers)
    per_group = {k: w[k] / rates[k] / groups for k in ("read", "hessian", "gptq", "forward",
                                                       "encode")}
    layer = {"dense": w["dense"] / rates["dense"] / stores,
             "routing": w["routing"] / rates["routing"] / stores,
             **{k: v * rounds for k, v in per_group.items()},
             "transfer": w["transfer"] / rates["transfer"] / stores,
             "write": w["write"] / rates["write"],
             "checkpoint": w["checkpoint"] / rates["checkpoint"] / stores}
    dense_block = (s.all_tokens * (2 * (s.block_params + s.dense_ffn_params)
                                   + 2 * s.seq_len * s.hidden) / rates["dense"] / stores
                   + w["write"] / rates["write"] + layer["checkpoint"])
    layer_s = sum(layer.values())
    total = c.fixed_s + s.moe_layers * layer_s + s.dense_blocks * dense_block
    return {
        "seconds": total,
        "layer_seconds": layer_s,
        "stages_per_layer": layer,
        "stage_totals": {k: v * s.moe_layers for k, v in layer.items()},
        "worker_bytes": worker_bytes(s, group, c.worker_base_bytes),
        "store_bytes": store_bytes(s, stores, group, c.store_base_bytes),
        "driver_bytes": c.driver_bytes,
        "object_store_bytes": object_store_bytes(s, c, workers, group),
        "groups_per_layer": groups,
    }


def fit(run: Mapping[str, Any], s: Shape, measured: str, blocksize: int = 128) -> Constants:
    """Constants from one measured job (``qmoe_ray.bench._scalejob``'s figures) of shape ``s``
    (one worker, one store, CPU)."""
    w = layer_work(s, blocksize)
    t, wt = run["timings"], run["worker_timings"]
    L = s.moe_layers
    worker_sum = sum(wt[k] for k in ("read", "hessian", "quantize", "forward", "encode"))
    seconds = {
        "dense": t["store_dense"], "routing": t["store_routing"], "read": wt["read"],
        "hessian": wt["hessian"], "gptq": wt["quantize"], "forward": wt["forward"],
        "encode": wt["encode"], "transfer": max(t["quantize"] - worker_sum, 1e-3),
        "write": t["write"], "checkpoint": t["checkpoint"],
    }
    rates = {k: w[k] * L / max(seconds[k], 1e-6) for k in STAGES}
    fixed = run["wall_s"] - sum(run["layer_seconds"])
    peaks = run["peak_rss_mb"]
    worker_base = peaks["worker"] * 2**20 - worker_bytes(s, run["group_size"], 0.0)
    store_base = peaks["store"] * 2**20 - store_bytes(s, 1, run["group_size"], 0.0)
    plasma = run["object_store"]["stream_mb"] * 2**20 / s.all_tokens
    return Constants(rates=rates, fixed_s=fixed, worker_base_bytes=max(worker_base, 0.0),
                     store_base_bytes=max(store_base, 0.0), driver_bytes=peaks["driver"] * 2**20,
                     plasma_bytes_per_token=plasma, measured=measured)


def _gb(n: float) -> float:
    return round(n / 1e9, 2)


def cluster_plan(plan: Mapping[str, Any], *, workers: int, gpu: str | None, eval_samples: int,
                 scheme: str = "ternary", memory_gb: float | None = None,
                 max_hours: float = 72.0, constants: Constants | None = None) -> dict[str, Any]:
    """The ``qmoe-ray plan --workers --gpu`` figures for ``estimate``'s ``plan``: the predicted
    job on ``workers`` workers (one ``gpu`` each, or CPU workers), and the cheapest shape (fewest
    GPU-hours, or CPU worker-hours, within ``max_hours``; ties: the shorter) among 1 to 64
    workers (powers of two, and ``workers``), 1 to ``STORES_PER_WORKER`` stores per worker, and
    groups of a power of two experts up to the layer's (and the asked ``group_size``) whose
    worker fits ``memory_gb`` (default: the GPU's
    memory; CPU workers 64 GB).

    Raises:
        InputError: a worker of this memory cannot hold the asked group (the largest group that
            fits named) or even one expert (the memory one needs named).
    """
    c = constants or load_constants()
    s = shape_of(plan, eval_samples=eval_samples, scheme=scheme)
    stores = int(plan["calibration"]["stores"])
    group = int(plan["group_size"])
    where = f"--gpu {gpu} ({GPUS[gpu]['memory_gb']:.0f} GB)" if gpu else "a CPU worker"
    mem = (memory_gb if memory_gb is not None
           else GPUS[gpu]["memory_gb"] if gpu else 64.0) * 1e9
    if memory_gb is not None:
        where += f" with --worker-memory-gb {memory_gb:g}"
    one = worker_bytes(s, 1, c.worker_base_bytes)
    if one > mem:
        raise InputError(f"{where}: one expert group of a single expert needs "
                         f"{one / 1e9:.1f} GB per worker ({plan['model_type']} expert matrices "
                         f"{s.matrices}, {s.sum_bytes * 8}-bit Hessian sums); use workers with at least that much "
                         "memory")
    if worker_bytes(s, group, c.worker_base_bytes) > mem:
        fits = max(g for g in range(1, s.experts + 1)
                   if worker_bytes(s, g, c.worker_base_bytes) <= mem)
        raise InputError(f"{where}: a group of --group-size {group} experts needs "
                         f"{worker_bytes(s, group, c.worker_base_bytes) / 1e9:.1f} GB per "
                         f"worker; the largest group that fits is {fits} (--group-size {fits})")
    asked = predict(s, c, workers=workers, gpu=gpu, group=min(group, s.experts), stores=stores)
    shapes = []
    sizes = sorted({min(2 ** i, s.experts) for i in range(12)} | {min(group, s.experts)})
    for w in sorted({2 ** i for i in range(7)} | {workers}):
        for st in sorted({2 ** i for i in range(10) if 2 ** i <= STORES_PER_WORKER * w}
                         | {stores}):
            for g in sizes:
                if worker_bytes(s, g, c.worker_base_bytes) > mem:
                    continue
                pr = predict(s, c, workers=w, gpu=gpu, group=g, stores=st)
                if pr["seconds"] <= max_hours * 3600:  # ties: the faster, then larger groups
                    shapes.append((pr["seconds"] * w / 3600, pr["seconds"], w, st, -g))
    best = min(shapes) if shapes else None
    src = plan["source_bytes"]
    routed_src = plan["params"]["routed experts"] * s.source_bytes_per_weight
    return {
        "workers": workers, "gpu": gpu or "none", "group_size": group, "stores": stores,
        "scheme": scheme,
        "hours": asked["seconds"] / 3600,
        "gpu_hours": asked["seconds"] / 3600 * workers if gpu else None,
        "cpu_worker_hours": None if gpu else asked["seconds"] / 3600 * workers,
        "stage_hours": {k: v / 3600 for k, v in asked["stage_totals"].items()},
        "fixed_s": c.fixed_s,
        "peak_worker_bytes": asked["worker_bytes"],
        "worker_memory_bytes": mem,
        "peak_store_bytes": asked["store_bytes"],
        "driver_bytes": asked["driver_bytes"],
        "object_store_bytes": asked["object_store_bytes"],
        "source_bytes_read": int(routed_src + (src - routed_src) * stores),
        "output_bytes": int(s.output_bytes),
        "cheapest": None if best is None else {
            "workers": best[2], "stores": best[3], "group_size": -best[4],
            "hours": best[1] / 3600, "worker_hours": best[0],
            "optimises": f"fewest {'GPU' if gpu else 'CPU worker'}-hours within {max_hours:g} h "
                         f"over 1-64 workers, 1 to {STORES_PER_WORKER} stores per worker and "
                         f"groups of powers of two, the worker fitting {mem / 1e9:.0f} GB"},
        "constants": {
            "measured": c.measured,
            "rates": {k: {"per_s": v, "units": UNITS[k]} for k, v in c.rates.items()},
            "worker_rates_used": worker_rates(c, gpu),
            "assumed": None if gpu is None else {
                "gpu": GPUS[gpu], "efficiency": GPU_EFFICIENCY,
                "note": "GPU rates are assumptions (published peak x assumed efficiency), not "
                        "measurements: no GPU was lent to measure them; encode, read, the "
                        "stores' dense forward and the writer keep their measured CPU rates"}},
    }


def _h(hours: float) -> str:
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:,.1f} h"


def format_cost(cost: Mapping[str, Any]) -> str:
    """``cluster_plan``'s figures as text."""
    gpu = cost["gpu"]
    kind = f"{cost['workers']} x {gpu}" if gpu != "none" else f"{cost['workers']} CPU workers"
    hours = cost["gpu_hours"] if gpu != "none" else cost["cpu_worker_hours"]
    unit = "GPU-hours" if gpu != "none" else "CPU worker-hours"
    lines = [f"Cost model ({kind}, groups of {cost['group_size']}, {cost['stores']} stores, "
             f"{cost['scheme']}):",
             f"- predicted wall time: {_h(cost['hours'])}; {hours:,.1f} {unit}",
             "- by stage: " + ", ".join(f"{k} {_h(v)}" for k, v in cost["stage_hours"].items()
                                        if v * 3600 >= 1) + f"; fixed {cost['fixed_s']:.0f} s",
             f"- peak memory per worker: {_gb(cost['peak_worker_bytes'])} GB (of "
             f"{_gb(cost['worker_memory_bytes'])} GB); per store: "
             f"{_gb(cost['peak_store_bytes'])} GB; driver: {_gb(cost['driver_bytes'])} GB",
             f"- object store: {_gb(cost['object_store_bytes'])} GB",
             f"- source bytes read: {_gb(cost['source_bytes_read'])} GB; output: "
             f"{_gb(cost['output_bytes'])} GB"]
    b = cost["cheapest"]
    if b is None:
        lines.append("- cheapest shape: none finishes within the time asked (--max-hours)")
    else:
        lines.append(f"- cheapest shape: {b['workers']} workers, {b['stores']} stores, groups of "
                     f"{b['group_size']}: "
                     f"{_h(b['hours'])}, {b['worker_hours']:,.1f} {unit} ({b['optimises']})")
    k = cost["constants"]
    lines.append(f"- constants measured: {k['measured']}")
    rates = ", ".join(f"{n} {v['per_s']:.3g}/s" for n, v in k["rates"].items())
    units = ", ".join(f"{n}: {v['units']}" for n, v in k["rates"].items())
    lines.append(f"  CPU rates ({units}): {rates}")
    if k["assumed"]:
        a = k["assumed"]
        lines.append(f"- ASSUMED, not measured ({gpu}): peak FP32 {a['gpu']['fp32']} TFLOP/s, "
                     f"FP64 {a['gpu']['fp64']} TFLOP/s, {a['gpu']['memory_gb']:.0f} GB; "
                     f"efficiency hessian {a['efficiency']['hessian']}, forward "
                     f"{a['efficiency']['forward']}, gptq {a['efficiency']['gptq']}. "
                     + a["note"])
    return "\n".join(lines)
