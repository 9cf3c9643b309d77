"""Trimming analysis: ``qmoe-ray analyze SOURCE --data ... --output plan.json``.

One layer-major pass over calibration data (the evaluator's walk: each layer's weights read once
for every batch, then dropped) measures the Expert Drop, Layer Drop and Block Drop scores of
every expert, MoE layer and block (``qmoe_ray.models.trim.trim_scores``) and writes a plan for
the budgets asked (``qmoe_ray.models.trim_plan.plan_from_scores``): a small JSON file a person
may edit, which ``qmoe-ray eval --trim-plan`` applies. docs/TRIM.md describes the scores, the
plan and the trimmed forward.

The source may be an HF-layout checkpoint or a compressed one (then the scores are those of the
compressed model, trim after quantization).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from typing import Any

from qmoe_ray.errors import InputError
from qmoe_ray.read.evaluate import EMBEDDED, LayerCache, _lazy_experts, _open_model, load_batches
from qmoe_ray.read.plans import read_plan, write_plan  # noqa: F401 - re-exported


def analyze(
    model_url: str = EMBEDDED,
    data_spec: str = EMBEDDED,
    num_samples: int | None = 128,
    seq_len: int | None = None,
    batch_size: int = 16,
    storage_options: Mapping[str, Any] | None = None,
    *,
    split: str | None = None,
    seed: int = 0,
    tokenizer_source: Any = None,
    drop_experts: str | int | None = None,
    drop_layers: int = 0,
    drop_blocks: int = 0,
    progress: bool = False,
) -> Any:
    """Score every expert, MoE layer and block on calibration data and plan the budgets asked.

    Args:
        model_url: source checkpoint (HF layout or compressed), ``"embedded"`` or
            ``"embedded-switch"``.
        data_spec: calibration data (``qmoe_ray.data.load_samples``).
        num_samples: samples (``None``: all of the split).
        seq_len: tokens per sample (``None``: the data's row length).
        batch_size: samples per forward batch.
        storage_options: fsspec options for the model and the data.
        split: ``"calib"`` (default for the embedded data), ``"heldout"`` or ``"all"`` (default
            for a file).
        seed: seeds the choice of samples.
        tokenizer_source: tokenizer for text data (default: the model's).
        drop_experts: ``N`` (across MoE layers) or ``"N/layer"``.
        drop_layers: MoE layers to drop.
        drop_blocks: blocks to drop.
        progress: show a progress bar while a compressed checkpoint loads.

    Returns:
        The ``TrimPlan`` (its ``scores`` hold every score, ``budgets`` the budgets).

    Raises:
        InputError: a budget the model cannot meet (``plan_from_scores``).
        ValueError / FileNotFoundError / KeyError: bad model, data or options (before the walk).
    """
    import torch

    from qmoe_ray.data import resolve_data
    from qmoe_ray.models.trim import TrimmedFamily, trim_scores
    from qmoe_ray.models.trim_plan import parse_expert_budget, plan_from_scores

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    parse_expert_budget(drop_experts)  # a bad budget fails before the pass
    for flag, n in (("--drop-layers", drop_layers), ("--drop-blocks", drop_blocks)):
        if type(n) is not int or n < 0:
            raise InputError(f"{flag} {n!r}: must be a whole number >= 0")
    t0 = time.perf_counter()
    opts = dict(storage_options or {})
    config, weights, experts_for, tok, family = _open_model(model_url, opts, progress)
    if isinstance(family, TrimmedFamily):
        raise InputError(f"{model_url} is a trimmed checkpoint; analyze the untrimmed source "
                         "(a plan applies to the untrimmed model)")
    if split is None:
        split = "calib" if data_spec == EMBEDDED else "all"
    batches, n, _ = load_batches(resolve_data(data_spec, model_url), config, num_samples,
                                 seq_len, batch_size, seed=seed, split=split,
                                 tokenizer_source=tokenizer_source if tokenizer_source
                                 is not None else tok, storage_options=opts)
    W = LayerCache(weights)
    with torch.no_grad():
        states = [family.embed(W, b) for b in batches]
        W.drop()
        scores = trim_scores(family, W, states, experts_for or _lazy_experts(family, W),
                             after_layer=lambda *_: W.drop())
    record = {**scores.to_dict(), "data": data_spec, "split": split, "samples": n,
              "seconds": round(time.perf_counter() - t0, 3)}
    return plan_from_scores(family, record, drop_experts, drop_layers, drop_blocks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``qmoe-ray analyze`` options."""
    from qmoe_ray.cli import add_storage_options

    parser.add_argument("model", nargs="?", default=EMBEDDED,
                        help="checkpoint folder or URL (HF layout or compressed); default: the "
                             "embedded tiny model")
    parser.add_argument("--data", default=EMBEDDED,
                        help="calibration token ids (.npy/.safetensors) or text (.jsonl, .txt); "
                             "default: the embedded calibration set")
    parser.add_argument("--output", "-o", required=True, metavar="PLAN.json",
                        help="where the plan goes (a path or fsspec URL)")
    parser.add_argument("--drop-experts", default=None, metavar="N|N/layer",
                        help="drop the N least-routed experts across the MoE layers, or N per "
                             "layer (N/layer)")
    parser.add_argument("--drop-layers", type=int, default=0, metavar="N",
                        help="drop the N MoE layers that change the residual stream least")
    parser.add_argument("--drop-blocks", type=int, default=0, metavar="N",
                        help="drop the N blocks whose output is most like their input")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sample (default: the data's row length)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch")
    parser.add_argument("--split", choices=("heldout", "calib", "all"), default=None,
                        help="part of the data (default: calib for embedded, all for a file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample choice")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json for text data (default: the model's)")
    add_storage_options(parser, "the model, the data and the output")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``qmoe-ray analyze``; bad input is raised (one line, exit status 2)."""
    from qmoe_ray.cli import storage_options

    opts = storage_options(args) or None
    plan = analyze(args.model, args.data, args.samples, args.seq_len, args.batch_size, opts,
                   split=args.split, seed=args.seed, tokenizer_source=args.tokenizer,
                   drop_experts=args.drop_experts, drop_layers=args.drop_layers,
                   drop_blocks=args.drop_blocks, progress=not args.quiet)
    write_plan(plan, args.output, opts)
    print(json.dumps(plan.to_dict()) if args.json else summary(plan, args.output))
    return 0


def summary(plan: Any, where: str) -> str:
    """A few lines for people: the scores per block and what the plan drops."""
    s = plan.scores
    rows = [f"{'block':<24}{'block cos':>10}{'MoE cos':>10}  experts kept (least routed weight)"]
    for name, b in s["blocks"].items():
        moe = s["layers"].get(name)
        exp = s["experts"].get(name)
        if name in plan.drop_blocks:
            kept = "block dropped"
        elif name in plan.drop_layers:
            kept = "MoE dropped"
        elif exp is None:
            kept = "dense"
        else:
            k = plan.keep_experts.get(name, range(len(exp)))
            kept = f"{len(k)}/{len(exp)} (min {min(exp):.3f})"
        rows.append(f"{name:<24}{'-' if b is None else f'{b:.4f}':>10}"
                    f"{'-' if moe is None else f'{moe:.4f}':>10}  {kept}")
    rows.append(f"plan written to {where}: {len(plan.drop_blocks)} blocks, "
                f"{len(plan.drop_layers)} MoE layers and "
                f"{sum(len(s['experts'][n]) - len(k) for n, k in plan.keep_experts.items())} "
                f"experts dropped ({s['samples']} samples, {s['seconds']:.1f} s)")
    return "\n".join(rows)
