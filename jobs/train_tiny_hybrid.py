"""Train a tiny Qwen3.5-style hybrid MoE and measure ternary GPTQ against ternary RTN and int2
on it: ``python jobs/train_tiny_hybrid.py [--out DIR]``.

Why: the hybrid families (Gated DeltaNet blocks, gated full attention, a sigmoid-gated shared
expert) are parity-tested on random weights, where quantization has nothing to lose. A trained
one shows whether GPTQ keeps its advantage over round-to-nearest when three of four token mixers
are linear attention (issue 15's target: GPTQ's held-out loss rise <= 0.25x ternary RTN's).

Recipe: the corpus, tokenizer, windows and schedule of ``jobs/train_tiny.py``;
``Qwen3_5MoeForCausalLM`` (``qwen3_5_moe_text``), d_model 128, 4 blocks (3 Gated DeltaNet, 1
gated attention), 16 routed experts top-4 plus a shared expert; AdamW with warm-up and cosine
decay, transformers' load-balancing loss. The job then compresses it three times (ternary GPTQ,
ternary RTN, int2 GPTQ; in-process Ray on 127.0.0.1) and the figures go to BENCHMARKS.md
(``tiny_hybrid``). The model is written to ``--out`` (default a temporary folder; not shipped).

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
RUNS = (("ternary", "gptq"), ("ternary", "rtn"), ("int2", "gptq"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--max-minutes", type=float, default=7.0)
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
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=96,
        shared_expert_intermediate_size=96, max_position_embeddings=4 * seq_len,
        output_router_logits=True, router_aux_loss_coef=0.01, bos_token_id=tt.BOS_ID,
        eos_token_id=tt.EOS_ID, pad_token_id=tt.PAD_ID, tie_word_embeddings=False)
    return Qwen3_5MoeForCausalLM(config)


def train(args: argparse.Namespace) -> tuple[Path, dict]:
    rng, out, t_start, stdlib, train_files, held_files = tt.start_run(args)
    train_texts, held_texts = tt.read_texts(train_files), tt.read_texts(held_files)
    tok = tt.train_tokenizer(train_texts, args.vocab)
    tok.save(str(out / "tokenizer.json"))
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
    model.config.output_router_logits = False
    model = model.to(torch.bfloat16).to(torch.float32)  # evaluate exactly the saved weights
    held_loss = tt.mean_loss(model, torch.from_numpy(heldout.astype(np.int64)), 32)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    np.save(out / "calib.npy", calib.astype(np.uint16))
    np.save(out / "heldout.npy", heldout.astype(np.uint16))
    meta = {"parameters": n_params, "expert_parameters": n_expert, "steps": args.steps,
            "steps_done": steps_done, "train_seconds": round(time.perf_counter() - t_train, 1),
            "heldout_loss_torch": round(held_loss, 4)}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta), flush=True)
    return out, meta


def measure(src: Path, meta: dict) -> dict:
    """Held-out loss of the bf16 model and of each compression in ``RUNS`` (the job)."""
    import ray

    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.evaluate import evaluate

    data = str(src / "heldout.npy")
    base = evaluate(str(src), data, batch_size=16)["loss"]
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=512 * 2**20)
    try:
        res = {}
        for scheme, method in RUNS:
            out = src.parent / f"{src.name}-{scheme}-{method}"
            run_compression(CompressConfig(
                source=str(src), output=str(out), data=str(src / "calib.npy"), num_samples=256,
                seq_len=128, eval_samples=0, scheme=scheme, method=method, num_workers=1,
                overwrite=True), progress=False)
            m = json.loads((out / "manifest.json").read_text())
            loss = evaluate(str(out), data, batch_size=16)["loss"]
            res[f"{scheme} {method}"] = {
                "loss": round(loss, 4), "rise": round(loss - base, 4),
                "bits_per_expert_param": round(m["sizes"]["expert_bits_per_param"], 3)}
    finally:
        ray.shutdown()
    rtn = res["ternary rtn"]["rise"]
    ratio = res["ternary gptq"]["rise"] / rtn if rtn > 0 else float("nan")
    return {**meta, "heldout_loss": round(base, 4), "runs": res,
            "gptq_over_rtn_rise": round(ratio, 3)}


def markdown(fig: dict) -> str:
    rows = [f"| {k} | {v['loss']:.4f} | {v['rise']:+.4f} | {v['bits_per_expert_param']:.3f} |"
            for k, v in fig["runs"].items()]
    return "\n".join([
        f"Tiny Qwen3.5-style hybrid MoE ({fig['parameters'] / 1e6:.2f} M parameters, "
        f"{fig['expert_parameters'] / fig['parameters']:.0%} in experts; 3 Gated DeltaNet + 1 "
        "gated attention blocks, 16 routed experts top-4, a gated shared expert) trained by "
        f"`python jobs/train_tiny_hybrid.py` ({fig['steps_done']} steps, "
        f"{fig['train_seconds']:.0f} s), compressed by the job (256 x 128 calibration tokens, "
        f"whole samples through the linear-attention blocks), held-out loss on 128 x 128 "
        f"tokens. bf16 model: {fig['heldout_loss']:.4f}.",
        "",
        "| scheme, method | held-out loss | rise | bits / expert param |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Ternary GPTQ's rise / ternary RTN's rise: **{fig['gptq_over_rtn_rise']:.3f}** "
        "(target <= 0.25).",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("train_tiny_hybrid.py needs transformers: pip install '.[test]'", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = str(Path(tempfile.mkdtemp(prefix="qmoe-tiny-hybrid-")) / "model")
    src, meta = train(args)
    fig = measure(src, meta)
    print(markdown(fig), flush=True)
    if not args.no_record:
        from qmoe_ray.bench import BenchResult, record

        record("tiny_hybrid", BenchResult(figures=fig, markdown=markdown(fig), notes=[
            "RTN's rise is measured on the same model: the ratio, not the absolute rises, is "
            "the figure (a run of a few CPU minutes; the machine was shared)."]),
            REPO / "BENCHMARKS.md")
        print("recorded in BENCHMARKS.md")
    return 0 if math.isfinite(fig["gptq_over_rtn_rise"]) else 1


if __name__ == "__main__":
    sys.exit(main())
