"""The multi-head latent attention kind (DeepSeek-V2/V3, Kimi-K2): ``MlaSpec`` and
``mla_attention``.

Why a kind: MLA (DeepSeek-V2 report, sec. 2.1) compresses keys and values into one low-rank
latent per token (``kv_a_proj_with_mqa`` -> ``kv_lora_rank`` latent plus one shared rope key of
``qk_rope_head_dim``), normalises the latent (``kv_a_layernorm``) and expands it per head
(``kv_b_proj`` -> key-nope ``qk_nope_head_dim`` and value ``v_head_dim``); queries come from a
plain ``q_proj`` or through their own low-rank path (``q_a_proj``, ``q_a_layernorm``,
``q_b_proj``) when ``q_lora_rank`` is set. Only the rope parts are rotated (``rope.RopeSpec``,
interleaved in DeepSeek's checkpoints), and the softmax scale carries YaRN's correction. The
families of this shape share the spec and the function; their tensor names are the ones
transformers' ``save_pretrained`` writes under ``self_attn``.

The latent norms use RMSNorm's epsilon 1e-6 whatever the config's ``rms_norm_eps`` (the
reference builds them with the default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qmoe_ray.models import layers as L
from qmoe_ray.models.config import MAX_FF, MAX_HEAD_DIM, config_int
from qmoe_ray.models.rope import RopeSpec

LATENT_EPS = 1e-6

Get = Callable[[str, tuple[int, ...]], torch.Tensor]
Opt = Callable[[str], "torch.Tensor | None"]


@dataclass(frozen=True)
class MlaSpec:
    """Sizes of one multi-head latent attention.

    Attributes:
        hidden: model width. heads: attention heads.
        q_lora_rank: the query latent's rank (0: a plain ``q_proj``).
        kv_lora_rank: the key/value latent's rank.
        qk_nope, qk_rope: per-head key/query dimensions without / with rotation.
        v_dim: per-head value dimension.
        bias: ``attention_bias``: ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` have biases.
    """

    hidden: int
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_dim: int
    bias: bool

    @property
    def qk_dim(self) -> int:
        return self.qk_nope + self.qk_rope

    @classmethod
    def from_config(cls, c: Mapping[str, Any], hidden: int, heads: int) -> MlaSpec:
        """The sizes from ``config.json`` (``q_lora_rank`` null or absent: plain ``q_proj``).

        Raises:
            CheckpointError: a size missing, not an integer or out of bounds.
        """
        return cls(
            hidden=hidden,
            heads=heads,
            q_lora_rank=config_int(c, "q_lora_rank", MAX_FF, default=0),
            kv_lora_rank=config_int(c, "kv_lora_rank", MAX_FF),
            qk_nope=config_int(c, "qk_nope_head_dim", MAX_HEAD_DIM),
            qk_rope=config_int(c, "qk_rope_head_dim", MAX_HEAD_DIM),
            v_dim=config_int(c, "v_head_dim", MAX_HEAD_DIM),
            bias=bool(c.get("attention_bias", False)),
        )

    def shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        """Every tensor under the attention prefix ``p`` (``model.layers.i.self_attn``) with its
        shape."""
        d, h = self.hidden, self.heads
        out: dict[str, tuple[int, ...]] = {}
        if self.q_lora_rank:
            r = self.q_lora_rank
            out[f"{p}.q_a_proj.weight"] = (r, d)
            out[f"{p}.q_a_layernorm.weight"] = (r,)
            out[f"{p}.q_b_proj.weight"] = (h * self.qk_dim, r)
            if self.bias:
                out[f"{p}.q_a_proj.bias"] = (r,)
        else:
            out[f"{p}.q_proj.weight"] = (h * self.qk_dim, d)
        out[f"{p}.kv_a_proj_with_mqa.weight"] = (self.kv_lora_rank + self.qk_rope, d)
        out[f"{p}.kv_a_layernorm.weight"] = (self.kv_lora_rank,)
        out[f"{p}.kv_b_proj.weight"] = (h * (self.qk_nope + self.v_dim), self.kv_lora_rank)
        out[f"{p}.o_proj.weight"] = (d, h * self.v_dim)
        if self.bias:
            out[f"{p}.kv_a_proj_with_mqa.bias"] = (self.kv_lora_rank + self.qk_rope,)
            out[f"{p}.o_proj.bias"] = (d,)
        return out


def mla_attention(
    spec: MlaSpec,
    rope: RopeSpec,
    get: Get,
    opt: Opt,
    p: str,
    x: torch.Tensor,
    position_ids: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Multi-head latent attention of ``x`` ``[B, S, d]`` -> ``[B, S, d]``.

    Args:
        spec, rope: the sizes and the RoPE kind (over ``qk_rope`` dimensions).
        get: ``(name, shape) -> tensor`` (checks the shape); opt: ``name -> tensor or None``.
        p: the attention's tensor prefix.
        position_ids: ``int64 [B, S]``; allowed: ``bool [B, 1, S, S]`` (``layers.causal_mask``).
    """
    b, n, d = x.shape
    h, nope, rd, vd = spec.heads, spec.qk_nope, spec.qk_rope, spec.v_dim
    if spec.q_lora_rank:
        r = spec.q_lora_rank
        qa = L.linear(x, get(f"{p}.q_a_proj.weight", (r, d)), opt(f"{p}.q_a_proj.bias"))
        qa = L.rms_norm(qa, get(f"{p}.q_a_layernorm.weight", (r,)), LATENT_EPS)
        q = L.linear(qa, get(f"{p}.q_b_proj.weight", (h * spec.qk_dim, r)))
    else:
        q = L.linear(x, get(f"{p}.q_proj.weight", (h * spec.qk_dim, d)))
    q_pass, q_rot = q.view(b, n, h, spec.qk_dim).transpose(1, 2).split([nope, rd], dim=-1)
    kv_a = L.linear(
        x,
        get(f"{p}.kv_a_proj_with_mqa.weight", (spec.kv_lora_rank + rd, d)),
        opt(f"{p}.kv_a_proj_with_mqa.bias"),
    )
    latent, k_rot = kv_a.split([spec.kv_lora_rank, rd], dim=-1)
    latent = L.rms_norm(
        latent, get(f"{p}.kv_a_layernorm.weight", (spec.kv_lora_rank,)), LATENT_EPS
    )
    cos, sin = rope.cos_sin(position_ids)
    q_rot = rope.apply(q_rot, cos, sin)
    k_rot = rope.apply(k_rot.view(b, 1, n, rd), cos, sin)
    kv = L.linear(latent, get(f"{p}.kv_b_proj.weight", (h * (nope + vd), spec.kv_lora_rank)))
    k_nope, v = kv.view(b, n, h, nope + vd).transpose(1, 2).split([nope, vd], dim=-1)
    k = torch.cat((k_nope, k_rot.expand(-1, h, -1, -1)), dim=-1)
    o = L.attention(
        torch.cat((q_pass, q_rot), dim=-1), k, v, allowed, rope.softmax_scale(spec.qk_dim)
    )
    return L.linear(o, get(f"{p}.o_proj.weight", (d, h * vd)), opt(f"{p}.o_proj.bias"))
