"""What the codec kernels must reproduce, shared by the host-emulation and GPU tests: random
codes, and the dense float32 weights (on the CPU) that torch computes from them."""

from __future__ import annotations

import numpy as np
import torch


def ternary_codes(rng: np.random.Generator, shape: tuple[int, int], p0: float = 0.88) -> np.ndarray:
    """int8 codes in {-1, 0, +1}, zero with probability ``p0``."""
    p = (1 - p0) / 2
    return rng.choice(np.array([-1, 0, 1], np.int8), size=shape, p=[p, p0, p])


def ternary_weights(codes: np.ndarray, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``hi[row]`` for +1, ``lo[row]`` for -1, else 0 (in ``lo``'s dtype)."""
    c = torch.from_numpy(codes)
    return torch.where(c > 0, hi[:, None], torch.where(c < 0, lo[:, None], 0))


def int2_weights(q: np.ndarray, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 ``scale[row] * (q - zero[row])``."""
    return scale[:, None] * (torch.from_numpy(q).float() - zero[:, None])
