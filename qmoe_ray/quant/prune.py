"""Expert slimming by pruning: masks by magnitude, Wanda and SparseGPT, unstructured or N:M.

Why the design is so:

- A mask is a bool tensor shaped like ``W`` (``[E, rows, cols]``), True where the weight is pruned.
  Scores are compared per output row (Wanda, Sun et al. 2023, section 3: per-output comparison
  beats a per-layer one on LLMs), so every row of an unstructured mask holds exactly
  ``round(sparsity * cols)`` zeros, and an N:M mask exactly ``N`` zeros in every ``M``
  consecutive input columns of a row (``2:4``: two of every four). A trailing partial group of
  fewer than ``M`` columns stays dense.
- Magnitude scores ``|W|``; Wanda ``|W| * sqrt(mean x^2)`` per input column, which is
  ``sqrt(diag H)`` with the mean Hessian of ``qmoe_ray.quant.hessian``.
- SparseGPT (Frantar & Alistarh 2023, section 3-4) chooses the mask per block of 128 columns
  inside the column sweep, on the weights updated so far, by the OBS score ``w^2 / [U]_ii^2``
  (``U`` the upper Cholesky factor of ``H^-1``), and compensates every pruned weight on the
  columns still to come. Here the unstructured count of a block is ``round(s * i2) - round(s *
  i1)`` per row, so the row total is exact; N:M groups are chosen per block too (the paper picks
  them every ``M`` columns: the same groups, chosen a little earlier).
- Joint pruning and quantization is the GPTQ sweep with a mask (``qmoe_ray.quant.gptq``, which
  calls ``SweepMask``): pruned positions are set to exactly 0 before their error is fed back,
  never quantize-then-zero. Zero is a grid point of every grid here: ternary has it, and the
  asymmetric integer grids widen their range to contain 0 (``grids.int_params_from_range``), so
  the code ``zero`` dequantizes to exactly ``scale * 0``.

Pure torch: no Ray, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PRUNE_METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(text: str) -> tuple[int, int]:
    """``"N:M"`` -> ``(N, M)`` with ``1 <= N < M``.

    Raises:
        ValueError: not two integers ``N:M`` with ``1 <= N < M``.
    """
    parts = str(text).split(":")
    try:
        n, m = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        n, m = 0, 0
    if not 1 <= n < m:
        raise ValueError(f"pruning pattern {text!r}: expected N:M with 1 <= N < M, such as 2:4 "
                         "(N of every M consecutive input weights of a row are zeroed)")
    return n, m


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: a method and either an unstructured ``sparsity`` or an ``N:M`` pattern.

    Attributes:
        method: one of ``PRUNE_METHODS``.
        sparsity: fraction of each row zeroed, in ``[0, 1)`` (None with a pattern).
        pattern: ``"N:M"`` (None for unstructured).
    """

    method: str
    sparsity: float | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"pruning method {self.method!r} is unknown; valid: "
                             f"{', '.join(PRUNE_METHODS)}")
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of sparsity (unstructured) or pattern (N:M)")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        elif (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
              or not 0 <= self.sparsity < 1):
            raise ValueError(f"sparsity {self.sparsity!r}: expected a fraction in [0, 1)")

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of the pattern, or None."""
        return None if self.pattern is None else parse_pattern(self.pattern)

    def record(self) -> dict[str, object]:
        """The JSON-able description the manifest and the report carry."""
        return {"method": self.method, "sparsity": self.sparsity, "pattern": self.pattern}


def _smallest(score: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """bool mask of the ``k`` smallest scores of each row (last dim) of ``score``."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    k = int(k)
    if k > 0:
        idx = score.topk(k, dim=-1, largest=False).indices
        mask.scatter_(-1, idx, True)
    return mask


def select(score: torch.Tensor, spec: PruneSpec, done: int = 0, total: int | None = None
           ) -> torch.Tensor:
    """The mask of the lowest ``score`` per row (last dim), as ``spec`` asks.

    Args:
        score: ``[..., rows, n]`` importance (higher: keep).
        spec: sparsity or N:M pattern.
        done: columns of the row before this slice (SparseGPT blocks), for the exact row count.
        total: columns of the whole row (default ``n``).

    Returns:
        bool ``[..., rows, n]``, True where pruned.
    """
    n = score.shape[-1]
    if spec.nm is None:
        s = float(spec.sparsity)
        return _smallest(score, round(s * (done + n)) - round(s * done))
    N, M = spec.nm
    full = n - n % M
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if full:
        groups = score[..., :full].reshape(*score.shape[:-1], full // M, M)
        mask[..., :full] = _smallest(groups, N).reshape(*score.shape[:-1], full)
    return mask


def magnitude_mask(W: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    """Magnitude pruning: the smallest ``|W|`` of each row (``[..., rows, cols]``)."""
    return select(W.abs(), spec)


def wanda_mask(W: torch.Tensor, H: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    """Wanda: the smallest ``|W| * sqrt(mean x^2)`` of each row; ``H`` ``[..., cols, cols]`` the
    mean Hessian of the inputs (its diagonal is ``mean x^2``)."""
    norm = H.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    norm = torch.where(norm.sum(-1, keepdim=True) > 0, norm, 1.0)  # no tokens: magnitude
    return select(W.abs() * norm.unsqueeze(-2).to(W.dtype), spec)


def prune_mask(W: torch.Tensor, H: torch.Tensor | None, spec: PruneSpec) -> torch.Tensor:
    """The mask of a method chosen before the sweep (magnitude, Wanda).

    Raises:
        ValueError: SparseGPT (its mask is chosen inside the sweep: ``sparsegpt`` or ``gptq``
            with ``prune=``), or Wanda without ``H``.
    """
    if spec.method == "magnitude":
        return magnitude_mask(W, spec)
    if spec.method == "wanda" and H is not None:
        return wanda_mask(W, H, spec)
    raise ValueError(f"{spec.method} needs "
                     f"{'a Hessian' if spec.method == 'wanda' else 'the column sweep'}: pass H, "
                     "or use gptq(prune=...) / sparsegpt()")


class SweepMask:
    """The mask of each block of a GPTQ/SparseGPT column sweep, and how much it pruned.

    Either a fixed ``mask`` (``[E, rows, cols]``, chosen before the sweep; permuted by ``perm``,
    ``[E, cols]``, when the sweep runs in act-order) or a SparseGPT ``spec``, chosen per block.
    """

    def __init__(self, spec: PruneSpec | None = None, mask: torch.Tensor | None = None,
                 perm: torch.Tensor | None = None):
        if (spec is None) == (mask is None):
            raise ValueError("SweepMask needs exactly one of a PruneSpec or a mask")
        if spec is not None and spec.nm is not None and perm is not None:
            raise ValueError("N:M SparseGPT needs actorder=False: N:M groups are consecutive "
                             "input columns, and act-order sweeps them out of order")
        self.spec, self.fixed = spec, None
        if mask is not None:
            mask = mask[None] if mask.dim() == 2 else mask
            if mask.dtype != torch.bool or mask.dim() != 3:
                raise ValueError(f"mask must be bool [E, rows, cols] like W, got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
            if perm is not None and perm.shape != (mask.shape[0], mask.shape[2]):
                raise ValueError(f"mask {tuple(mask.shape)} does not match W's columns")
            if perm is not None:
                mask = mask.gather(2, perm[:, None, :].expand_as(mask))
            self.fixed = mask
        self.count: torch.Tensor | None = None

    def block(self, W1: torch.Tensor, d: torch.Tensor, i1: int) -> torch.Tensor:
        """The mask of columns ``i1 .. i1 + n`` of the sweep.

        Args:
            W1: ``[E, rows, n]`` the block's weights as updated so far.
            d: ``[E, n]`` the block's diagonal of ``U`` (``U^T U = H^-1``).
            i1: the block's first column.
        """
        n = W1.shape[-1]
        if self.fixed is not None:
            if self.fixed.shape[:2] != W1.shape[:2] or i1 + n > self.fixed.shape[2]:
                raise ValueError(f"mask {tuple(self.fixed.shape)} does not match W (experts and "
                                 f"rows {tuple(W1.shape[:2])})")
            m1 = self.fixed[:, :, i1 : i1 + n].to(W1.device)
        else:
            nm = self.spec.nm
            if nm is not None and i1 % nm[1]:
                raise ValueError(f"blocksize must be a multiple of M={nm[1]} for N:M SparseGPT")
            m1 = select(W1.square() / d.square().unsqueeze(1), self.spec, done=i1)
        c = m1.sum(dim=(1, 2), dtype=torch.int64).cpu()
        self.count = c if self.count is None else self.count + c
        return m1

    def fraction(self, rows: int, cols: int) -> torch.Tensor:
        """float64 ``[E]``: the fraction of each expert's matrix pruned so far."""
        return self.count.to(torch.float64) / (rows * cols)


def sparsegpt(W: torch.Tensor, H: torch.Tensor, spec: PruneSpec, blocksize: int = 128,
              percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT pruning without quantization (Frantar & Alistarh 2023, algorithm 1).

    Args:
        W: ``[E, rows, cols]`` or ``[rows, cols]`` weights (computed in float32).
        H: ``[E, cols, cols]`` (or ``[cols, cols]``) mean Hessians of the inputs.
        spec: sparsity or N:M pattern (its method is not consulted).
        blocksize: columns per mask-selection / lazy-update block (a multiple of M for N:M).
        percdamp: damping relative to the mean Hessian diagonal.

    Returns:
        ``(W', mask)``: the pruned and compensated weights (exact zeros where ``mask``) and the
        bool mask, both shaped like ``W``.

    Raises:
        ValueError: shapes that disagree, or a blocksize that is not a multiple of M.
    """
    squeeze = W.dim() == 2
    W = (W[None] if squeeze else W).to(torch.float32).clone()
    H = (H[None] if H.dim() == 2 else H).to(device=W.device, dtype=torch.float32)
    E, R, C = W.shape
    if H.shape != (E, C, C):
        raise ValueError(f"H must be {(E, C, C)} for W {(E, R, C)}, got {tuple(H.shape)}")
    if spec.nm is not None and blocksize % spec.nm[1]:
        raise ValueError(f"blocksize {blocksize} is not a multiple of M={spec.nm[1]}")
    Hd = H.clone()
    diag = Hd.diagonal(dim1=1, dim2=2)
    mean = diag.mean(dim=1, keepdim=True)
    diag.copy_(torch.where(diag == 0, mean.clamp(min=1e-8), diag)
               + (percdamp * mean).clamp(min=1e-8))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    picker = SweepMask(spec)
    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        W1, U1 = W[:, :, i1:i2].clone(), U[:, i1:i2, i1:i2]
        d = U1.diagonal(dim1=1, dim2=2)
        m1 = picker.block(W1, d, i1)
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, :, i]
            err = w.masked_fill(~m1[:, :, i], 0.0) / d[:, i, None]  # w - q, q = w * ~mask
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            W1[:, :, i].masked_fill_(m1[:, :, i], 0.0)
            Err1[:, :, i] = err
        W[:, :, i1:i2] = W1
        mask[:, :, i1:i2] = m1
        if i2 < C:
            W[:, :, i2:] -= torch.bmm(Err1, U[:, i1:i2, i2:])
    return (W[0], mask[0]) if squeeze else (W, mask)


def sparsity(x: torch.Tensor) -> float:
    """Fraction of exact zeros in ``x``."""
    return float((x == 0).sum()) / max(1, math.prod(x.shape))
