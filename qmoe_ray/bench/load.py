"""Load-time benchmark: read / verify / decode split for a compressed checkpoint.

``python jobs/benchmark.py load [URL] [--device cuda]`` loads an existing checkpoint; without a URL
it compresses the embedded model and writes a synthetic Mixtral-shaped checkpoint (random ternary
experts at the paper's P(0)=0.885, a shared table per layer and role, random bf16 dense weights)
of a chosen size to a temporary folder, and loads both. The synthetic writer mirrors the job's layout (``format.matrices`` + ``format.shards``)
without Ray or GPTQ, so hundreds of millions of expert weights take seconds to make.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmoe_ray.bench import BenchResult
from qmoe_ray.format import manifest as mf
from qmoe_ray.format.matrices import pack_matrix, shared_table, table_tensors
from qmoe_ray.format.shards import serialize_shard
from qmoe_ray.quant import parse_scheme


def synthetic_checkpoint(out: Path, hidden: int = 1024, ff: int = 2048, layers: int = 6,
                         experts: int = 8, vocab: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Write a synthetic compressed Mixtral checkpoint to ``out``; returns its manifest."""
    rng = np.random.default_rng(seed)
    scheme = parse_scheme("ternary")
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
           "hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": layers,
           "num_attention_heads": 8, "num_key_value_heads": 8, "num_local_experts": experts,
           "num_experts_per_tok": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 512, "tie_word_embeddings": False}
    (out / "shards").mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": mf.FORMAT_NAME, "format_version": mf.FORMAT_VERSION,
                                "config": cfg, "files": [], "tensors": {}, "quantized": {},
                                "tables": {}, "experts": {}, "source": "synthetic",
                                "options": {"scheme": "ternary", "method": "synthetic"}}

    def bf16(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02).bfloat16()

    def write(rel: str, tensors: dict[str, torch.Tensor]) -> None:
        data, index = serialize_shard(tensors)
        (out / rel).write_bytes(data)
        manifest["files"].append(rel)
        for k, v in index.items():
            manifest["tensors"][k] = {**v, "file": rel}

    shapes = {"gate_proj": (ff, hidden), "up_proj": (ff, hidden), "down_proj": (hidden, ff)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors = {f"{p}.input_layernorm.weight": bf16(hidden),
                   f"{p}.post_attention_layernorm.weight": bf16(hidden),
                   f"{p}.block_sparse_moe.gate.weight": bf16(experts, hidden)}
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}.self_attn.{n}.weight"] = bf16(hidden, hidden)
        for role, (r, c) in shapes.items():
            codes = torch.from_numpy(rng.choice(np.array([-1, 0, 1], np.int8), size=(experts, r, c),
                                                p=[0.0575, 0.885, 0.0575]))
            table = shared_table(scheme, codes)
            tname = f"{p}.qmoe_table.group0.{role}"
            tt, meta = table_tensors(tname, table)
            tensors.update(tt)
            manifest["tables"][tname] = meta
            for e in range(experts):
                name = f"{p}.mlp.experts.{e}.{role}.weight"
                params = {"lo": -torch.rand(r) * 0.05, "hi": torch.rand(r) * 0.05}
                t, entry = pack_matrix(name, scheme, codes[e], params, table, tname)
                tensors.update(t)
                manifest["quantized"][name] = entry
        write(f"shards/layer-{i:05d}.safetensors", tensors)
    write("shards/other.safetensors", {"model.embed_tokens.weight": bf16(vocab, hidden),
                                       "lm_head.weight": bf16(vocab, hidden),
                                       "model.norm.weight": bf16(hidden)})
    (out / mf.MANIFEST).write_bytes(mf.manifest_bytes(manifest))
    return manifest


def _one_load(url: str, mode: str, device: str) -> tuple[dict[str, float], int]:
    """One load's timings and its number of expert weights."""
    from qmoe_ray.read.loader import load

    m = load(url, device=device, mode=mode)
    n = sum(int(np.prod(e["shape"])) for e in m.manifest["quantized"].values())
    return dict(m.timings), n


def _summary(runs: list[dict[str, float]], n: int, mode: str, device: str) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med.update(expert_weights=n, mode=mode, device=device, repeats=len(runs),
               decode_mweights_per_s=n / max(med["decode"], 1e-9) / 1e6,
               load_mweights_per_s=n / max(med["wall"], 1e-9) / 1e6)
    return med


def load_timings(url: str, mode: str = "decode", device: str = "cpu", repeat: int = 3
                 ) -> dict[str, Any]:
    """Load ``url`` ``repeat`` times; the median of each timing, and throughput figures."""
    runs = []
    for _ in range(repeat):
        t, n = _one_load(url, mode, device)
        runs.append(t)
    return _summary(runs, n, mode, device)


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _embedded_checkpoint(out: Path) -> str:
    """Compress the embedded tiny model (ternary GPTQ, local Ray) into ``out``."""
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression

    run_compression(CompressConfig(output=str(out), overwrite=True, eval_samples=0),
                    progress=False)
    return str(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", nargs="?", default=None,
                        help="a compressed checkpoint (default: the embedded model compressed "
                             "now, and a synthetic Mixtral-shaped one)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ff", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true",
                        help="skip the loads from a local S3 endpoint (moto; needs the test "
                             "extra)")
    parser.add_argument("--tokens", type=int, default=8,
                        help="sequence length of the latency measurement (batch 1)")


def run(args: argparse.Namespace) -> BenchResult:
    """Load-time split (read / wait / verify / decode) for decode and resident modes, with the
    same model as plain bf16 safetensors as the baseline. Everything is written first; then
    every repeat loads each checkpoint in each mode (and cold: page cache dropped) and the bf16
    file (warm and cold) once, in turn, so a noisy machine slows all of them alike; then the
    S3 loads (a local moto server, when installed) and the forward latency."""
    from qmoe_ray.read.weights import check_device

    check_device(args.device)  # no GPU: say so before minutes of writing checkpoints
    with tempfile.TemporaryDirectory() as tmp:
        targets: list[tuple[str, str]] = []
        if args.url:
            targets.append(("given checkpoint", args.url))
        else:
            if _installed("ray"):
                targets.append(("embedded tiny model (ternary GPTQ, 4 layers x 8 experts x 3 of "
                                "192x128)", _embedded_checkpoint(Path(tmp) / "embedded")))
            else:  # e.g. a GPU image without Ray: the synthetic checkpoint needs no job
                print("ray is not installed: skipping the embedded model (it needs the job)")
            syn = Path(tmp) / "synthetic"
            synthetic_checkpoint(syn, args.hidden, args.ff, args.layers, args.experts)
            targets.append((f"synthetic Mixtral-shaped ({args.layers} layers x {args.experts} "
                            f"experts x 3 of {args.ff}x{args.hidden}, P(0)=0.885)", str(syn)))
        bf16_path = _bf16_file(targets[-1][1], Path(tmp) / "bf16")
        os.sync()
        time.sleep(5)  # the compression's Ray processes wind down; the writes settle
        cold = _can_evict()
        modes = ("decode", "resident") + (("decode, cold cache",) if cold else ())
        keys = [(label, url, mode) for label, url in targets for mode in modes]
        runs: dict[str, list[dict[str, float]]] = {f"{k[0]} | {k[2]}": [] for k in keys}
        sizes: dict[str, int] = {}
        base_times, cold_times = [], []
        fresh: dict[str, list[dict[str, float]]] = {"compressed": [], "bf16": []}
        for _, url in targets:  # warm-up: numba kernels, page cache
            _one_load(url, "decode", args.device)
        for _ in range(args.repeat):
            for label, url, mode in keys:
                if mode.endswith("cold cache"):
                    evict(Path(url))
                t, sizes[label] = _one_load(url, mode.split(",")[0], args.device)
                runs[f"{label} | {mode}"].append(t)
            base_times.append(_bf16_seconds(bf16_path))
            if cold:
                evict(bf16_path)
                cold_times.append(_bf16_seconds(bf16_path))
            fresh["compressed"].append(fresh_process("compressed", targets[-1][1], args.device))
            fresh["bf16"].append(fresh_process("bf16", str(bf16_path)))
        figures = {k: _summary(v, sizes[k.rsplit(" | ", 1)[0]], k.rsplit(" | ", 1)[1],
                               args.device) for k, v in runs.items()}
        baseline = {"seconds": statistics.median(base_times), "bytes": bf16_path.stat().st_size,
                    "cold_seconds": statistics.median(cold_times) if cold else None,
                    "fresh": {k: {f: statistics.median(r[f] for r in v) for f in v[0]}
                              for k, v in fresh.items()}}
        if args.url or args.no_s3:
            s3 = None
        elif not _installed("moto", "s3fs", "flask"):
            print("moto/s3fs are not installed: skipping the S3 loads (pip install -e '.[test]')")
            s3 = None
        else:
            s3 = s3_timings(Path(targets[-1][1]), args.repeat)
        latency = {label: token_latency(url, args.device, args.tokens, 3 * args.repeat)
                   for label, url in targets}
    figures["latency"] = latency
    if s3:
        figures["s3"] = s3
    return BenchResult(figures, _markdown(figures, args.device, targets[-1][0], baseline))


def token_latency(url: str, device: str, tokens: int = 8, repeat: int = 15) -> dict[str, float]:
    """Forward latency of a short sequence (``tokens`` ids, batch 1): decode mode with the expert
    products in float32 and in bf16 (the dense bf16 model), and resident mode (experts kept
    encoded: the fused kernel on a GPU, a decode per product on a CPU), timed in turn; medians
    in milliseconds and resident's ratio to each."""
    import torch

    from qmoe_ray.read.loader import load

    models = {"decode_f32": load(url, device=device),
              "decode_bf16": load(url, device=device, compute="bf16"),
              "resident": load(url, device=device, mode="resident")}
    vocab = int(models["resident"].config["vocab_size"])
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in models}

    def once(m: Any) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.logits(ids)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for m in models.values():  # warm-up: kernels compiled, caches filled
        once(m)
    for _ in range(repeat):
        for k, m in models.items():
            times[k].append(once(m))
    ms = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}
    return {"tokens": tokens, **ms, "ratio_bf16": ms["resident_ms"] / ms["decode_bf16_ms"],
            "ratio_f32": ms["resident_ms"] / ms["decode_f32_ms"]}


def _can_evict() -> bool:
    return hasattr(os, "posix_fadvise")


def evict(path: Path) -> None:
    """Drop ``path`` (a file, or every file under a folder) from the page cache, so the next
    read comes from the disk: a cold local-disk load. The files must be written back first
    (``os.sync()``); ``POSIX_FADV_DONTNEED`` drops only clean pages."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _bf16_file(url: str, out: Path) -> Path:
    """The same model (dense tensors and decoded experts) as one plain bf16 safetensors file:
    what an uncompressed checkpoint holds."""
    from safetensors.torch import save_file

    from qmoe_ray.read.loader import load

    m = load(url)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m.weights.items()}, str(path))
    return path


_FRESH = """
import json, sys
from pathlib import Path
from qmoe_ray.bench.load import _bf16_seconds, _one_load
kind, target, device = sys.argv[1:4]
if kind == "compressed":
    t, _ = _one_load(target, "decode", device)
    out = {"seconds": t["wall"], "decode": t["decode"]}
else:
    out = {"seconds": _bf16_seconds(Path(target))}
print(json.dumps(out))
"""


def fresh_process(kind: str, target: str, device: str = "cpu") -> dict[str, float]:
    """One load in a new Python process, as a program that loads its model once does (the
    interpreter and imports not counted): ``kind`` ``"compressed"`` (``_one_load``: the load's
    wall and decode seconds) or ``"bf16"`` (``_bf16_seconds`` on the file ``target``), the same
    code as the in-process rows."""
    proc = subprocess.run([sys.executable, "-c", _FRESH, kind, target, device],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fresh-process {kind} load failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bf16_seconds(path: Path) -> float:
    """Seconds to read the bf16 file and build its tensors, from the same disk."""
    from safetensors.torch import load as st_load

    t0 = time.perf_counter()
    st_load(path.read_bytes())  # read every byte (load_file would only map the file)
    return time.perf_counter() - t0


@contextlib.contextmanager
def moto_server(timeout: float = 60.0) -> Iterator[str]:
    """A moto S3 server in its own process on 127.0.0.1 (so it does not share this process's
    GIL, as a real endpoint would not); yields its URL and stops it, by its PID, on exit."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the moto S3 server did not start on port {port}"
                                       ) from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def s3_timings(checkpoint: Path, repeat: int, workers: int = 4) -> dict[str, Any]:
    """The compressed checkpoint from an S3 endpoint (a local moto server): read and verified
    only, and loaded in full (decode overlapping the download); medians over ``repeat`` rounds.

    No bf16 baseline here: moto copies a large object for every range read (a 16 MiB range of
    a 640 MiB object took 0.45 s, a whole 12 MiB object 0.03 s), which would time moto, not a
    store."""
    import s3fs

    from qmoe_ray.format.manifest import read_manifest
    from qmoe_ray.format.shards import read_verified
    from qmoe_ray.read.loader import load

    with moto_server() as endpoint:
        opts = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}  # moto's, not real
        fs = s3fs.S3FileSystem(key="bench", secret="bench", skip_instance_cache=True,
                               client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        fs.put(str(checkpoint), "bench/compressed", recursive=True)
        url = "s3://bench/compressed"
        manifest = read_manifest(url, **opts)

        def read_only() -> float:
            t0 = time.perf_counter()
            read_verified(url, manifest, workers=workers, checked=True, **opts)
            return time.perf_counter() - t0

        load(url, workers=workers, **opts)  # warm-up
        full: list[dict[str, float]] = []
        reads = []
        for _ in range(repeat):
            full.append(dict(load(url, workers=workers, **opts).timings))
            reads.append(read_only())
    med = {k: statistics.median(r[k] for r in full) for k in full[0]}
    return {"load": med, "read_verify_s": statistics.median(reads), "repeats": repeat}


def _markdown(f: dict[str, Any], device: str, base_label: str, base: dict[str, float]) -> str:
    lines = [
        f"Loading with `qmoe_ray.load(url, device={device!r}, mode=...)`, medians of "
        f"{next(iter(f.values()))['repeats']} loads from local disk (page cache warm, except "
        "the `cold cache` rows: the checkpoint's files dropped from the page cache first, so "
        "they come from the disk; each round loads every checkpoint and mode and the bf16 "
        "baseline in turn). `read` is "
        "thread-seconds of range reads (overlapped with verify/decode), `wait` the time the "
        "consumer waited for bytes, `decode` includes building the experts (resident: only "
        "checking and keeping them encoded).",
        "",
        "| checkpoint | mode | expert weights | bytes read | read | wait | verify | decode | wall "
        "| M weights/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in f.items():
        if key in ("latency", "s3"):
            continue
        label, mode = key.rsplit(" | ", 1)
        lines.append(
            f"| {label} | {mode} | {r['expert_weights'] / 1e6:.1f} M | {r['bytes'] / 2**20:.1f} MiB "
            f"| {r['read']:.3f} s | {r['wait']:.3f} s | {r['verify']:.3f} s | {r['decode']:.3f} s "
            f"| {r['wall']:.3f} s | {r['load_mweights_per_s']:.0f} |")
    dec = f[f"{base_label} | decode"]
    if f.get("latency"):
        lines += ["", "Forward latency, batch 1 (medians; the three models timed in turn; the "
                  "project's block code, expert products as named):", "",
                  "| checkpoint | tokens | decode, float32 products | decode, bf16 products "
                  "(dense bf16) | resident (encoded experts) | resident / dense bf16 "
                  "| resident / float32 |", "|---|---|---|---|---|---|---|"]
        for label, r in f["latency"].items():
            lines.append(f"| {label} | {r['tokens']} | {r['decode_f32_ms']:.1f} ms | "
                         f"{r['decode_bf16_ms']:.1f} ms | {r['resident_ms']:.1f} ms | "
                         f"**{r['ratio_bf16']:.2f}x** | {r['ratio_f32']:.2f}x |")
    lines += [
        "",
        f"Baseline, same disk: the {base_label.split(' (')[0]} model as one plain bf16 "
        f"safetensors file ({base['bytes'] / 2**20:.0f} MiB) loads in {base['seconds']:.3f} s; the "
        f"compressed checkpoint ({dec['bytes'] / 2**20:.0f} MiB, "
        f"{base['bytes'] / dec['bytes']:.1f}x fewer bytes) loads and decodes in {dec['wall']:.3f} s "
        f"(**{dec['wall'] / base['seconds']:.2f}x** the bf16 load time); decode is "
        f"{100 * dec['decode'] / dec['wall']:.0f}% of its wall time and "
        f"**{dec['decode'] / base['seconds']:.2f}x** the time of the bf16 load.",
    ]
    cold = f.get(f"{base_label} | decode, cold cache")
    if cold and base.get("cold_seconds"):
        lines += [
            "",
            f"Cold cache (both files dropped from the page cache before each load): the bf16 "
            f"file loads in {base['cold_seconds']:.3f} s, the compressed checkpoint in "
            f"{cold['wall']:.3f} s (**{cold['wall'] / base['cold_seconds']:.2f}x**); its "
            f"decode, {cold['decode']:.3f} s, is **{cold['decode'] / base['cold_seconds']:.2f}x"
            "** the bf16 load's time: decoding costs "
            f"{'less' if cold['decode'] < base['cold_seconds'] else 'more'} than reading the "
            "weights it replaces would.",
        ]
    fr = base.get("fresh")
    if fr:
        c, b = fr["compressed"], fr["bf16"]
        lines += [
            "",
            "Fresh process (one load per new Python process, as `qmoe-ray eval` or a serving "
            "process does; interpreter start and imports not counted; in the same rounds): "
            f"the compressed checkpoint loads in {c['seconds']:.3f} s (decode {c['decode']:.3f}"
            f" s), the bf16 file in {b['seconds']:.3f} s: **{c['seconds'] / b['seconds']:.2f}x"
            "**. A new process pays numba's one-time start-up (~0.25-0.3 s here, even with every "
            "kernel in its disk cache) and fresh memory for every decoded weight, where a "
            "long-lived process reuses freed memory.",
        ]
    s3 = f.get("s3")
    if s3:
        ld = s3["load"]
        lines += [
            "",
            f"From an S3 endpoint (a moto server in its own process on 127.0.0.1, sharing "
            f"the {os.cpu_count()} cores; the {base_label.split(' (')[0]} checkpoint; medians of "
            f"{s3['repeats']}): read and verified only in {s3['read_verify_s']:.3f} s, loaded in "
            f"full in {ld['wall']:.3f} s with {ld['decode']:.3f} s of decode: "
            f"{max(0.0, s3['read_verify_s'] + ld['decode'] - ld['wall']):.3f} s of the decode "
            "overlapped the download (read-only + decode - full load).",
        ]
    lines += [
        "",
        "- CPU decode is the numba rANS loop writing bf16 straight through a per-row lookup "
        "table (`codec.decode_ternary_lut`), two segments in lock-step per core, segments spread "
        "over the cores; it includes the first-touch page faults of the "
        f"{dec['expert_weights'] * 2 / 2**20:.0f} MiB of decoded bf16 (which a bf16 load pays "
        "too; costly and noisy on this VM). From object storage, where the job writes, bytes dominate instead: at 1 GB/s the bf16 "
        f"file takes {base['bytes'] / 1e9:.2f} s to arrive, the compressed one "
        f"{dec['bytes'] / 1e9:.2f} s plus at most {dec['decode']:.2f} s of decode (less where "
        "it overlaps the download).",
        "- Resident mode only verifies and keeps the experts encoded; on a CPU each product "
        "then decodes its matrix again (a test path; on a GPU the fused kernel runs).",
    ]
    if device == "cpu":
        lines.append("- On a CPU the resident latency is that test path's (every product decodes "
                     "its matrix again), not the fused kernel's. GPU decode-at-load and the "
                     "GPU resident-vs-decode latency: not measured here (no GPU); "
                     "`python jobs/benchmark.py load --device cuda`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m qmoe_ray.bench.load [URL] [--device ...]``: print, record nothing."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    res = run(ap.parse_args(argv))
    print(json.dumps(res.figures, indent=1))
    print(res.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
