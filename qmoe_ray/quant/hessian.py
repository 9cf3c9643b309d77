"""GPTQ Hessians ``H = mean over tokens of x x^T``, per expert, accumulated in a stream.

Why the design is so:

- Convention: ``H`` is the plain *mean* of ``x x^T`` over the tokens routed to an expert (not the
  GPTQ paper's ``2 X X^T / n``). Then the proxy loss ``tr((W - Q) H (W - Q)^T)`` is the mean, over
  those tokens, of the squared error of the expert's output, which reads directly in a report.
  GPTQ itself is invariant to the scale of ``H`` except through the absolute damping floor.
- Streaming: activations arrive in batches (calibration shards, routed tokens); the accumulator
  keeps the running *sum* and the token count per expert, so partial accumulators from several
  workers merge by addition (``merge``), and the mean is taken once at the end.
- Precision: each batch product ``X^T X`` runs in float32 (the fast path on CPU and GPU; pass
  float64 ``X`` for float64 products), and the running sums are kept in ``dtype`` (float64 by
  default) so that hundreds of thousands of tokens add up without drift.
- A whole group of experts lives in one ``[E, cols, cols]`` tensor, which is what the batched GPTQ
  takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_x(X: torch.Tensor, cols: int, what: str) -> None:
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(X).__name__}")
    if not X.is_floating_point():
        raise ValueError(f"{what} must be a floating tensor, got dtype {X.dtype}; cast it first")
    if X.dim() != 2 or X.shape[-1] != cols:
        raise ValueError(f"{what} must have shape [tokens, {cols}], got {tuple(X.shape)}")


def _product_dtype(X: torch.Tensor) -> torch.dtype:
    return torch.float64 if X.dtype == torch.float64 else torch.float32


def rows_by_id(ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Bucket the positions of a 1-D id tensor by id with one stable sort: ``[(id, positions)]``
    in increasing id, positions in increasing order (tokens per expert, without one scan per
    expert)."""
    order = torch.argsort(ids, stable=True)
    uniq, counts = torch.unique_consecutive(ids[order], return_counts=True)
    return list(zip(uniq.tolist(), torch.split(order, counts.tolist()), strict=True))


class HessianAccumulator:
    """Running sums of ``x x^T`` and token counts for ``experts`` experts with ``cols`` inputs.

    Args:
        experts: number of experts ``E``.
        cols: input dimension of the experts' matrix.
        dtype: dtype of the running sums (float64 by default; float32 halves the memory).
        device: where the sums live (default CPU).

    Raises:
        ValueError: non-positive sizes or a non-floating ``dtype``.
    """

    def __init__(
        self,
        experts: int,
        cols: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        if experts <= 0 or cols <= 0:
            raise ValueError(
                f"experts and cols must be positive, got experts={experts}, cols={cols}"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype (float64 or float32), got {dtype}")
        self.experts = experts
        self.cols = cols
        self.sums = torch.zeros(experts, cols, cols, dtype=dtype, device=device)
        self.counts = torch.zeros(experts, dtype=torch.int64)

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.experts:
            raise ValueError(f"expert index {expert} out of range [0, {self.experts})")

    def add(self, expert: int, X: torch.Tensor) -> None:
        """Add tokens ``X`` ``[T, cols]`` routed to ``expert``.

        Raises:
            ValueError: bad expert index, shape or dtype.
        """
        self._check_expert(expert)
        _check_x(X, self.cols, "X")
        if X.shape[0] == 0:
            return
        Xp = X.to(device=self.sums.device, dtype=_product_dtype(X))
        self.sums[expert] += (Xp.T @ Xp).to(self.sums.dtype)
        self.counts[expert] += X.shape[0]

    def add_batch(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add ``X`` ``[E, T, cols]``: ``T`` tokens for every expert at once (one batched product).

        Args:
            X: activations of every expert.
            mask: optional bool ``[E, T]``: which tokens count (padding excluded).

        Raises:
            ValueError: shapes that do not match the accumulator.
        """
        if not isinstance(X, torch.Tensor) or not X.is_floating_point():
            raise ValueError("X must be a floating torch.Tensor of shape [E, T, cols]")
        if X.dim() != 3 or X.shape[0] != self.experts or X.shape[2] != self.cols:
            raise ValueError(
                f"X must have shape [{self.experts}, T, {self.cols}], got {tuple(X.shape)}"
            )
        Xp = X.to(device=self.sums.device, dtype=_product_dtype(X))
        if mask is not None:
            if mask.shape != X.shape[:2]:
                raise ValueError(
                    f"mask must have shape {tuple(X.shape[:2])}, got {tuple(mask.shape)}"
                )
            m = mask.to(device=Xp.device, dtype=torch.bool)
            Xp = Xp * m[..., None].to(Xp.dtype)
            n = m.sum(dim=1).to(torch.int64).cpu()
        else:
            n = torch.full((self.experts,), X.shape[1], dtype=torch.int64)
        self.sums += torch.bmm(Xp.transpose(1, 2), Xp).to(self.sums.dtype)
        self.counts += n

    def add_routed(self, X: torch.Tensor, experts: torch.Tensor) -> None:
        """Add tokens ``X`` ``[T, cols]`` with their expert ids ``experts`` ``[T]`` (one sort).

        Ids outside ``[0, E)`` (e.g. -1 for dropped tokens, or experts of other groups after
        subtracting the group offset) are skipped.

        Raises:
            ValueError: shapes that disagree.
        """
        _check_x(X, self.cols, "X")
        if experts.shape != X.shape[:1]:
            raise ValueError(f"experts must have shape [{X.shape[0]}], got {tuple(experts.shape)}")
        for e, sel in rows_by_id(experts.to(torch.int64).cpu()):
            if 0 <= e < self.experts:
                self.add(e, X[sel.to(X.device)])

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's sums and counts (partial results from other workers).

        Raises:
            ValueError: the accumulators have different shapes.
        """
        if (other.experts, other.cols) != (self.experts, self.cols):
            raise ValueError(
                f"cannot merge an accumulator of [{other.experts}, {other.cols}] into "
                f"[{self.experts}, {self.cols}]"
            )
        self.sums += other.sums.to(device=self.sums.device, dtype=self.sums.dtype)
        self.counts += other.counts

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean Hessians and the token counts.

        Returns:
            ``(H float32 [E, cols, cols], counts int64 [E])``; ``H`` is all zeros for an expert
            without tokens (GPTQ then falls back to round-to-nearest and flags it).
        """
        denom = self.counts.clamp(min=1).to(device=self.sums.device, dtype=self.sums.dtype)
        H = self.sums / denom[:, None, None]
        return H.to(torch.float32), self.counts.clone()


def hessian(
    X: torch.Tensor | Sequence[torch.Tensor],
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Hessians of a group of experts in one call.

    Args:
        X: ``[E, T, cols]`` (the same number of tokens per expert), ``[T, cols]`` (one expert,
            ``E = 1``), or a sequence of ``E`` tensors ``[T_e, cols]`` (``T_e`` may be 0).
        dtype: accumulation dtype (see ``HessianAccumulator``).

    Returns:
        ``(H float32 [E, cols, cols], counts int64 [E])``, on the device of ``X``.

    Raises:
        ValueError: empty input, mismatching columns or non-floating tensors.
    """
    if isinstance(X, torch.Tensor):
        if not X.is_floating_point():
            raise ValueError(f"X must be a floating tensor, got dtype {X.dtype}; cast it first")
        if X.dim() == 2:
            X = X[None]
        if X.dim() != 3:
            raise ValueError(f"X must be [E, T, cols] or [T, cols], got shape {tuple(X.shape)}")
        acc = HessianAccumulator(X.shape[0], X.shape[2], dtype=dtype, device=X.device)
        acc.add_batch(X)
        return acc.result()
    X = list(X)
    if not X:
        raise ValueError("X is an empty sequence; pass one [T_e, cols] tensor per expert")
    if not isinstance(X[0], torch.Tensor) or X[0].dim() != 2:
        raise ValueError("each element of X must be a [T_e, cols] tensor")
    acc = HessianAccumulator(len(X), X[0].shape[-1], dtype=dtype, device=X[0].device)
    for e, Xe in enumerate(X):
        _check_x(Xe, acc.cols, f"X[{e}]")
        acc.add(e, Xe)
    return acc.result()
