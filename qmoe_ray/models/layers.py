"""Functional transformer pieces the families are built from (plain torch, no modules).

Why functional: the families run one block at a time with weights handed in from a
``WeightSource``, so there is no module tree to hold parameters. Each function takes its weights as
arguments and computes in float32, which is what the transformers oracle does for fp32 models and
what the compressor needs for Hessians.

The pieces are the *kinds* a family is assembled from, so a new family (DeepSeek-V3, GLM) adds
a variant here and picks it, rather than copying a block:

- norms: ``rms_norm`` (Llama-style, cast back to the input dtype), ``t5_layer_norm``;
- position: ``rope_cos_sin`` / ``apply_rope`` (default RoPE), ``relative_position_bucket`` (T5);
- attention: ``attention`` (scaled, grouped KV heads, causal/sliding masks from
  ``causal_mask``), ``t5_attention`` (unscaled, additive position bias, cross-attention);
- feed-forward: ``swiglu_mlp`` (dense blocks, shared experts), ``ACTIVATIONS`` by config name;
- routers: ``softmax_topk_router`` (top-k of a float32 softmax, optionally renormalised),
  ``top1_capacity_router`` (Switch: top-1 with per-sequence expert capacity).

The kinds of the newer families live beside this module: ``rope`` (partial, interleaved, YaRN),
``routers`` (sigmoid scores with a correction bias and group limit), ``attention`` (multi-head
latent attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: ``config.json`` activation names (``dense_act_fn``, ``hidden_act``) -> function
ACTIVATIONS = {
    "relu": F.relu,
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
}


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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    Args:
        q, k: ``[B, H, S, D]`` / ``[B, H_kv, S, D]`` with ``H % H_kv == 0``; v: ``[B, H_kv, S,
            D_v]`` (``D_v`` may differ from ``D``: multi-head latent attention).
        allowed: ``bool [B, 1, S, S]`` from ``causal_mask``.
        scale: the logits' scale (default ``D^-1/2``).
        sinks: ``[H]`` attention-sink logits (gpt-oss): one extra key per head, no value, in the
            softmax (so a query may attend to nothing); None: no sinks.

    Returns:
        ``[B, S, H * D]``. Rows with no allowed key (fully padded) attend uniformly instead of
        producing NaN, as transformers' additive-min masks do.
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1, dtype=torch.float32)
        probs = probs[..., :-1].to(q.dtype)
    out = probs @ v
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)


def swiglu_mlp(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """``(silu(x gate^T) * (x up^T)) down^T``: a dense SwiGLU MLP (dense blocks, shared
    experts)."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def softmax_topk_router(
    x: torch.Tensor, weight: torch.Tensor, k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of the float32 softmax of ``x weight^T``; ``renormalize``: the ``k``
    probabilities are rescaled to sum to one.

    Returns:
        ``(idx int64 [..., k], gate float32 [..., k])``.
    """
    probs = torch.softmax(linear(x.to(torch.float32), weight), dim=-1, dtype=torch.float32)
    gate, idx = torch.topk(probs, k, dim=-1)
    if renormalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    return idx.to(torch.int64), gate


def top1_capacity_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch routing at inference: the router in ``dtype``, top-1 by the softmax's maximum, and
    per sequence the n-th token (in order) sent to an expert has priority n; over ``capacity`` it
    is dropped.

    Args:
        x: ``[B, S, d]``; weight: ``[E, d]``; bias: ``[E]`` or None.

    Returns:
        ``idx`` int64 ``[B, S, 1]`` (-1 where dropped) and ``gate`` float32 ``[B, S, 1]`` (the
        top-1 probability).
    """
    logits = x.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    probs = torch.softmax(logits, dim=-1, dtype=dtype).to(torch.float32)
    gate, idx = probs.max(dim=-1)
    # (idx from max equals argmax's first maximum, as in the reference.)
    onehot = F.one_hot(idx, weight.shape[0])
    priority = (onehot.cumsum(dim=1) * onehot).sum(-1)
    idx = torch.where(priority <= capacity, idx, torch.full_like(idx, -1))
    return idx[..., None], gate[..., None]


def t5_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's layer norm: scale only, no mean subtraction, no bias; variance in float32."""
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


def relative_position_bucket(
    rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's relative-position buckets (exact for small offsets, logarithmic up to max_distance).

    Args:
        rel: ``int64`` key position minus query position.
        bidirectional: encoder (True) or causal decoder (False).
        num_buckets: ``relative_attention_num_buckets``.
        max_distance: ``relative_attention_max_distance``.

    Returns:
        ``int64`` bucket ids in ``[0, num_buckets)``, same shape as ``rel``.
    """
    offset = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0).to(torch.long) * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = num_buckets // 2
    # The float ops below are in the same order as the reference so boundaries land identically.
    log_part = (
        torch.log(dist.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).to(torch.long)
    far = torch.clamp(exact + log_part, max=num_buckets - 1)
    return offset + torch.where(dist < exact, dist, far)


def t5_position_bias(
    table: torch.Tensor, s: int, bidirectional: bool, max_distance: int
) -> torch.Tensor:
    """``[1, H, S, S]`` attention bias from a ``[buckets, H]`` relative-position table."""
    pos = torch.arange(s)
    buckets = relative_position_bucket(
        pos[None, :] - pos[:, None], bidirectional, table.shape[0], max_distance
    )
    return table[buckets].permute(2, 0, 1)[None]


def t5_attention(
    x: torch.Tensor,
    kv: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    wo: torch.Tensor,
    num_heads: int,
    bias: torch.Tensor | None,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """T5 attention: unscaled dot products plus an additive position bias.

    Args:
        x: queries' input ``[B, Sq, d]``; kv: keys' and values' input ``[B, Sk, d]`` (``x`` for
            self-attention, the encoder output for cross-attention).
        wq, wk, wv: ``[H * d_kv, d]``; wo: ``[d, H * d_kv]``.
        num_heads: ``H``.
        bias: ``[1, H, Sq, Sk]`` or None.
        allowed: bool broadcastable to ``[B, H, Sq, Sk]``.

    Returns:
        ``[B, Sq, d]``.
    """
    inner = wq.shape[0]
    d_kv = inner // num_heads
    b, sq, _ = x.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], num_heads, d_kv).transpose(1, 2)

    q, k, v = heads(x @ wq.T), heads(kv @ wk.T), heads(kv @ wv.T)
    scores = q @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    ctx = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    return ctx.transpose(1, 2).reshape(b, sq, inner) @ wo.T
