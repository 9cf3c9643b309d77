"""``ternary-sym256`` (the GGUF-exact grid) against QMoE's ternary grid, and the GGUF export's size.

- Loss: one job per grid on the embedded Mixtral (the same calibration and held-out samples as
  the ``job`` benchmark's defaults), held-out loss rise over the uncompressed model and expert
  bits per parameter of our entropy-coded checkpoint.
- Size: the embedded model's expert dimensions (128, 192) are not whole GGUF blocks of 256, so
  the export is measured on a random Mixtral of the same family with 256-multiple dimensions
  (written here as a plain safetensors checkpoint with the embedded tokenizer), compressed with
  ``ternary-sym256`` RTN: the source (bf16), our checkpoint, the ``--format hf`` export and the
  GGUF file with TQ2_0 and TQ1_0 experts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmoe_ray.bench import BenchResult, median_time
from qmoe_ray.job.config import CompressConfig

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_local_experts=8)


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=int, default=256, help="calibration samples")
    parser.add_argument("--eval-samples", type=int, default=64, help="held-out samples")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample")


def _folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() \
        else p.stat().st_size


def random_mixtral(out: Path, seed: int = 0) -> Path:
    """A random bf16 Mixtral checkpoint of ``SHAPE`` (HF names) with the embedded tokenizer."""
    from safetensors.torch import save_file

    from qmoe_ray.data import embedded_model_path

    emb = embedded_model_path()
    cfg = {**json.loads((emb / "config.json").read_text()), **SHAPE}
    g = torch.Generator().manual_seed(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = D // cfg["num_attention_heads"] * cfg["num_key_value_heads"]

    def mat(r: int, c: int) -> torch.Tensor:
        return (torch.randn(r, c, generator=g) / c ** 0.5).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": mat(V, D), "lm_head.weight": mat(V, D),
         "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t.update({f"{p}.input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                  f"{p}.post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                  f"{p}.self_attn.q_proj.weight": mat(D, D), f"{p}.self_attn.k_proj.weight":
                  mat(kv, D), f"{p}.self_attn.v_proj.weight": mat(kv, D),
                  f"{p}.self_attn.o_proj.weight": mat(D, D),
                  f"{p}.block_sparse_moe.gate.weight": mat(cfg["num_local_experts"], D)})
        for e in range(cfg["num_local_experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t.update({f"{q}.w1.weight": mat(F, D), f"{q}.w3.weight": mat(F, D),
                      f"{q}.w2.weight": mat(D, F)})
    out.mkdir(parents=True)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(emb / "tokenizer.json", out / "tokenizer.json")
    return out


def run(args) -> BenchResult:
    from qmoe_ray.bench.job import _baseline_loss, _variant_runs
    from qmoe_ray.data import embedded_model_path
    from qmoe_ray.job.cluster import ray_init, shutdown
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.export import export

    tmp = Path(tempfile.mkdtemp(prefix="qmoe-bench-gguf-"))
    base = dict(source="embedded", data="embedded", num_samples=args.samples,
                seq_len=args.seq_len, eval_samples=args.eval_samples, overwrite=True)
    base_loss = _baseline_loss(str(embedded_model_path()), "embedded", args.eval_samples,
                               args.seq_len)
    variants = [("ternary gptq", dict(scheme="ternary")),
                ("ternary-sym256 gptq", dict(scheme="ternary-sym256")),
                ("ternary rtn", dict(scheme="ternary", method="rtn")),
                ("ternary-sym256 rtn", dict(scheme="ternary-sym256", method="rtn"))]
    try:
        ray_init(CompressConfig())
        runs = _variant_runs(base, variants, base_loss, tmp)
        src = random_mixtral(tmp / "src")
        ck = tmp / "sym"
        run_compression(CompressConfig(source=str(src), output=str(ck), data="embedded",
                                       num_samples=32, seq_len=64, eval_samples=8,
                                       scheme="ternary-sym256", method="rtn"), progress=False)
    finally:
        shutdown()
    sizes: dict[str, Any] = {"source (bf16 safetensors)": _folder_bytes(src / "model.safetensors"),
                             "qmoe-ray checkpoint": _folder_bytes(ck)}
    walls: dict[str, float] = {}
    for label, kw in (("--format hf (bf16)", dict(format="hf")),
                      ("--format gguf, TQ2_0 experts, bf16 rest", dict(format="gguf")),
                      ("--format gguf, TQ1_0 experts, bf16 rest",
                       dict(format="gguf", gguf_expert_type="tq1_0")),
                      ("--format gguf, TQ1_0 experts, Q8_0 rest",
                       dict(format="gguf", gguf_expert_type="tq1_0", gguf_type="q8_0"))):
        out = tmp / label.replace(" ", "_").replace(",", "").replace("-", "")
        t0 = time.perf_counter()
        export(str(ck), str(out), **kw)
        walls[label] = time.perf_counter() - t0
        sizes[label] = _folder_bytes(out)
    speed = _speeds(ck, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    rows = {k: {kk: v[kk] for kk in ("loss", "rise", "bits", "wall")} for k, v in runs.items()}
    lines = [f"Embedded Mixtral, {args.samples} calibration / {args.eval_samples} held-out "
             f"samples of {args.seq_len} tokens; uncompressed held-out loss {base_loss:.4f}.",
             "", "| grid | held-out loss | rise | expert bits/param (our checkpoint) |",
             "|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['loss']:.4f} | {r['rise']:+.4f} | {r['bits']:.3f} |")
    src_b = sizes["source (bf16 safetensors)"]
    lines += ["", f"Export size: random Mixtral, {SHAPE['num_hidden_layers']} layers x "
              f"{SHAPE['num_local_experts']} experts of {SHAPE['hidden_size']}x"
              f"{SHAPE['intermediate_size']}, vocab 2048, `ternary-sym256` RTN.", "",
              "| file | MiB | vs source | export s |", "|---|---|---|---|"]
    for label, b in sizes.items():
        w = f"{walls[label]:.2f}" if label in walls else ""
        lines.append(f"| {label} | {b / 2**20:.2f} | {b / src_b:.3f} | {w} |")
    notes = ["the GGUF files' expert tensors dequantize (gguf package) to our weights bit for "
             "bit (tests/test_export_gguf.py), and llama.cpp's logits of the export follow ours "
             "(its ternary kernels multiply by 8-bit-quantized activations: close, not equal)"]
    if speed:
        lines += ["", f"CPU speed on the same model: logits of one sequence of {SPEED_TOKENS} "
                  f"tokens (prefill), {SPEED_THREADS} threads, median of {SPEED_REPEATS}:", "",
                  "| runtime | tokens/s | vs ours (decode mode) |", "|---|---|---|"]
        ref = speed["qmoe-ray load, decode mode (bf16 experts)"]
        for label, tps in speed.items():
            lines.append(f"| {label} | {tps:.0f} | {tps / ref:.2f} |")
        notes.append("llama.cpp via llama-cpp-python (built from its source package here); "
                     "ours: `qmoe_ray.load(...).logits` in torch, float32 activations")
    else:
        notes.append("llama.cpp speed not measured: llama-cpp-python is not installed (pip "
                     "install llama-cpp-python builds llama.cpp from source)")
    return BenchResult({"baseline_loss": base_loss, "runs": rows, "sizes": sizes,
                        "export_seconds": walls, "tokens_per_s": speed}, "\n".join(lines),
                       notes)


SPEED_TOKENS, SPEED_THREADS, SPEED_REPEATS = 128, 2, 5


def _speeds(ck: Path, tmp: Path) -> dict[str, float]:
    """Tokens/s of the logits of one ``SPEED_TOKENS``-token sequence: our loader's two modes and,
    where llama-cpp-python imports, llama.cpp on the GGUF exports; empty without llama.cpp."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    from qmoe_ray.read.export import export
    from qmoe_ray.read.loader import load

    ids = [int(t) for t in np.random.default_rng(0).integers(3, 2048, size=SPEED_TOKENS)]
    out: dict[str, float] = {}
    x = torch.tensor([ids])
    n = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)
    try:
        for label, mode in (("qmoe-ray load, decode mode (bf16 experts)", "decode"),
                            ("qmoe-ray load, resident mode (experts encoded)", "resident")):
            model = load(str(ck), mode=mode)
            with torch.no_grad():
                out[label] = SPEED_TOKENS / median_time(lambda m=model: m.logits(x), SPEED_REPEATS)
    finally:
        torch.set_num_threads(n)
    for label, kw in (("llama.cpp, TQ2_0 experts, bf16 rest", {}),
                      ("llama.cpp, TQ1_0 experts, bf16 rest", dict(gguf_expert_type="tq1_0")),
                      ("llama.cpp, TQ1_0 experts, Q8_0 rest",
                       dict(gguf_expert_type="tq1_0", gguf_type="q8_0"))):
        path = tmp / f"speed-{len(out)}.gguf"
        export(str(ck), str(path), format="gguf", **kw)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=2 * SPEED_TOKENS,
                              n_batch=SPEED_TOKENS, n_threads=SPEED_THREADS, verbose=False)
        try:
            def prefill(llm=llm):
                llm.reset()
                llm.eval(ids)

            out[label] = SPEED_TOKENS / median_time(prefill, SPEED_REPEATS)
        finally:
            llm.close()
    return out
