"""The compression job's driver: ``run_compression`` = ``plan.prepare`` + ``execute``.

Shape of a run (see DESIGN.md): the driver reads only the source's config and tensor list, checks
everything it can before the cluster does work (scheme, output writable, enough calibration
tokens, the resources asked for), then creates

- ``ActivationStoreActor`` actors, each holding contiguous batches of samples (``stores.py``),
- ``QuantWorkerActor`` actors (``num_gpus``/``num_cpus`` per worker) running ``QuantWorker`` (``workers.py``),
- one ``Writer`` actor running ``CheckpointWriter`` (``writer.py``),

and walks the layers in order. For an MoE layer: every store runs its part of the block up to the
router and buckets its tokens per expert; expert groups go to the workers (at most two in flight
per worker); each group's outputs go straight from the worker to the stores (one return per
store), its encoded experts to the writer, and nothing large passes through the driver. When all
groups are in, the stores finish the block and the writer writes the layer's shard. The manifest
is written last, after the report.

Resume and faults (``qmoe_ray.job.progress``): after each layer the stores checkpoint their
stream to the output location and the driver records the layer as done there; a rerun of the same
command restores the stores from the last finished layer and goes on (another source or other
options are refused, naming what differs, unless ``--overwrite``). Within a run, a failure that
comes from the cluster (an actor or node lost, an object lost) is recovered by waiting for the
restarted actors, restoring every store from the last checkpoint and redoing the layer; since
every step is deterministic, the bytes are those of an undisturbed run. Errors of the job itself
(bad data, a permanent storage error) fail the job naming the layer, with no manifest written.
The checks are ``qmoe_ray.job.plan``, the cluster ``qmoe_ray.job.cluster``, the recovery
``qmoe_ray.job.faults``; the source's tensor index is read once, by ``prepare``, and handed to every actor through
the progress folder (``Progress.save_source_index``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from qmoe_ray.format import manifest as mf
from qmoe_ray.format.trimmed import trim_record, trim_summary
from qmoe_ray.job import cluster
from qmoe_ray.job.config import CompressConfig, StorageOptions
from qmoe_ray.job.faults import Guard
from qmoe_ray.job.grouping import AUTO
from qmoe_ray.job.plan import Plan, prepare, resolve_groups, source_label, worker_budget
from qmoe_ray.job.progress import PROGRESS
from qmoe_ray.models import LayerSpec
from qmoe_ray.storage import quantized as qz
from qmoe_ray.storage.fs import redact

log = logging.getLogger("qmoe_ray")

Hook = Callable[[str, dict[str, Any]], None]
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def run_compression(
    cfg: CompressConfig,
    storage: StorageOptions | None = None,
    progress: bool = True,
    hook: Hook | None = None,
) -> dict[str, Any]:
    """Run a compression job to completion, resuming one the output holds progress of.

    Args:
        cfg: the job's options.
        storage: fsspec options for the source and the output (never written anywhere).
        progress: show a tqdm bar per layer.
        hook: called as ``hook(event, info)`` at ``"layer_start"``, ``"group_dispatched"`` and
            ``"layer_done"`` (``info``: ``layer``, ``attempt``, ``actors``, and ``group`` /
            ``worker`` for dispatches); for tests and monitoring, must not raise.

    Returns:
        The report (also written as ``report.json`` next to the checkpoint).

    Raises:
        ValueError / FileExistsError / PermissionError / RuntimeError: bad input (including
        progress of another job at the output), found before the cluster does work;
        RuntimeError naming the layer when a layer fails.
    """
    return execute(prepare(cfg, storage), progress, hook)


def _announce(plan: Plan) -> None:
    cfg, moe = plan.cfg, plan.moe_layers
    print(f"[qmoe-ray] compressing {source_label(cfg.source)} ({plan.family.model_type}, "
          f"{len(moe)} MoE layers x {moe[0].num_experts} experts) to "
          f"{redact(cfg.output)}: {cfg.scheme} {cfg.method}, "
          f"{int(plan.is_calib.sum())} calibration + {int((~plan.is_calib).sum())} held-out "
          f"samples x {cfg.seq_len} tokens; starting Ray", flush=True)


def execute(plan: Plan, progress: bool = True, hook: Hook | None = None) -> dict[str, Any]:
    """Carry out a checked job (``plan.prepare``): start or join Ray, check its resources, then
    (the output now this job's) record the job, create the actors, walk the layers and finish.

    Returns and raises as ``run_compression``.
    """
    from qmoe_ray.job.actors import make_actors, save_inputs

    cfg, prog = plan.cfg, plan.progress
    if progress:
        _announce(plan)
    started = cluster.ray_init(cfg)
    actors = None
    try:
        joined = not started or bool(cluster.address(cfg))
        cluster.check_resources(cfg, cluster.resource_wait_s(joined))
        plan = _cluster_groups(plan)
        # every check has passed: from here on the output is this job's (an old checkpoint
        # is replaced only now)
        if not plan.resuming:
            prog.start(plan.job, cfg.overwrite)
        save_inputs(prog, plan.inputs, plan.is_calib, cfg.batch_size)
        prog.save_source_index(plan.index)  # every actor opens the source by it
        actors = make_actors(cfg, plan.storage, plan.source, plan.quant, len(plan.is_calib),
                             plan.trim)
        guard, result = _walk(plan, actors, progress, hook)
        report = _finish(plan, actors, guard, result)
        prog.remove(PROGRESS)  # the manifest is written: the checkpoint no longer needs it
    finally:
        cluster.release(started, actors.all() if actors is not None else [])
    return report


def _cluster_groups(plan: Plan) -> Plan:
    """``--group-size auto`` on a joined cluster without ``--worker-memory``: the groups sized
    to Ray's memory figure (``cluster.ray_worker_memory``), now that Ray is up."""
    if plan.cfg.group_size != AUTO or plan.grouping is not None:
        return plan
    budget = worker_budget(plan.cfg, cluster.ray_worker_memory(plan.cfg))
    sizes, info = resolve_groups(plan.cfg, plan.family, plan.shapes, budget, plan.group_sizes)
    plan.job["group_sizes"] = sizes
    return dataclasses.replace(plan, group_sizes=sizes, grouping=info)


def _resume(plan: Plan, actors: Any, progress: bool) -> None:
    """Put the stores at the stream after the last layer done (a resume)."""
    import ray

    done, layers = plan.done, plan.layers
    ray.get([s.restore.remote(layers[len(done) - 1].index) for s in actors.stores])
    log.info("resuming after layer %s (%d of %d layers done)", layers[len(done) - 1].name,
             len(done), len(layers))
    if progress:
        print(f"[qmoe-ray] resuming after layer {layers[len(done) - 1].name} "
              f"({len(done)}/{len(layers)} layers done)", flush=True)


def _walk(plan: Plan, actors: Any, progress: bool,
          hook: Hook | None) -> tuple[Guard, dict[str, Any]]:
    """Process every layer not yet done, in order; returns the recovery guard (for the steps
    after the walk) and the per-layer results and timings."""
    layers, done = plan.layers, plan.done
    timings: dict[str, float] = {"dense": 0.0, "store_dense": 0.0, "store_routing": 0.0,
                                 "quantize": 0.0, "write": 0.0, "checkpoint": 0.0,
                                 "restore": 0.0, "recovery": 0.0}
    moe = {"done": sum(1 for l in layers[: len(done)] if l.moe),
           "total": sum(1 for l in layers if l.moe)}
    prev = layers[len(done) - 1].index if done else None
    t_walk = time.perf_counter()
    if done:
        _resume(plan, actors, progress)
    timings["restore"] = time.perf_counter() - t_walk
    guard = Guard(actors, plan.restart_timeout_s)
    results: list[dict[str, Any]] = list(done)
    first_new: float | None = None
    for layer in layers[len(done):]:
        started: list[float] = []  # each attempt's start: a layer's seconds are its last try's

        budget = layer_budget(plan.cfg.target_bits, results) if layer.moe else None

        def step(attempt: int, layer: LayerSpec = layer, started: list[float] = started,
                 budget: float | None = budget) -> dict[str, Any]:
            started.append(time.perf_counter())
            return _layer_step(plan, layer, actors, timings, moe, progress, hook, attempt,
                               budget)

        res, attempt = guard.run(step, f"compression failed at layer {layer.name}",
                                 layer.index, prev, layer.name)
        res["seconds"] = time.perf_counter() - started[-1]
        res = json.loads(mf.dumps(res))  # the record as the manifest sees it after a resume
        t1 = time.perf_counter()
        plan.progress.finish_layer(layer.index, res, prev)
        timings["checkpoint"] += time.perf_counter() - t1
        results.append(res)
        first_new = first_new if first_new is not None else time.perf_counter()
        if hook:
            hook("layer_done", {"layer": layer, "attempt": attempt, "actors": actors})
        prev = layer.index
        if layer.moe:
            moe["done"] += 1
            _log_layer(layer, res, progress)
            _log_richest(plan.cfg, res, progress)
    timings["recovery"] = guard.seconds
    timings["first_new_layer"] = (first_new - t_walk) if first_new is not None else 0.0
    return guard, {"layers": results, "timings": timings, "resumed_after": len(done),
                   "recoveries": guard.recoveries, "last_index": prev}


def layer_budget(target_bits: float | None, done: list[dict[str, Any]]) -> float | None:
    """A layer's budget in bits per expert parameter under ``--target-bits``: the job's, plus
    what the layers before it left unspent, spread over this layer's parameters (taken to be
    as many as the last MoE layer's: the MoE layers of a model are alike). None without a
    budget.

    ``done``: the records of the layers before (each with the ``allocation`` of its groups).
    """
    if target_bits is None:
        return None
    allocs = [a for r in done for a in r.get("allocation", [])]
    if not allocs:
        return float(target_bits)
    params = sum(a["params"] for a in allocs)
    unspent = target_bits * params - sum(a["bits"] for a in allocs)
    last = next(r for r in reversed(done) if r.get("allocation"))
    last_params = sum(a["params"] for a in last["allocation"])
    return float(target_bits + max(0.0, unspent) / last_params)


def _layer_step(plan: Plan, layer: LayerSpec, actors: Any, timings: dict[str, float],
                moe: dict[str, int], progress: bool, hook: Hook | None,
                attempt: int, budget: float | None = None) -> dict[str, Any]:
    """One try at a layer: through the actors, then the stores' activation checkpoint."""
    import ray

    if hook:
        hook("layer_start", {"layer": layer, "attempt": attempt, "actors": actors})
    group = plan.group_sizes[layer.name] if layer.moe else 0
    res = _layer(plan.cfg, layer, actors, timings, moe, progress, hook, attempt, budget, group)
    t1 = time.perf_counter()
    ray.get([s.save_state.remote(layer.index) for s in actors.stores])
    timings["checkpoint"] += time.perf_counter() - t1
    return res


def _log_layer(layer: LayerSpec, res: dict[str, Any], progress: bool) -> None:
    routed = int(np.sum(res["routed"]))
    fallbacks = sum(1 for s in res["stats"] if s["fallback"])
    loss = sum(sum(s["proxy_loss"].values()) for s in res["stats"])
    if not progress:  # with progress on, the line is printed (and logging would repeat it)
        log.info("layer %s: %d experts, %d tokens routed, %d fallbacks, proxy loss %.4g, %.1fs",
                 layer.name, layer.num_experts, routed, fallbacks, loss, res["seconds"])
    else:
        print(f"[qmoe-ray] layer {layer.name}: {layer.num_experts} experts, "
              f"{routed} tokens, {fallbacks} RTN fallbacks, "
              f"proxy loss {loss:.4g}, {res['seconds']:.1f}s", flush=True)


def _log_richest(cfg: CompressConfig, res: dict[str, Any], progress: bool) -> None:
    """Say so when a size budget is above what every expert at the richest setting costs."""
    allocs = res.get("allocation") or []
    if allocs and all(a["richest"] for a in allocs):
        richest = sum(a["richest_bits_per_param"] * a["params"] for a in allocs) / sum(
            a["params"] for a in allocs)
        msg = (f"--target-bits {cfg.target_bits:g} is above what every expert of this layer at "
               f"the richest setting (int4) costs ({richest:.3f} bits per expert parameter): "
               "using the richest")
        log.warning(msg)
        if progress:
            print(f"[qmoe-ray] {msg}", flush=True)


def _dense_layer(layer: LayerSpec, actors: Any, timings: dict[str, float]) -> dict[str, Any]:
    """A layer without experts: the stores run it, the writer writes its shard."""
    import ray

    t0 = time.perf_counter()
    ray.get([s.dense_block.remote(layer) for s in actors.stores])
    t1 = time.perf_counter()
    timings["dense"] += t1 - t0
    res = ray.get(actors.writer.finish_layer.remote(layer, 0))
    timings["write"] += time.perf_counter() - t1
    res.update(routed=[], hessian_tokens_total=[], cap=None)
    return res


def _layer(cfg: CompressConfig, layer: LayerSpec, actors: Any, timings: dict[str, float],
           moe: dict[str, int], progress: bool, hook: Hook | None,
           attempt: int, budget: float | None = None, group: int = 0) -> dict[str, Any]:
    """One layer through the stores, workers and writer (``group`` experts per worker call);
    returns the writer's result."""
    import ray

    if not layer.moe:
        return _dense_layer(layer, actors, timings)
    stores, writer = actors.stores, actors.writer
    t0 = time.perf_counter()
    counts = ray.get([s.pre_moe.remote(layer) for s in stores])
    t1 = time.perf_counter()
    timings["dense"] += t1 - t0
    for key in ("dense", "routing"):  # the slowest store's (the stores run side by side)
        timings[f"store_{key}"] += max(c["seconds"][key] for c in counts)
    routed = np.sum([c["routed"] for c in counts], axis=0)
    hess = np.sum([c["hessian"] for c in counts], axis=0)
    cap = int(math.ceil(cfg.token_cap * hess.mean())) if cfg.token_cap else None
    groups = [list(range(g, min(g + group, layer.num_experts)))
              for g in range(0, layer.num_experts, group)]
    desc = f"layer {layer.name} ({moe['done'] + 1}/{moe['total']} MoE)"
    _dispatch(layer, groups, cap, actors, desc if progress else None, int(routed.sum()), hook,
              attempt, budget)
    ray.get([s.post_moe.remote(layer, len(groups)) for s in stores])
    t2 = time.perf_counter()
    timings["quantize"] += t2 - t1
    res = ray.get(writer.finish_layer.remote(layer, len(groups)))
    timings["write"] += time.perf_counter() - t2
    res["routed"] = routed.tolist()
    res["hessian_tokens_total"] = hess.tolist()
    res["cap"] = cap
    res["group_size"] = group
    res["layer"] = layer.name
    return res


def _dispatch(layer: LayerSpec, groups: list[list[int]], cap: int | None, actors: Any,
              desc: str | None, tokens: int, hook: Hook | None, attempt: int,
              budget: float | None = None) -> None:
    """Every expert group of ``layer`` through the workers (at most two in flight per worker):
    each group's outputs go from its worker to the stores, its encoding to the writer."""
    import ray
    from tqdm.auto import tqdm

    stores, workers, writer = actors.stores, actors.workers, actors.writer
    bar = tqdm(total=layer.num_experts, unit="expert", disable=desc is None, desc=desc,
               leave=False)
    pending: dict[Any, tuple[int, list[int]]] = {}
    in_flight = [0] * len(workers)
    queue = list(enumerate(groups))
    try:
        while queue or pending:
            while queue and min(in_flight) < 2:
                w = int(np.argmin(in_flight))
                g, experts = queue.pop(0)
                parts = [s.expert_tokens.remote(experts) for s in stores]
                refs = workers[w].run.options(num_returns=1 + len(stores)).remote(
                    layer, g, experts, cap, budget, *parts)
                for s, ref in zip(stores, refs[1:], strict=True):
                    s.add_outputs.remote(g, experts, ref)
                pending[writer.add_group.remote(refs[0])] = (w, experts)
                in_flight[w] += 1
                if hook:
                    hook("group_dispatched", {"layer": layer, "group": g, "worker": w,
                                              "attempt": attempt, "actors": actors})
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                w, experts = pending.pop(r)
                ray.get(r)  # surfaces a worker's or the writer's error here
                in_flight[w] -= 1
                bar.update(len(experts))
                bar.set_postfix(tokens=tokens)
    finally:
        bar.close()


def _sum_timings(parts: Any) -> dict[str, float]:
    """Add up per-layer worker timings (``peak_*`` entries take the maximum)."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = max(out.get(k, 0.0), v) if k.startswith("peak_") else out.get(k, 0.0) + v
    return out


def _heldout(actors: Any, guard: Guard, after: int | None) -> tuple[float, int]:
    """The held-out samples' summed cross-entropy and token count, over every store (the stream
    after layer ``after``)."""
    import ray

    losses, _ = guard.run(lambda _: ray.get([s.loss.remote() for s in actors.stores]),
                          "held-out loss failed", None, after)
    return sum(l["ce_sum"] for l in losses), sum(l["tokens"] for l in losses)


def _collect(other: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The manifest's tensor tables, from the 'other' shard and every layer's record."""
    out: dict[str, dict[str, Any]] = {"tensors": dict(other["tensors"]), "quantized": {},
                                      "tables": {}, "experts": {}}
    for res in layers:
        out["tensors"].update(res["tensors"])
        out["quantized"].update(res["quantized"])
        out["tables"].update(res["tables"])
        if res["stats"]:
            out["experts"][res["file"]] = res["stats"]
    return out


def _report(plan: Plan, result: dict[str, Any], sizes: dict[str, Any], experts: dict[str, Any],
            ce: float, ntok: int) -> dict[str, Any]:
    from qmoe_ray.job import report as rp

    cfg = plan.cfg
    scheme = qz.source_scheme(plan.index.config, "config.json")
    _, decoded = qz.source_view(plan.index.tensors, scheme)
    # a family may name both layouts (Switch: per-expert and fused); the source holds one
    routed = [n for lay in plan.moe_layers for n in plan.family.source_expert_names(lay)
              if n in plan.index.tensors or n in decoded]
    return {
        "source": source_label(cfg.source),
        "source_precision": qz.precision(plan.index.tensors, scheme),
        "source_sizes": rp.source_sizes(plan.index.tensors, decoded, routed, sizes),
        "resumed_after_layers": result["resumed_after"],
        "recoveries": result["recoveries"],
        "model_type": plan.family.model_type,
        "options": cfg.output_options(),
        "seconds": time.perf_counter() - plan.started_at,
        "timings": result["timings"],
        "worker_timings": _sum_timings(r.get("worker_timings", {}) for r in result["layers"]),
        "sizes": sizes,
        "heldout_loss": ce / ntok if ntok else None,
        "heldout_perplexity": math.exp(ce / ntok) if ntok else None,
        "heldout_tokens": ntok,
        "layers": rp.layer_rows(result["layers"]),
        "grouping": rp.grouping(plan.grouping, result["layers"]),
        "trim": None if plan.trim is None else trim_summary(trim_record(plan.family)),
        "fallbacks": [
            {"file": f, "expert": s["expert"], "reason": s["fallback"]}
            for f, st in experts.items() for s in st if s["fallback"]
        ],
    }


def _finish(plan: Plan, actors: Any, guard: Guard, result: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss, the 'other' shard, copied source files, the report, and the manifest last."""
    import ray

    from qmoe_ray import __version__
    from qmoe_ray.job import report as rp

    writer = actors.writer
    ce, ntok = _heldout(actors, guard, result["last_index"])
    other = ray.get(writer.write_other.remote())
    copied = {f: c for f in COPIED_FILES
              if (c := ray.get(writer.copy_source_file.remote(f))) is not None}
    parts = _collect(other, result["layers"])
    sizes = rp.size_summary(parts["tensors"], parts["quantized"], parts["tables"])
    report = _report(plan, result, sizes, parts["experts"], ce, ntok)
    put = writer.put_bytes.remote
    ray.get([
        put("report.json", mf.dumps(report)),
        put("report.md", rp.to_markdown(report).encode()),
        put("report.png", rp.plot_png(report)),
    ])
    manifest = mf.build_manifest(
        created_by=f"qmoe-ray {__version__}", source=source_label(plan.cfg.source),
        source_fingerprint=plan.job["source_fingerprint"], model_type=plan.family.model_type,
        expert_layout=plan.family.expert_layout, config=qz.model_config(plan.index.config),
        options=plan.cfg.output_options(), copied_files=copied, sizes=sizes,
        heldout_loss=report["heldout_loss"], source_precision=report["source_precision"],
        trim=None if plan.trim is None else trim_record(plan.family), **parts)
    ray.get(put(mf.MANIFEST, mf.manifest_bytes(manifest)))
    return report
