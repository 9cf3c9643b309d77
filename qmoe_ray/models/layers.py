"""Functional transformer pieces shared by the decoder-only families (plain torch, no modules).

Why functional: the families run one block at a time with weights handed in from a
``WeightSource``, so there is no module tree to hold parameters. Each function takes its weights as
arguments and computes in float32, which is what the transformers oracle does for fp32 models and
what the compressor needs for Hessians.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, computed in float32."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` with ``W`` ``[out, in]``."""
    return F.linear(x, weight, bias)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default (unscaled) rotary tables for ``position_ids`` ``[B, S]`` -> two ``[B, S, head_dim]``.

    Frequencies ``theta^(-2i/head_dim)``; the two halves of the head share them (the "rotate half"
    convention of Llama-style checkpoints).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, S, D]`` by tables ``[B, S, D]`` (rotate-half convention)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_mask(attention_mask: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """``bool [B, 1, S, S]``: query ``i`` may attend key ``j`` (causal, key not padding, and
    ``j > i - sliding_window`` when a window is given)."""
    s = attention_mask.shape[-1]
    q = torch.arange(s)[:, None]
    k = torch.arange(s)[None, :]
    allowed = k <= q
    if sliding_window:
        allowed = allowed & (k > q - sliding_window)
    return allowed[None, None] & attention_mask.bool()[:, None, None, :]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    Args:
        q: ``[B, H, S, D]``; k, v: ``[B, H_kv, S, D]`` with ``H % H_kv == 0``.
        allowed: ``bool [B, 1, S, S]`` from ``causal_mask``.

    Returns:
        ``[B, S, H * D]``. Rows with no allowed key (fully padded) attend uniformly instead of
        producing NaN, as transformers' additive-min masks do.
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs @ v
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)
