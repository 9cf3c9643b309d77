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
and matrix role): counts start from the round-to-nearest codes of the original weights (a prior
with the weight of one column) and grow with every column quantized, so the table follows the
zeros the rounding itself creates. Order-0 lengths ``-log2 p``; the coder is within 0.6% of that.

Pure torch: no I/O.
"""

from __future__ import annotations

import torch


class RateModel:
    """Running order-0 code lengths of one group's codes.

    Args:
        prior_codes: ``[E, rows, cols]`` codes the prior is counted from (round to nearest).
        num_symbols: alphabet size (3 for ternary: codes -1, 0, 1 at indices 0, 1, 2; ``2^b``).
        offset: added to a code to get its index (1 for ternary, 0 for integer codes).
        lam: ``[E]`` float32: lambda in proxy-loss units per bit, per expert.
    """

    def __init__(self, prior_codes: torch.Tensor, num_symbols: int, offset: int,
                 lam: torch.Tensor):
        E, R, C = prior_codes.shape
        idx = (prior_codes.to(torch.int64) + offset).flatten()
        hist = torch.bincount(idx, minlength=num_symbols).to(torch.float64)
        # the prior weighs as much as one column of the group: enough to start, quickly outvoted
        self.counts = hist * (E * R / max(1.0, float(hist.sum()))) + 0.5
        self.offset = offset
        self.num_symbols = num_symbols
        self.lam = lam

    def lengths(self) -> torch.Tensor:
        """``[num_symbols]`` float32 code lengths in bits under the current counts."""
        p = self.counts / self.counts.sum()
        return (-torch.log2(p)).to(torch.float32)

    def update(self, codes: torch.Tensor) -> None:
        """Count one quantized column (``[E, rows]`` codes) into the estimate."""
        idx = (codes.to(torch.int64) + self.offset).flatten()
        self.counts += torch.bincount(idx, minlength=self.num_symbols).to(torch.float64)


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
                   lengths: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Rate-aware ternary codes of one column.

    Args:
        w: ``[E, rows]`` the (updated) weights of the column.
        lo, hi: ``[E, rows]`` the grids.
        d2: ``[E]`` ``U_jj^2`` of this column (``[H^-1]_jj`` of the remaining problem).
        lengths: ``[3]`` bits of codes -1, 0, +1.
        lam: ``[E]`` lambda in loss units per bit.

    Returns:
        ``[E, rows]`` int8 codes; a tie goes to zero, then to the nearer point.
    """
    pen = (lam * d2)[:, None]  # cost in the units of (w - q)^2
    inf = torch.tensor(float("inf"), device=w.device)
    c0 = w.square() + pen * lengths[1]
    cp = torch.where(hi > 0, (w - hi).square() + pen * lengths[2], inf)
    cn = torch.where(lo < 0, (w - lo).square() + pen * lengths[0], inf)
    pos = (cp < c0) & (cp <= cn)
    neg = (cn < c0) & (cn < cp)
    return pos.to(torch.int8) - neg.to(torch.int8)


def choose_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
               d2: torch.Tensor, lengths: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Rate-aware integer codes of one column: the cheaper of the two grid points around ``w``.

    Args:
        w: ``[E, rows]`` weights; ``scale``, ``zero``: ``[E, rows]`` the column's grid.
        maxq: the largest code.
        d2, lengths (``[maxq + 1]``), lam: as in ``choose_ternary``.

    Returns:
        ``[E, rows]`` uint8 codes.
    """
    pen = (lam * d2)[:, None]
    x = w / scale + zero
    f = torch.floor(x).clamp(0, maxq)
    c = (f + 1).clamp(0, maxq)
    cost_f = (w - scale * (f - zero)).square() + pen * lengths[f.to(torch.int64)]
    cost_c = (w - scale * (c - zero)).square() + pen * lengths[c.to(torch.int64)]
    return torch.where(cost_c < cost_f, c, f).to(torch.uint8)
