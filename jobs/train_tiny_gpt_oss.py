"""Train a tiny gpt-oss, ship it as gpt-oss ships (MXFP4 experts) and compress that:
``python jobs/train_tiny_gpt_oss.py [--out DIR]``.

Why: the gpt_oss family is parity-tested on random weights, where quantization has nothing to
lose; and gpt-oss is released at 4.25 bits per expert weight (MXFP4), so what matters is the
compression against that release and the loss against the MXFP4-dequantized model (issue 15).

Recipe: the corpus, tokenizer and windows of ``jobs/train_tiny.py``; ``GptOssForCausalLM``
with d_model 128, expert hidden 128, 4 blocks alternating sliding-window (32) and full
attention, 8 experts top-2, sinks, biases, YaRN; AdamW with warm-up and cosine decay. The trained
model's experts are packed as MXFP4 (``qmoe_ray.storage.quantized.mxfp4_encode``; everything
else bf16, the release's ``quantization_config``), then the job compresses that MXFP4 source
(ternary GPTQ and RTN, int4 GPTQ; in-process Ray on 127.0.0.1), and the figures go to
BENCHMARKS.md (``tiny_gpt_oss``): held-out loss of the bf16 and MXFP4 models and of each
compression, and bytes against MXFP4 and bf16. The model is written to ``--out`` (default a
temporary folder; not shipped).

transformers is a development dependency: ``pip install '.[test]'``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny as tt  # noqa: E402  (the corpus, tokenizer and schedule)

REPO = Path(__file__).resolve().parents[1]
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--max-minutes", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--heldout", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-record", action="store_true", help="leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def build_model(vocab: int, seq_len: int):
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
        num_local_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, sliding_window=32, max_position_embeddings=4 * seq_len,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": seq_len},
        bos_token_id=tt.BOS_ID, eos_token_id=tt.EOS_ID, pad_token_id=tt.PAD_ID,
        tie_word_embeddings=False)
    return GptOssForCausalLM(config)


def save_mxfp4(bf16_dir: Path, out: Path) -> None:
    """The bf16 checkpoint with its expert matrices as MXFP4 blocks and scales."""
    from safetensors.torch import load_file, save_file

    from qmoe_ray.storage.quantized import mxfp4_encode

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in load_file(bf16_dir / "model.safetensors").items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4_encode(t)
        else:
            tensors[name] = t
    save_file(tensors, out / "model.safetensors")
    config = json.loads((bf16_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG},
                                                indent=2))
    for f in ("tokenizer.json", "calib.npy", "heldout.npy"):
        (out / f).write_bytes((bf16_dir / f).read_bytes())


def train(args: argparse.Namespace) -> tuple[Path, dict]:
    rng, out, t_start, stdlib, train_files, held_files = tt.start_run(args)
    train_texts, held_texts = tt.read_texts(train_files), tt.read_texts(held_files)
    tok = tt.train_tokenizer(train_texts, args.vocab)
    bf16 = out / "bf16"
    bf16.mkdir(parents=True, exist_ok=True)
    tok.save(str(bf16 / "tokenizer.json"))
    train_stream, held_stream = tt.token_stream(tok, train_texts), tt.token_stream(tok, held_texts)
    calib = tt.windows(train_stream, args.calib, args.seq_len, rng)
    heldout = tt.windows(held_stream, args.heldout, args.seq_len, rng)
    model = build_model(args.vocab, args.seq_len)
    n_params, n_expert = tt.count_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget, n_windows = 60 * args.max_minutes, len(train_stream) - args.seq_len
    stream_t = torch.from_numpy(train_stream.astype(np.int64))
    model.train()
    t_train, steps_done = time.perf_counter(), 0
    for step in range(args.steps):
        elapsed = time.perf_counter() - t_train
        if elapsed > budget:
            print(f"time limit of {args.max_minutes} min reached after {step} steps", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * tt.lr_factor(step, elapsed, args.steps, budget)
        starts = rng.integers(0, n_windows, size=args.batch).tolist()
        x = torch.stack([stream_t[s : s + args.seq_len] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:5d}/{args.steps} loss {loss.item():.3f} "
                  f"{time.perf_counter() - t_train:.0f} s", flush=True)
        steps_done = step + 1
    model.eval()
    model.to(torch.bfloat16).save_pretrained(str(bf16), safe_serialization=True)
    (bf16 / "generation_config.json").unlink(missing_ok=True)
    np.save(bf16 / "calib.npy", calib.astype(np.uint16))
    np.save(bf16 / "heldout.npy", heldout.astype(np.uint16))
    save_mxfp4(bf16, out / "mxfp4")
    meta = {"parameters": n_params, "expert_parameters": n_expert, "steps": args.steps,
            "steps_done": steps_done, "train_seconds": round(time.perf_counter() - t_train, 1)}
    print(json.dumps(meta), flush=True)
    return out, meta


def measure(out: Path, meta: dict) -> dict:
    """Held-out losses (bf16, MXFP4-dequantized, each compression of the MXFP4 source) and the
    compressions' sizes against the MXFP4 release and bf16 (the job's report)."""
    import ray

    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.evaluate import evaluate

    src, data = out / "mxfp4", str(out / "mxfp4" / "heldout.npy")
    bf16 = evaluate(str(out / "bf16"), data, batch_size=16)["loss"]
    base = evaluate(str(src), data, batch_size=16)["loss"]
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=512 * 2**20)
    try:
        res = {}
        for scheme, method in (("ternary", "gptq"), ("ternary", "rtn"), ("int4", "gptq")):
            dest = out / f"{scheme}-{method}"
            run_compression(CompressConfig(
                source=str(src), output=str(dest), data=str(src / "calib.npy"), num_samples=256,
                seq_len=128, eval_samples=0, scheme=scheme, method=method, num_workers=1,
                overwrite=True), progress=False)
            rep = json.loads((dest / "report.json").read_text())
            loss = evaluate(str(dest), data, batch_size=16)["loss"]
            s, v = rep["sizes"], rep["source_sizes"]
            res[f"{scheme} {method}"] = {
                "loss": round(loss, 4), "rise": round(loss - base, 4),
                "bits_per_expert_param": round(s["expert_bits_per_param"], 3),
                "experts_vs_mxfp4": round(v["expert_ratio"], 2),
                "model_vs_mxfp4": round(v["ratio"], 2),
                "experts_vs_bf16": round(s["expert_ratio_vs_bf16"], 2),
                "model_vs_bf16": round(s["ratio_vs_bf16"], 2)}
            mxfp4_bits = v["expert_bits_per_param"]
    finally:
        ray.shutdown()
    g, r = res["ternary gptq"]["rise"], res["ternary rtn"]["rise"]
    return {**meta, "bf16_loss": round(bf16, 4), "mxfp4_loss": round(base, 4),
            "mxfp4_bits_per_expert_param": round(mxfp4_bits, 3), "compressed": res,
            "gptq_over_rtn_rise": round(g / r, 3) if r > 0 else float("nan")}


def markdown(fig: dict) -> str:
    rows = [f"| {k} | {v['loss']:.4f} | {v['rise']:+.4f} | {v['bits_per_expert_param']:.3f} | "
            f"{v['experts_vs_mxfp4']:.2f}x / {v['model_vs_mxfp4']:.2f}x | "
            f"{v['experts_vs_bf16']:.2f}x / {v['model_vs_bf16']:.2f}x |"
            for k, v in fig["compressed"].items()]
    return "\n".join([
        f"Tiny gpt-oss ({fig['parameters'] / 1e6:.2f} M parameters, "
        f"{fig['expert_parameters'] / fig['parameters']:.0%} in experts and their biases; 8 "
        "experts top-2, sliding-window (32) and full blocks, sinks, YaRN) trained by `python "
        f"jobs/train_tiny_gpt_oss.py` ({fig['steps_done']} steps, {fig['train_seconds']:.0f} s), "
        f"shipped with MXFP4 experts ({fig['mxfp4_bits_per_expert_param']:.2f} bits per expert "
        "weight, the rest bf16, as gpt-oss is released) and compressed from that by the job "
        "(256 x 128 calibration tokens); held-out loss on 128 x 128 tokens. bf16 model: "
        f"{fig['bf16_loss']:.4f}; MXFP4 model (the baseline): {fig['mxfp4_loss']:.4f}.",
        "",
        "| scheme / method | held-out loss | rise vs MXFP4 | bits / expert param | smaller than "
        "MXFP4: experts / model | smaller than bf16: experts / model |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Ternary GPTQ's rise / ternary RTN's rise: **{fig['gptq_over_rtn_rise']:.3f}**.",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("train_tiny_gpt_oss.py needs transformers: pip install '.[test]'", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="qmoe-tiny-gpt-oss-")
    out, meta = train(args)
    fig = measure(out, meta)
    print(markdown(fig), flush=True)
    if not args.no_record:
        from qmoe_ray.bench import BenchResult, record

        record("tiny_gpt_oss", BenchResult(figures=fig, markdown=markdown(fig), notes=[
            "The tiny model's dense part (embeddings, head, attention) is a larger share than "
            "in gpt-oss-20b/120b (91-98% experts there), so the whole-model ratios understate "
            "the released models' (qmoe-ray plan gives those)."]), REPO / "BENCHMARKS.md")
        print("recorded in BENCHMARKS.md")
    return 0 if math.isfinite(fig["gptq_over_rtn_rise"]) else 1


if __name__ == "__main__":
    sys.exit(main())
