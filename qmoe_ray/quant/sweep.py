"""The GPTQ column sweep, for one setting or several at once (``qmoe_ray.quant.gptq``).

Why the design is so:

- Per column the sweep runs a dozen small tensor operations. On the row samples the size budget
  estimates its candidates on (``qmoe_ray.job.allocation``: 128-192 rows) and on a GPU, their
  fixed cost per call, not their arithmetic, is the sweep's time, and it was paid once per
  candidate setting. GPTQ's rows are independent given the inverse-Hessian factor ``U``, so the
  settings that share ``U`` run as *lanes* of one sweep: ``W``'s rows stacked once per setting
  (every expert under every setting: ``gptq_multi``'s candidates), or each expert under its own
  setting (``assign``: the allocation's choice). A lane keeps its own grid (per row), its own
  rate-aware lambda and its own running code table, so its codes are those of a sweep of that
  setting alone: the rounding is elementwise and the block updates are the same matrix products
  over more columns of the right-hand side (on CPU/MKL bit for bit: ``tests/test_alloc.py``).
- Lanes share one grid family (ternary; or integer grids, each row with its own largest code)
  and per-row grids. A group-wise grid (its scales set as the sweep reaches each group) or a
  pruning mask runs as the one lane of its sweep.
- A rate-aware sweep whose lanes include lambda 0 rounds those lanes' rows to nearest exactly as
  a plain sweep does (not through the rate-aware rule with a zero rate term, whose float
  comparisons can differ at the thresholds).

Pure torch: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qmoe_ray.quant.grids import (
    Scheme,
    dequantize_int,
    dequantize_ternary,
    grid_params,
    parse_scheme,
    quantize,
    quantize_int,
    range_params,
    ternary_thresholds,
)
from qmoe_ray.quant.prune import SweepMask
from qmoe_ray.quant.rate import RateModel, choose_int, choose_ternary, clamp_code, rate_unit


def aligned_blocksize(blocksize: int, group_size: int | None) -> int:
    """A block size whose block boundaries fall on group boundaries."""
    if group_size is None:
        return blocksize
    if blocksize >= group_size:
        return blocksize - blocksize % group_size
    return max(d for d in range(1, blocksize + 1) if group_size % d == 0)


def _sub_blocksize(blocksize: int, group_size: int | None, target: int = 16) -> int:
    """The inner (sub-block) size: divides ``blocksize``; groups nest in sub-blocks or the
    reverse, so a group's scale is always taken from fully updated weights."""
    best = 1
    for d in range(1, min(blocksize, target) + 1):
        nests = group_size is None or group_size % d == 0 or d % group_size == 0
        if blocksize % d == 0 and nests:
            best = d
    return best


def gather_cols(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x`` ``[E, C, R]`` with its dim 1 permuted per expert by ``perm`` ``[E, C]``."""
    return x.gather(1, perm[:, :, None].expand_as(x))


def batchable(scheme: Scheme) -> bool:
    """Whether ``scheme`` can share a sweep with others of its family (per-row grids)."""
    return scheme.group_size is None


class _Layout:
    """Where each setting's rows sit in the sweep's stack ``[E, rows', cols]``."""

    def __init__(self, E: int, R: int, T: int, assign: Sequence[int] | None, device):
        self.R = R
        if assign is None:  # every expert under every setting: rows stacked T times
            self.experts = [None] * T
            self.rows = T * R
            sid = torch.arange(T, device=device).repeat_interleave(R)[None].expand(E, -1)
        else:
            a = torch.as_tensor(list(assign), dtype=torch.int64, device=device)
            self.experts = [(a == t).nonzero().flatten() for t in range(T)]
            self.rows = R
            sid = a[:, None].expand(E, R)
        self.offset = [t * R if assign is None else 0 for t in range(T)]
        self.sid = sid.contiguous() if T > 1 else None

    def put(self, dst: torch.Tensor, t: int, val: torch.Tensor) -> None:
        """Write setting ``t``'s ``[E_t, R, ...]`` into ``dst`` ``[E, rows', ...]``."""
        o, ex = self.offset[t], self.experts[t]
        if ex is None:
            dst[:, o:o + self.R] = val
        else:
            dst[ex, o:o + self.R] = val

    def take(self, src: torch.Tensor, t: int) -> torch.Tensor:
        """Setting ``t``'s ``[E_t, R, ...]`` of ``src`` ``[E, rows', ...]``."""
        o, ex = self.offset[t], self.experts[t]
        return src[:, o:o + self.R] if ex is None else src[ex, o:o + self.R]

    def part(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The experts of setting ``t`` in ``x`` ``[E, ...]``."""
        ex = self.experts[t]
        return x if ex is None else x[ex]


def _prior(W: torch.Tensor, scheme: Scheme, params: dict[str, torch.Tensor],
           scale_dtype: torch.dtype | None, dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A lane's prior codes (round to nearest) and grid step per row, for its code table."""
    if scheme.is_ternary:
        return quantize(W, scheme, params), (params["hi"] - params["lo"]) * 0.5
    if dynamic:  # group grids are set as the sweep reaches them: the per-row grid stands in
        scheme = parse_scheme(scheme.name)
        params = grid_params(W, scheme, scale_dtype)
    return quantize(W, scheme, params), params["scale"].mean(dim=-1)


def sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    schemes: Sequence[Scheme],
    lams: Sequence[float],
    blocksize: int,
    perm: torch.Tensor | None,
    scale_dtype: torch.dtype | None,
    masks: SweepMask | None = None,
    assign: Sequence[int] | None = None,
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The GPTQ column sweep over all experts at once, one lane per setting
    ``(schemes[t], lams[t])`` (see the module doc).

    ``assign``: None, every expert under every setting; else the setting of each expert. Returns
    per setting ``(codes, params)`` of its experts (all of them without ``assign``; in expert
    order), as a sweep of that setting alone gives them.

    Two levels of lazy updates: within a sub-block of ~16 columns the error of each column is
    applied to the next columns at once (a rank-1 update of a small, cache-resident slab); at the
    end of a sub-block, to the rest of its block, and at the end of a block, to all later columns
    (batched matrix products). The result is the same as the textbook column-by-column sweep.
    """
    E, R, C = W.shape
    T = len(schemes)
    scheme = schemes[0]
    if T > 1 and (masks is not None or len({s.is_ternary for s in schemes}) > 1
                  or not all(map(batchable, schemes))):
        raise ValueError("lanes of one sweep need one grid family, per-row grids and no mask")
    lay = _Layout(E, R, T, assign, W.device)
    gs = scheme.group_size
    dynamic_groups = gs is not None and perm is None
    if dynamic_groups:
        G = scheme.num_groups(C)
        params = {
            "scale": torch.ones(E, R, G, dtype=torch.float32, device=W.device),
            "zero": torch.zeros(E, R, G, dtype=torch.float32, device=W.device),
        }
        blocksize = aligned_blocksize(blocksize, gs)
        lane_params = [params]
    else:
        lane_params = [grid_params(lay.part(W, t), s, scale_dtype) for t, s in enumerate(schemes)]
        params = lane_params[0]
    sub = _sub_blocksize(blocksize, gs if dynamic_groups else None)

    Wt = W.transpose(1, 2).contiguous() if assign is not None or T == 1 else (
        W.transpose(1, 2).repeat(1, 1, T))  # [E, C, rows']
    col_params: dict[str, torch.Tensor] = {}  # per-column grids [E, C, R] (static groups)
    if perm is not None:
        Wt = gather_cols(Wt, perm)
        if gs is not None:
            gidx = (perm // gs)[:, :, None].expand(E, C, R)
            col_params = {k: v.transpose(1, 2).gather(1, gidx) for k, v in params.items()}

    def stacked(key: str, last: bool = False) -> torch.Tensor:
        if T == 1:
            v = lane_params[0][key]
            return v[..., 0] if last else v
        out = torch.empty(E, lay.rows, dtype=torch.float32, device=W.device)
        for t in range(T):
            v = lane_params[t][key]
            lay.put(out, t, v[..., 0] if last else v)
        return out

    maxq: int | torch.Tensor = scheme.maxq
    if scheme.is_ternary:
        lo, hi = stacked("lo"), stacked("hi")  # [E, rows']
        t_lo, t_hi = ternary_thresholds(lo, hi)
    elif gs is None:
        scale, zero = stacked("scale", True), stacked("zero", True)
        if len({s.maxq for s in schemes}) > 1:
            maxq = torch.empty(E, lay.rows, dtype=torch.float32, device=W.device)
            for t, s in enumerate(schemes):
                lay.put(maxq, t, float(s.maxq))

    rate = plain = None
    if any(lams):
        priors, units = [], []
        for t, s in enumerate(schemes):
            p, step = _prior(lay.part(W, t), s, lane_params[t], scale_dtype, dynamic_groups)
            priors.append(p)
            units.append(float(lams[t]) * rate_unit(step, lay.part(U, t)))
        if T == 1:
            lam = units[0][:, None]
        else:
            lam = torch.zeros(E, lay.rows, dtype=torch.float32, device=W.device)
            for t in range(T):
                lay.put(lam, t, units[t][:, None].expand(-1, R))
            if not all(lams):  # the lambda-0 lanes' rows round to nearest, as in a plain sweep
                plain = torch.zeros(E, lay.rows, dtype=torch.bool, device=W.device)
                for t in range(T):
                    if not lams[t]:
                        lay.put(plain, t, True)
        nsym = [3 if s.is_ternary else s.maxq + 1 for s in schemes]
        rate = RateModel(priors, nsym, 1 if scheme.is_ternary else 0, lam, lay.sid)
        del priors
    codes_t = torch.empty(E, C, lay.rows, dtype=scheme.code_dtype, device=W.device)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        W1 = Wt[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        n = i2 - i1
        m1 = None if masks is None else masks.block(
            W1.transpose(1, 2), U1.diagonal(dim1=1, dim2=2), i1).transpose(1, 2)
        for s1 in range(0, n, sub):
            s2 = min(s1 + sub, n)
            for i in range(s1, s2):
                j = i1 + i
                w = W1[:, i]
                if dynamic_groups and j % gs == 0:
                    block = Wt[:, j : j + gs] if gs > blocksize else W1[:, i : i + gs]
                    scale, zero = range_params(
                        block.amin(dim=1), block.amax(dim=1), scheme, scale_dtype
                    )
                    params["scale"][:, :, j // gs] = scale
                    params["zero"][:, :, j // gs] = zero
                elif col_params:
                    scale, zero = col_params["scale"][:, j], col_params["zero"][:, j]
                if rate is None or plain is not None:
                    if scheme.is_ternary:
                        code = (w > t_hi).to(torch.int8) - (w < t_lo).to(torch.int8)
                    elif isinstance(maxq, int):
                        code = quantize_int(w, scale, zero, maxq)
                    else:
                        code = clamp_code(torch.round(w / scale) + zero, maxq).to(torch.uint8)
                if rate is not None:
                    d2 = U1[:, i, i].square()
                    rc = (choose_ternary(w, lo, hi, d2, rate.row_lengths((0, 1, 2)), rate.lam)
                          if scheme.is_ternary else choose_int(w, scale, zero, maxq, d2, rate))
                    code = rc if plain is None else torch.where(plain, code, rc)
                q = (dequantize_ternary(code, lo, hi) if scheme.is_ternary
                     else dequantize_int(code, scale, zero))
                if m1 is not None:  # pruned: exactly 0 (ternary code 0, int code ``zero``)
                    q = q.masked_fill(m1[:, i], 0.0)
                    code = torch.where(m1[:, i], 0 if scheme.is_ternary else zero.to(code.dtype),
                                       code)
                codes_t[:, j] = code
                if rate is not None:
                    rate.update(code)
                err = Err1[:, i]
                torch.sub(w, q, out=err)
                err.div_(U1[:, i, i, None])
                if i + 1 < s2:
                    W1[:, i + 1 : s2].addcmul_(
                        U1[:, i, i + 1 : s2, None], err[:, None, :], value=-1.0
                    )
            if s2 < n:
                W1[:, s2:].baddbmm_(U1[:, s1:s2, s2:].transpose(1, 2), Err1[:, s1:s2], alpha=-1.0)
        if i2 < C:
            Wt[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1.0)

    if perm is not None:
        codes_t = gather_cols(codes_t, torch.argsort(perm, dim=1))
    codes = codes_t.transpose(1, 2)  # [E, rows', C]
    return [(lay.take(codes, t).contiguous(), lane_params[t]) for t in range(T)]
