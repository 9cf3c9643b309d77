"""Decoder-only MoE families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

The families differ from one another in a handful of switches (``DecoderSpec``, parsed from
``config.json``) and in their tensor names; both, and the expert layout, are
``decoder_layout``'s (``DecoderLayout``, the base class of ``DecoderMoE``). The blocks are
assembled from ``qmoe_ray.models.layers``: RMSNorm, RoPE attention with grouped KV heads, a
top-k softmax router, SwiGLU experts and the gated shared expert.

All computation is float32; ``state`` holds ``hidden`` ``[B,S,d]``, ``attention_mask`` ``bool
[B,S]`` and ``position_ids`` ``int64 [B,S]`` (positions count from 0 at the first column, as
transformers does without explicit position ids: pad on the right).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from qmoe_ray.data.samples import special_token_ids
from qmoe_ray.errors import CheckpointError
from qmoe_ray.models import layers as L
from qmoe_ray.models.base import LayerSpec, State, WeightSource
from qmoe_ray.models.config import MAX_FF, MAX_LAYERS, config_int
from qmoe_ray.models.decoder_layout import (  # noqa: F401 - re-exported
    CANONICAL,
    ROLES,
    DecoderLayout,
    DecoderSpec,
    _need_int,
    _window,
)


class DecoderMoE(DecoderLayout):
    """Shared implementation of the decoder-only MoE families: ``DecoderLayout``'s config,
    blocks and names, and the forward (see the module docstring).

    Args:
        config: parsed ``config.json``.
        names: the checkpoint's tensor names, to fix the expert layout now (``bind``).

    Raises:
        ValueError: a required field is missing or inconsistent (the message names it).
        CheckpointError (a ``ValueError``): a size is not an integer or out of bounds.
    """

    # -- forward ----------------------------------------------------------------------------------
    def embed(self, W: WeightSource, inputs: Mapping[str, torch.Tensor]) -> State:
        if "input_ids" not in inputs:
            raise KeyError(f"inputs lack 'input_ids' (got {sorted(inputs)}); pass token ids [B,S]")
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 [B, S], got {ids.dtype} {list(ids.shape)}")
        ids = ids.to(torch.int64)
        s = self.spec
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= s.vocab_size):
            raise ValueError(f"input_ids outside [0, {s.vocab_size}); tokenizer and model differ")
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}"
            )
        emb = self._w(W, f"{self.prefix}embed_tokens.weight", (s.vocab_size, s.hidden_size))
        b, n = ids.shape
        special = torch.tensor(special_token_ids(self.text_config), dtype=torch.int64)
        return {
            "hidden": emb[ids],
            "attention_mask": mask,
            "position_ids": torch.arange(n, dtype=torch.int64).expand(b, n).contiguous(),
            # pad / BOS / EOS stay out of the Hessians (attention-sink tokens carry outlier
            # activations unlike the text's; QMoE masks Switch's specials the same way)
            "hessian_ok": mask & ~torch.isin(ids, special),
        }

    def _attention(self, i: int, W: WeightSource, x: torch.Tensor, state: State) -> torch.Tensor:
        s = self.spec
        p = f"{self.prefix}layers.{i}.self_attn"
        d, hd = s.hidden_size, s.head_dim
        qd, kvd = s.num_heads * hd, s.num_kv_heads * hd
        q = L.linear(x, self._w(W, f"{p}.q_proj.weight", (qd, d)), self._opt(W, f"{p}.q_proj.bias"))
        k = L.linear(
            x, self._w(W, f"{p}.k_proj.weight", (kvd, d)), self._opt(W, f"{p}.k_proj.bias")
        )
        v = L.linear(
            x, self._w(W, f"{p}.v_proj.weight", (kvd, d)), self._opt(W, f"{p}.v_proj.bias")
        )
        if s.qk_norm == "full":
            q = L.rms_norm(q, self._w(W, f"{p}.q_norm.weight", (qd,)), s.rms_eps)
            k = L.rms_norm(k, self._w(W, f"{p}.k_norm.weight", (kvd,)), s.rms_eps)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        b, n, _ = x.shape
        q = q.view(b, n, s.num_heads, hd)
        k = k.view(b, n, s.num_kv_heads, hd)
        v = v.view(b, n, s.num_kv_heads, hd)
        if s.qk_norm == "head":
            q = L.rms_norm(q, self._w(W, f"{p}.q_norm.weight", (hd,)), s.rms_eps)
            k = L.rms_norm(k, self._w(W, f"{p}.k_norm.weight", (hd,)), s.rms_eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = self._rotate(q, k, state)
        allowed = L.causal_mask(state["attention_mask"], s.windows[i])
        o = L.attention(q, k, v, allowed, sinks=self._sinks(W, p))
        return L.linear(
            o, self._w(W, f"{p}.o_proj.weight", (d, qd)), self._opt(W, f"{p}.o_proj.bias")
        )

    def _sinks(self, W: WeightSource, p: str) -> torch.Tensor | None:
        """The attention sinks of attention ``p`` (None: the family has none)."""
        return None

    def _rotate(
        self, q: torch.Tensor, k: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on ``q`` / ``k`` ``[B, H, S, head_dim]``: the default kind over whole heads (a
        family with another RoPE kind overrides this)."""
        cos, sin = L.rope_cos_sin(state["position_ids"], self.spec.head_dim, self.spec.rope_theta)
        return L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)

    def _mlp(self, W: WeightSource, p: str, x: torch.Tensor, ff: int) -> torch.Tensor:
        d = self.spec.hidden_size
        g = self._w(W, f"{p}.gate_proj.weight", (ff, d))
        u = self._w(W, f"{p}.up_proj.weight", (ff, d))
        return L.swiglu_mlp(x, g, u, self._w(W, f"{p}.down_proj.weight", (d, ff)))

    def _norm(self, W: WeightSource, name: str, x: torch.Tensor) -> torch.Tensor:
        return L.rms_norm(x, self._w(W, name, (self.spec.hidden_size,)), self.spec.rms_eps)

    def _pre(self, layer: LayerSpec, W: WeightSource, state: State) -> tuple[State, torch.Tensor]:
        h = state["hidden"]
        a = self._attention(
            layer.block, W, self._norm(W, f"{layer.name}.input_layernorm.weight", h), state
        )
        h = h + a
        x = self._norm(W, f"{layer.name}.post_attention_layernorm.weight", h)
        return {**state, "hidden": h}, x

    def dense_block(self, layer: LayerSpec, W: WeightSource, state: State) -> State:
        if layer.moe:
            raise ValueError(f"{layer.name} is an MoE block; use pre_moe/route/post_moe")
        state, x = self._pre(layer, W, state)
        return {
            **state,
            "hidden": state["hidden"] + self._mlp(W, f"{layer.name}.mlp", x, self.spec.dense_ff),
        }

    def pre_moe(
        self, layer: LayerSpec, W: WeightSource, state: State
    ) -> tuple[State, torch.Tensor]:
        if not layer.moe:
            raise ValueError(f"{layer.name} is a dense block; use dense_block")
        return self._pre(layer, W, state)

    def route(
        self,
        layer: LayerSpec,
        W: WeightSource,
        x: torch.Tensor,
        state: State,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        r = self._w(W, self.router_name(layer, W), (s.num_experts, s.hidden_size))
        if keep is None:
            return L.softmax_topk_router(x, r, s.top_k, s.norm_topk)
        return L.softmax_topk_router(x, r[keep], min(s.top_k, len(keep)), s.norm_topk)

    def router_probs(
        self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State
    ) -> torch.Tensor:
        """The router's softmax over every expert (the distribution top-k picks from)."""
        s = self.spec
        r = self._w(W, self.router_name(layer, W), (s.num_experts, s.hidden_size))
        return torch.softmax(L.linear(x.to(torch.float32), r), dim=-1, dtype=torch.float32)

    def post_moe(self, layer: LayerSpec, W: WeightSource, state: State, y: torch.Tensor) -> State:
        h = state["hidden"]
        out = h + y
        if self.spec.shared_ff:
            x = self._norm(W, f"{layer.name}.post_attention_layernorm.weight", h)
            p = f"{layer.name}.mlp"
            shared = self._mlp(W, f"{p}.shared_expert", x, self.spec.shared_ff)
            g = self._w(W, f"{p}.shared_expert_gate.weight", (1, self.spec.hidden_size))
            out = out + torch.sigmoid(L.linear(x, g)) * shared
        return {**state, "hidden": out}

    def logits(self, W: WeightSource, state: State) -> torch.Tensor:
        s = self.spec
        h = self._norm(W, f"{self.prefix}norm.weight", state["hidden"])
        head = (
            f"{self.prefix}embed_tokens.weight"
            if s.tie_embeddings or "lm_head.weight" not in W
            else "lm_head.weight"
        )
        return L.linear(h, self._w(W, head, (s.vocab_size, s.hidden_size))).to(torch.float32)

    def loss_terms(
        self, logits: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        ids = inputs["input_ids"].to(torch.int64)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        valid = mask[:, 1:]
        ce = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            ids[:, 1:].reshape(-1),
            reduction="none",
        )
        v = valid.reshape(-1)
        return ce[v].sum(), int(v.sum())

    def token_mask(self, layer: LayerSpec, state: State) -> torch.Tensor:
        return state["attention_mask"].to(torch.bool)

    def hessian_mask(self, layer: LayerSpec, state: State) -> torch.Tensor:
        """Real tokens other than the config's pad / BOS / EOS ids."""
        ok = state.get("hessian_ok")
        return self.token_mask(layer, state) if ok is None else ok.to(torch.bool)


class Mixtral(DecoderMoE):
    """Mixtral: top-k always renormalised, experts ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""

    model_type = "mixtral"
    moe_modules = ("block_sparse_moe", "mlp")
    source_roles = {"gate": "w1", "up": "w3", "down": "w2"}
    default_rope_theta = 1e6
    default_eps = 1e-5

    def _expert_count_keys(self) -> tuple[str, ...]:
        return ("num_local_experts", "num_experts")

    def _moe_ff_keys(self) -> tuple[str, ...]:
        return ("intermediate_size",)

    def _norm_topk(self, c: Mapping[str, Any]) -> bool:
        return True

    def _windows(self, c: Mapping[str, Any], n: int) -> tuple[int | None, ...]:
        return (_window(c),) * n


class _QwenMoE(DecoderMoE):
    """Qwen-MoE layout: ``decoder_sparse_step`` / ``mlp_only_layers`` make some blocks dense."""

    def _sparse_layout(
        self, c: Mapping[str, Any], n: int, e: int
    ) -> tuple[tuple[bool, ...], int, int]:
        step = config_int(c, "decoder_sparse_step", MAX_LAYERS, default=1)
        only = c.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(
            type(i) is int and 0 <= i < MAX_LAYERS for i in only
        ):
            raise CheckpointError(
                f"config.json 'mlp_only_layers' must be a list of layer indices 0..{MAX_LAYERS - 1}"
            )
        only = set(only)
        sparse = tuple(i not in only and e > 0 and (i + 1) % step == 0 for i in range(n))
        dense_ff = (
            _need_int(c, self.model_type, MAX_FF, "intermediate_size") if not all(sparse) else 0
        )
        return sparse, dense_ff, 0

    def _windows(self, c: Mapping[str, Any], n: int) -> tuple[int | None, ...]:
        if not c.get("use_sliding_window") or not c.get("sliding_window"):
            return (None,) * n
        return (_window(c),) * n


class Qwen2Moe(_QwenMoE):
    """Qwen2-MoE (Qwen1.5-MoE): q/k/v biases, a shared expert scaled by ``sigmoid(x g^T)``."""

    model_type = "qwen2_moe"

    def _sparse_layout(
        self, c: Mapping[str, Any], n: int, e: int
    ) -> tuple[tuple[bool, ...], int, int]:
        sparse, dense_ff, _ = super()._sparse_layout(c, n, e)
        shared = config_int(c, "shared_expert_intermediate_size", MAX_FF, lo=0, default=0)
        return sparse, dense_ff, shared

    def _windows(self, c: Mapping[str, Any], n: int) -> tuple[int | None, ...]:
        if not c.get("use_sliding_window") or not c.get("sliding_window"):
            return (None,) * n
        types = c.get("layer_types")
        if types is None:
            mw = config_int(c, "max_window_layers", MAX_LAYERS, lo=0, default=n)
            types = [
                "sliding_attention" if (i + 1) % 2 and i < mw else "full_attention"
                for i in range(n)
            ]
        if not isinstance(types, list) or len(types) != n:
            raise CheckpointError(
                f"config.json 'layer_types' must be a list of {n} entries (num_hidden_layers)"
            )
        w = _window(c)
        return tuple(w if t == "sliding_attention" else None for t in types)


class Qwen3Moe(_QwenMoE):
    """Qwen3-MoE: RMSNorm on each query/key head before RoPE, no shared expert."""

    model_type = "qwen3_moe"

    def _qk_norm(self) -> str:
        return "head"


class Olmoe(DecoderMoE):
    """OLMoE: RMSNorm over the whole q/k projections, optional ``clip_qkv``."""

    model_type = "olmoe"
    default_eps = 1e-5

    def _moe_ff_keys(self) -> tuple[str, ...]:
        return ("intermediate_size",)

    def _qk_norm(self) -> str:
        return "full"


__all__ = ["DecoderLayout", "DecoderMoE", "DecoderSpec", "Mixtral", "Olmoe", "Qwen2Moe", "Qwen3Moe"]
