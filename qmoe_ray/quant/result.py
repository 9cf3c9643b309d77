"""What every quantizer of ``qmoe_ray.quant`` returns (``QuantResult``: codes, grid parameters,
proxy loss, per-expert fallback reasons) and the checks of its inputs (weights, Hessians, token
counts), shared by round-to-nearest and GPTQ (``qmoe_ray.quant.gptq``).

Pure torch: no Ray, no I/O, no printing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmoe_ray.quant.grids import Scheme, dequantize

NO_TOKENS = "no_tokens"
FEW_TOKENS = "few_tokens"
CHOLESKY_FAILED = "cholesky_failed"
NONFINITE_HESSIAN = "nonfinite_hessian"


@dataclass
class QuantResult:
    """Quantized experts of one group.

    Attributes:
        scheme: the grid.
        codes: ``[E, rows, cols]``: int8 in {-1, 0, 1} (ternary) or uint8 in ``[0, 2^b)``.
        params: ternary ``{"lo", "hi"}`` float32 ``[E, rows]``; integer grids ``{"scale",
            "zero"}`` float32 ``[E, rows, G]`` (``zero`` integer-valued). Values are representable
            in the ``scale_dtype`` used (bf16 by default).
        loss: float64 ``[E]`` (CPU): the proxy loss ``tr((W - Q) H (W - Q)^T)`` with the undamped
            ``H`` (the mean squared output error over the calibration tokens, with the mean
            Hessian convention of ``qmoe_ray.quant.hessian``); the plain squared error sum for
            ``rtn`` without ``H``; NaN where ``H`` was not finite.
        tokens: int64 ``[E]`` (CPU) token counts if known, else ``None``.
        fallback: per expert ``None`` or why it was rounded to nearest instead of GPTQ:
            ``"no_tokens"``, ``"few_tokens"``, ``"cholesky_failed"``, ``"nonfinite_hessian"``.
        squeeze: the input was one ``[rows, cols]`` matrix (``codes`` still has ``E = 1``;
            ``dequantize`` returns 2-D).
        pruned: float64 ``[E]`` (CPU): the fraction of each matrix pruned to 0 (``mask`` /
            ``prune`` of ``gptq``), or ``None`` without pruning.
    """

    scheme: Scheme
    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    loss: torch.Tensor
    tokens: torch.Tensor | None
    fallback: list[str | None]
    squeeze: bool = False
    pruned: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        """Number of experts ``E``."""
        return self.codes.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The quantized weights ``Q``: ``[E, rows, cols]`` (``[rows, cols]`` if ``squeeze``)."""
        Q = dequantize(self.scheme, self.codes, self.params, dtype=dtype)
        return Q[0] if self.squeeze else Q


# -- input checks ---------------------------------------------------------------------------------
def _check_float(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {x.dtype}"
        )
    return x


def _prepare_w(W: torch.Tensor) -> tuple[torch.Tensor, bool]:
    W = _check_float(W, "W")
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be [rows, cols] or [E, rows, cols], got shape {tuple(W.shape)}")
    squeeze = W.dim() == 2
    W = W[None] if squeeze else W
    if W.numel() == 0:
        raise ValueError(f"W is empty (shape {tuple(W.shape)}); nothing to quantize")
    W = W.to(torch.float32)
    if not _finite_per_expert(W).all():
        raise ValueError("W contains NaN or Inf; check the checkpoint tensor before quantizing")
    return W, squeeze


def _prepare_h(H: torch.Tensor, W: torch.Tensor, squeeze: bool) -> torch.Tensor:
    H = _check_float(H, "H")
    E, _, C = W.shape
    if squeeze and H.dim() == 2:
        H = H[None]
    if H.shape != (E, C, C):
        raise ValueError(
            f"H must have shape {(E, C, C)} to match W {tuple(W.shape)} "
            f"(one [cols, cols] Hessian per expert), got {tuple(H.shape)}"
        )
    return H.to(device=W.device, dtype=torch.float32)


def _prepare_tokens(tokens: object, E: int) -> torch.Tensor | None:
    if tokens is None:
        return None
    t = torch.as_tensor(tokens)
    if t.dim() == 0 and E == 1:
        t = t[None]
    if t.shape != (E,) or t.is_floating_point() or t.is_complex():
        raise ValueError(f"tokens must be {E} integer counts (one per expert), got {tokens!r}")
    t = t.to(torch.int64).cpu()
    if (t < 0).any():
        raise ValueError(f"tokens must be non-negative counts, got {t.tolist()}")
    return t


def _proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    D = W - Q
    if H is None:
        return (D * D).sum(dim=(1, 2), dtype=torch.float64).cpu()
    return (torch.bmm(D, H) * D).sum(dim=(1, 2), dtype=torch.float64).cpu()


def _finite_per_expert(x: torch.Tensor) -> torch.Tensor:
    """bool ``[E]``: whether ``x[e]`` is all finite.

    A plain sum is the fast test (NaN/Inf propagate); only when it is not finite, which an
    overflow of huge finite values can also cause, the elementwise test decides.
    """
    ok = torch.isfinite(x.sum(dim=(1, 2)))
    if not ok.all():
        ok = torch.isfinite(x).all(dim=2).all(dim=1)
    return ok
