"""Code lengths for rate-aware rounding: what a code costs in the entropy-coded format.

GPTQ rounds each weight to the nearest grid point. Under an entropy code the grid points do not
cost the same: at 88% zeros a ternary zero costs ~0.18 bits and a +-1 ~4 bits. Rate-aware rounding
(issue 17) picks, at each step of the column sweep, the grid point minimising

    (w - q)^2 / [H^-1]_jj  +  lambda_e * len(q)

(the first term is the proxy-loss increase GPTQ's own derivation assigns to that rounding; its
error feedback then compensates the choice in later columns). ``lambda_e`` is the user's
dimensionless ``rate_lambda`` times a per-expert unit, the proxy-loss cost of one grid step for a
typical column (``mean_r(step_r^2) / mean_j(U_jj^2)``), so ``rate_lambda`` means the same thing for
every matrix: a near-threshold weight becomes a zero when the loss it adds, in grid steps squared,
is below ``rate_lambda`` times the bits it saves. ``rate_lambda = 0`` is plain GPTQ, bit for bit.

Lengths come from a running estimate over the whole group (the codec shares one table per group
and matrix role; one table per setting when several settings run as lanes of one sweep,
``qmoe_ray.quant.sweep``): counts start from the round-to-nearest codes of the original weights (a prior
with the weight of one column) and grow with every column quantized, so the table follows the
zeros the rounding itself creates. Order-0 lengths ``-log2 p``; the coder is within 0.6% of that.

Pure torch: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RateModel:
    """Running order-0 code lengths of one group's codes, one table per setting of a sweep.

    Args:
        priors: per table, the ``[E_t, rows, cols]`` codes its prior is counted from (round to
            nearest under that table's setting).
        num_symbols: per table, its alphabet size (3 for ternary: codes -1, 0, 1 at indices 0,
            1, 2; ``maxq + 1`` for an integer grid); the tables are padded to the largest, the
            padding never counted.
        offset: added to a code to get its index (1 for ternary, 0 for integer codes).
        lam: ``[E, 1]`` (one setting) or ``[E, rows']`` float32: lambda in proxy-loss units per
            bit, per expert (and row of the sweep's stack).
        sid: ``[E, rows']`` int64: the table of each row of the sweep's stack (None: one table).
    """

    def __init__(self, priors: Sequence[torch.Tensor], num_symbols: Sequence[int], offset: int,
                 lam: torch.Tensor, sid: torch.Tensor | None = None):
        S = max(num_symbols)
        rows = []
        for codes, n in zip(priors, num_symbols, strict=True):
            E, R, C = codes.shape
            idx = (codes.to(torch.int64) + offset).flatten()
            hist = torch.bincount(idx, minlength=S).to(torch.float64)
            # the prior weighs as much as one column of its rows: enough to start, soon outvoted
            c = hist * (E * R / max(1.0, float(hist.sum()))) + 0.5
            c[n:] = 0.0
            rows.append(c)
        self.counts = torch.stack(rows)  # [T, S]
        self.offset = offset
        self.lam = lam
        self.base = None if sid is None else sid * S  # each row's first index in the flat table

    def lengths(self) -> torch.Tensor:
        """``[T, S]`` float32 code lengths in bits under the current counts (inf: padding)."""
        p = self.counts / self.counts.sum(dim=1, keepdim=True)
        return (-torch.log2(p)).to(torch.float32)

    def row_lengths(self, codes: Sequence[int]) -> list[torch.Tensor]:
        """The lengths of each code in ``codes`` (indices), per row of the stack: 0-dim tensors
        with one table, ``[E, rows']`` with several."""
        L = self.lengths()
        if self.base is None:
            return [L[0, c] for c in codes]
        flat = L.flatten()
        return [flat[self.base + c] for c in codes]

    def code_lengths(self, index: torch.Tensor) -> torch.Tensor:
        """The lengths of the symbols ``index`` (``[E, rows']`` int64, code + offset) in each
        row's table."""
        L = self.lengths()
        return L[0][index] if self.base is None else L.flatten()[self.base + index]

    def update(self, codes: torch.Tensor) -> None:
        """Count one quantized column (``[E, rows']`` codes) into its rows' tables."""
        idx = codes.to(torch.int64) + self.offset
        if self.base is not None:
            idx = idx + self.base
        self.counts += torch.bincount(idx.flatten(), minlength=self.counts.numel()).to(
            torch.float64).view_as(self.counts)


def rate_unit(step: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Per expert, the proxy-loss cost of one grid step on a typical column.

    Args:
        step: ``[E, rows]`` grid step per row.
        U: ``[E, cols, cols]`` the inverse-Hessian factor of the sweep (``U^T U = H^-1``).

    Returns:
        ``[E]`` float32.
    """
    d2 = U.diagonal(dim1=1, dim2=2).square().mean(dim=1)
    s2 = step.square().mean(dim=1)
    return torch.where(d2 > 0, s2 / d2.clamp(min=1e-30), torch.zeros_like(s2))


def choose_ternary(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, d2: torch.Tensor,
                   lengths: Sequence[torch.Tensor], lam: torch.Tensor) -> torch.Tensor:
    """Rate-aware ternary codes of one column.

    Args:
        w: ``[E, rows]`` the (updated) weights of the column.
        lo, hi: ``[E, rows]`` the grids.
        d2: ``[E]`` ``U_jj^2`` of this column (``[H^-1]_jj`` of the remaining problem).
        lengths: bits of codes -1, 0, +1 (``RateModel.row_lengths``: scalars or per row).
        lam: ``[E, 1]`` or ``[E, rows]`` lambda in loss units per bit.

    Returns:
        ``[E, rows]`` int8 codes; a tie goes to zero, then to the nearer point.
    """
    pen = lam * d2[:, None]  # cost in the units of (w - q)^2
    inf = torch.tensor(float("inf"), device=w.device)
    c0 = w.square() + pen * lengths[1]
    cp = torch.where(hi > 0, (w - hi).square() + pen * lengths[2], inf)
    cn = torch.where(lo < 0, (w - lo).square() + pen * lengths[0], inf)
    pos = (cp < c0) & (cp <= cn)
    neg = (cn < c0) & (cn < cp)
    return pos.to(torch.int8) - neg.to(torch.int8)


def clamp_code(x: torch.Tensor, maxq: int | torch.Tensor) -> torch.Tensor:
    """``x`` clamped to ``[0, maxq]`` (``maxq`` a number or a per-row float tensor)."""
    if isinstance(maxq, torch.Tensor):
        return x.clamp(min=0).minimum(maxq)
    return x.clamp(0, maxq)


def choose_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               maxq: int | torch.Tensor, d2: torch.Tensor, rate: RateModel) -> torch.Tensor:
    """Rate-aware integer codes of one column: the cheaper of the two grid points around ``w``.

    Args:
        w: ``[E, rows]`` weights; ``scale``, ``zero``: ``[E, rows]`` the column's grid.
        maxq: the largest code (a number, or per row ``[E, rows]`` float32).
        d2: as in ``choose_ternary``; ``rate``: the running tables and lambdas.

    Returns:
        ``[E, rows]`` uint8 codes.
    """
    pen = rate.lam * d2[:, None]
    x = w / scale + zero
    f = clamp_code(torch.floor(x), maxq)
    c = clamp_code(f + 1, maxq)
    cost_f = (w - scale * (f - zero)).square() + pen * rate.code_lengths(f.to(torch.int64))
    cost_c = (w - scale * (c - zero)).square() + pen * rate.code_lengths(c.to(torch.int64))
    return torch.where(cost_c < cost_f, c, f).to(torch.uint8)
