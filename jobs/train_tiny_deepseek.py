"""Train a tiny DeepSeek-V3-style MoE and measure ternary GPTQ against ternary RTN on it:
``python jobs/train_tiny_deepseek.py [--out DIR]``.

Why: the DeepSeek-V3 family (MLA attention, sigmoid router with a correction bias and groups,
shared expert, dense first block) is only parity-tested on random weights, where quantization
has nothing to lose. A trained one shows whether GPTQ keeps its advantage over round-to-nearest
on this architecture (issue 14's target: GPTQ's held-out loss rise <= 0.25x RTN's).

Recipe: the corpus, tokenizer and windows of ``jobs/train_tiny.py`` (the Python standard
library's sources, fixed seed); ``DeepseekV3ForCausalLM``, d_model 128, 4 layers (the first
dense), 16 routed experts top-4 in 4 groups (2 chosen), one shared expert, MLA with
``q_lora_rank`` 64 and ``kv_lora_rank`` 32; AdamW with warm-up and cosine decay. The routing
is kept balanced the DeepSeek-V3 way, without an auxiliary loss: after every step each MoE
layer's ``e_score_correction_bias`` moves by ``--bias-rate`` towards the experts chosen less
than average (the transformers model does not update it itself), so the trained biases are
non-zero and the router's choice depends on them. Then the job compresses it twice (ternary,
GPTQ and RTN, in-process Ray on 127.0.0.1) and the figures go to BENCHMARKS.md
(``tiny_deepseek``). The model is written to ``--out`` (default a temporary folder; not shipped:
it is as large as the embedded Mixtral and adds no family the tests lack).

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--max-minutes", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--bias-rate", type=float, default=1e-3,
                   help="correction-bias step per training step (DeepSeek-V3's gamma)")
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=256,
                   help="calibration windows the job uses (of --calib)")
    p.add_argument("--model", default=None,
                   help="measure a model this script trained before (its folder) instead of "
                        "training one")
    p.add_argument("--heldout", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-record", action="store_true", help="leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def build_model(vocab: int, seq_len: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=32, max_position_embeddings=4 * seq_len,
        rope_interleave=True, bos_token_id=tt.BOS_ID, eos_token_id=tt.EOS_ID,
        pad_token_id=tt.PAD_ID, tie_word_embeddings=False)
    return DeepseekV3ForCausalLM(config)


class BiasBalancer:
    """Counts each MoE layer's chosen experts (hooks on the routers) and, after a step, moves the
    correction biases towards the under-used ones by ``rate`` (sign of the load gap)."""

    def __init__(self, model, rate: float):
        self.rate, self.loads, self.gates = rate, {}, {}
        cfg = model.config
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is None or not hasattr(gate, "e_score_correction_bias"):
                continue
            self.gates[i] = gate
            gate.register_forward_hook(self._hook(i, cfg.num_experts_per_tok))

    def _hook(self, i: int, k: int):
        def hook(module, args, out):
            logits = out[0] if isinstance(out, tuple) else out
            scores = logits.detach().float().sigmoid() + module.e_score_correction_bias
            top = scores.topk(k, dim=-1).indices.reshape(-1)
            self.loads[i] = torch.bincount(top, minlength=scores.shape[-1]).float()
        return hook

    def step(self) -> None:
        with torch.no_grad():
            for i, load in self.loads.items():
                b = self.gates[i].e_score_correction_bias
                b += self.rate * torch.sign(load.mean() - load)
        self.loads.clear()


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
    balancer = BiasBalancer(model, args.bias_rate)
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
        balancer.step()
        if step % 50 == 0:
            print(f"step {step:5d}/{args.steps} loss {loss.item():.3f} "
                  f"{time.perf_counter() - t_train:.0f} s", flush=True)
        steps_done = step + 1
    model.eval()
    model = model.to(torch.bfloat16).to(torch.float32)  # evaluate exactly the saved weights
    held_loss = tt.mean_loss(model, torch.from_numpy(heldout.astype(np.int64)), 32)
    bias = [g.e_score_correction_bias.abs().max().item() for g in balancer.gates.values()]
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    np.save(out / "calib.npy", calib.astype(np.uint16))
    np.save(out / "heldout.npy", heldout.astype(np.uint16))
    meta = {"parameters": n_params, "expert_parameters": n_expert, "steps": args.steps,
            "steps_done": steps_done, "train_seconds": round(time.perf_counter() - t_train, 1),
            "heldout_loss_torch": round(held_loss, 4),
            "max_abs_correction_bias": round(max(bias), 4)}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta), flush=True)
    return out, meta


def measure(src: Path, meta: dict, threads: int, calib_samples: int) -> dict:
    """Held-out loss of the bf16 model and of its ternary GPTQ / RTN compressions (the job)."""
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
        for method in ("gptq", "rtn"):
            out = src.parent / f"{src.name}-ternary-{method}"
            run_compression(CompressConfig(
                source=str(src), output=str(out), data=str(src / "calib.npy"), num_samples=calib_samples,
                seq_len=128, eval_samples=0, method=method, num_workers=1, overwrite=True),
                progress=False)
            m = json.loads((out / "manifest.json").read_text())
            loss = evaluate(str(out), data, batch_size=16)["loss"]
            res[method] = {"loss": round(loss, 4), "rise": round(loss - base, 4),
                           "bits_per_expert_param": round(
                               m["sizes"]["expert_bits_per_param"], 3)}
    finally:
        ray.shutdown()
    ratio = res["gptq"]["rise"] / res["rtn"]["rise"] if res["rtn"]["rise"] > 0 else float("nan")
    return {**meta, "heldout_loss": round(base, 4), "ternary": res, "calib_samples": calib_samples,
            "gptq_over_rtn_rise": round(ratio, 3)}


def markdown(fig: dict) -> str:
    t = fig["ternary"]
    rows = [f"| {m} | {t[m]['loss']:.4f} | {t[m]['rise']:+.4f} | "
            f"{t[m]['bits_per_expert_param']:.3f} |" for m in ("gptq", "rtn")]
    return "\n".join([
        f"Tiny DeepSeek-V3-style MoE ({fig['parameters'] / 1e6:.2f} M parameters, "
        f"{fig['expert_parameters'] / fig['parameters']:.0%} in experts; MLA, 16 routed experts "
        f"top-4 in 4 groups, 1 shared expert, first block dense) trained by `python "
        f"jobs/train_tiny_deepseek.py` ({fig['steps_done']} steps, {fig['train_seconds']:.0f} s; "
        f"correction biases up to {fig['max_abs_correction_bias']:.3f}), compressed by the job "
        f"(ternary, {fig['calib_samples']} x 128 calibration tokens), held-out loss on 128 x 128 tokens. bf16 "
        f"model: {fig['heldout_loss']:.4f}.",
        "",
        "| method | held-out loss | rise | bits / expert param |",
        "|---|---|---|---|",
        *rows,
        "",
        f"GPTQ's rise / RTN's rise: **{fig['gptq_over_rtn_rise']:.3f}** (target <= 0.25).",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("train_tiny_deepseek.py needs transformers: pip install '.[test]'", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = str(Path(tempfile.mkdtemp(prefix="qmoe-tiny-deepseek-")) / "model")
    if args.model is not None:
        src = Path(args.model)
        meta = json.loads((src / "metadata.json").read_text())
    else:
        src, meta = train(args)
    if args.calib_samples > args.calib:
        print(f"--calib-samples {args.calib_samples} exceeds --calib {args.calib}", file=sys.stderr)
        return 2
    fig = measure(src, meta, args.threads, args.calib_samples)
    print(markdown(fig), flush=True)
    if not args.no_record:
        from qmoe_ray.bench import BenchResult, record

        record("tiny_deepseek", BenchResult(figures=fig, markdown=markdown(fig), notes=[
            "RTN's rise is measured on the same model: the ratio, not the absolute rises, is "
            "the figure (a run of a few CPU minutes; the machine was shared)."]),
            REPO / "BENCHMARKS.md")
        print("recorded in BENCHMARKS.md")
    return 0 if math.isfinite(fig["gptq_over_rtn_rise"]) else 1


if __name__ == "__main__":
    sys.exit(main())
