"""Round-to-nearest and GPTQ over a stack of experts at once.

Why the design is so:

- One batched computation per expert group: ``W`` is ``[E, rows, cols]`` and ``H`` is
  ``[E, cols, cols]``; the factorizations are batched torch linear algebra and the GPTQ column
  sweep updates all ``E`` experts per step. Grouping amortises the per-column work that a single
  expert cannot fill a GPU (or many CPU cores) with; QMoE measured 6x from groups of 16 on a GPU.
- The sweep runs on ``W`` transposed to ``[E, cols, rows]``, so the column being quantized and the
  block still to update are contiguous memory.
- The inverse-Hessian factor GPTQ needs is the upper ``U`` with ``U^T U = H^-1``. Instead of
  Cholesky, inverse, Cholesky again (the reference's three ``O(n^3)`` steps, slow on CPU), we take
  the Cholesky factor of ``H`` with rows and columns reversed, which gives an upper ``V`` with
  ``H = V V^T``, and ``U = V^-1`` by a blocked triangular inverse (matrix products). Same ``U``.
- Failures are found per expert, never by parsing exception text: ``cholesky_ex`` reports each
  batch element; an expert whose factorization fails, whose inverse factor is not finite, that has
  no tokens (``H == 0``), or whose Hessian is not finite (when asked to tolerate that) gets the
  identity Hessian, which makes GPTQ exactly round-to-nearest, and is flagged with the reason.
- Grids are fixed before the sweep from the original weights (per row, as QMoE does). Group-wise
  integer grids take each group's scale when the sweep reaches the group's first column (GPTQ's
  ``groupsize``), on the weights updated so far; the block size is adjusted so block and group
  boundaries align, which makes that exact. With act-order, groups are "static" (taken from the
  original weights before the sweep) so that the stored layout stays one scale per original group.
- Dead inputs (a zero Hessian diagonal: a channel no calibration token used) are rounded to
  nearest and not zeroed as in the GPTQ reference: the calibration set can miss channels that
  real inputs use.

Pure torch: no Ray, no I/O, no printing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qmoe_ray.quant.grids import (
    Scheme,
    dequantize,
    grid_params,
    parse_scheme,
    quantize,
)
from qmoe_ray.quant.prune import PruneSpec, SweepMask
from qmoe_ray.quant.result import (  # noqa: F401 - the fallback reasons are re-exported
    CHOLESKY_FAILED,
    FEW_TOKENS,
    NO_TOKENS,
    NONFINITE_HESSIAN,
    QuantResult,
    _check_float,
    _finite_per_expert,
    _prepare_h,
    _prepare_tokens,
    _prepare_w,
    _proxy_loss,
)
from qmoe_ray.quant.sweep import batchable, gather_cols, sweep

#: Most rows one sweep stacks when it runs several settings of every expert as lanes (each
#: setting's copy of ``W``): the lanes pay off on few rows, where the per-column cost dominates.
LANE_ROWS = 2048

# -- round to nearest -----------------------------------------------------------------------------
def rtn(
    W: torch.Tensor,
    scheme: Scheme | str,
    H: torch.Tensor | None = None,
    tokens: Sequence[int] | torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = torch.bfloat16,
) -> QuantResult:
    """Round-to-nearest quantization of a stack of experts.

    Args:
        W: ``[E, rows, cols]`` or ``[rows, cols]`` weights (any float dtype; computed in fp32).
        scheme: a ``Scheme`` or one of ``SCHEMES``.
        H: optional ``[E, cols, cols]`` Hessians, only to report the proxy loss.
        tokens: optional per-expert token counts, carried into the result.
        scale_dtype: dtype the grid parameters are rounded to (``None``: keep float32).

    Returns:
        A ``QuantResult`` (``fallback`` all ``None``).

    Raises:
        ValueError: bad scheme, non-float or non-finite inputs, shapes that disagree.
    """
    scheme = parse_scheme(scheme)
    W, squeeze = _prepare_w(W)
    Hf = None if H is None else _prepare_h(H, W, squeeze)
    if Hf is not None and not _finite_per_expert(Hf).all():
        raise ValueError("H contains NaN or Inf; recompute the Hessian (float64 accumulation)")
    tok = _prepare_tokens(tokens, W.shape[0])
    params = grid_params(W, scheme, scale_dtype)
    codes = quantize(W, scheme, params)
    Q = dequantize(scheme, codes, params)
    return QuantResult(scheme=scheme, codes=codes, params=params, loss=_proxy_loss(W, Q, Hf),
                       tokens=tok, fallback=[None] * W.shape[0], squeeze=squeeze)


# -- GPTQ -----------------------------------------------------------------------------------------
def _triu_inverse(
    V: torch.Tensor, leaf: int = 256, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of a batch of upper-triangular matrices ``[E, n, n]`` by 2x2 block recursion.

    ``[[A, B], [0, D]]^-1 = [[A^-1, -A^-1 B D^-1], [0, D^-1]]``: the work is matrix products,
    which run several times faster than a triangular solve against the identity on CPU. The
    blocks are written into one output buffer (large fresh allocations are slow on CPU).
    """
    if out is None:
        out = torch.zeros_like(V)
    n = V.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=V.dtype, device=V.device).expand_as(V)
        out.copy_(torch.linalg.solve_triangular(V, eye, upper=True))
        return out
    k = n // 2
    Ai = _triu_inverse(V[:, :k, :k], leaf, out[:, :k, :k])
    Di = _triu_inverse(V[:, k:, k:], leaf, out[:, k:, k:])
    out[:, :k, k:] = torch.bmm(torch.bmm(Ai, V[:, :k, k:]), Di).neg_()
    return out


def _inverse_factor(Hf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper ``U`` with ``U^T U = Hd^-1`` per expert, and a bool ``[E]`` of which succeeded.

    Takes ``Hf``, the damped Hessian ``Hd`` with rows and columns reversed (built that way by the
    caller, which saves a copy).
    """
    E, C, _ = Hf.shape
    M, info = torch.linalg.cholesky_ex(Hf)  # lower M: Hf = M M^T
    ok = info == 0
    eye = torch.eye(C, dtype=Hf.dtype, device=Hf.device)
    V = M.flip(-2, -1)  # upper V: Hd = V V^T
    del M
    if not ok.all():
        V[~ok] = eye
    U = _triu_inverse(V)
    ok = ok & _finite_per_expert(U)
    if not ok.all():
        U[~ok] = eye
    return U, ok


def _all_zero_per_expert(H: torch.Tensor) -> list[bool]:
    """Per expert: whether ``H[e]`` is all zeros (cheap diagonal test, confirmed in full)."""
    cand = H.diagonal(dim1=1, dim2=2).abs().sum(dim=1) == 0
    out = [False] * H.shape[0]
    for e in cand.nonzero().flatten().tolist():
        out[e] = bool(torch.count_nonzero(H[e]) == 0)
    return out


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: Scheme | str,
    blocksize: int = 128,
    percdamp: float = 0.1,
    actorder: bool = False,
    damp_floor: float = 1e-6,
    tokens: Sequence[int] | torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = torch.bfloat16,
    min_tokens: int = 1,
    on_nonfinite: str = "raise",
    rate_lambda: float = 0.0,
    mask: torch.Tensor | None = None,
    prune: PruneSpec | None = None,
) -> QuantResult:
    """GPTQ over a stack of experts in one batched computation.

    Args:
        W: ``[E, rows, cols]`` or ``[rows, cols]`` weights (any float dtype; computed in fp32 on
            ``W``'s device).
        H: ``[E, cols, cols]`` (or ``[cols, cols]`` with a 2-D ``W``) Hessians of the matrices'
            inputs (``qmoe_ray.quant.hessian``); moved to ``W``'s device.
        scheme: a ``Scheme`` or one of ``SCHEMES``.
        blocksize: columns per lazy-update block (adjusted down to align with ``group_size``).
        percdamp: damping added to the diagonal, relative to each expert's mean diagonal.
        actorder: quantize columns in order of decreasing ``diag(H)`` (per expert).
        damp_floor: absolute lower bound of the damping.
        tokens: optional per-expert token counts (fallback for counts below ``min_tokens``).
        scale_dtype: dtype the grid parameters are rounded to before quantizing (bf16 default;
            ``None`` keeps float32).
        min_tokens: experts with fewer known tokens are rounded to nearest (flagged).
        on_nonfinite: ``"raise"`` (default) or ``"fallback"``: what a NaN/Inf in ``H`` does.
        rate_lambda: rate-aware rounding (``qmoe_ray.quant.rate``): each weight goes to the grid
            point minimising its loss increase plus ``rate_lambda`` x (one grid step's loss) x
            its code length in bits, so cheap zeros win near the thresholds. 0: plain GPTQ.
        mask: optional bool ``[E, rows, cols]`` (True: pruned) fixed before the sweep
            (``qmoe_ray.quant.prune``): those weights become exactly 0 and their error is fed
            back to the columns still to come, like any rounding error.
        prune: optional SparseGPT ``PruneSpec``: the mask is chosen per block inside the sweep.

    Returns:
        A ``QuantResult``; ``fallback[e]`` says whether and why expert ``e`` was rounded to
        nearest instead.

    Raises:
        ValueError: bad scheme or options, non-float or non-finite inputs, shapes that disagree;
            all before any factorization.
    """
    return gptq_multi(W, H, [(scheme, rate_lambda)], blocksize=blocksize, percdamp=percdamp,
                      actorder=actorder, damp_floor=damp_floor, tokens=tokens,
                      scale_dtype=scale_dtype, min_tokens=min_tokens, on_nonfinite=on_nonfinite,
                      mask=mask, prune=prune)[0]


def gptq_multi(
    W: torch.Tensor,
    H: torch.Tensor,
    settings: Sequence[tuple[Scheme | str, float]],
    blocksize: int = 128,
    percdamp: float = 0.1,
    actorder: bool = False,
    damp_floor: float = 1e-6,
    tokens: Sequence[int] | torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = torch.bfloat16,
    min_tokens: int = 1,
    on_nonfinite: str = "raise",
    mask: torch.Tensor | None = None,
    prune: PruneSpec | None = None,
    assign: Sequence[int] | None = None,
) -> list[QuantResult | None]:
    """``gptq`` of one stack of experts under several settings ``(scheme, rate_lambda)``, sharing
    what does not depend on the setting: the checks, the fallbacks, the act-order permutation and
    the inverse-Hessian factor (the Cholesky and its triangular inverse, the sweep's ``O(n^3)``
    part), and the column sweep itself for settings of one grid family with per-row grids (their
    lanes run in one sweep: ``qmoe_ray.quant.sweep``). One result per setting, in order, each
    exactly what ``gptq`` gives for it.

    ``assign``: instead of every expert under every setting, expert ``e`` under
    ``settings[assign[e]]`` only; then a setting's result holds the experts assigned to it, in
    order (None for a setting no expert has), and is what ``gptq`` of those experts alone gives
    (the rate-aware code tables are those experts'). Not with ``mask`` or ``prune``.
    """
    settings = [(parse_scheme(sc), lam) for sc, lam in settings]
    if not settings:
        raise ValueError("settings is empty: give at least one (scheme, rate_lambda)")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not percdamp >= 0 or not damp_floor >= 0:
        raise ValueError(f"percdamp and damp_floor must be >= 0, got {percdamp!r}, {damp_floor!r}")
    for _, rate_lambda in settings:
        if (isinstance(rate_lambda, bool) or not isinstance(rate_lambda, (int, float))
                or not math.isfinite(rate_lambda) or rate_lambda < 0):
            raise ValueError(f"rate_lambda must be a finite number >= 0, got {rate_lambda!r}")
    if on_nonfinite not in ("raise", "fallback"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'fallback', got {on_nonfinite!r}")
    W, squeeze = _prepare_w(W)
    H = _prepare_h(H, W, squeeze)
    E, R, C = W.shape
    tok = _prepare_tokens(tokens, E)
    finite = _finite_per_expert(H)
    if on_nonfinite == "raise" and not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"H of experts {bad} contains NaN or Inf; recompute it (float64 accumulation) or "
            "pass on_nonfinite='fallback' to round those experts to nearest"
        )

    reasons: list[str | None] = [None] * E
    zero_h = _all_zero_per_expert(H)
    for e, fin in enumerate(finite.tolist()):
        if not fin:
            reasons[e] = NONFINITE_HESSIAN
        elif zero_h[e] or (tok is not None and tok[e] == 0):
            reasons[e] = NO_TOKENS
        elif tok is not None and tok[e] < min_tokens:
            reasons[e] = FEW_TOKENS
    skip = torch.tensor([r is not None for r in reasons], device=W.device)

    # Hf: the working Hessian in sweep order, reversed (see _inverse_factor); a fresh copy.
    perm = None
    if actorder:
        order_by = torch.where(finite[:, None], H.diagonal(dim1=1, dim2=2), 0.0)
        perm = torch.argsort(order_by, dim=1, descending=True, stable=True)
        rev = perm.flip(1)
        Hf = gather_cols(gather_cols(H, rev).transpose(1, 2), rev).transpose(1, 2)
    else:
        Hf = H.flip(-2, -1)
    eye = torch.eye(C, dtype=torch.float32, device=W.device)
    if not finite.all():
        Hf[~finite] = eye
    diag = Hf.diagonal(dim1=1, dim2=2)
    mean_diag = diag.mean(dim=1)
    damp = (percdamp * mean_diag).clamp(min=damp_floor)
    dead = diag == 0
    fill = torch.where(mean_diag > 0, mean_diag, torch.ones_like(mean_diag))
    diag.copy_(torch.where(dead, fill[:, None], diag) + damp[:, None])
    if skip.any():
        Hf[skip] = eye
    U, ok = _inverse_factor(Hf)
    del Hf
    for e in (~ok).nonzero().flatten().tolist():
        if reasons[e] is None:
            reasons[e] = CHOLESKY_FAILED

    masked = mask is not None or prune is not None
    if assign is not None:
        assign = [int(a) for a in assign]
        if masked or len(assign) != E or not all(0 <= a < len(settings) for a in assign):
            raise ValueError(f"assign must give each of the {E} experts a setting index below "
                             f"{len(settings)}, without mask or prune; got {assign!r}")
    out: list[QuantResult | None] = [None] * len(settings)
    for batch in _batches(settings, masked, assign, R):
        ex = None if assign is None else torch.as_tensor(
            [e for e in range(E) if assign[e] in batch], dtype=torch.int64)
        local = None if ex is None else [batch.index(assign[e]) for e in ex.tolist()]
        dev = None if ex is None else ex.to(W.device)
        masks = SweepMask(prune, mask, perm) if masked else None
        lanes = sweep(W if ex is None else W[dev], U if ex is None else U[dev],
                      [settings[k][0] for k in batch], [float(settings[k][1]) for k in batch],
                      blocksize, perm if ex is None or perm is None else perm[dev], scale_dtype,
                      masks, local)
        for j, k in enumerate(batch):
            codes, params = lanes[j]
            mine = None if ex is None else ex[torch.as_tensor(local) == j]
            pick = (lambda x: x) if mine is None else (lambda x, m=mine: x[m.to(x.device)])
            Q = dequantize(settings[k][0], codes, params)
            out[k] = QuantResult(
                scheme=settings[k][0], codes=codes, params=params,
                loss=_loss(pick(W), Q, pick(H), pick(finite)),
                tokens=None if tok is None else pick(tok),
                fallback=list(reasons) if mine is None else [reasons[e] for e in mine.tolist()],
                squeeze=squeeze and mine is None,
                pruned=None if masks is None else masks.fraction(R, C))
    return out


def _batches(settings: Sequence[tuple[Scheme, float]], masked: bool,
             assign: Sequence[int] | None, rows: int) -> list[list[int]]:
    """The settings (indices) that share a sweep: one grid family with per-row grids, no mask;
    with every expert under every setting, at most ``LANE_ROWS`` stacked rows per sweep (the
    stack is a copy of ``W`` per setting)."""
    used = range(len(settings)) if assign is None else sorted(set(assign))
    groups: dict[object, list[int]] = {}
    for k in used:
        s = settings[k][0]
        key = ("alone", k) if masked or not batchable(s) else s.is_ternary
        groups.setdefault(key, []).append(k)
    per = len(settings) if assign is not None else max(1, LANE_ROWS // max(1, rows))
    return [ks[i:i + per] for ks in groups.values() for i in range(0, len(ks), per)]


def _loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """The proxy loss per expert; NaN where ``H`` was not finite."""
    if not finite.all():
        H = H.clone()
        H[~finite] = 0.0
    loss = _proxy_loss(W, Q, H)
    loss[~finite.cpu()] = float("nan")
    return loss
