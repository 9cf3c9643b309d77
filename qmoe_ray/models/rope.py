"""The RoPE kind: rotary position tables parsed once from ``config.json`` (``RopeSpec``).

Why a kind of its own: the newer MoE families rotate only part of each head
(``partial_rotary_factor``: GLM-4.5, MiniMax-M2; DeepSeek-V3's separate rope head), pair the
rotated dimensions interleaved (``rope_interleave``: DeepSeek-V3) and stretch the context with
YaRN, which also rescales the attention logits. Each is a field here, so a family of that shape
picks them from its config instead of writing its own rotary code. The families whose RoPE is the
plain full-head default (Mixtral, Qwen, OLMoE) keep ``layers.rope_cos_sin`` / ``apply_rope``.

YaRN follows the YaRN paper (Peng et al. 2023, sec. 3.2-3.4: the ramp between interpolated and
extrapolated frequencies from ``beta_fast`` / ``beta_slow`` rotations, ``mscale = 0.1 m ln(s) +
1``) with the conventions transformers' DeepSeek-V3 reads from the config: ``factor`` (or
``max_position_embeddings / original_max_position_embeddings``), the cos/sin scale
``attention_factor`` (default ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``), the
correction range rounded outwards unless ``truncate`` is false, and for multi-head latent
attention the softmax scale multiplied by ``mscale(factor, mscale_all_dim)^2``
(``softmax_scale``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qmoe_ray.models.config import MAX_POSITIONS, config_float, config_int

ROPE_TYPES = ("default", "yarn")


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 m ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of the first ``dim`` dimensions of each head.

    Attributes:
        dim: rotated dimensions (even, <= head dim); the rest pass through.
        theta: the RoPE base.
        interleave: pairs are ``(x0, x1), (x2, x3), ...`` (DeepSeek) instead of the two halves.
        inv_freq: ``float32 [dim / 2]`` frequencies (YaRN-corrected where configured).
        cos_scale: multiplies cos and sin (YaRN's ``attention_factor``; 1 otherwise).
        logit_mscale: multiplies the softmax scale (YaRN ``mscale_all_dim``, squared; 1 otherwise).
    """

    dim: int
    theta: float
    interleave: bool
    inv_freq: torch.Tensor
    cos_scale: float = 1.0
    logit_mscale: float = 1.0

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``position_ids`` ``[B, S]`` -> two float32 ``[B, S, dim / 2]``."""
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq
        return freqs.cos() * self.cos_scale, freqs.sin() * self.cos_scale

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``dim`` dimensions of ``x`` ``[B, H, S, D]`` by ``cos_sin`` tables.

        Interleaved pairs come out de-interleaved (evens' rotation first, then odds'), as
        DeepSeek's reference does: query and key are permuted alike, so their products agree.
        """
        c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        if self.interleave:
            a, b = rot[..., 0::2], rot[..., 1::2]
        else:
            a, b = rot[..., : self.dim // 2], rot[..., self.dim // 2 :]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    def softmax_scale(self, qk_dim: int) -> float:
        """``qk_dim^-1/2`` times YaRN's logit correction (1 without YaRN)."""
        return qk_dim**-0.5 * self.logit_mscale


def rope_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE fields of a config, merged: the old ``rope_scaling`` dict (``type`` or
    ``rope_type``), then transformers 5's ``rope_parameters``, then top-level ``rope_theta`` /
    ``partial_rotary_factor`` where neither dict has them."""
    out: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        d = config.get(key)
        if d is not None and not isinstance(d, Mapping):
            raise ValueError(f"config.json {key!r} must be an object, got {type(d).__name__}")
        out.update(d or {})
    if "rope_type" not in out and "type" in out:
        out["rope_type"] = out["type"]
    for key in ("rope_theta", "partial_rotary_factor"):
        if out.get(key) is None and config.get(key) is not None:
            out[key] = config[key]
    return out


def parse_rope(
    config: Mapping[str, Any],
    head_dim: int,
    default_theta: float,
    *,
    interleave: bool = False,
    partial: bool = True,
    default_partial: float = 1.0,
) -> RopeSpec:
    """The ``RopeSpec`` a config describes for heads of ``head_dim`` rotary-eligible dimensions.

    Args:
        config: the parsed ``config.json``.
        head_dim: the head dimension the factor applies to (DeepSeek: ``qk_rope_head_dim``).
        default_theta: the family's base when the config states none.
        interleave: pair dimensions interleaved (the family reads ``rope_interleave``).
        partial: whether ``partial_rotary_factor`` is honoured (else it must be 1).
        default_partial: the factor when the config states none (GLM-4.5: 0.5).

    Raises:
        ValueError: a RoPE type other than default / yarn (naming it and the supported ones), or
            a factor that leaves an odd or empty rotary dimension.
        CheckpointError: a number that is not finite / positive.
    """
    p = rope_params(config)
    kind = p.get("rope_type") or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"config.json rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}); "
            "use a checkpoint without that rope_scaling"
        )
    theta = config_float(p, "rope_theta", default_theta)
    frac = config_float(p, "partial_rotary_factor", default_partial)
    if not partial and frac != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 is not supported by this family")
    dim = int(head_dim * frac)
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ValueError(
            f"config.json partial_rotary_factor={frac} leaves {dim} rotary dimensions of "
            f"{head_dim}: expected an even number in 2..{head_dim}"
        )
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    if kind == "default":
        return RopeSpec(dim, theta, interleave, 1.0 / base)
    return _yarn(config, p, dim, theta, interleave, base)


def _yarn(
    config: Mapping[str, Any], p: Mapping[str, Any], dim: int, theta: float, interleave: bool,
    base: torch.Tensor,
) -> RopeSpec:
    orig = config_int(p, "original_max_position_embeddings", MAX_POSITIONS, default=0) or (
        config_int(config, "max_position_embeddings", MAX_POSITIONS)
    )
    if p.get("factor") is None:
        factor = config_int(config, "max_position_embeddings", MAX_POSITIONS) / orig
    else:
        factor = config_float(p, "factor", 1.0)
    m = config_float(p, "mscale", 0.0, positive=False)
    m_all = config_float(p, "mscale_all_dim", 0.0, positive=False)
    if p.get("attention_factor") is not None:
        cos_scale = config_float(p, "attention_factor", 1.0)
    elif m and m_all:
        cos_scale = yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
    else:
        cos_scale = yarn_mscale(factor)
    fast = config_float(p, "beta_fast", 32.0) if p.get("beta_fast") else 32.0
    slow = config_float(p, "beta_slow", 1.0) if p.get("beta_slow") else 1.0

    def corr_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(fast), corr_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty interval
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    mscale = yarn_mscale(factor, m_all) ** 2 if m_all else 1.0
    return RopeSpec(dim, theta, interleave, inv_freq, float(cos_scale), mscale)
