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
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from qmoe_ray.compress import QuantOptions
from qmoe_ray.config import EMBEDDED, CompressConfig, StorageOptions
from qmoe_ray.models import get_family
from qmoe_ray.quant import parse_scheme
from qmoe_ray.storage.checkpoint import open_checkpoint
from qmoe_ray.storage.fs import url_to_fs

log = logging.getLogger("qmoe_ray")

MIN_CALIB_TOKENS = 256


def resolve_source(source: str) -> str:
    """``"embedded"`` -> the packaged tiny model's folder; anything else unchanged."""
    if source == EMBEDDED:
        from qmoe_ray.data import embedded_model_path

        return str(embedded_model_path())
    return source


def check_output_writable(output: str, options: Mapping[str, Any], overwrite: bool) -> None:
    """Fail fast when ``output`` cannot be written or already holds a checkpoint.

    Raises:
        PermissionError / OSError: the output cannot be written (names the URL).
        FileExistsError: a checkpoint (manifest) is already there and ``overwrite`` is False.
    """
    fs, root = url_to_fs(output, **dict(options))
    root = root.rstrip("/")
    if fs.exists(f"{root}/manifest.json") and not overwrite:
        raise FileExistsError(
            f"{output} already holds a compressed checkpoint; choose another output or pass "
            "--overwrite to replace it"
        )
    probe = f"{root}/.qmoe-write-probe"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - any backend error means "cannot write here"
        raise PermissionError(
            f"cannot write to output {output}: {type(exc).__name__}: {exc}. Check the URL and "
            "the credentials/storage options for it."
        ) from exc
    if overwrite and fs.exists(f"{root}/manifest.json"):
        fs.rm_file(f"{root}/manifest.json")


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
    need = math.ceil(cfg.num_workers * cfg.cpus_per_worker)
    # A local single-node cluster stays on loopback: Ray otherwise resolves 127.0.0.1 to the
    # machine's external address (this switch is read when ray's constants are first imported,
    # hence also set before `import ray` above when nothing imported Ray yet).
    ray.init(
        num_cpus=max(os.cpu_count() or 1, need),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=512 * 2**20,
        log_to_driver=True,
    )
    return True


def check_resources(cfg: CompressConfig) -> None:
    """Refuse up front when the cluster lacks what the workers ask for (instead of hanging).

    Raises:
        RuntimeError: naming the resource, what is asked and what the cluster has.
    """
    import ray

    have = ray.cluster_resources()
    asks = {"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": cfg.num_workers * cfg.gpus_per_worker}
    for res, amount in asks.items():
        if amount > 0 and have.get(res, 0) < amount:
            raise RuntimeError(
                f"the Ray cluster has {have.get(res, 0):g} {res} but {cfg.num_workers} workers x "
                f"{getattr(cfg, 'cpus_per_worker' if res == 'CPU' else 'gpus_per_worker'):g} "
                f"{res} = {amount:g} were asked for; lower --num-workers / --{res.lower()}s-per-worker "
                "or add nodes with that resource"
            )


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
    cfg: CompressConfig, storage: StorageOptions | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run a compression job to completion.

    Args:
        cfg: the job's options.
        storage: fsspec options for the source and the output (never written anywhere).
        progress: show a tqdm bar per layer.

    Returns:
        The report (also written as ``report.json`` next to the checkpoint).

    Raises:
        ValueError / FileExistsError / PermissionError / RuntimeError: bad input, found before
        the cluster does work; RuntimeError naming the layer when a layer fails.
    """
    from qmoe_ray.data import load_samples

    storage = storage or StorageOptions()
    t_start = time.perf_counter()
    source = resolve_source(cfg.source)
    ckpt = open_checkpoint(source, **storage.source)
    family = get_family(ckpt.config)
    layers = family.layers()
    moe_layers = [l for l in layers if l.moe]
    if not moe_layers:
        raise ValueError(f"{cfg.source}: the model has no mixture-of-experts layers; "
                         "qmoe-ray compresses MoE models only")
    scheme = parse_scheme(cfg.scheme, cfg.quant_group_size)
    check_output_writable(cfg.output, storage.output, cfg.overwrite)

    data_spec = cfg.data
    calib = load_samples(data_spec, ckpt.config, cfg.num_samples, cfg.seq_len, seed=cfg.seed,
                         split="calib", tokenizer_source=source, storage_options=storage.source)
    held = (load_samples(data_spec, ckpt.config, cfg.eval_samples, cfg.seq_len, seed=cfg.seed,
                         split="heldout", tokenizer_source=source,
                         storage_options=storage.source) if cfg.eval_samples else None)
    n_tok = int(np.asarray(calib["attention_mask"]).sum()) if "attention_mask" in calib else 0
    if n_tok < MIN_CALIB_TOKENS:
        raise ValueError(
            f"only {n_tok} calibration tokens ({cfg.num_samples} samples x {cfg.seq_len}); at "
            f"least {MIN_CALIB_TOKENS} are needed: raise --num-samples or --seq-len"
        )
    inputs = calib if held is None else {k: np.concatenate([calib[k], held[k]]) for k in calib}
    is_calib = np.zeros(len(next(iter(inputs.values()))), dtype=bool)
    is_calib[: len(next(iter(calib.values())))] = True

    started = _ray_init(cfg)
    try:
        from qmoe_ray.distributed.actors import make_actors

        check_resources(cfg)
        opts = QuantOptions(scheme=scheme, method=cfg.method, blocksize=cfg.blocksize,
                            percdamp=cfg.percdamp, actorder=cfg.actorder,
                            sequential=cfg.sequential_experts)
        actors = make_actors(cfg, storage, source, opts, inputs, is_calib)
        result = _walk(cfg, family, layers, actors, progress)
        report = _finish(cfg, ckpt, family, actors, result, t_start)
    finally:
        if started:
            import ray

            ray.shutdown()
    return report


def _walk(cfg: CompressConfig, family: Any, layers: list, actors: Any, progress: bool) -> dict[str, Any]:
    """Process every layer in order; returns per-layer write results and timings."""
    import ray
    from tqdm.auto import tqdm

    stores, workers, writer = actors.stores, actors.workers, actors.writer
    layer_results: list[dict[str, Any]] = []
    timings: dict[str, float] = {"dense": 0.0, "quantize": 0.0, "write": 0.0}
    n_moe = sum(1 for l in layers if l.moe)
    done_moe = 0
    for layer in layers:
        t0 = time.perf_counter()
        try:
            if not layer.moe:
                ray.get([s.dense_block.remote(layer) for s in stores])
                t1 = time.perf_counter()
                timings["dense"] += t1 - t0
                res = ray.get(writer.finish_layer.remote(layer, 0))
                timings["write"] += time.perf_counter() - t1
                res.update(routed=[], hessian_tokens_total=[], cap=None, seconds=time.perf_counter() - t0)
                layer_results.append(res)
                continue
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
                ready, _ = ray.wait(list(pending), num_returns=1)
                for r in ready:
                    w, experts = pending.pop(r)
                    ray.get(r)  # surfaces a worker's or the writer's error here
                    in_flight[w] -= 1
                    bar.update(len(experts))
                    bar.set_postfix(tokens=int(routed.sum()))
            bar.close()
            ray.get([s.post_moe.remote(layer, len(groups)) for s in stores])
            t2 = time.perf_counter()
            timings["quantize"] += t2 - t1
            res = ray.get(writer.finish_layer.remote(layer, len(groups)))
            timings["write"] += time.perf_counter() - t2
        except Exception as exc:
            raise RuntimeError(f"compression failed at layer {layer.name}: {exc}") from exc
        res["routed"] = routed.tolist()
        res["hessian_tokens_total"] = hess.tolist()
        res["cap"] = cap
        res["seconds"] = time.perf_counter() - t0
        layer_results.append(res)
        done_moe += 1
        fallbacks = sum(1 for s in res["stats"] if s["fallback"])
        loss = sum(sum(s["proxy_loss"].values()) for s in res["stats"])
        log.info("layer %s: %d experts, %d tokens routed, %d fallbacks, proxy loss %.4g, %.1fs",
                 layer.name, layer.num_experts, int(routed.sum()), fallbacks, loss, res["seconds"])
        if progress:
            print(f"[qmoe-ray] layer {layer.name}: {layer.num_experts} experts, "
                  f"{int(routed.sum())} tokens, {fallbacks} RTN fallbacks, "
                  f"proxy loss {loss:.4g}, {res['seconds']:.1f}s", flush=True)
    return {"layers": layer_results, "timings": timings}


def _sum_timings(parts: Any) -> dict[str, float]:
    """Add up per-layer worker timings (``peak_*`` entries take the maximum)."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = max(out.get(k, 0.0), v) if k.startswith("peak_") else out.get(k, 0.0) + v
    return out


def _finish(cfg: CompressConfig, ckpt: Any, family: Any, actors: Any, result: dict[str, Any],
            t_start: float) -> dict[str, Any]:
    """Held-out loss, the 'other' shard, copied source files, the report, and the manifest last."""
    import ray

    from qmoe_ray import __version__
    from qmoe_ray import report as rp
    from qmoe_ray.storage import manifest as mf

    writer = actors.writer
    losses = ray.get([s.loss.remote() for s in actors.stores])
    ce = sum(l["ce_sum"] for l in losses)
    ntok = sum(l["tokens"] for l in losses)
    other = ray.get(writer.write_other.remote())
    copied = [f for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
                          "generation_config.json")
              if ray.get(writer.copy_source_file.remote(f))]
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
    source_label = cfg.source if "://" not in cfg.source else cfg.source.split("?")[0]
    report = {
        "source": source_label,
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
        "source": source_label,
        "model_type": family.model_type,
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
