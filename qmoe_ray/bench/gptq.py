"""Benchmark: joint (batched) GPTQ over a group of experts against the same experts one at a time.

Why it is measured this way: QMoE reports 6x from quantizing 16 experts jointly on a GPU, because
one expert's column sweep is a long chain of tiny kernels that cannot fill the device. Whether
grouping pays depends on the machine, so both variants run in the same process on the same
Hessians, and the ratio of their medians is the figure (shared machines are noisy; ratios within
one run are comparable, absolute times less so). The shapes are switch-base's experts: ``wi``
``[3072, 768]`` (inputs: the MoE input, ``d_model`` = 768) and ``wo`` ``[768, 3072]`` (inputs: the
ReLU hidden activation, ``d_ff`` = 3072), with Hessians from ``--tokens`` tokens per expert.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qmoe_ray.bench import BenchResult, median_time
from qmoe_ray.quant import HessianAccumulator, gptq, parse_scheme, rtn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``gptq`` benchmark."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--experts", type=int, default=16, help="experts per group (16)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per expert Hessian")
    parser.add_argument("--d-model", type=int, default=768, help="expert input width (768)")
    parser.add_argument("--d-ff", type=int, default=3072, help="expert hidden width (3072)")
    parser.add_argument("--scheme", default="ternary", help="ternary, int2, int3, int4, int8")
    parser.add_argument("--group-size", type=int, default=None, help="int schemes: group size")
    parser.add_argument("--blocksize", type=int, default=128, help="GPTQ block size")
    parser.add_argument("--actorder", action="store_true", help="GPTQ with act-order")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def _activations(T: int, cols: int, g: torch.Generator, device: str) -> torch.Tensor:
    """LLM-like inputs: a shared component correlating all channels plus a few outlier channels."""
    X = torch.randn(T, cols, generator=g)
    X += 0.5 * X[:, :1]
    X[:, torch.randperm(cols, generator=g)[:4]] *= 20.0
    return X.to(device)


def _problems(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{kind: (W [E, rows, cols], H [E, cols, cols])}`` for ``wi`` and ``wo``."""
    E, T, dm, dff, dev = args.experts, args.tokens, args.d_model, args.d_ff, args.device
    g = torch.Generator().manual_seed(args.seed)
    Wi = (torch.randn(E, dff, dm, generator=g) * dm**-0.5).to(dev)
    Wo = (torch.randn(E, dm, dff, generator=g) * dff**-0.5).to(dev)
    acc_i = HessianAccumulator(E, dm, device=dev)
    acc_o = HessianAccumulator(E, dff, device=dev)
    for e in range(E):
        x = _activations(T, dm, g, dev)
        acc_i.add(e, x)
        acc_o.add(e, torch.relu(x @ Wi[e].T))
    return {"wi": (Wi, acc_i.result()[0]), "wo": (Wo, acc_o.result()[0])}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> BenchResult:
    """Time joint vs one-at-a-time GPTQ for each expert matrix; see the module doc.

    Raises:
        ValueError: bad sizes, an unknown scheme, or ``--device cuda`` without a GPU.
    """
    scheme = parse_scheme(args.scheme, args.group_size)
    if args.experts <= 0 or args.tokens <= 0 or args.repeats <= 0:
        raise ValueError("--experts, --tokens and --repeats must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU visible to torch; use --device cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev, E = args.device, args.experts
    opts = {"blocksize": args.blocksize, "actorder": args.actorder}

    t0 = time.perf_counter()
    problems = _problems(args)
    _sync(dev)
    setup_s = time.perf_counter() - t0

    scheme_name = scheme.name if scheme.group_size is None else f"{scheme.name}/g{args.group_size}"
    figures: dict[str, object] = {
        "device": dev,
        "torch_threads": torch.get_num_threads(),
        "scheme": scheme_name,
        "experts": E,
        "tokens_per_expert": args.tokens,
        "setup_s": round(setup_s, 2),
    }
    rows = []
    totals = {"joint": 0.0, "loop": 0.0, "weights": 0}
    for kind, (W, H) in problems.items():

        def joint(W=W, H=H):
            out = gptq(W, H, scheme, **opts)
            _sync(dev)
            return out

        def loop(W=W, H=H):
            out = [gptq(W[e], H[e], scheme, **opts) for e in range(E)]
            _sync(dev)
            return out

        t_joint = median_time(joint, repeats=args.repeats, warmup=args.warmup)
        t_loop = median_time(loop, repeats=args.repeats, warmup=args.warmup)
        res_j, res_l = joint(), loop()
        agree = sum(
            (res_j.codes[e] == r.codes[0]).float().mean().item() for e, r in enumerate(res_l)
        ) / E
        gain = (res_j.loss / rtn(W, scheme, H).loss).mean().item()
        n_weights = W.numel()
        totals["joint"] += t_joint
        totals["loop"] += t_loop
        totals["weights"] += n_weights
        figures[kind] = {
            "shape": list(W.shape[1:]),
            "joint_s": round(t_joint, 3),
            "one_at_a_time_s": round(t_loop, 3),
            "speedup": round(t_loop / t_joint, 2),
            "joint_weights_per_s": round(n_weights / t_joint),
            "one_at_a_time_weights_per_s": round(n_weights / t_loop),
            "codes_agree": round(agree, 6),
            "gptq_over_rtn_loss": round(gain, 4),
            "fallbacks": sum(f is not None for f in res_j.fallback),
        }
        rows.append(
            f"| `{kind}` {W.shape[1]}x{W.shape[2]} | {t_joint:.2f} | {t_loop:.2f} | "
            f"{t_loop / t_joint:.2f}x | {n_weights / t_joint / 1e6:.1f} | "
            f"{n_weights / t_loop / 1e6:.1f} | {gain:.3f} |"
        )
    figures["speedup_both"] = round(totals["loop"] / totals["joint"], 2)
    figures["joint_weights_per_s_both"] = round(totals["weights"] / totals["joint"])
    tj, tl, nw = totals["joint"], totals["loop"], totals["weights"]
    rows.append(
        f"| both | {tj:.2f} | {tl:.2f} | {tl / tj:.2f}x | {nw / tj / 1e6:.1f} "
        f"| {nw / tl / 1e6:.1f} | |"
    )
    md = (
        f"Joint GPTQ over a group of {E} experts vs the same {E} one at a time, "
        f"`{figures['scheme']}`, block size {args.blocksize}, act-order {args.actorder}, "
        f"Hessians from {args.tokens} tokens per expert, device `{dev}` "
        f"({figures['torch_threads']} torch threads), median of {args.repeats} runs.\n\n"
        "| matrix (rows x cols) | joint s | one at a time s | grouping speed-up | "
        "joint Mweights/s | one-at-a-time Mweights/s | GPTQ/RTN proxy loss |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    notes = [
        "Times include factorization, the column sweep and the proxy-loss computation; "
        "Hessian accumulation is setup (not timed).",
        f"Joint and one-at-a-time codes agree on "
        f"{min(figures[k]['codes_agree'] for k in problems):.4%} of weights (the same math).",
    ]
    if hasattr(os, "getloadavg") and not dev.startswith("cuda"):
        load = os.getloadavg()[0]
        notes.append(f"1-minute load average at the end: {load:.1f} (shared machine).")
    return BenchResult(figures=figures, markdown=md, notes=notes)
