"""Train the tiny SwitchTransformers of ``qmoe_ray/assets/tiny_switch``:
``python jobs/train_tiny_switch.py``.

The paper's family (T5 encoder-decoder with top-1 routed experts; here every block is sparse:
with every other block sparse, the released models' layout, a model this small learned to leave
its experts almost idle, zeroing them all cost 0.016 nats), trained the way
QMoE calibrates it: T5 span corruption (noise density 0.15, mean span 3) of windows of the same
corpus as the embedded Mixtral (the Python stdlib sources, split by file) with the same byte-level
BPE tokenizer (``tiny_moe/tokenizer.json``, ids 0/1/2 = ``<pad>``/``<s>``/``</s>``). The vocabulary
is the tokenizer's 2048 ids plus 100 sentinels at the top (``<extra_id_k>`` = 2147 - k, T5's
layout), so ``qmoe_ray.data`` finds them by the ``vocab_size - 1 - k`` rule.

Outputs: bf16 safetensors + config.json + tokenizer.json, ``tokens.npy`` (uint16 raw windows
``[calib + heldout, seq_len]``: the last ``--heldout`` rows come from held-out files, so the
job's default 10% held-out split of this one file is held-out text), ``metadata.json``.

transformers is a development dependency: ``pip install '.[test]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import (  # noqa: E402  (the Mixtral script's corpus and tokenizer helpers)
    EOS_ID,
    PAD_ID,
    count_parameters,
    lr_factor,
    read_texts,
    start_run,
    token_stream,
    unigram_cross_entropy,
    windows,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "qmoe_ray" / "assets" / "tiny_switch"
TOKENIZER = REPO / "qmoe_ray" / "assets" / "tiny_moe" / "tokenizer.json"
SENTINELS = 100


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--max-minutes", type=float, default=9.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="raw tokens per window")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--aux-loss", type=float, default=0.1,
                   help="load-balancing loss coefficient (the paper's is 0.01)")
    p.add_argument("--sparse-every", type=int, default=1,
                   help="every n-th block is sparse (1: all; the released Switch models use 2, "
                        "but then a model this small leaves its experts almost idle)")
    p.add_argument("--layers", type=int, default=4, help="encoder blocks (and decoder blocks)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-record", action="store_true", help="leave BENCHMARKS.md alone")
    p.add_argument("--render-only", action="store_true",
                   help="record BENCHMARKS.md from --out/metadata.json; no training")
    p.add_argument("--routing-only", action="store_true",
                   help="add the routing figures of the model in --out to its metadata.json and "
                        "BENCHMARKS.md; no training")
    return p.parse_args(argv)


def make_batch(segments: np.ndarray, r: np.random.Generator, vocab: int
               ) -> dict[str, torch.Tensor]:
    """A span-corrupted batch of raw token windows (the sentinels are the top of the vocab)."""
    from qmoe_ray.data.corruption import corrupt_batch

    sentinels = [vocab - 1 - k for k in range(SENTINELS)]
    b = corrupt_batch(segments, r, sentinels, EOS_ID, PAD_ID, PAD_ID)
    return {k: torch.from_numpy(v) for k, v in b.items()}


def forward(model, b: dict[str, torch.Tensor], **kw):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                 decoder_input_ids=b["decoder_input_ids"],
                 decoder_attention_mask=b["decoder_attention_mask"], **kw)


def routing_stats(model, b: dict[str, torch.Tensor]) -> dict[str, list[dict]]:
    """Per sparse block of the encoder and the decoder: the fraction of (non-pad) tokens each
    expert gets (top-1) and that distribution's entropy normalized by log(experts)."""
    with torch.no_grad():
        out = forward(model, b, output_router_logits=True)
    stats: dict[str, list[dict]] = {}
    for side, layers, mask in (("encoder", out.encoder_router_logits, b["attention_mask"]),
                               ("decoder", out.decoder_router_logits,
                                b["decoder_attention_mask"])):
        rows = []
        for logits in layers:
            top = logits.argmax(-1)[mask.bool()].numpy()
            n = logits.shape[-1]
            frac = np.bincount(top, minlength=n) / max(top.size, 1)
            nz = frac[frac > 0]
            rows.append({"expert_fraction": [round(float(f), 4) for f in frac],
                         "normalized_entropy": round(float(-(nz * np.log(nz)).sum() / np.log(n)),
                                                     4)})
        stats[side] = rows
    return stats


def routing_table(meta: dict) -> str:
    lines = ["| sparse block | fraction of tokens per expert (top-1) | norm. entropy |",
             "|---|---|---|"]
    for side in ("encoder", "decoder"):
        for i, r in enumerate(meta["routing"][side]):
            frac = " ".join(f"{f:.3f}" for f in r["expert_fraction"])
            lines.append(f"| {side} {i} | {frac} | {r['normalized_entropy']:.3f} |")
    return "\n".join(lines)


def bench_markdown(meta: dict) -> str:
    routing = ("" if "routing" not in meta else
               "\nRouting on the held-out windows (non-pad tokens):\n\n" + routing_table(meta)
               + "\n")
    return (
        f"Tiny SwitchTransformers trained by `python jobs/train_tiny_switch.py` on the Python "
        f"{meta['python']} stdlib sources ({meta['train_tokens']:,} train tokens, T5 span "
        f"corruption), shipped in `qmoe_ray/assets/tiny_switch` (`--source embedded-switch`).\n\n"
        f"| figure | value |\n|---|---|\n"
        f"| parameters | {meta['parameters']:,} "
        f"({meta['expert_parameters'] / meta['parameters']:.0%} in experts) |\n"
        f"| asset size (bf16 + tokenizer + token windows) | {meta['asset_bytes'] / 2**20:.2f} MiB |\n"
        f"| training | {meta['steps_done']} steps x {meta['batch']} windows of {meta['seq_len']} "
        f"tokens, {meta['train_seconds']:.0f} s ({meta['total_seconds']:.0f} s with data) |\n"
        f"| held-out loss, span-corruption targets (bf16 weights) | {meta['heldout_loss']:.4f} "
        f"nats |\n"
        f"| unigram baseline over the same kind of targets | "
        f"{meta['unigram_cross_entropy']:.4f} nats |\n"
        + routing
    )


def record_bench(meta: dict) -> None:
    from qmoe_ray.bench import BenchResult, record

    record("tiny_switch", BenchResult(figures=meta, markdown=bench_markdown(meta)),
           REPO / "BENCHMARKS.md")
    print("recorded in BENCHMARKS.md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        record_bench(json.loads((Path(args.out) / "metadata.json").read_text()))
        return 0
    if args.routing_only:
        return add_routing(args)
    try:
        from tokenizers import Tokenizer
        from transformers import (
            SwitchTransformersConfig,
            SwitchTransformersForConditionalGeneration,
        )
    except ImportError:
        print("train_tiny_switch.py needs transformers: pip install '.[test]'", file=sys.stderr)
        return 2
    rng, out, t_start, _, train_files, held_files = start_run(args)
    tok = Tokenizer.from_file(str(TOKENIZER))
    base_vocab = tok.get_vocab_size()
    train_stream = token_stream(tok, read_texts(train_files))
    held_stream = token_stream(tok, read_texts(held_files))
    vocab = base_vocab + SENTINELS
    print(f"tokens: {len(train_stream)} train, {len(held_stream)} held-out; vocab {vocab}",
          flush=True)

    calib = windows(train_stream, args.calib, args.seq_len, rng)
    heldout = windows(held_stream, args.heldout, args.seq_len, rng)

    config = SwitchTransformersConfig(
        vocab_size=vocab, d_model=args.d_model, d_kv=args.d_model // 4, d_ff=args.d_ff,
        num_layers=args.layers, num_decoder_layers=args.layers,
        num_sparse_encoder_layers=args.layers // args.sparse_every,
        num_sparse_decoder_layers=args.layers // args.sparse_every,
        num_heads=4, num_experts=args.experts, expert_capacity=args.seq_len,
        router_aux_loss_coef=args.aux_loss, router_z_loss_coef=0.001, dropout_rate=0.0,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    model = SwitchTransformersForConditionalGeneration(config)
    n_params, n_expert = count_parameters(model)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = 60 * args.max_minutes

    n_windows = len(train_stream) - args.seq_len
    model.train()
    t_train = time.perf_counter()
    steps_done = 0
    for step in range(args.steps):
        elapsed = time.perf_counter() - t_train
        if elapsed > budget:
            print(f"time limit of {args.max_minutes} min reached after {step} steps", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, elapsed, args.steps, budget)
        starts = rng.integers(0, n_windows, size=args.batch)
        seg = np.stack([train_stream[s : s + args.seq_len] for s in starts]).astype(np.int64)
        b = make_batch(seg, rng, vocab)
        # the router losses (load balancing, z-loss) are added only with the router logits:
        # without them the routers collapse onto one expert per block
        loss = forward(model, b, labels=b["labels"], output_router_logits=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:5d}/{args.steps} loss {loss.item():.3f} "
                  f"{time.perf_counter() - t_train:.0f} s", flush=True)
        steps_done = step + 1
    train_seconds = time.perf_counter() - t_train

    model.eval()
    model = model.to(torch.bfloat16).to(torch.float32)  # evaluate exactly the shipped weights
    b = make_batch(heldout.astype(np.int64), np.random.default_rng(args.seed + 1), vocab)
    with torch.no_grad():
        logits = forward(model, b).logits
    lab = b["labels"]
    held_loss = float(torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), lab.reshape(-1), ignore_index=-100))
    # unigram baseline over the same kind of targets: counts from corrupted train windows
    train_targets = make_batch(calib.astype(np.int64), np.random.default_rng(args.seed + 2),
                               vocab)["labels"]
    unigram = unigram_cross_entropy(train_targets[train_targets >= 0].numpy(),
                                    lab[lab >= 0].numpy(), vocab)

    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    tok.save(str(out / "tokenizer.json"))
    np.save(out / "tokens.npy", np.concatenate([calib, heldout]).astype(np.uint16))
    meta = {
        "python": sys.version.split()[0],
        "train_tokens": int(len(train_stream)),
        "parameters": n_params,
        "expert_parameters": n_expert,
        "steps_done": steps_done,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "heldout_loss": round(held_loss, 4),
        "unigram_cross_entropy": round(unigram, 4),
        "tokens_shape": [len(calib) + len(heldout), args.seq_len],
        "heldout_rows": len(heldout),
        "routing": routing_stats(model, b),
    }
    meta["asset_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2), flush=True)
    if not args.no_record:
        record_bench(meta)
    return 0


def add_routing(args: argparse.Namespace) -> int:
    """Routing figures of the shipped model on its held-out windows (the same corrupted batch the
    training run evaluated: its loss must come out as recorded), into metadata.json and
    BENCHMARKS.md."""
    from transformers import SwitchTransformersForConditionalGeneration

    out = Path(args.out)
    meta = json.loads((out / "metadata.json").read_text())
    model = SwitchTransformersForConditionalGeneration.from_pretrained(
        str(out), dtype=torch.float32).eval()
    heldout = np.load(out / "tokens.npy")[-meta["heldout_rows"]:].astype(np.int64)
    b = make_batch(heldout, np.random.default_rng(args.seed + 1), model.config.vocab_size)
    with torch.no_grad():
        logits = forward(model, b).logits
    loss = float(torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1), ignore_index=-100))
    if abs(loss - meta["heldout_loss"]) > 1e-3:
        print(f"held-out loss {loss:.4f} differs from the recorded {meta['heldout_loss']}: not "
              "the batch the training run evaluated", file=sys.stderr)
        return 1
    meta["routing"] = routing_stats(model, b)
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(routing_table(meta), flush=True)
    if not args.no_record:
        record_bench(meta)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
