"""Held-out loss and perplexity of a model: ``qmoe-ray eval MODEL --data ...``.

Why layer-major: the evaluator must run models far larger than one machine's memory, like the
compressor does. So instead of pushing each batch through the whole model (which needs every
layer's weights for every batch), it pushes *every batch* through one layer, drops that layer's
weights and moves on: each tensor is read once, and memory holds one layer's weights plus the
activations of the evaluation set (``samples x seq_len x d_model`` floats). It uses the same
family steps as the compressor (``embed``, ``pre_moe``, ``route``, ``post_moe``, ``logits``,
``loss_terms``) and ``base.moe_dense`` for the experts.

The weight source is pluggable: ``weights=`` replaces the checkpoint reader and ``experts_for=``
replaces how the routed experts are obtained (a compressed checkpoint's decoded experts), so the
same loop evaluates source and compressed models. A folder holding ``manifest.json`` (a
compressed checkpoint) is loaded through ``qmoe_ray.read.loader``.

The loss is the token mean of the cross-entropy over all predicted positions, as transformers
computes it with ``labels=input_ids`` (decoder-only) or ``labels=`` (Switch).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from qmoe_ray.errors import InputError, shorten

EMBEDDED = "embedded"
ASK_SOURCE = "\0ask"  # bare ``--compare``: name the manifest's source, evaluate nothing

ExpertsFor = Callable[[Any], Callable[[int], Mapping[str, Any]]]


class LayerCache:
    """A ``WeightSource`` that keeps every tensor it reads until ``drop()``: one layer's weights
    are read once for all batches, then freed."""

    def __init__(self, source: Any):
        self._source = source
        self._cache: dict[str, Any] = {}
        self.reads = 0

    def __call__(self, name: str):
        t = self._cache.get(name)
        if t is None:
            t = self._source(name)
            self._cache[name] = t
            self.reads += 1
        return t

    def __contains__(self, name: str) -> bool:
        return name in self._cache or name in self._source

    def drop(self) -> None:
        """Forget every cached tensor."""
        self._cache.clear()

    def __getattr__(self, attr: str):  # read_many / read_slice / names of the source
        return getattr(self._source, attr)


def _lazy_experts(family: Any, W: Any) -> ExpertsFor:
    """Default ``experts_for``: each expert read from ``W`` on first use, kept for the layer."""

    def for_layer(layer: Any) -> Callable[[int], Mapping[str, Any]]:
        cache: dict[int, dict[str, Any]] = {}

        def get(e: int) -> Mapping[str, Any]:
            if e not in cache:
                cache[e] = {r: t[0] for r, t in family.read_experts(layer, W, [e]).items()}
            return cache[e]

        return get

    return for_layer


def _is_compressed(url: str, storage_options: Mapping[str, Any]) -> bool:
    if url == EMBEDDED:
        return False
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        return fs.exists(path.rstrip("/") + "/manifest.json")
    except (OSError, ValueError):
        return False


def _open_model(model_url: str, storage_options: Mapping[str, Any], progress: bool = False):
    """``(config, WeightSource, experts_for or None, tokenizer source, family)`` for a model
    URL; ``family`` is bound to the weights (a trimmed checkpoint's: its ``TrimmedFamily``)."""
    from qmoe_ray.data import resolve_source
    from qmoe_ray.models import get_family

    url = resolve_source(model_url)
    if _is_compressed(url, storage_options):
        from qmoe_ray.read.loader import load

        cm = load(url, progress=progress, **storage_options)
        return cm.config, cm.W, cm.experts_for, url, cm.family
    from qmoe_ray.storage.checkpoint import open_checkpoint

    ckpt = open_checkpoint(url, **storage_options)
    return ckpt.config, ckpt, None, ckpt, get_family(ckpt.config, ckpt)


def evaluate(
    model_url: str = EMBEDDED,
    data_spec: str = EMBEDDED,
    num_samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    storage_options: Mapping[str, Any] | None = None,
    *,
    split: str | None = None,
    seed: int = 0,
    weights: Any = None,
    config: Mapping[str, Any] | None = None,
    experts_for: ExpertsFor | None = None,
    tokenizer_source: Any = None,
    progress: bool = False,
    trim_plan: Any = None,
) -> dict[str, Any]:
    """Mean cross-entropy and perplexity of a model on held-out data, walking layer by layer.

    Args:
        model_url: checkpoint folder/URL (HF layout or compressed), ``"embedded"`` or
            ``"embedded-switch"`` (the packaged tiny Mixtral / SwitchTransformers).
        data_spec: ``"embedded"`` or a data file (see ``qmoe_ray.data.load_samples``).
        num_samples: samples to evaluate (``None``: all of the split).
        seq_len: tokens per sample (``None``: the data's row length).
        batch_size: samples per forward batch.
        storage_options: fsspec options for the model and the data.
        split: ``"heldout"``, ``"calib"`` or ``"all"``; default ``"heldout"`` for the embedded
            data and ``"all"`` for a file given explicitly.
        seed: seeds the choice of samples.
        weights: a ``WeightSource`` to use instead of reading ``model_url`` (needs ``config``).
        config: the model's ``config.json`` (with ``weights``).
        experts_for: ``layer -> (expert id -> {role: weight})``; default reads them from weights.
        tokenizer_source: tokenizer for text data (default: the model's ``tokenizer.json``).
        progress: show a progress bar while a compressed checkpoint loads.
        trim_plan: a ``TrimPlan`` or its file/URL (``qmoe-ray analyze``): the model is
            evaluated trimmed (``qmoe_ray.models.trim``; a compressed model is trimmed after
            decoding).

    Returns:
        ``{"loss", "perplexity", "tokens", "samples", "seconds", "seq_len", "batch_size"}``.

    Raises:
        ValueError / FileNotFoundError / KeyError: bad model, data or options (before the walk).
        InputError: a trim plan that is bad or made for another model.
        CheckpointError: a compressed checkpoint that is malformed, inconsistent with its config
            or corrupted (``qmoe_ray.read.loader.load``).
    """
    import torch

    from qmoe_ray.data import resolve_data
    from qmoe_ray.models import get_family, walk_layers
    from qmoe_ray.models.trim import TrimmedFamily

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    opts = dict(storage_options or {})
    family = None
    if weights is None:
        config, weights, hook, tok, family = _open_model(model_url, opts, progress)
        experts_for = experts_for or hook
        tokenizer_source = tokenizer_source if tokenizer_source is not None else tok
    elif config is None:
        raise ValueError("evaluate(weights=...) needs config= (the model's config.json)")
    if family is None:
        family = get_family(config)
        family.bind(list(weights.names))
    if trim_plan is not None and isinstance(family, TrimmedFamily):
        raise InputError(f"{model_url} is a trimmed checkpoint (its manifest's trim record); "
                         "evaluate it without --trim-plan, or trim the untrimmed source")
    if trim_plan is not None:
        trimmed = TrimmedFamily(family, _as_plan(trim_plan, opts))
        experts_for = experts_for and trimmed.experts_for(experts_for)  # a compressed model's
        family = trimmed
    if split is None:  # the embedded sets' default is their held-out part
        split = "heldout" if data_spec == EMBEDDED else "all"
    data_spec = resolve_data(data_spec, model_url)
    batches, n, arrays = load_batches(data_spec, config, num_samples, seq_len, batch_size,
                                      seed=seed, split=split, tokenizer_source=tokenizer_source,
                                      storage_options=opts)
    W = LayerCache(weights)
    experts_for = experts_for or _lazy_experts(family, W)
    total, count = 0.0, 0
    with torch.no_grad():
        states = [family.embed(W, b) for b in batches]
        W.drop()
        walk_layers(family, W, states, experts_for, after_layer=lambda *_: W.drop())
        for b, s in zip(batches, states, strict=True):
            loss_sum, tokens = family.loss_terms(family.logits(W, s), b)
            total += float(loss_sum)
            count += int(tokens)
        W.drop()
    if count == 0:
        raise ValueError(f"data {data_spec!r}: no predicted tokens (all positions masked)")
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "tokens": count,
        "samples": n,
        "seq_len": int(arrays["input_ids"].shape[1]),
        "batch_size": batch_size,
        "seconds": time.perf_counter() - t0,
    }


def load_batches(data_spec: str, config: Mapping[str, Any], num_samples: int | None,
                 seq_len: int | None, batch_size: int, **kw: Any) -> tuple[list, int, dict]:
    """``(batches of torch tensors, number of samples, the numpy arrays)`` of
    ``qmoe_ray.data.load_samples(data_spec, config, num_samples, seq_len, **kw)``."""
    import numpy as np
    import torch

    from qmoe_ray.data import load_samples

    arrays = load_samples(data_spec, config, num_samples, seq_len, **kw)
    n = len(arrays["input_ids"])
    batches = [{k: torch.from_numpy(np.ascontiguousarray(v[i : i + batch_size]))
                for k, v in arrays.items()} for i in range(0, n, batch_size)]
    return batches, n, arrays


def _as_plan(plan: Any, storage_options: Mapping[str, Any]) -> Any:
    from qmoe_ray.models.trim_plan import TrimPlan

    if isinstance(plan, TrimPlan):
        return plan
    from qmoe_ray.read.plans import read_plan

    return read_plan(str(plan), storage_options)


def compare_eval(compressed_url: str, original_url: str | None = None, data_spec: str = "embedded",
                 num_samples: int | None = None, seq_len: int | None = None, batch_size: int = 8,
                 storage_options: Mapping[str, Any] | None = None, **eval_kw: Any
                 ) -> dict[str, Any]:
    """Original vs compressed loss and perplexity on the same held-out data (side by side).

    Why the original must be named: a manifest's ``source`` is data from the checkpoint's store,
    not a choice of the user; fetching it would read whatever URL the checkpoint names, with the
    user's storage options (credentials, endpoint). ``source_of`` tells what the manifest names.

    Args:
        compressed_url: the compressed checkpoint.
        original_url: the source model, given explicitly (required).
        data_spec, num_samples, seq_len, batch_size, storage_options, **eval_kw: as
            ``evaluate`` (the same samples are drawn for both models).

    Returns:
        ``{"original": result, "compressed": result, "loss_delta", "perplexity_ratio"}``.

    Raises:
        InputError: no ``original_url`` (the message quotes the manifest's source).
    """
    from qmoe_ray.read.loader import source_of

    opts = dict(storage_options or {})
    if not original_url:
        raise InputError(_name_the_original(compressed_url, source_of(compressed_url, **opts)))
    source = original_url
    args = (data_spec, num_samples, seq_len, batch_size, opts)
    comp = evaluate(compressed_url, *args, **eval_kw)
    orig = evaluate(source, *args, **eval_kw)
    return {"original": {"model": source, **orig},
            "compressed": {"model": compressed_url, **comp},
            "loss_delta": comp["loss"] - orig["loss"],
            "perplexity_ratio": comp["perplexity"] / orig["perplexity"]}


def _name_the_original(url: str, source: str | None) -> str:
    from qmoe_ray.storage.fs import redact

    if not source:
        return (f"{redact(url)}: the manifest names no source model; give the original model's "
                "URL explicitly (eval --compare URL)")
    return (f"the original model must be given explicitly: the manifest of {redact(url)} names "
            f"its source as {shorten(source, 200)}; if that is the model to compare with, run "
            f"again with --compare {source} (it is read with your storage options)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``qmoe-ray eval`` options."""
    from qmoe_ray.cli import add_storage_options

    parser.add_argument("model", nargs="?", default=EMBEDDED,
                        help="checkpoint folder or URL (HF layout or compressed); default: the "
                             "embedded tiny model")
    parser.add_argument("--data", default=EMBEDDED,
                        help="token ids (.npy/.safetensors [samples, length]) or text "
                             "(.jsonl with 'text', .txt); default: the embedded held-out set")
    parser.add_argument("--samples", type=int, default=None, help="samples (default: all)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sample (default: the data's row length)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    parser.add_argument("--split", choices=("heldout", "calib", "all"), default=None,
                        help="part of the data (default: heldout for embedded, all for a file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample choice")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json for text data (default: the model's)")
    add_storage_options(parser, "the model(s) and the data")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--trim-plan", default=None, metavar="PLAN.json",
                        help="evaluate the model trimmed by this plan (qmoe-ray analyze; "
                             "docs/TRIM.md)")
    parser.add_argument("--compare", nargs="?", const=ASK_SOURCE, default=None,
                        metavar="ORIGINAL",
                        help="MODEL is compressed: also evaluate ORIGINAL (the source model's "
                             "folder or URL) on the same data, side by side. ORIGINAL must be "
                             "given: bare --compare prints the source the manifest names and "
                             "stops (a checkpoint does not choose what is read with your "
                             "storage options)")


def main(args: argparse.Namespace) -> int:
    """Run ``qmoe-ray eval``; returns the exit status. Bad input (``InputError``,
    ``CheckpointError``, ...) is raised, and ``qmoe_ray.cli.run`` shows it as one line with exit
    status 2; so is a bare ``--compare`` (the message names the manifest's source to pass)."""
    from qmoe_ray.cli import storage_options

    opts = storage_options(args) or None
    compare = getattr(args, "compare", None)
    if compare is not None:
        both = compare_eval(args.model, None if compare is ASK_SOURCE else compare, args.data,
                            args.samples, args.seq_len, args.batch_size, opts, split=args.split,
                            seed=args.seed, progress=not args.quiet,
                            trim_plan=args.trim_plan)
        print(json.dumps(both) if args.json else _side_by_side(both))
        return 0
    result = evaluate(args.model, args.data, args.samples, args.seq_len, args.batch_size,
                      opts, split=args.split, seed=args.seed,
                      tokenizer_source=args.tokenizer, progress=not args.quiet,
                      trim_plan=args.trim_plan)
    result = {"model": args.model, "data": args.data, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} on {args.data}: loss {result['loss']:.4f}, perplexity "
              f"{result['perplexity']:.3f} over {result['tokens']} tokens "
              f"({result['samples']} samples x {result['seq_len']}) in {result['seconds']:.1f} s")
    return 0


def _side_by_side(both: dict[str, Any]) -> str:
    rows = [f"{'':<12}{'loss':>10}{'perplexity':>14}  model"]
    for k in ("original", "compressed"):
        r = both[k]
        rows.append(f"{k:<12}{r['loss']:>10.4f}{r['perplexity']:>14.3f}  {r['model']}")
    rows.append(f"delta loss {both['loss_delta']:+.4f}, perplexity x{both['perplexity_ratio']:.4f} "
                f"over {both['compressed']['tokens']} tokens")
    return "\n".join(rows)
