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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qmoe_ray.job.config import CompressConfig
from qmoe_ray.models.base import ExpertSpec
from qmoe_ray.quant import QuantResult, Scheme, gptq, gptq_multi, hessian, parse_scheme, rtn
from qmoe_ray.quant.alloc import (
    CANDIDATES,
    TABLE_BITS,
    BudgetTooSmall,
    allocate,
    estimate_bits,
    label,
)
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


Measure = Callable[[Mapping[str, Sequence[QuantResult]], Mapping[str, Sequence[str]]], int]
"""Exact stored bits (codes, grids, shared tables) of a group's per-expert results, given with
the labels of their candidate settings."""


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


def _hessians(xs: Sequence[torch.Tensor], cols: int,
              opts: QuantOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessians of a list of per-expert activations (empty ones give an all-zero Hessian), their
    sums in ``opts.hessian_dtype``."""
    return hessian([x if x.numel() else x.new_zeros(0, cols) for x in xs],
                   dtype=getattr(torch, opts.hessian_dtype))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
        results, choices, alloc = _allocate(spec, W, B, x_h, counts, tokens, opts,
                                            target_bits or opts.target_bits, measure, device)
        timings["quantize"] = clock() - t0
        deq = {r: torch.cat([q.dequantize() for q in results[r]]) for r in spec.roles}
        t4 = clock()
        return _finish(spec, experts, results, deq, B, x_all, counts, opts, timings, t4, device,
                       choices, alloc)

    results: dict[str, QuantResult] = {}
    t0 = clock()
    H_in, _ = _hessians(x_h, d_in, opts)
    _sync(device)
    t1 = clock()
    for role in spec.in_roles:
        results[role] = _quantize(W[role], H_in, counts, opts)
    del H_in
    _sync(device)
    t2 = clock()
    timings["hessian"] += t1 - t0
    timings["quantize"] += t2 - t1

    deq = {role: results[role].dequantize() for role in spec.in_roles}
    feed = deq if opts.sequential else W
    hidden_h = [spec.hidden({**{r: feed[r][i] for r in spec.in_roles},
                             **{b: v[i] for b, v in B.items()}}, x_h[i]) for i in range(G)]
    d_ff = W[spec.out_roles[0]].shape[2]
    H_out, _ = _hessians(hidden_h, d_ff, opts)
    del hidden_h
    _sync(device)
    t3 = clock()
    for role in spec.out_roles:
        results[role] = _quantize(W[role], H_out, counts, opts)
    del H_out
    for role in spec.out_roles:
        deq[role] = results[role].dequantize()
    _sync(device)
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


#: Hessian tokens per expert an in matrix's candidates are measured on (``_allocate``)
ESTIMATE_TOKENS = 1024


def _slice(q: QuantResult, idx: Sequence[int]) -> QuantResult:
    """The experts ``idx`` of ``q`` (a stack of ``len(idx)``)."""
    ix = torch.as_tensor(list(idx), dtype=torch.int64, device=q.codes.device)
    return dataclasses.replace(
        q, codes=q.codes[ix], params={k: v[ix] for k, v in q.params.items()},
        loss=q.loss[ix.cpu()], tokens=None if q.tokens is None else q.tokens[ix.cpu()],
        fallback=[q.fallback[i] for i in idx], squeeze=False, pruned=None)


def _allocate(spec: ExpertSpec, W: dict[str, torch.Tensor], B: dict[str, torch.Tensor],
              x_h: list[torch.Tensor], counts: torch.Tensor, tokens: Sequence[ExpertTokens],
              opts: QuantOptions, target_bits: float, measure: Measure | None,
              device: str) -> tuple[dict[str, list[QuantResult]], dict[str, list[str]], dict]:
    """Every matrix of the group under its chosen candidate (``qmoe_ray.quant.alloc``).

    Loss estimate (``qmoe_ray.quant.alloc``; README, ``--target-bits``): the mean squared error
    a candidate adds to the expert's output over the expert's Hessian tokens, times those
    tokens, so it is the squared error the matrix adds to the layer's output over the
    calibration set. An out matrix's is its proxy loss; an in matrix's is measured by a forward
    of the expert with that matrix under the candidate and the others exact (a linear factor
    from plain ternary underrated the near-zero candidates by far: the gate is not linear).

    The out matrices' candidates are estimated on the Hessian through the exact in matrices; once
    the in matrices are chosen (and ``opts.sequential``), the out matrices are quantized again,
    under their chosen settings, on the Hessian through the quantized ones, as without a budget.
    """
    clock = time.perf_counter
    sec = {"candidates": 0.0, "calibrate": 0.0, "choose": 0.0, "requantize": 0.0, "measure": 0.0}
    t = clock()
    settings = [(parse_scheme(s), lam) for s, lam in CANDIDATES]
    labels = [label(s, lam) for s, lam in CANDIDATES]
    K, G = len(settings), len(x_h)
    roles = list(spec.roles)
    kw = dict(blocksize=opts.blocksize, percdamp=opts.percdamp, actorder=opts.actorder,
              tokens=counts)
    bias = [{b: v[i] for b, v in B.items()} for i in range(G)]
    d_in = W[spec.in_roles[0]].shape[2]
    d_ff = W[spec.out_roles[0]].shape[2]
    H_in, _ = _hessians(x_h, d_in, opts)
    cand = {r: gptq_multi(W[r], H_in, settings, **kw) for r in spec.in_roles}
    del H_in
    hid = [spec.hidden({**{r: W[r][i] for r in spec.in_roles}, **bias[i]}, x_h[i])
           for i in range(G)]
    H0, _ = _hessians(hid, d_ff, opts)
    del hid
    for r in spec.out_roles:
        cand[r] = gptq_multi(W[r], H0, settings, **kw)
    del H0
    _sync(device)
    sec["candidates"] += clock() - t
    t = clock()

    # each in matrix's candidates measured where they act: the expert's output error with that
    # matrix quantized (the others exact), in the unit of an out matrix's proxy loss, over at
    # most ESTIMATE_TOKENS of the expert's Hessian tokens, evenly spaced (a mean; the forwards
    # dominated the allocation's cost)
    in_loss = {r: np.zeros((G, K)) for r in spec.in_roles}
    xs = [x[::max(1, -(-x.shape[0] // ESTIMATE_TOKENS))] for x in x_h]
    with torch.no_grad():
        base = [{**{q: W[q][i] for q in roles}, **bias[i]} for i in range(G)]
        y0 = [spec.forward(base[i], xs[i]) if xs[i].shape[0] else None for i in range(G)]
        for r in spec.in_roles:
            for k in range(K):
                deq = cand[r][k].dequantize()
                for i in range(G):
                    if y0[i] is not None:
                        y = spec.forward({**base[i], r: deq[i]}, xs[i])
                        in_loss[r][i, k] = float((y - y0[i]).square().sum(dim=1).mean())
                del deq
    weight = np.array([float(t.hmask.sum()) for t in tokens])
    bits = np.concatenate([np.stack([estimate_bits(cand[r][k]).numpy() for k in range(K)], 1)
                           for r in roles])
    loss = np.concatenate([(in_loss[r] if r in in_loss else
                            np.stack([cand[r][k].loss.numpy() for k in range(K)], 1))
                           * weight[:, None] for r in roles])
    params = sum(W[r][0].numel() for r in roles) * G
    target = target_bits * params
    minimum = float(bits.min(axis=1).sum())
    richest = float(bits[:, K - 1].sum())
    alloc = {"target_bits_per_param": target_bits, "params": params,
             "minimum_bits_per_param": minimum / params,
             "richest_bits_per_param": richest / params, "richest": target >= richest}

    sec["calibrate"] += clock() - t
    schemes = [s.name for s, _ in settings]

    def choose(budget: float) -> tuple[np.ndarray, float]:
        """The knapsack's choice at ``budget`` less the tables it needs, and its estimate."""
        inner = budget
        for _ in range(8):
            choice = (np.full(len(bits), K - 1) if target >= richest
                      else allocate(bits, loss, inner))
            used = {(j, schemes[int(k)]) for j in range(len(roles))
                    for k in choice[j * G:(j + 1) * G]}
            est = float(bits[np.arange(len(bits)), choice].sum()) + sum(
                TABLE_BITS.get(sc, 0) for _, sc in used)
            if est <= budget or target >= richest:
                break
            inner -= est - budget
        return choice, est

    budget = target * (1 - 1e-3)  # a little room for the coder's overhead over the entropy
    for attempt in range(8):
        t = clock()
        try:
            choice, est = choose(budget)
        except BudgetTooSmall as exc:
            raise BudgetTooSmall(minimum / params, target_bits) from exc
        ch = {r: choice[j * G:(j + 1) * G] for j, r in enumerate(roles)}
        t1 = clock()
        sec["choose"] += t1 - t
        results = {r: [_slice(cand[r][int(ch[r][i])], [i]) for i in range(G)]
                   for r in spec.in_roles}
        if opts.sequential:
            deq = {r: torch.cat([q.dequantize() for q in results[r]]) for r in spec.in_roles}
            hid = [spec.hidden({**{r: deq[r][i] for r in spec.in_roles}, **bias[i]}, x_h[i])
                   for i in range(G)]
            H_out, _ = _hessians(hid, d_ff, opts)
            del hid, deq
            for r in spec.out_roles:
                ks = sorted(set(ch[r].tolist()))
                qs = dict(zip(ks, gptq_multi(W[r], H_out, [settings[k] for k in ks], **kw),
                              strict=True))
                results[r] = [_slice(qs[int(ch[r][i])], [i]) for i in range(G)]
            del H_out
        else:
            for r in spec.out_roles:
                results[r] = [_slice(cand[r][int(ch[r][i])], [i]) for i in range(G)]
        choices = {r: [labels[int(k)] for k in ch[r]] for r in roles}
        _sync(device)
        t2 = clock()
        sec["requantize"] += t2 - t1
        exact = est if measure is None else float(measure(results, choices))
        sec["measure"] += clock() - t2
        alloc.update(estimated_bits=est, bits=exact, attempts=attempt + 1)
        if exact <= target or alloc["richest"]:
            break
        budget -= (exact - target) + 1e-3 * target
    else:
        raise RuntimeError(f"the coded choice stays above the budget ({exact:.0f} > "
                           f"{target:.0f} bits) after {attempt + 1} tries")
    alloc["bits_per_param"] = alloc["bits"] / params
    alloc["seconds"] = sec
    return results, choices, alloc
