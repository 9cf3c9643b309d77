"""A group's matrices under a size budget (``--target-bits``): candidates, estimates, the choice.

``qmoe_ray.quant.alloc`` has the candidates, the bit estimate and the knapsack; this module runs
them on one expert group as a worker does (``qmoe_ray.job.group.quantize_group`` calls
``allocate_group``).

Loss estimate (README, ``--target-bits``): the mean squared error a candidate adds to the
expert's output over the expert's Hessian tokens, times those tokens, so it is the squared error
the matrix adds to the layer's output over the calibration set. An out matrix's is its proxy
loss; an in matrix's is measured by a forward of the expert with that matrix under the candidate
and the others exact (a linear factor from plain ternary underrated the near-zero candidates by
far: the gate is not linear).

Cost: the candidates of one grid family run as lanes of one GPTQ column sweep (``gptq_multi``,
``qmoe_ray.quant.sweep``: ternary at every lambda in one, int2/int3/int4 in another), and the
chosen settings of a role in one sweep per family (``assign``); still, on large matrices the candidates are
estimated on a sample of rows (``sample_rows``: evenly spaced, at least ``SAMPLE_MIN_ROWS``, a
``1 / SAMPLE_FRACTION`` share): GPTQ treats rows independently given the Hessian factor, so a
row sample's codes are exactly those rows' codes under the candidate, and its bits and loss,
scaled by rows / sampled rows, estimate the matrix's (an in matrix's forward quantizes only the
sampled rows, the others exact). Only the chosen setting is then run on the whole matrix, per
expert subset (for a rate-aware setting its running code table is then the subset's, not the
whole group's as in its estimate: running every used setting over the whole group would cost
the sweeps the sampling saves). Small matrices (fewer than ``4 * SAMPLE_MIN_ROWS`` rows, as in the embedded
models) use every row, and their chosen candidates are the results themselves.

The out matrices' candidates are estimated on the Hessian through the exact in matrices; once
the in matrices are chosen (and ``opts.sequential``), the out matrices are quantized again,
under their chosen settings, on the Hessian through the quantized ones, as without a budget.
The coded bits of each choice are measured (the worker codes it); a choice over the budget is
chosen again with the budget tightened by the excess, and one that leaves more than
``LOOSEN_SLACK`` of it unspent (the estimate ran high: sampled rows, the coder's overhead) with
the budget loosened by what is left, keeping the last choice that fit if that goes over. Results
are cached per expert and setting (and, for an out matrix, its expert's in choices) across the
attempts, so a retry only runs what changed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qmoe_ray.models.base import ExpertSpec
from qmoe_ray.quant import QuantResult, gptq_multi, hessian, parse_scheme
from qmoe_ray.quant.alloc import (
    CANDIDATES,
    TABLE_BITS,
    BudgetTooSmall,
    allocate,
    estimate_bits,
    label,
)

#: Most of an expert's Hessian tokens the in matrices' forward estimates use (evenly spaced).
ESTIMATE_TOKENS = 1024
#: Choices per group: the first, tightened ones while the coded bits exceed the budget, and up
#: to ``LOOSEN_TRIES`` loosened ones while more than ``LOOSEN_SLACK`` of it is left unspent.
MAX_ATTEMPTS = 8
LOOSEN_TRIES = 2
LOOSEN_SLACK = 5e-3
#: Row sampling of the candidates (``sample_rows``).
SAMPLE_MIN_ROWS = 128
SAMPLE_FRACTION = 16

Measure = Callable[[Mapping[str, Sequence[QuantResult]], Mapping[str, Sequence[str]]], int]
"""Exact stored bits (codes, grids, shared tables) of a group's per-expert results, given with
the labels of their candidate settings."""


def group_hessians(xs: Sequence[torch.Tensor], cols: int,
                   dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Hessians of a list of per-expert activations (empty ones give an all-zero Hessian), their
    sums in ``dtype`` (``float32`` or ``float64``: ``--hessian-dtype``)."""
    return hessian([x if x.numel() else x.new_zeros(0, cols) for x in xs],
                   dtype=getattr(torch, dtype))


def sync(device: str) -> None:
    """Wait for the device's queued work (timings on a GPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def slice_result(q: QuantResult, idx: Sequence[int]) -> QuantResult:
    """The experts ``idx`` of ``q`` (a stack of ``len(idx)``)."""
    ix = torch.as_tensor(list(idx), dtype=torch.int64, device=q.codes.device)
    return dataclasses.replace(
        q, codes=q.codes[ix], params={k: v[ix] for k, v in q.params.items()},
        loss=q.loss[ix.cpu()], tokens=None if q.tokens is None else q.tokens[ix.cpu()],
        fallback=[q.fallback[i] for i in idx], squeeze=False, pruned=None)


def sample_rows(rows: int) -> torch.Tensor | None:
    """The rows a matrix's candidates are estimated on (None: all of them)."""
    if rows < 4 * SAMPLE_MIN_ROWS:
        return None
    n = max(SAMPLE_MIN_ROWS, rows // SAMPLE_FRACTION)
    return torch.from_numpy(np.unique(np.linspace(0, rows - 1, n).round().astype(np.int64)))


def allocate_group(spec: ExpertSpec, W: dict[str, torch.Tensor], B: dict[str, torch.Tensor],
                   x_h: list[torch.Tensor], counts: torch.Tensor, tokens: Sequence[Any],
                   opts: Any, target_bits: float, measure: Measure | None,
                   device: str) -> tuple[dict[str, list[QuantResult]], dict[str, list[str]], dict]:
    """Every matrix of the group under its chosen candidate (see the module doc).

    ``opts`` is the group's ``QuantOptions``; ``tokens`` its ``ExpertTokens`` (for the Hessian
    token counts that weigh the losses). Returns ``(results, choices, allocation)``: one
    single-expert ``QuantResult`` per expert and role, the chosen labels, the budget record.
    """
    clock = time.perf_counter
    sec = {"candidates": 0.0, "calibrate": 0.0, "choose": 0.0, "requantize": 0.0, "measure": 0.0}
    t = clock()
    settings = [(parse_scheme(s), lam) for s, lam in CANDIDATES]
    labels = [label(s, lam) for s, lam in CANDIDATES]
    K, G = len(settings), len(x_h)
    roles = list(spec.roles)
    kw = dict(blocksize=opts.blocksize, percdamp=opts.percdamp, actorder=opts.actorder)
    bias = [{b: v[i] for b, v in B.items()} for i in range(G)]
    d_in = W[spec.in_roles[0]].shape[2]
    d_ff = W[spec.out_roles[0]].shape[2]
    rows = {r: sample_rows(W[r].shape[1]) for r in roles}
    if len({W[r].shape[1] for r in spec.in_roles}) == 1:  # gate/up: the same hidden units
        rows.update({r: rows[spec.in_roles[0]] for r in spec.in_roles})
    scale = {r: 1.0 if rows[r] is None else W[r].shape[1] / len(rows[r]) for r in roles}

    def part(r: str) -> torch.Tensor:
        return W[r] if rows[r] is None else W[r][:, rows[r].to(W[r].device)]

    H_in, _ = group_hessians(x_h, d_in, opts.hessian_dtype)
    cand = {r: gptq_multi(part(r), H_in, settings, tokens=counts, **kw) for r in spec.in_roles}
    hid = [spec.hidden({**{r: W[r][i] for r in spec.in_roles}, **bias[i]}, x_h[i])
           for i in range(G)]
    H0, _ = group_hessians(hid, d_ff, opts.hessian_dtype)
    del hid
    for r in spec.out_roles:
        cand[r] = gptq_multi(part(r), H0, settings, tokens=counts, **kw)
    if opts.sequential:  # the out matrices are quantized on the Hessians through the chosen ins
        del H0
    sync(device)
    sec["candidates"] += clock() - t
    t = clock()

    # each in matrix's candidates measured where they act: the expert's output error with that
    # matrix quantized (the others exact; sampled rows only when sampled), in the unit of an out
    # matrix's proxy loss, over at most ESTIMATE_TOKENS of the expert's Hessian tokens
    in_loss = {r: np.zeros((G, K)) for r in spec.in_roles}
    xs = [x[::max(1, -(-x.shape[0] // ESTIMATE_TOKENS))] for x in x_h]
    with torch.no_grad():
        base = [{**{q: W[q][i] for q in roles}, **bias[i]} for i in range(G)]
        y0 = [spec.forward(base[i], xs[i]) if xs[i].shape[0] else None for i in range(G)]
        for r in spec.in_roles:
            for k in range(K):
                deq = cand[r][k].dequantize()
                for i in range(G):
                    if y0[i] is None:
                        continue
                    w = deq[i]
                    if rows[r] is not None:
                        w = W[r][i].clone()
                        w[rows[r].to(w.device)] = deq[i]
                    y = spec.forward({**base[i], r: w}, xs[i])
                    in_loss[r][i, k] = float((y - y0[i]).square().sum(dim=1).mean())
                del deq
    weight = np.array([float(t.hmask.sum()) for t in tokens])
    bits = np.concatenate([np.stack([estimate_bits(cand[r][k]).numpy() for k in range(K)], 1)
                           * scale[r] for r in roles])
    loss = np.concatenate([(in_loss[r] * scale[r] if r in in_loss else
                            np.stack([cand[r][k].loss.numpy() for k in range(K)], 1) * scale[r])
                           * weight[:, None] for r in roles])
    params = sum(W[r][0].numel() for r in roles) * G
    target = target_bits * params
    minimum = float(bits.min(axis=1).sum())
    richest = float(bits[:, K - 1].sum())
    alloc = {"target_bits_per_param": target_bits, "params": params,
             "minimum_bits_per_param": minimum / params,
             "richest_bits_per_param": richest / params, "richest": target >= richest,
             "sampled_rows": {r: None if rows[r] is None else len(rows[r]) for r in roles}}
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

    cache: dict[tuple, QuantResult] = {}

    def run(r: str, H: torch.Tensor, want: dict[int, tuple]) -> None:
        """Quantize role ``r`` of the experts in ``want`` (expert -> cache key, setting last)
        under their settings, on ``H`` (all experts' Hessians), into ``cache``."""
        idx = [i for i, key in want.items() if key not in cache]
        if not idx:
            return
        ks = [want[i][-1] for i in idx]
        ix = torch.as_tensor(idx, device=W[r].device)
        qs = gptq_multi(W[r][ix], H[ix], settings, tokens=counts[ix.cpu()], assign=ks, **kw)
        for k, q in enumerate(qs):  # each setting's experts, in order: one sweep per family
            mine = [i for i, kk in zip(idx, ks, strict=True) if kk == k]
            for j, i in enumerate(mine):
                cache[want[i]] = slice_result(q, [j])

    def chosen(r: str, ks: np.ndarray, H: torch.Tensor) -> list[QuantResult]:
        """Role ``r`` of every expert under its chosen candidate ``ks[i]``: the candidate itself
        (all rows) or the setting run on the whole matrix (sampled rows), on ``H``."""
        if rows[r] is None:
            return [slice_result(cand[r][int(ks[i])], [i]) for i in range(G)]
        want = {i: (r, i, int(ks[i])) for i in range(G)}
        run(r, H, want)
        return [cache[want[i]] for i in range(G)]

    # the out Hessians through the chosen in matrices: one buffer, each expert's redone only
    # when its in choices change
    H_out: torch.Tensor | None = None
    H_for: list[tuple | None] = [None] * G
    budget = target * (1 - 1e-3)  # a little room for the coder's overhead over the entropy
    best, loosened = None, 0
    for attempt in range(MAX_ATTEMPTS):
        t = clock()
        try:
            choice, est = choose(budget)
        except BudgetTooSmall as exc:
            raise BudgetTooSmall(minimum / params, target_bits) from exc
        ch = {r: choice[j * G:(j + 1) * G] for j, r in enumerate(roles)}
        t1 = clock()
        sec["choose"] += t1 - t
        results: dict[str, list[QuantResult]] = {}
        for r in spec.in_roles:
            results[r] = chosen(r, ch[r], H_in)
        ins = [tuple(int(ch[r][i]) for r in spec.in_roles) for i in range(G)]
        if opts.sequential:
            need = [i for i in range(G) if H_for[i] != ins[i]]
            if need:
                deq = {r: torch.cat([results[r][i].dequantize() for i in need])
                       for r in spec.in_roles}
                hid = [spec.hidden({**{r: deq[r][j] for r in spec.in_roles}, **bias[i]}, x_h[i])
                       for j, i in enumerate(need)]
                Hn, _ = group_hessians(hid, d_ff, opts.hessian_dtype)
                del hid, deq
                if H_out is None:
                    H_out = Hn if len(need) == G else Hn.new_zeros(G, d_ff, d_ff)
                if H_out is not Hn:
                    H_out[need] = Hn
                del Hn
                for i in need:
                    H_for[i] = ins[i]
            Hs = H_out
            for r in spec.out_roles:
                if rows[r] is None:  # small: each used setting over the whole group, as its
                    # candidates were (a rate-aware setting's running table is the group's)
                    ks = sorted(set(ch[r].tolist()))
                    qs = dict(zip(ks, gptq_multi(W[r], Hs, [settings[k] for k in ks],
                                                 tokens=counts, **kw), strict=True))
                    results[r] = [slice_result(qs[int(ch[r][i])], [i]) for i in range(G)]
                    continue
                want = {i: (r, i, ins[i], int(ch[r][i])) for i in range(G)}
                run(r, Hs, want)
                results[r] = [cache[want[i]] for i in range(G)]
        else:
            for r in spec.out_roles:
                results[r] = chosen(r, ch[r], H0)
        choices = {r: [labels[int(k)] for k in ch[r]] for r in roles}
        sync(device)
        t2 = clock()
        sec["requantize"] += t2 - t1
        exact = est if measure is None else float(measure(results, choices))
        sec["measure"] += clock() - t2
        alloc.update(estimated_bits=est, bits=exact, attempts=attempt + 1)
        if alloc["richest"]:
            break
        if exact <= target:
            best = (results, choices, est, exact)
            # the coded choice left budget unspent (the estimate ran high): choose again with it
            if loosened < LOOSEN_TRIES and target - exact > LOOSEN_SLACK * target \
                    and measure is not None and attempt + 1 < MAX_ATTEMPTS:
                loosened += 1
                budget += target - exact
                continue
            break
        if best is not None:  # a loosened choice went over: back to the last one that fit
            results, choices, est, exact = best
            t2 = clock()
            exact = float(measure(results, choices))  # the worker keeps what it coded last
            sec["measure"] += clock() - t2
            alloc.update(estimated_bits=est, bits=exact)
            break
        budget -= (exact - target) + 1e-3 * target
    else:
        raise RuntimeError(f"the coded choice stays above the budget ({exact:.0f} > "
                           f"{target:.0f} bits) after {attempt + 1} tries")
    alloc["loosened"] = loosened
    alloc["bits_per_param"] = alloc["bits"] / params
    alloc["seconds"] = sec
    return results, choices, alloc
