"""One expert group, quantized without Ray: what a quantization worker runs.

QMoE section 4: the experts of a layer are quantized in groups, jointly (one batched GPTQ over the
group), each expert on the Hessian of the tokens the router sent to it. Within an expert we go
sequentially, as GPTQ does across layers: the input matrices (``wi``, or ``gate``/``up``) are
quantized on the Hessian of the expert input; the output matrix (``wo``/``down``) on the Hessian of
the hidden activation computed *through the already-quantized input matrices*, so it corrects the
error they made. All routed tokens then pass through the quantized expert, and those outputs are
what the activation stores add into their residual stream for the next layer.

Hessians use at most ``cap`` tokens per expert (evenly spaced over the routed tokens, so the choice
is deterministic and not biased to the first samples), as the paper caps tokens at 4x the mean;
every token still passes through the expert. Held-out tokens ride along (``hmask`` False): they get
outputs but never enter a Hessian.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qmoe_ray.job.allocation import Measure, allocate_group, group_hessians, sync
from qmoe_ray.job.config import CompressConfig
from qmoe_ray.models.base import ExpertSpec
from qmoe_ray.quant import QuantResult, Scheme, gptq, parse_scheme, rtn
from qmoe_ray.quant.prune import PruneSpec, prune_mask

_D = CompressConfig  # the defaults: CompressConfig's fields, one place for every option


@dataclass(frozen=True)
class QuantOptions:
    """How a group is quantized (the subset of ``CompressConfig`` a worker needs; a job builds it
    with ``from_config``, and every default is the ``CompressConfig`` field's)."""

    scheme: Scheme
    method: str = _D.method
    blocksize: int = _D.blocksize
    percdamp: float = _D.percdamp
    actorder: bool = _D.actorder
    sequential: bool = _D.sequential_experts
    """Hessian of the output matrix from the hidden activation through the *quantized* input
    matrices (ours). False: through the original ones, as the QMoE reference does."""
    segment_symbols: int = _D.segment_symbols
    """Symbols per rANS segment when the worker encodes the codes (see ``CompressConfig``)."""
    rate_lambda: float = _D.rate_lambda
    """Rate-aware rounding strength (``qmoe_ray.quant.rate``; 0: plain GPTQ)."""
    prune: PruneSpec | None = None
    """Expert pruning (``qmoe_ray.quant.prune``), joint with the quantization; None: none."""
    hessian_dtype: str = _D.hessian_dtype
    """dtype of the Hessians' running sums (``float32`` or ``float64``; ``CompressConfig``)."""
    target_bits: float | None = None
    """A size budget in bits per expert parameter (``qmoe_ray.quant.alloc``): each matrix gets
    the candidate setting the allocation chooses; None: ``scheme`` for every matrix."""

    @classmethod
    def from_config(cls, cfg: CompressConfig) -> QuantOptions:
        """The options of ``cfg`` that decide how a group is quantized.

        Raises:
            ValueError: the scheme and its group size do not go together (``parse_scheme``).
        """
        return cls(scheme=parse_scheme(cfg.scheme, cfg.quant_group_size), method=cfg.method,
                   blocksize=cfg.blocksize, percdamp=cfg.percdamp, actorder=cfg.actorder,
                   sequential=cfg.sequential_experts, segment_symbols=cfg.segment_symbols,
                   rate_lambda=cfg.rate_lambda, target_bits=cfg.target_bits,
                   hessian_dtype=cfg.hessian_dtype,
                   prune=None if cfg.prune is None else PruneSpec(cfg.prune, cfg.sparsity,
                                                                  cfg.prune_pattern))


@dataclass
class ExpertTokens:
    """Tokens routed to one expert: inputs ``x`` ``[T, d_model]`` and which may enter Hessians."""

    x: np.ndarray
    hmask: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.hmask.shape != (self.x.shape[0],):
            raise ValueError(
                f"ExpertTokens: x must be [T, d] and hmask [T]; got {self.x.shape}, "
                f"{self.hmask.shape}"
            )


@dataclass
class GroupResult:
    """The quantized group: per-role results, per-expert outputs and statistics.

    Under a size budget (``QuantOptions.target_bits``) ``results[role]`` is a list, one
    single-expert ``QuantResult`` per expert (each with its own scheme), ``choices[role]`` the
    chosen candidates' labels and ``allocation`` the group's budget, estimate and coded bits.
    """

    experts: list[int]
    results: dict[str, QuantResult] | dict[str, list[QuantResult]]
    outputs: list[np.ndarray]
    hessian_tokens: list[int]
    routed_tokens: list[int]
    stats: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    choices: dict[str, list[str]] | None = None
    allocation: dict | None = None




def select_hessian_tokens(hmask: np.ndarray, cap: int | None) -> np.ndarray:
    """Indices of the tokens that enter the Hessian: the eligible ones, evenly thinned to ``cap``.

    Args:
        hmask: bool ``[T]``, eligible tokens.
        cap: the most tokens to keep (None or 0: keep all).

    Returns:
        int64 indices into the token list, ascending.
    """
    eligible = np.flatnonzero(hmask)
    if cap and len(eligible) > cap:
        pick = np.linspace(0, len(eligible) - 1, cap).round().astype(np.int64)
        eligible = eligible[np.unique(pick)]
    return eligible


def _quantize(
    W: torch.Tensor, H: torch.Tensor, tokens: torch.Tensor, opts: QuantOptions
) -> QuantResult:
    p = opts.prune
    mask = None if p is None or p.method == "sparsegpt" else prune_mask(W, H, p)
    if opts.method == "rtn":
        if mask is None:
            return rtn(W, opts.scheme, H=H, tokens=tokens)
        # no sweep to feed the error back: the kept weights are rounded to nearest on the grid
        # of the pruned matrix, where a pruned 0 is exactly 0 (ternary code 0, int code zero)
        res = rtn(W.masked_fill(mask, 0.0), opts.scheme, H=H, tokens=tokens)
        D = W - res.dequantize()
        loss = (torch.bmm(D, H) * D).sum(dim=(1, 2), dtype=torch.float64).cpu()
        return dataclasses.replace(res, loss=loss, pruned=_fraction(mask))
    return gptq(
        W,
        H,
        opts.scheme,
        blocksize=opts.blocksize,
        percdamp=opts.percdamp,
        actorder=opts.actorder,
        tokens=tokens,
        rate_lambda=opts.rate_lambda,
        mask=mask,
        prune=p if mask is None else None,
    )


def _fraction(mask: torch.Tensor) -> torch.Tensor:
    """float64 ``[E]``: the fraction of each expert's matrix that ``mask`` prunes."""
    return mask.sum(dim=(1, 2), dtype=torch.float64).cpu() / (mask.shape[1] * mask.shape[2])


def quantize_group(
    spec: ExpertSpec,
    weights: Mapping[str, torch.Tensor],
    tokens: Sequence[ExpertTokens],
    opts: QuantOptions,
    cap: int | None = None,
    experts: Sequence[int] | None = None,
    device: str = "cpu",
    target_bits: float | None = None,
    measure: Measure | None = None,
) -> GroupResult:
    """Quantize a group of experts jointly and run their tokens through the quantized experts.

    Args:
        spec: the family's expert structure.
        weights: ``{role: float32 [G, out, in]}`` for every role of ``spec``, and
            ``{role}_bias`` ``[G, out]`` for each of its ``bias_roles`` (not quantized).
        tokens: one ``ExpertTokens`` per expert of the group, in the same order.
        opts: scheme and GPTQ settings.
        cap: most Hessian tokens per expert (None: all).
        experts: the experts' ids (for the statistics); default ``range(G)``.
        device: where the math runs (``"cpu"``, ``"cuda"``); results come back on the CPU.
        target_bits: with ``opts.target_bits``: this group's budget in bits per expert
            parameter (the job's budget plus what earlier layers left; default the job's).
        measure: with ``opts.target_bits``: the exact stored bits of a choice (the worker codes
            it); the budget is tightened until the coded choice fits.

    Returns:
        A ``GroupResult``; ``outputs[i]`` is ``[T_i, d_model]`` float32, the (ungated) output of the
        quantized expert ``i`` for each of its routed tokens; ``timings`` splits the seconds into
        Hessians, quantization and the forward through the quantized experts.

    Raises:
        ValueError: roles missing from ``weights`` or group sizes that disagree.
    """
    biases = [f"{r}_bias" for r in spec.bias_roles]
    missing = [r for r in (*spec.roles, *biases) if r not in weights]
    if missing:
        raise ValueError(f"weights lack roles {missing}; expected {list(spec.roles) + biases}")
    G = len(tokens)
    for role in spec.roles:
        if weights[role].ndim != 3 or weights[role].shape[0] != G:
            raise ValueError(
                f"weights[{role!r}] has shape {tuple(weights[role].shape)}; expected "
                f"[{G}, out, in] for a group of {G} experts"
            )
    experts = list(range(G)) if experts is None else list(experts)
    timings = {"hessian": 0.0, "quantize": 0.0, "forward": 0.0}
    clock = time.perf_counter
    x_all = [
        torch.from_numpy(np.ascontiguousarray(t.x, dtype=np.float32)).to(device) for t in tokens
    ]
    sel = [torch.from_numpy(select_hessian_tokens(t.hmask, cap)).to(device) for t in tokens]
    x_h = [x[s] for x, s in zip(x_all, sel, strict=True)]
    counts = torch.tensor([len(s) for s in sel], dtype=torch.int64)
    W = {r: weights[r].to(device=device, dtype=torch.float32) for r in spec.roles}
    # per-expert biases (gpt-oss): carried unquantized, they enter the hidden activation (the
    # out matrices' Hessians) and the outputs
    B = {b: weights[b].to(device=device, dtype=torch.float32) for b in biases}
    d_in = W[spec.in_roles[0]].shape[2]

    if opts.target_bits is not None:
        t0 = clock()
        results, choices, alloc = allocate_group(spec, W, B, x_h, counts, tokens, opts,
                                            target_bits or opts.target_bits, measure, device)
        timings["quantize"] = clock() - t0
        deq = {r: torch.cat([q.dequantize() for q in results[r]]) for r in spec.roles}
        t4 = clock()
        return _finish(spec, experts, results, deq, B, x_all, counts, opts, timings, t4, device,
                       choices, alloc)

    results: dict[str, QuantResult] = {}
    t0 = clock()
    H_in, _ = group_hessians(x_h, d_in, opts.hessian_dtype)
    sync(device)
    t1 = clock()
    for role in spec.in_roles:
        results[role] = _quantize(W[role], H_in, counts, opts)
    del H_in
    sync(device)
    t2 = clock()
    timings["hessian"] += t1 - t0
    timings["quantize"] += t2 - t1

    deq = {role: results[role].dequantize() for role in spec.in_roles}
    feed = deq if opts.sequential else W
    hidden_h = [spec.hidden({**{r: feed[r][i] for r in spec.in_roles},
                             **{b: v[i] for b, v in B.items()}}, x_h[i]) for i in range(G)]
    d_ff = W[spec.out_roles[0]].shape[2]
    H_out, _ = group_hessians(hidden_h, d_ff, opts.hessian_dtype)
    del hidden_h
    sync(device)
    t3 = clock()
    for role in spec.out_roles:
        results[role] = _quantize(W[role], H_out, counts, opts)
    del H_out
    for role in spec.out_roles:
        deq[role] = results[role].dequantize()
    sync(device)
    t4 = clock()
    timings["hessian"] += t3 - t2
    timings["quantize"] += t4 - t3
    return _finish(spec, experts, results, deq, B, x_all, counts, opts, timings, t4, device)


def _finish(spec: ExpertSpec, experts: list[int], results: dict, deq: dict[str, torch.Tensor],
            B: dict[str, torch.Tensor], x_all: list[torch.Tensor], counts: torch.Tensor,
            opts: QuantOptions, timings: dict[str, float], t4: float, device: str,
            choices: dict[str, list[str]] | None = None,
            alloc: dict | None = None) -> GroupResult:
    """The forward through the quantized experts and the statistics."""
    clock = time.perf_counter
    G = len(experts)
    outputs = []
    with torch.no_grad():
        for i in range(G):
            w = {**{r: deq[r][i] for r in spec.roles}, **{b: v[i] for b, v in B.items()}}
            if x_all[i].shape[0]:
                y = spec.forward(w, x_all[i])
            else:
                y = x_all[i].new_zeros(0, w[spec.out_roles[0]].shape[0])
            outputs.append(y.cpu().numpy().astype(np.float32, copy=False))
    timings["forward"] = clock() - t4
    mixed = choices is not None

    def one(r: str, i: int) -> tuple[QuantResult, int]:
        return (results[r][i], 0) if mixed else (results[r], i)

    if device != "cpu":
        results = {r: ([_to_cpu(x) for x in q] if mixed else _to_cpu(q))
                   for r, q in results.items()}

    stats = []
    for i, e in enumerate(experts):
        fb = {r: one(r, i)[0].fallback[one(r, i)[1]] for r in spec.roles}
        stats.append(
            {
                "expert": int(e),
                "routed_tokens": int(x_all[i].shape[0]),
                "hessian_tokens": int(counts[i]),
                "fallback": {r: f for r, f in fb.items() if f},
                "proxy_loss": {r: float(one(r, i)[0].loss[one(r, i)[1]]) for r in spec.roles},
            }
        )
        if mixed:
            stats[-1]["choice"] = {r: choices[r][i] for r in spec.roles}
        if opts.prune is not None:
            stats[-1]["sparsity"] = {r: float(results[r].pruned[i]) for r in spec.roles}
    return GroupResult(
        experts=experts,
        results=results,
        outputs=outputs,
        hessian_tokens=[int(c) for c in counts],
        routed_tokens=[int(x.shape[0]) for x in x_all],
        stats=stats,
        timings=timings,
        choices=choices,
        allocation=alloc,
    )


def _to_cpu(q: QuantResult) -> QuantResult:
    """A copy of ``q`` with its tensors on the CPU."""
    return dataclasses.replace(
        q,
        codes=q.codes.cpu(),
        params={k: v.cpu() for k, v in q.params.items()},
        loss=q.loss.cpu(),
        tokens=None if q.tokens is None else q.tokens.cpu(),
        pruned=None if q.pruned is None else q.pruned.cpu(),
    )
