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
  float64 ``X`` for float64 products), and the running sums are kept in ``dtype``. float32 sums
  (the job's default, ``--hessian-dtype``) cost nothing measurable: the job forms each expert's
  Hessian with one product of all its tokens, so the sums are that product exactly (the
  embedded Mixtral's ternary and int2 jobs wrote bit-identical checkpoints). Streamed, 256
  batches of 512 tokens through Qwen3-30B-A3B's 2048-wide expert input: float32 sums 4.0e-7
  largest error relative to ``max |H|`` against float64 products and sums, float64 sums
  9.1e-8, one float32 product of all the tokens 6.2e-7 (BENCHMARKS.md, ``hessian``): the
  products' own rounding is of the same order. float64 sums double the accumulator's memory
  (forming a group's Hessians peaked at 3.6x their float32 bytes, against 1.3-1.9x); they stay
  the accumulator's default for long streams of small batches.
- Memory: ``result(release=True)`` divides the sums in place and hands the buffer over (the
  accumulator is spent), so the peak is the sums alone, not sums + mean + float32 copy.
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
        dtype: dtype of the running sums (float64 by default, for long streams of batches;
            float32 halves the memory: see the module doc).
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

    def _check_live(self) -> None:
        if self.sums is None:
            raise RuntimeError("this HessianAccumulator was released by result(release=True); "
                               "build a new one")

    def _check_expert(self, expert: int) -> None:
        self._check_live()
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
        self.sums[expert].add_(Xp.T @ Xp)  # cast on the fly: no summed-dtype copy
        self.counts[expert] += X.shape[0]

    def add_batch(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add ``X`` ``[E, T, cols]``: ``T`` tokens for every expert at once (one batched product).

        Args:
            X: activations of every expert.
            mask: optional bool ``[E, T]``: which tokens count (padding excluded).

        Raises:
            ValueError: shapes that do not match the accumulator.
        """
        self._check_live()
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
        self.sums.add_(torch.bmm(Xp.transpose(1, 2), Xp))
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
        self._check_live()
        other._check_live()
        if (other.experts, other.cols) != (self.experts, self.cols):
            raise ValueError(
                f"cannot merge an accumulator of [{other.experts}, {other.cols}] into "
                f"[{self.experts}, {self.cols}]"
            )
        self.sums.add_(other.sums.to(device=self.sums.device))
        self.counts += other.counts

    def result(self, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean Hessians and the token counts.

        Args:
            release: divide the sums in place and hand their buffer over (float32 sums: no
                copy at all); the accumulator is spent afterwards (``add`` / ``result`` raise).

        Returns:
            ``(H float32 [E, cols, cols], counts int64 [E])``; ``H`` is all zeros for an expert
            without tokens (GPTQ then falls back to round-to-nearest and flags it).

        Raises:
            RuntimeError: the accumulator was released by an earlier ``result(release=True)``
                (``add``, ``add_batch`` and ``merge`` raise it too).
        """
        self._check_live()
        denom = self.counts.clamp(min=1).to(device=self.sums.device, dtype=self.sums.dtype)
        if not release:
            return (self.sums / denom[:, None, None]).to(torch.float32), self.counts.clone()
        H, self.sums = self.sums, None
        H.div_(denom[:, None, None])
        return H.to(torch.float32), self.counts.clone()


def hessian(
    X: torch.Tensor | Sequence[torch.Tensor],
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Hessians of a group of experts in one call.

    Args:
        X: ``[E, T, cols]`` (the same number of tokens per expert), ``[T, cols]`` (one expert,
            ``E = 1``), or a sequence of ``E`` tensors ``[T_e, cols]`` (``T_e`` may be 0).
        dtype: accumulation dtype of the sums (see ``HessianAccumulator``; float32 default,
            float64 for the sums of before ``--hessian-dtype``).

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
        return acc.result(release=True)
    X = list(X)
    if not X:
        raise ValueError("X is an empty sequence; pass one [T_e, cols] tensor per expert")
    if not isinstance(X[0], torch.Tensor) or X[0].dim() != 2:
        raise ValueError("each element of X must be a [T_e, cols] tensor")
    acc = HessianAccumulator(len(X), X[0].shape[-1], dtype=dtype, device=X[0].device)
    for e, Xe in enumerate(X):
        _check_x(Xe, acc.cols, f"X[{e}]")
        acc.add(e, Xe)
    return acc.result(release=True)
