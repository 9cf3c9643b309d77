"""Decoder MoE families with a sigmoid, bias-corrected router: DeepSeek-V3 (and Kimi-K2, the same
architecture), GLM-4.5 (``glm4_moe``) and MiniMax-M2.

Why one module over ``DecoderMoE``: these families keep the decoder block of Mixtral/Qwen
(pre-norm RMSNorm, SwiGLU experts, the expert layouts and names of ``decoder_layout``) and swap in
kinds:

============  =====================  ==================  ==============  ==================
family        attention              RoPE                shared experts  dense blocks
============  =====================  ==================  ==============  ==================
deepseek_v3   latent (``attention``) rope head, interl.  ungated         first_k_dense_
kimi_k2                              YaRN                                replace
glm4_moe      GQA, q/k/v biases,     partial (0.5)       ungated         first_k_dense_
              optional per-head q/k                                      replace
              norm
minimax_m2    GQA, q/k norm over     partial             none            none
              the whole projection   (``rotary_dim``)
============  =====================  ==================  ==============  ==================

Routing is ``routers.SigmoidRouter``: DeepSeek/GLM with groups, renormalisation and
``routed_scaling_factor``; MiniMax without groups, always renormalised. The correction bias is a
float32 tensor beside the router (``mlp.gate.e_score_correction_bias``; MiniMax:
``block_sparse_moe.e_score_correction_bias``) and, like the router, keeps its source precision in
the output checkpoint (``stored_dtype``). Shared experts (``mlp.shared_experts``, hidden size
``moe_intermediate_size * n_shared_experts``) are dense weights of the MoE block, added to the
routed output without a gate.

Multi-token-prediction layers (``num_nextn_predict_layers``: ``model.layers.{num_hidden_layers}``
and later) are not part of the forward: the job carries their tensors through unchanged (dense,
bf16, experts included, never quantized) and the export writes them under their names, which
transformers' models skip on load; ``drop_mtp`` (``--drop-mtp``) leaves them out (``mtp_names``).
Their shapes are not checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from qmoe_ray.models import layers as L
from qmoe_ray.models.attention import MlaSpec, mla_attention
from qmoe_ray.models.base import LayerSpec, State, WeightSource
from qmoe_ray.models.config import MAX_EXPERTS, MAX_FF, MAX_LAYERS, config_int
from qmoe_ray.models.decoder_moe import DecoderMoE, _need_int
from qmoe_ray.models.rope import RopeSpec, parse_rope
from qmoe_ray.models.routers import SigmoidRouter

BIAS = "e_score_correction_bias"
#: routing fields of the reference configs (DeepSeek-V3's and MiniMax-M2's config.json) and the
#: values this router implements; anything else (DeepSeek-V2's softmax / greedy routing, MoE
#: blocks every other layer) is refused rather than run wrong
ROUTING_FIELDS: dict[str, tuple[Any, ...]] = {
    "scoring_func": (None, "sigmoid"),
    "topk_method": (None, "noaux_tc"),
    "moe_layer_freq": (None, 1),
    "use_routing_bias": (None, True),
}


class SigmoidMoE(DecoderMoE):
    """The shared part: sigmoid router, correction bias, ungated shared experts, dense first
    blocks, a ``RopeSpec``. Subclasses set the switches below.

    Attributes:
        bias_under_gate: the bias sits under the router (``mlp.gate.<bias>``) rather than beside
            it (``block_sparse_moe.<bias>``).
        router_groups: the config's ``n_group`` / ``topk_group`` / ``routed_scaling_factor`` apply.
        default_partial: ``partial_rotary_factor`` when the config states none.
    """

    bias_under_gate: ClassVar[bool] = True
    router_groups: ClassVar[bool] = True
    default_partial: ClassVar[float] = 1.0

    def __init__(self, config: Mapping[str, Any], names: Sequence[str] | None = None):
        for key, ok in ROUTING_FIELDS.items():
            if config.get(key) not in ok:
                raise ValueError(
                    f"config.json {key}={config.get(key)!r} is not supported by "
                    f"{self.model_type} (supported: {', '.join(map(repr, ok[1:]))} or absent)"
                )
        super().__init__(config, names)
        s = self.spec
        self.router = SigmoidRouter.from_config(
            self.config, s.num_experts, s.top_k, groups=self.router_groups,
            renormalize=None if self.router_groups else True,
            eps=1e-20 if self.router_groups else 0.0,
        )
        self.rope = self._parse_rope(self.config)
        n_shared = config_int(self.config, "n_shared_experts", MAX_EXPERTS, lo=0, default=0)
        self.shared_ff = s.moe_ff * n_shared if self._has_shared() else 0
        if self.shared_ff > MAX_FF:
            raise ValueError(f"config.json: n_shared_experts={n_shared} x moe_intermediate_size "
                             f"exceeds {MAX_FF}")

    def mtp_names(self, W_names: Sequence[str]) -> list[str]:
        """The tensors of ``model.layers.{k}`` for ``k >= num_hidden_layers`` (the MTP layers)."""
        n = self.spec.num_layers
        out = []
        for name in W_names:
            head, _, rest = name.partition("model.layers.")
            idx = rest.split(".", 1)[0]
            if not head and idx.isdigit() and int(idx) >= n:
                out.append(name)
        return out

    # -- config hooks -----------------------------------------------------------------------------
    def _rope_theta(self, c: Mapping[str, Any]) -> float:
        return self.default_rope_theta  # the RoPE kind is parsed by _parse_rope

    def _parse_rope(self, c: Mapping[str, Any]) -> RopeSpec:
        return parse_rope(c, self.spec.head_dim, self.default_rope_theta,
                          default_partial=self.default_partial)

    def _has_shared(self) -> bool:
        return True

    def _expert_count_keys(self) -> tuple[str, ...]:
        return ("n_routed_experts", "num_local_experts")

    def _sparse_layout(
        self, c: Mapping[str, Any], n: int, e: int
    ) -> tuple[tuple[bool, ...], int, int]:
        k = config_int(c, "first_k_dense_replace", MAX_LAYERS, lo=0, default=0)
        sparse = tuple(i >= k for i in range(n))
        dense_ff = 0 if all(sparse) else _need_int(c, self.model_type, MAX_FF, "intermediate_size")
        return sparse, dense_ff, 0  # shared experts: ungated, handled here (not Qwen2's gate)

    # -- names ------------------------------------------------------------------------------------
    def bias_name(self, layer: LayerSpec, W: Any = None) -> str:
        """The router's correction bias of an MoE layer (bound layout)."""
        mod = self._lay(W)[0]
        return f"{layer.name}.{mod}.gate.{BIAS}" if self.bias_under_gate else (
            f"{layer.name}.{mod}.{BIAS}")

    def stored_dtype(self, name: str, src: torch.dtype) -> torch.dtype:
        """Routers and their correction biases keep their source precision; the rest is bf16."""
        return src if name.endswith(BIAS) else super().stored_dtype(name, src)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        out = super().expected_shapes()
        s = self.spec
        for lay in self.layers():
            if lay.moe:
                out[self.bias_name(lay)] = (s.num_experts,)
                if self.shared_ff:
                    out.update(self._mlp_shapes(f"{lay.name}.mlp.shared_experts", s.hidden_size,
                                                self.shared_ff))
        return out

    # -- forward ----------------------------------------------------------------------------------
    def _rotate(
        self, q: torch.Tensor, k: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope.cos_sin(state["position_ids"])
        return self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)

    def route(
        self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        r = self._w(W, self.router_name(layer, W), (s.num_experts, s.hidden_size))
        return self.router(x, r, self._w(W, self.bias_name(layer, W), (s.num_experts,)))

    def post_moe(self, layer: LayerSpec, W: WeightSource, state: State, y: torch.Tensor) -> State:
        h = state["hidden"]
        if self.shared_ff:
            x = self._norm(W, f"{layer.name}.post_attention_layernorm.weight", h)
            y = y + self._mlp(W, f"{layer.name}.mlp.shared_experts", x, self.shared_ff)
        return {**state, "hidden": h + y}


class DeepseekV3(SigmoidMoE):
    """DeepSeek-V3 / R1 / V3.1: multi-head latent attention (``attention.MlaSpec``), RoPE on the
    rope head only (interleaved unless ``rope_interleave`` is false), YaRN with its softmax-scale
    correction."""

    model_type = "deepseek_v3"

    def __init__(self, config: Mapping[str, Any], names: Sequence[str] | None = None):
        super().__init__(config, names)
        self.mla = MlaSpec.from_config(self.config, self.spec.hidden_size, self.spec.num_heads)

    def _parse_rope(self, c: Mapping[str, Any]) -> RopeSpec:
        rope_dim = config_int(c, "qk_rope_head_dim", 4096)
        return parse_rope(c, rope_dim, self.default_rope_theta,
                          interleave=bool(c.get("rope_interleave", True)), partial=False)

    def _attention(self, i: int, W: WeightSource, x: torch.Tensor, state: State) -> torch.Tensor:
        return mla_attention(
            self.mla, self.rope, lambda n, shape: self._w(W, n, shape),
            lambda n: self._opt(W, n), f"model.layers.{i}.self_attn", x,
            state["position_ids"], L.causal_mask(state["attention_mask"]),
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        out = {n: s for n, s in super().expected_shapes().items() if ".self_attn." not in n}
        for lay in self.layers():
            out.update(self.mla.shapes(f"{lay.name}.self_attn"))
        return out

    def shape_message(self, name: str, got: Sequence[int], want: Sequence[int]) -> str:
        m = getattr(self, "mla", None)
        extra = "" if m is None else (
            f"; q_lora_rank={m.q_lora_rank or None}, kv_lora_rank={m.kv_lora_rank}, "
            f"qk_nope/rope/v head dims={m.qk_nope}/{m.qk_rope}/{m.v_dim}")
        return super().shape_message(name, got, want) + extra


class KimiK2(DeepseekV3):
    """Kimi-K2: DeepSeek-V3's architecture under its own ``model_type``."""

    model_type = "kimi_k2"

    def export_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """As ``deepseek_v3``: transformers has no ``kimi_k2`` type (the release loads it with
        its own remote code, whose files an export does not carry: ``auto_map`` goes too)."""
        out = {k: v for k, v in config.items() if k != "auto_map"}
        out["model_type"] = "deepseek_v3"
        return out


class Glm4Moe(SigmoidMoE):
    """GLM-4.5 / 4.6 / 4.7: grouped-KV attention with q/k/v biases (``attention_bias``), optional
    RMSNorm on each q/k head (``use_qk_norm``), RoPE on the first ``partial_rotary_factor`` (default
    0.5) of each head."""

    model_type = "glm4_moe"
    default_partial = 0.5
    default_eps = 1e-5

    def _qk_norm(self) -> str:
        return "head" if self.config.get("use_qk_norm") else "none"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        out = super().expected_shapes()
        if self.config.get("attention_bias"):
            s = self.spec
            q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            for lay in self.layers():
                p = f"{lay.name}.self_attn"
                out.update({f"{p}.q_proj.bias": (q,), f"{p}.k_proj.bias": (kv,),
                            f"{p}.v_proj.bias": (kv,)})
        return out


class MiniMaxM2(SigmoidMoE):
    """MiniMax-M2: sigmoid routing with the bias beside the router, no groups, always
    renormalised; RMSNorm over the whole q/k projections; partial RoPE (``rotary_dim`` or
    ``partial_rotary_factor``); Mixtral's ``block_sparse_moe.experts.E.w1/w3/w2`` names."""

    model_type = "minimax_m2"
    moe_modules = ("block_sparse_moe", "mlp")
    source_roles = {"gate": "w1", "up": "w3", "down": "w2"}
    bias_under_gate = False
    router_groups = False
    default_rope_theta = 5e6

    def _has_shared(self) -> bool:
        return False

    def _expert_count_keys(self) -> tuple[str, ...]:
        return ("num_local_experts", "num_experts")

    def _moe_ff_keys(self) -> tuple[str, ...]:
        return ("intermediate_size",)

    def _sparse_layout(
        self, c: Mapping[str, Any], n: int, e: int
    ) -> tuple[tuple[bool, ...], int, int]:
        return (True,) * n, 0, 0

    def _qk_norm(self) -> str:
        return "full"

    def _parse_rope(self, c: Mapping[str, Any]) -> RopeSpec:
        hd = self.spec.head_dim
        rd = c.get("rotary_dim")
        if rd is not None and (c.get("rope_parameters") or {}).get("partial_rotary_factor") is None:
            c = {**c, "partial_rotary_factor": config_int(c, "rotary_dim", hd) / hd}
        return parse_rope(c, hd, self.default_rope_theta)


__all__ = ["DeepseekV3", "Glm4Moe", "KimiK2", "MiniMaxM2", "SigmoidMoE"]
