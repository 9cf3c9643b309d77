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
minimal, the summed bits within the budget. Greedy on the lower convex hull of each matrix's
(bits, loss) points, taking the upgrade with the largest loss decrease per bit that still fits,
then a fill pass that spends what is left on any single change that fits. The caller measures
the coded bytes of the choice and tightens the budget if the estimate was short, so the budget
is never exceeded.

Pure numpy/torch: no I/O.
"""

from __future__ import annotations

import heapq
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


def _hull(bits: np.ndarray, loss: np.ndarray) -> list[int]:
    """Candidate indices on the lower convex hull of one matrix's (bits, loss), by bits."""
    pts: list[int] = []
    for k in sorted(range(len(bits)), key=lambda k: (bits[k], loss[k])):
        if not pts or loss[k] < loss[pts[-1]]:
            pts.append(k)
    hull: list[int] = []
    for k in pts:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            s_ab = (loss[b] - loss[a]) / (bits[b] - bits[a])
            s_bk = (loss[k] - loss[b]) / (bits[k] - bits[b])
            if s_bk <= s_ab:
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def allocate(bits: np.ndarray, loss: np.ndarray, budget: float) -> np.ndarray:
    """One candidate per matrix minimising ``sum(loss)`` with ``sum(bits) <= budget``.

    Args:
        bits, loss: ``[M, K]``: matrix ``m`` under candidate ``k``.
        budget: the most bits the choice may take.

    Returns:
        int64 ``[M]``: the chosen candidate of each matrix.

    Raises:
        BudgetTooSmall: even the cheapest candidates exceed ``budget``.
    """
    bits = np.asarray(bits, dtype=np.float64)
    loss = np.nan_to_num(np.asarray(loss, dtype=np.float64), nan=np.inf)
    M, _ = bits.shape
    hulls = [_hull(bits[m], loss[m]) for m in range(M)]
    choice = np.array([h[0] for h in hulls], dtype=np.int64)
    spent = float(bits[np.arange(M), choice].sum())
    if spent > budget:
        raise BudgetTooSmall(spent, budget)
    pos = [0] * M
    heap: list[tuple[float, int]] = []

    def push(m: int) -> None:
        h = hulls[m]
        if pos[m] + 1 < len(h):
            a, b = h[pos[m]], h[pos[m] + 1]
            heapq.heappush(heap, (-(loss[m, a] - loss[m, b]) / (bits[m, b] - bits[m, a]), m))

    for m in range(M):
        push(m)
    while heap:
        _, m = heapq.heappop(heap)
        a, b = hulls[m][pos[m]], hulls[m][pos[m] + 1]
        extra = bits[m, b] - bits[m, a]
        if spent + extra <= budget:
            spent += extra
            pos[m] += 1
            choice[m] = b
            push(m)
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
