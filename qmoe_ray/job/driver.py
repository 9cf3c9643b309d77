"""The compression job's driver: the only module that talks to Ray.

Shape of a run (see DESIGN.md): the driver reads only the source's config and tensor list, checks
everything it can before the cluster does work (scheme, output writable, enough calibration
tokens, the resources asked for), then creates

- ``ActivationStore`` actors, each holding contiguous batches of samples (``stores.py``),
- ``QuantWorker`` actors (``num_gpus``/``num_cpus`` per worker) running ``GroupWorker`` (``workers.py``),
- one ``Writer`` actor running ``CheckpointWriter`` (``reducer.py``),

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from qmoe_ray.data import resolve_data, resolve_source
from qmoe_ray.errors import InputError, ResourceError
from qmoe_ray.format import manifest as mf
from qmoe_ray.job.config import CompressConfig, StorageOptions
from qmoe_ray.job.group import QuantOptions
from qmoe_ray.job.progress import PROGRESS, Progress, source_fingerprint
from qmoe_ray.models import LayerSpec, get_family
from qmoe_ray.quant import parse_scheme
from qmoe_ray.storage.checkpoint import open_checkpoint
from qmoe_ray.storage.fs import redact, url_to_fs

log = logging.getLogger("qmoe_ray")

MIN_CALIB_TOKENS = 256
MAX_LAYER_ATTEMPTS = 4
"""Tries per layer when the cluster fails under it (lost actors/nodes); job errors are not retried."""
RESTART_TIMEOUT_S = float(os.environ.get("QMOE_RESTART_TIMEOUT_S", "180"))
"""How long to wait for restarted actors (a lost node's actors need room elsewhere)."""

Hook = Callable[[str, dict[str, Any]], None]


def check_output_writable(output: str, options: Mapping[str, Any], overwrite: bool) -> None:
    """Fail fast when ``output`` cannot be written or already holds a checkpoint.

    Changes nothing at the output (a probe file is written and removed; a folder made for it is
    removed again): an existing checkpoint is replaced only once every check has passed
    (``Progress.start``).

    Raises:
        PermissionError / OSError: the output cannot be written (names the URL).
        FileExistsError: a checkpoint (manifest) is already there and ``overwrite`` is False.
    """
    fs, root = url_to_fs(output, **dict(options))
    root = root.rstrip("/")
    if fs.exists(f"{root}/manifest.json") and not overwrite:
        raise FileExistsError(
            f"{redact(output)} already holds a compressed checkpoint; choose another output or "
            "pass --overwrite to replace it"
        )
    probe = f"{root}/.qmoe-write-probe"
    made = not fs.exists(root)
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
        if made and fs.isdir(root) and not fs.ls(root):
            fs.rmdir(root)
    except Exception as exc:  # noqa: BLE001 - any backend error means "cannot write here"
        raise PermissionError(
            f"cannot write to output {redact(output)}: {type(exc).__name__}: {exc}. Check the URL "
            "and the credentials/storage options for it."
        ) from None


def _ray_init(cfg: CompressConfig) -> bool:
    """Connect to (or start) Ray. Returns True when this call started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not (cfg.address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return True
    # A local single-node cluster stays on loopback: Ray otherwise resolves 127.0.0.1 to the
    # machine's external address (this switch is read when ray's constants are first imported,
    # hence also set before `import ray` above when nothing imported Ray yet).
    # address="local": always a new cluster of our own, never one that `ray start` (or a stale
    # /tmp/ray/ray_current_cluster file) points at. It is sized to the machine (its cores), so
    # that check_resources refuses a request beyond it instead of starting 1000 workers.
    # Ray's notice that it made a token for the local cluster is not the user's business.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    ray.init(
        address="local",
        num_cpus=local_cpus(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=512 * 2**20,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )
    return True


def local_cpus() -> int:
    """CPUs of the in-process local cluster: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _resource_problem(cfg: CompressConfig) -> str | None:
    """Why the cluster cannot host the workers (None when it can)."""
    import ray

    have = ray.cluster_resources()
    per = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}
    for res, each in per.items():
        amount = cfg.num_workers * each
        if amount > 0 and have.get(res, 0) < amount:
            flag = "cpus" if res == "CPU" else "gpus"
            return (f"the Ray cluster has {have.get(res, 0):g} {res} but {cfg.num_workers} "
                    f"workers x {each:g} {res} = {amount:g} were asked for; lower --num-workers / "
                    f"--{flag}-per-worker or add nodes with that resource")
    # a worker must fit on one node: pack them greedily onto the alive nodes' totals
    free = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    for k in range(cfg.num_workers):
        node = next((n for n in free if all(n.get(r, 0) >= v for r, v in per.items() if v > 0)),
                    None)
        if node is None:
            largest = {r: max((n.get(r, 0) for n in free), default=0) for r in per}
            return (f"worker {k + 1} of {cfg.num_workers} fits on no node: each needs "
                    f"{per['CPU']:g} CPU and {per['GPU']:g} GPU, the nodes left have at most "
                    f"{largest['CPU']:g} CPU and {largest['GPU']:g} GPU; lower "
                    "--cpus-per-worker / --gpus-per-worker or add larger nodes")
        for r, v in per.items():
            node[r] = node.get(r, 0) - v
    return None


def check_resources(cfg: CompressConfig, wait_s: float = 0.0) -> None:
    """Refuse when the cluster lacks what the workers ask for (instead of hanging).

    Args:
        cfg: the job's options (workers and their CPUs/GPUs).
        wait_s: on an autoscaling cluster, ask the autoscaler for the workers' resources and wait
            up to this long for them to appear.

    Raises:
        ResourceError: naming the resource, what is asked and what the cluster has.
    """
    deadline = time.monotonic() + wait_s
    asked = False
    while True:
        problem = _resource_problem(cfg)
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise ResourceError(problem)
        if not asked:
            from ray.autoscaler.sdk import request_resources

            bundle = {"CPU": cfg.cpus_per_worker}
            if cfg.gpus_per_worker:
                bundle["GPU"] = cfg.gpus_per_worker
            request_resources(bundles=[bundle] * cfg.num_workers)
            log.warning("%s; waiting up to %.0fs for the autoscaler to add them "
                        "(QMOE_RESOURCE_WAIT_S)", problem, wait_s)
            asked = True
        time.sleep(2.0)


def split_batches(n: int, batch_size: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous sample ranges of whole batches for ``parts`` stores (some may be empty)."""
    nb = math.ceil(n / batch_size)
    per = [nb // parts + (1 if i < nb % parts else 0) for i in range(parts)]
    out, b = [], 0
    for p in per:
        out.append((min(b * batch_size, n), min((b + p) * batch_size, n)))
        b += p
    return [r for r in out if r[1] > r[0]]


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
    from qmoe_ray.data import load_samples

    storage = storage or StorageOptions()
    t_start = time.perf_counter()
    source = resolve_source(cfg.source)
    ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if not (cfg.address or os.environ.get("RAY_ADDRESS") or ray_up):
        need = cfg.num_workers * cfg.cpus_per_worker
        if need > local_cpus():  # refuse before any work, not after starting Ray
            raise InputError(
                f"--num-workers {cfg.num_workers} x --cpus-per-worker {cfg.cpus_per_worker:g} = "
                f"{need:g} CPUs, but the local cluster has {local_cpus()} (this machine's cores); "
                "lower --num-workers / --cpus-per-worker, or pass --address of a larger Ray "
                "cluster")
    ckpt = open_checkpoint(source, **storage.source)
    family = get_family(ckpt.config, ckpt)  # the expert layout, resolved from the names
    layers = family.layers()
    moe_layers = [l for l in layers if l.moe]
    if not moe_layers:
        raise ValueError(f"{cfg.source}: the model has no mixture-of-experts layers; "
                         "qmoe-ray compresses MoE models only")
    family.check_weights(ckpt.names, ckpt.shape)  # a missing tensor or a wrong shape: now
    scheme = parse_scheme(cfg.scheme, cfg.quant_group_size)
    check_output_writable(cfg.output, storage.output, cfg.overwrite)
    prog = Progress(cfg.output, storage.output)
    job = {"source": source_label(cfg.source),
           "source_fingerprint": _fingerprint(ckpt),
           "options": cfg.output_options()}
    resuming = prog.check(job, cfg.overwrite)

    data_spec = resolve_data(cfg.data, cfg.source)
    calib = load_samples(data_spec, ckpt.config, cfg.num_samples, cfg.seq_len, seed=cfg.seed,
                         split="calib", tokenizer_source=source, storage_options=storage.source)
    held = (load_samples(data_spec, ckpt.config, cfg.eval_samples, cfg.seq_len, seed=cfg.seed,
                         split="heldout", tokenizer_source=source,
                         storage_options=storage.source, fewer_ok=True)
            if cfg.eval_samples else None)
    if held is not None and len(held["input_ids"]) < cfg.eval_samples:
        log.warning("--eval-samples %d: the held-out split of %s holds %d samples of this "
                    "length; the report's loss uses those %d", cfg.eval_samples,
                    redact(cfg.data), len(held["input_ids"]), len(held["input_ids"]))
    n_tok = int(np.asarray(calib["attention_mask"]).sum()) if "attention_mask" in calib else 0
    if n_tok < MIN_CALIB_TOKENS:
        raise InputError(
            f"only {n_tok} calibration tokens ({cfg.num_samples} samples x {cfg.seq_len}); at "
            f"least {MIN_CALIB_TOKENS} are needed: raise --num-samples or --seq-len"
        )
    inputs = calib if held is None else {k: np.concatenate([calib[k], held[k]]) for k in calib}
    is_calib = np.zeros(len(next(iter(inputs.values()))), dtype=bool)
    is_calib[: len(next(iter(calib.values())))] = True

    if progress:
        print(f"[qmoe-ray] compressing {source_label(cfg.source)} ({family.model_type}, "
              f"{len(moe_layers)} MoE layers x {moe_layers[0].num_experts} experts) to "
              f"{redact(cfg.output)}: {cfg.scheme} {cfg.method}, {int(is_calib.sum())} calibration + "
              f"{int((~is_calib).sum())} held-out samples x {cfg.seq_len} tokens; starting Ray",
              flush=True)
    started = _ray_init(cfg)
    actors = None
    try:
        from qmoe_ray.job.actors import make_actors, save_inputs

        remote = not started or bool(cfg.address or os.environ.get("RAY_ADDRESS"))
        check_resources(cfg, float(os.environ.get("QMOE_RESOURCE_WAIT_S", 300 if remote else 0)))
        done = prog.done_layers([l.index for l in layers]) if resuming else []
        # every check has passed: from here on the output is this job's (an old checkpoint
        # is replaced only now)
        if not resuming:
            prog.start(job, cfg.overwrite)
        save_inputs(prog, inputs, is_calib, cfg.batch_size)
        opts = QuantOptions(scheme=scheme, method=cfg.method, blocksize=cfg.blocksize,
                            percdamp=cfg.percdamp, actorder=cfg.actorder,
                            sequential=cfg.sequential_experts,
                            segment_symbols=cfg.segment_symbols,
                            rate_lambda=cfg.rate_lambda)
        actors = make_actors(cfg, storage, source, opts, len(is_calib))
        result = _walk(cfg, layers, actors, prog, done, progress, hook)
        report = _finish(cfg, ckpt, family, actors, result, t_start)
        prog.remove(PROGRESS)  # the manifest is written: the checkpoint no longer needs it
    finally:
        import ray

        if started:
            ray.shutdown()
        elif actors is not None:  # a shared cluster: free the job's CPUs/GPUs now, not at GC
            for a in [*actors.stores, *actors.workers, actors.writer]:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already dead is fine
                    pass
    return report


def source_label(source: str) -> str:
    """The source as recorded in the manifest, the reports and progress: no credentials (the
    URL's userinfo and query string dropped)."""
    return redact(source)


# -- faults ----------------------------------------------------------------------------------------
def _system_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the cluster failing rather than the job."""
    import ray.exceptions as rex

    system = (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError,
              rex.WorkerCrashedError, rex.NodeDiedError, rex.RaySystemError,
              rex.ObjectFetchTimedOutError, rex.OutOfMemoryError)
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, system):
            return True
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return False


def _incarnations(actors: Any, timeout: float) -> list[str]:
    """Each stateful actor's incarnation (stores, then the writer)."""
    import ray

    return ray.get([a.ping.remote() for a in [*actors.stores, actors.writer]], timeout=timeout)


def _recoverable(exc: BaseException, actors: Any, known: list[str]) -> bool:
    """A cluster failure, or a stateful actor restarted (its calls then fail as job errors)."""
    if _system_failure(exc):
        return True
    try:
        return _incarnations(actors, 10.0) != known
    except Exception:  # noqa: BLE001 - an actor that cannot answer is a cluster failure too
        return True


def _recover(actors: Any, redo: LayerSpec | None, after: int | None) -> list[str]:
    """Wait for every actor to answer (restarted ones included), then put the stores back to
    the input of ``redo`` (the stream after layer ``after``) and drop ``redo``'s held groups.

    Returns:
        The stateful actors' incarnations after recovery.

    Raises:
        RuntimeError: the actors did not come back within ``RESTART_TIMEOUT_S`` (the message
            names what the cluster lacks).
    """
    import ray

    deadline = time.monotonic() + RESTART_TIMEOUT_S
    everyone = [*actors.stores, *actors.workers, actors.writer]
    while True:
        try:
            ray.get([a.ping.remote() for a in everyone],
                    timeout=max(1.0, deadline - time.monotonic()))
            break
        except Exception as exc:  # noqa: BLE001 - restarting actors answer with several errors
            if time.monotonic() >= deadline:
                raise ResourceError(
                    f"actors lost with their node(s) were not restarted within "
                    f"{RESTART_TIMEOUT_S:.0f}s ({type(exc).__name__}); the cluster has "
                    f"{ray.available_resources()} available: add nodes or lower --num-workers"
                ) from exc
            time.sleep(0.5)
    if redo is not None:
        ray.get(actors.writer.discard_layer.remote(redo.index))
    ray.get([s.restore.remote(after) for s in actors.stores])
    return _incarnations(actors, 60.0)


def _walk(cfg: CompressConfig, layers: list, actors: Any, prog: Progress,
          done: list[dict[str, Any]], progress: bool, hook: Hook | None) -> dict[str, Any]:
    """Process every layer not yet done, in order; returns per-layer results and timings."""
    import ray

    stores = actors.stores
    layer_results: list[dict[str, Any]] = list(done)
    timings: dict[str, float] = {"dense": 0.0, "quantize": 0.0, "write": 0.0, "checkpoint": 0.0,
                                 "restore": 0.0, "recovery": 0.0}
    n_moe = sum(1 for l in layers if l.moe)
    done_moe = sum(1 for l in layers[: len(done)] if l.moe)
    prev = layers[len(done) - 1].index if done else None
    t_walk = t0 = time.perf_counter()
    if done:
        ray.get([s.restore.remote(prev) for s in stores])
        log.info("resuming after layer %s (%d of %d layers done)", layers[len(done) - 1].name,
                 len(done), len(layers))
        if progress:
            print(f"[qmoe-ray] resuming after layer {layers[len(done) - 1].name} "
                  f"({len(done)}/{len(layers)} layers done)", flush=True)
    timings["restore"] = time.perf_counter() - t0
    known = _incarnations(actors, 600.0)
    recoveries: list[dict[str, Any]] = []
    first_new: float | None = None
    for layer in layers[len(done):]:
        for attempt in range(1, MAX_LAYER_ATTEMPTS + 1):
            t0 = time.perf_counter()
            try:
                if hook:
                    hook("layer_start", {"layer": layer, "attempt": attempt, "actors": actors})
                res = _layer(cfg, layer, actors, timings, done_moe, n_moe, progress, hook, attempt)
                t1 = time.perf_counter()
                ray.get([s.save_state.remote(layer.index) for s in stores])
                timings["checkpoint"] += time.perf_counter() - t1
                break
            except Exception as exc:
                if attempt == MAX_LAYER_ATTEMPTS or not _recoverable(exc, actors, known):
                    why = "" if attempt == 1 else f" (attempt {attempt})"
                    raise RuntimeError(
                        f"compression failed at layer {layer.name}{why}: {exc}") from exc
                log.warning("layer %s: the cluster failed under it (%s: %s); restoring the "
                            "stores and redoing the layer", layer.name, type(exc).__name__,
                            str(exc).splitlines()[0][:200] if str(exc) else "")
                t1 = time.perf_counter()
                known = _recover(actors, layer, prev)
                timings["recovery"] += time.perf_counter() - t1
                recoveries.append({"layer": layer.name, "attempt": attempt,
                                   "error": type(exc).__name__})
        res["seconds"] = time.perf_counter() - t0
        # the record, as the manifest will see it after a resume: JSON round trip both ways
        res = json.loads(mf.dumps(res))
        t1 = time.perf_counter()
        prog.finish_layer(layer.index, res, prev)
        timings["checkpoint"] += time.perf_counter() - t1
        layer_results.append(res)
        if first_new is None:
            first_new = time.perf_counter()
        if hook:
            hook("layer_done", {"layer": layer, "attempt": attempt, "actors": actors})
        prev = layer.index
        if layer.moe:
            done_moe += 1
            _log_layer(layer, res, progress)
    timings["first_new_layer"] = (first_new - t_walk) if first_new is not None else 0.0
    return {"layers": layer_results, "timings": timings, "resumed_after": len(done),
            "recoveries": recoveries, "last_index": prev}


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


def _layer(cfg: CompressConfig, layer: LayerSpec, actors: Any, timings: dict[str, float],
           done_moe: int, n_moe: int, progress: bool, hook: Hook | None,
           attempt: int) -> dict[str, Any]:
    """One layer through the stores, workers and writer; returns the writer's result."""
    import ray
    from tqdm.auto import tqdm

    stores, workers, writer = actors.stores, actors.workers, actors.writer
    t0 = time.perf_counter()
    if not layer.moe:
        ray.get([s.dense_block.remote(layer) for s in stores])
        t1 = time.perf_counter()
        timings["dense"] += t1 - t0
        res = ray.get(writer.finish_layer.remote(layer, 0))
        timings["write"] += time.perf_counter() - t1
        res.update(routed=[], hessian_tokens_total=[], cap=None)
        return res
    counts = ray.get([s.pre_moe.remote(layer) for s in stores])
    t1 = time.perf_counter()
    timings["dense"] += t1 - t0
    routed = np.sum([c["routed"] for c in counts], axis=0)
    hess = np.sum([c["hessian"] for c in counts], axis=0)
    cap = int(math.ceil(cfg.token_cap * hess.mean())) if cfg.token_cap else None
    groups = [list(range(g, min(g + cfg.group_size, layer.num_experts)))
              for g in range(0, layer.num_experts, cfg.group_size)]
    bar = tqdm(total=layer.num_experts, unit="expert", disable=not progress,
               desc=f"layer {layer.name} ({done_moe + 1}/{n_moe} MoE)", leave=False)
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
                    layer, g, experts, cap, *parts)
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
                bar.set_postfix(tokens=int(routed.sum()))
    finally:
        bar.close()
    ray.get([s.post_moe.remote(layer, len(groups)) for s in stores])
    t2 = time.perf_counter()
    timings["quantize"] += t2 - t1
    res = ray.get(writer.finish_layer.remote(layer, len(groups)))
    timings["write"] += time.perf_counter() - t2
    res["routed"] = routed.tolist()
    res["hessian_tokens_total"] = hess.tolist()
    res["cap"] = cap
    return res


def _sum_timings(parts: Any) -> dict[str, float]:
    """Add up per-layer worker timings (``peak_*`` entries take the maximum)."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = max(out.get(k, 0.0), v) if k.startswith("peak_") else out.get(k, 0.0) + v
    return out


def _fingerprint(ckpt: Any) -> str:
    """The source's identity for resume checks and the manifest: config + tensor names/shapes."""
    return source_fingerprint(
        ckpt.config, {n: f"{ckpt.dtype(n)}{list(ckpt.shape(n))}" for n in ckpt.names})


def _finish(cfg: CompressConfig, ckpt: Any, family: Any, actors: Any, result: dict[str, Any],
            t_start: float) -> dict[str, Any]:
    """Held-out loss, the 'other' shard, copied source files, the report, and the manifest last."""
    import ray

    from qmoe_ray import __version__
    from qmoe_ray.job import report as rp
    writer = actors.writer
    known = _incarnations(actors, 600.0)
    for attempt in range(1, MAX_LAYER_ATTEMPTS + 1):
        try:
            losses = ray.get([s.loss.remote() for s in actors.stores])
            break
        except Exception as exc:
            if attempt == MAX_LAYER_ATTEMPTS or not _recoverable(exc, actors, known):
                raise RuntimeError(f"held-out loss failed: {exc}") from exc
            known = _recover(actors, None, result["last_index"])
    ce = sum(l["ce_sum"] for l in losses)
    ntok = sum(l["tokens"] for l in losses)
    other = ray.get(writer.write_other.remote())
    copied = {f: c for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
                             "generation_config.json")
              if (c := ray.get(writer.copy_source_file.remote(f))) is not None}
    tensors: dict[str, Any] = dict(other["tensors"])
    quantized: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    experts: dict[str, Any] = {}
    for res in result["layers"]:
        tensors.update(res["tensors"])
        quantized.update(res["quantized"])
        tables.update(res["tables"])
        if res["stats"]:
            experts[res["file"]] = res["stats"]
    sizes = rp.size_summary(tensors, quantized, tables)
    report = {
        "source": source_label(cfg.source),
        "resumed_after_layers": result["resumed_after"],
        "recoveries": result["recoveries"],
        "model_type": family.model_type,
        "options": cfg.output_options(),
        "seconds": time.perf_counter() - t_start,
        "timings": result["timings"],
        "worker_timings": _sum_timings(r.get("worker_timings", {}) for r in result["layers"]),
        "sizes": sizes,
        "heldout_loss": ce / ntok if ntok else None,
        "heldout_perplexity": math.exp(ce / ntok) if ntok else None,
        "heldout_tokens": ntok,
        "layers": rp.layer_rows(result["layers"]),
        "fallbacks": [
            {"file": f, "expert": s["expert"], "reason": s["fallback"]}
            for f, st in experts.items() for s in st if s["fallback"]
        ],
    }
    put = writer.put_bytes.remote
    ray.get([
        put("report.json", mf.dumps(report)),
        put("report.md", rp.to_markdown(report).encode()),
        put("report.png", rp.plot_png(report)),
    ])
    manifest = {
        "format": mf.FORMAT_NAME,
        "format_version": mf.FORMAT_VERSION,
        "created_by": f"qmoe-ray {__version__}",
        "source": source_label(cfg.source),
        "source_fingerprint": _fingerprint(ckpt),
        "model_type": family.model_type,
        "expert_layout": family.expert_layout,  # the source's: per-expert or fused 3-D tensors
        "config": ckpt.config,
        "options": cfg.output_options(),
        "files": sorted({t["file"] for t in tensors.values()}),
        "copied_files": copied,
        "tensors": tensors,
        "quantized": quantized,
        "tables": tables,
        "experts": experts,
        "sizes": sizes,
        "heldout_loss": report["heldout_loss"],
    }
    ray.get(put(mf.MANIFEST, mf.dumps(manifest)))
    return report
