"""Train the tiny embedded MoE of ``qmoe_ray/assets/tiny_moe``: ``python jobs/train_tiny.py``.

Why this model: the project needs a real, *trained* MoE that every machine can run in seconds, so
that quantization error shows up as a real loss increase (random weights have nothing to lose) and
the routing is skewed the way real routers are (experts see different token populations, which is
what makes per-expert Hessians differ). The corpus must exist everywhere without a download, so it
is the Python standard library's own ``.py`` sources, read from the running interpreter.

Recipe (fixed seed, sorted file list, so a rerun on the same Python gives the same data):
- corpus: ``sysconfig.get_paths()["stdlib"]`` ``**/*.py`` minus tests, idlelib, lib2to3 and
  site-packages; split *by file* into train (~95%) and held-out (~5%);
- tokenizer: byte-level BPE trained with ``tokenizers`` on the train split (vocab 2048; ids 0, 1, 2
  are ``<pad>``, ``<s>``, ``</s>``; files are joined with ``</s>``);
- model: ``MixtralForCausalLM``, d_model 128, 4 layers, 8 experts top-2, d_ff 192, 4 heads / 2 KV
  heads, untied embeddings; AdamW with warm-up and cosine decay, load-balancing loss 0.02;
- outputs: bf16 safetensors + config.json + tokenizer.json, ``calib.npy`` (train-split windows),
  ``heldout.npy`` (held-out windows), ``metadata.json`` and ``README.md`` with the figures, and the
  ``tiny_model`` section of BENCHMARKS.md.

transformers is a development dependency: ``pip install '.[test]'``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "qmoe_ray" / "assets" / "tiny_moe"
EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__phello__", "turtledemo"}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def corpus_files(stdlib: Path) -> list[Path]:
    """The stdlib's ``.py`` files, sorted, without tests and vendored packages."""
    files = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append(p)
    return files


def split_files(files: list[Path], heldout_fraction: float, seed: int) -> tuple[list, list]:
    """Split by file (never inside a file) with a seeded permutation; both halves stay sorted."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    n_held = max(1, round(len(files) * heldout_fraction))
    held = sorted(files[i] for i in order[:n_held])
    train = sorted(files[i] for i in order[n_held:])
    return train, held


def read_texts(files: list[Path]) -> list[str]:
    """File contents as text (undecodable bytes replaced, so every interpreter reads the same)."""
    return [f.read_bytes().decode("utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """All texts tokenized and joined, each file followed by ``</s>``."""
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.asarray([EOS_ID], dtype=np.int32))
    return np.concatenate(parts)


def windows(stream: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct non-overlapping windows of ``length`` tokens, in a seeded random choice."""
    total = len(stream) // length
    if total < n:
        raise ValueError(f"{len(stream)} tokens hold only {total} windows of {length}")
    pick = np.sort(rng.choice(total, size=n, replace=False))
    return np.stack([stream[i * length : (i + 1) * length] for i in pick])


def count_parameters(model) -> tuple[int, int]:
    """``(all parameters, expert parameters)`` of a transformers MoE, printed as one line."""
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"model: {n_params / 1e6:.2f} M parameters, {n_expert / n_params:.0%} in experts",
          flush=True)
    return n_params, n_expert


def unigram_cross_entropy(train: np.ndarray, held: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats) of held-out tokens under the train split's add-one unigram model."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held].mean())


def routing_stats(model, heldout: torch.Tensor, num_experts: int, top_k: int) -> list[dict]:
    """Per layer: fraction of routed slots per expert, its normalized entropy, and the normalized
    entropy of the top-1 expert *given the token id* (low = experts specialise by token)."""
    with torch.no_grad():
        out = model(heldout, output_router_logits=True)
    ids = heldout.reshape(-1).numpy()
    stats = []
    for logits in out.router_logits:
        top = torch.topk(logits.float(), top_k, dim=-1).indices.numpy()  # [T, k]
        frac = np.bincount(top.reshape(-1), minlength=num_experts) / top.size
        marg_h = -(frac[frac > 0] * np.log(frac[frac > 0])).sum() / math.log(num_experts)
        joint = np.zeros((int(ids.max()) + 1, num_experts))
        np.add.at(joint, (ids, top[:, 0]), 1.0)
        row = joint.sum(1, keepdims=True)
        p = np.divide(joint, row, out=np.zeros_like(joint), where=row > 0)
        h_rows = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(1)
        cond_h = float((h_rows * row[:, 0]).sum() / row.sum() / math.log(num_experts))
        stats.append(
            {
                "expert_fraction": [round(float(f), 4) for f in frac],
                "normalized_entropy": round(float(marg_h), 4),
                "top1_entropy_given_token": round(cond_h, 4),
            }
        )
    return stats


def mean_loss(model, data: torch.Tensor, batch: int) -> float:
    """Token-mean next-token cross-entropy over ``data`` (same as transformers' ``labels=ids``)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            x = data[i : i + batch]
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(model(x, labels=x).loss) * n
            count += n
    return total / count


def lr_factor(step: int, elapsed: float, steps: int, budget: float) -> float:
    """Warm-up over 5% of ``steps``, then cosine to 10% over the steps or the time ``budget``
    (seconds), whichever ends first (on a busy machine the schedule still completes; on an idle
    one it is step-exact)."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    t = max((step - warmup) / max(1, steps - warmup), elapsed / budget)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def start_run(args: argparse.Namespace) -> tuple:
    """Seeds, threads, the output folder and the corpus split shared by the training scripts.

    Returns:
        ``(rng, out, t_start, stdlib, train_files, held_files)``.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_files, held_files = split_files(corpus_files(stdlib), 0.05, args.seed)
    return rng, out, t_start, stdlib, train_files, held_files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the package)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (sets the schedule)")
    p.add_argument("--max-minutes", type=float, default=8.5,
                   help="stop training early past this wall time (recorded as steps_done)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--calib", type=int, default=512, help="train-split windows in calib.npy")
    p.add_argument("--heldout", type=int, default=128, help="held-out windows in heldout.npy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest for these tiny matmuls on a shared machine")
    p.add_argument("--no-record", action="store_true", help="leave BENCHMARKS.md alone")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite README.md and BENCHMARKS.md from --out/metadata.json; no training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        meta = json.loads((Path(args.out) / "metadata.json").read_text())
        (Path(args.out) / "README.md").write_text(readme(meta))
        if not args.no_record:
            record_bench(meta)
        return 0
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        print("train_tiny.py needs transformers: pip install '.[test]'", file=sys.stderr)
        return 2
    rng, out, t_start, stdlib, train_files, held_files = start_run(args)
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    print(f"corpus: {stdlib}: {len(train_files)} train files, {len(held_files)} held-out files",
          flush=True)
    tok = train_tokenizer(train_texts, args.vocab)
    tok.save(str(out / "tokenizer.json"))
    train_stream = token_stream(tok, train_texts)
    held_stream = token_stream(tok, held_texts)
    chars = sum(map(len, train_texts))
    print(f"tokens: {len(train_stream)} train ({chars / len(train_stream):.2f} chars/token), "
          f"{len(held_stream)} held-out ({time.perf_counter() - t_start:.0f} s)", flush=True)

    calib = windows(train_stream, args.calib, args.seq_len, rng)
    heldout = windows(held_stream, args.heldout, args.seq_len, rng)

    config = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=4 * args.seq_len, rope_theta=10000.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.02,
    )
    model = MixtralForCausalLM(config)
    n_params, n_expert = count_parameters(model)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = 60 * args.max_minutes
    n_windows = len(train_stream) - args.seq_len
    stream_t = torch.from_numpy(train_stream.astype(np.int64))
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
        starts = torch.from_numpy(rng.integers(0, n_windows, size=args.batch))
        x = torch.stack([stream_t[s : s + args.seq_len] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.perf_counter() - t_train
            print(f"step {step:5d}/{args.steps} loss {loss.item():.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {el:.0f} s", flush=True)
        steps_done = step + 1
    train_seconds = time.perf_counter() - t_train

    model.eval()
    model.config.output_router_logits = False
    model = model.to(torch.bfloat16).to(torch.float32)  # evaluate exactly the shipped weights
    held_t = torch.from_numpy(heldout.astype(np.int64))
    held_loss = mean_loss(model, held_t, 32)
    calib_loss = mean_loss(model, torch.from_numpy(calib[:128].astype(np.int64)), 32)
    unigram = unigram_cross_entropy(train_stream, heldout[:, 1:].reshape(-1), args.vocab)
    routing = routing_stats(model, held_t, args.experts, args.top_k)

    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    for extra in ("generation_config.json",):
        (out / extra).unlink(missing_ok=True)
    np.save(out / "calib.npy", calib.astype(np.uint16))
    np.save(out / "heldout.npy", heldout.astype(np.uint16))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    meta = {
        "python": sys.version.split()[0],
        "stdlib": str(stdlib),
        "train_files": len(train_files),
        "heldout_files": len(held_files),
        "train_tokens": int(len(train_stream)),
        "heldout_tokens": int(len(held_stream)),
        "parameters": n_params,
        "expert_parameters": n_expert,
        "steps": args.steps,
        "steps_done": steps_done,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "top_k": args.top_k,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "heldout_loss": round(held_loss, 4),
        "heldout_perplexity": round(math.exp(held_loss), 3),
        "calib_loss": round(calib_loss, 4),
        "unigram_cross_entropy": round(unigram, 4),
        "calib_shape": list(calib.shape),
        "heldout_shape": list(heldout.shape),
        "routing": routing,
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    meta["asset_bytes"] = size
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(readme(meta))
    print(json.dumps({k: v for k, v in meta.items() if k != "routing"}, indent=2), flush=True)
    if not args.no_record:
        record_bench(meta)
    return 0


def bench_notes(meta: dict) -> list[str]:
    notes = [
        "The learning-rate schedule (warm-up, cosine to 10%) ends at `--steps` or at the "
        "`--max-minutes` budget, whichever comes first, so the script always finishes in about "
        "10 minutes; this run did "
        f"{meta['steps_done']} of {meta['steps']} steps in the budget on a shared machine.",
        "Experts receive very unequal shares of tokens and a few almost none: the quantizer's "
        "few-token/zero-token fallback paths are exercised by the default model.",
    ]
    return notes


def record_bench(meta: dict) -> None:
    from qmoe_ray.bench import BenchResult, record

    record("tiny_model", BenchResult(figures=meta, markdown=bench_markdown(meta),
                                     notes=bench_notes(meta)), REPO / "BENCHMARKS.md")
    print("recorded in BENCHMARKS.md")


def routing_table(meta: dict) -> str:
    lines = ["| layer | fraction of routed slots per expert | norm. entropy "
             "| top-1 entropy given token |", "|---|---|---|---|"]
    for i, r in enumerate(meta["routing"]):
        frac = " ".join(f"{f:.3f}" for f in r["expert_fraction"])
        lines.append(f"| {i} | {frac} | {r['normalized_entropy']:.3f} | "
                     f"{r['top1_entropy_given_token']:.3f} |")
    return "\n".join(lines)


def bench_markdown(meta: dict) -> str:
    return (
        f"Tiny Mixtral-style MoE trained by `python jobs/train_tiny.py` on the Python "
        f"{meta['python']} stdlib sources ({meta['train_tokens']:,} train tokens), shipped in "
        f"`qmoe_ray/assets/tiny_moe`.\n\n"
        f"| figure | value |\n|---|---|\n"
        f"| parameters | {meta['parameters']:,} "
        f"({meta['expert_parameters'] / meta['parameters']:.0%} in experts) |\n"
        f"| asset size (bf16 + tokenizer + token sets) | {meta['asset_bytes'] / 2**20:.2f} MiB |\n"
        f"| training | {meta['steps_done']} steps x {meta['batch']} x {meta['seq_len']} tokens, "
        f"{meta['train_seconds']:.0f} s ({meta['total_seconds']:.0f} s with data) |\n"
        f"| held-out loss (bf16 weights) | {meta['heldout_loss']:.4f} nats "
        f"(perplexity {meta['heldout_perplexity']:.2f}) |\n"
        f"| unigram baseline cross-entropy | {meta['unigram_cross_entropy']:.4f} nats |\n\n"
        f"Routing on the held-out set (top-{meta.get('top_k', 2)} slots; entropies normalized by "
        f"log(experts)):\n\n"
        f"{routing_table(meta)}\n"
    )


def readme(meta: dict) -> str:
    return (
        "# tiny_moe: the embedded default model\n\n"
        "Written by `python jobs/train_tiny.py` (do not edit by hand). A Mixtral-layout MoE in\n"
        "HF format (bf16 `model.safetensors`, `config.json`, byte-level BPE `tokenizer.json`)\n"
        "trained on the Python standard library's own sources, so any machine can rebuild it.\n\n"
        "- `calib.npy`: uint16 token ids `[samples, seq_len]`, windows of the train split;\n"
        "- `heldout.npy`: uint16 token ids, windows of held-out *files* (split by file);\n"
        "- `metadata.json`: all figures below, for machines.\n\n"
        + bench_markdown(meta) + "\n" + "".join(f"- {n}\n" for n in bench_notes(meta))
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
