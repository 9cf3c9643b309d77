"""Bit allocation under a size budget (issue 17 item 2, ``compress --target-bits B``).

Every expert matrix of a group is quantized under each candidate setting of ``CANDIDATES``
(``gptq_multi``: one Hessian, one act-order permutation and one inverse-Hessian factor shared by
all of them; only the column sweeps repeat). Each candidate then has

- an estimated size in bits (``estimate_bits``): its codes' order-0 entropy for the entropy-coded
  schemes (the coder is within ~1% of it) or the exact packed bits for int3/int4, plus the exact
  bits of its grid parameters (bf16 scales, uint8 zeros); only the chosen candidates are coded;
- a loss estimate, calibrated by the caller (``qmoe_ray.job.group``) so that matrices of
  different roles and experts are in one unit.

``allocate`` solves the multiple-choice knapsack: one candidate per matrix, the summed loss
minimal, the summed bits within the budget, by dynamic programming over the budget in 20,000
units (a group of 16 experts x 3 matrices x 8 candidates takes milliseconds; greedy on the
convex hulls was measured 7% above the exhaustive optimum on small problems). The caller measures
the coded bytes of the choice and tightens the budget if the estimate was short, so the budget
is never exceeded.

Pure numpy/torch: no I/O.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qmoe_ray.quant.gptq import QuantResult

#: The candidate settings ``(scheme, rate_lambda)``, cheapest first: ternary at rate-aware
#: lambdas from 1.0 (mostly zeros) to 0 (plain GPTQ), int2, then the bit-packed int3/int4.
CANDIDATES: tuple[tuple[str, float], ...] = (
    ("ternary", 2.0), ("ternary", 0.6), ("ternary", 0.2), ("ternary", 0.05), ("ternary", 0.0),
    ("int2", 0.0), ("int3", 0.0), ("int4", 0.0),
)
#: The coded size over the order-0 entropy the estimate assumes (segment lengths, rANS state).
CODED_OVERHEAD = 1.01
_CODED = ("ternary", "int2", "ternary-sym256")
#: The stored bits of one shared code table (``qmoe_ray.codec.table``: uint16 frequencies of
#: 3^5 ternary or 4^4 int2 symbol groups), paid once per expert group, role and coded scheme.
TABLE_BITS = {"ternary": 16 * 243, "int2": 16 * 256}
_PARAM_BITS = {"lo": 16, "hi": 16, "scale": 16, "zero": 8}


def label(scheme: str, rate_lambda: float) -> str:
    """A candidate's name in reports and the manifest: ``ternary``, ``ternary@0.2``, ``int3``."""
    return scheme if not rate_lambda else f"{scheme}@{rate_lambda:g}"


class BudgetTooSmall(ValueError):
    """The cheapest candidates already exceed the budget; ``minimum`` is their bits."""

    def __init__(self, minimum: float, budget: float):
        super().__init__(f"the cheapest candidates cost {minimum:.0f} bits, over the budget of "
                         f"{budget:.0f}")
        self.minimum = minimum
        self.budget = budget


def estimate_bits(qr: QuantResult) -> torch.Tensor:
    """float64 ``[E]``: each expert's estimated stored bits under ``qr`` (codes and grid)."""
    E, R, C = qr.codes.shape
    n = R * C
    if qr.scheme.name in _CODED:
        k = 3 if qr.scheme.name == "ternary" else 4
        idx = qr.codes.to(torch.int64).reshape(E, n) + (1 if qr.scheme.name == "ternary" else 0)
        counts = torch.zeros(E, k, dtype=torch.float64)
        counts.scatter_add_(1, idx.cpu(), torch.ones(E, n, dtype=torch.float64))
        p = counts / n
        ent = -(p * torch.log2(p.clamp(min=1e-300))).sum(dim=1)
        code_bits = ent * n * CODED_OVERHEAD
    else:
        code_bits = torch.full((E,), float(8 * math.ceil(n * qr.scheme.bits / 8)),
                               dtype=torch.float64)
    grid = sum(_PARAM_BITS[k] * v[0].numel() for k, v in qr.params.items())
    return code_bits + float(grid)


def allocate(bits: np.ndarray, loss: np.ndarray, budget: float,
             resolution: int = 20000) -> np.ndarray:
    """One candidate per matrix minimising ``sum(loss)`` with ``sum(bits) <= budget``.

    Dynamic programming over the budget in ``resolution`` units, each candidate's bits rounded
    up to whole units (so the choice fits in real bits; the rounding leaves at most one unit
    per matrix unspent), then a fill pass spending what is left, in real bits, on the single
    change with the largest loss decrease, until none fits.

    Args:
        bits, loss: ``[M, K]``: matrix ``m`` under candidate ``k``.
        budget: the most bits the choice may take.
        resolution: units the budget is split into.

    Returns:
        int64 ``[M]``: the chosen candidate of each matrix.

    Raises:
        BudgetTooSmall: even the cheapest candidates exceed ``budget``.
    """
    bits = np.asarray(bits, dtype=np.float64)
    loss = np.nan_to_num(np.asarray(loss, dtype=np.float64), nan=np.inf)
    M, K = bits.shape
    cheapest = float(bits.min(axis=1).sum())
    if cheapest > budget:
        raise BudgetTooSmall(cheapest, budget)
    unit = budget / resolution
    cost = np.ceil(bits / unit - 1e-9).astype(np.int64)
    f = np.full(resolution + 1, np.inf)
    f[0] = 0.0
    back = np.zeros((M, resolution + 1), dtype=np.int16)
    for m in range(M):
        new = np.full(resolution + 1, np.inf)
        for k in range(K):
            c = int(cost[m, k])
            if c > resolution:
                continue
            cand = np.full(resolution + 1, np.inf)
            cand[c:] = f[: resolution + 1 - c] + loss[m, k]
            better = cand < new
            new[better] = cand[better]
            back[m, better] = k
        f = new
    b = int(np.argmin(f))
    if not np.isfinite(f[b]):  # rounding up made the cheapest miss: take it in real bits
        choice = bits.argmin(axis=1)
    else:
        choice = np.zeros(M, dtype=np.int64)
        for m in range(M - 1, -1, -1):
            k = int(back[m, b])
            choice[m] = k
            b -= int(cost[m, k])
    spent = float(bits[np.arange(M), choice].sum())
    # what is left: the single change that fits with the largest loss decrease, until none
    for _ in range(M):
        cur_b, cur_l = bits[np.arange(M), choice], loss[np.arange(M), choice]
        gain = np.where(bits - cur_b[:, None] <= budget - spent, cur_l[:, None] - loss, 0.0)
        m, k = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[m, k] > 0:
            break
        spent += bits[m, k] - cur_b[m]
        choice[m] = k
    return choice
