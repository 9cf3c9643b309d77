"""Hybrid linear-attention MoE families: Qwen3-Next (``qwen3_next``) and Qwen3.5 / 3.6-MoE
(``qwen3_5_moe``, the multimodal wrapper the Hub ships, and ``qwen3_5_moe_text``).

Why one module over ``DecoderMoE``: the MoE half of the block is Qwen2-MoE's (softmax top-k router,
SwiGLU experts under ``mlp.experts``, the ``sigmoid(x g^T)``-gated shared expert); what differs is
the token mixer and the norms:

- ``layer_types`` says per block ``"linear_attention"`` (a Gated DeltaNet,
  ``qmoe_ray.models.linear_attention``, under ``linear_attn``) or ``"full_attention"`` (under
  ``self_attn``); absent, every ``full_attention_interval``-th block (default 4) is full;
- full attention is gated: ``q_proj`` gives per head a query and a gate of ``head_dim`` each
  (``[q_h | gate_h]``), the attention output is multiplied by ``sigmoid(gate)`` before
  ``o_proj``; q and k get a per-head RMSNorm; RoPE covers the first ``partial_rotary_factor``
  (default 0.25) of each head;
- every RMSNorm of the stack (block norms, final norm, q/k norms) scales by ``1 + w`` (the
  stored weight is centred on 0); the DeltaNet's gated norm keeps a plain ``w``.

Qwen3.5 differs from Qwen3-Next in its DeltaNet input projections (``separate`` instead of the
interleaved ``in_proj_qkvz`` / ``in_proj_ba``), in always renormalising the top-k and in having
no dense blocks. Its multimodal RoPE (``mrope_section``) gives text tokens the same position on
its three axes, which is plain RoPE: the text-only forward here is exact for text.

The wrapper (``model_type`` ``qwen3_5_moe``) keeps the decoder's sizes in ``text_config`` and its
weights under ``model.language_model.`` (``prefix``); the vision tower (``model.visual.*``) and
the multi-token-prediction head (``mtp.*``, Qwen3-Next's too) are not part of the text forward: the job carries
them through unchanged (never quantized: the routed experts of the text stack are the only
matrices compressed) and ``drop_mtp`` leaves the MTP head out (``mtp_names``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from qmoe_ray.errors import CheckpointError
from qmoe_ray.models import layers as L
from qmoe_ray.models.base import LayerSpec, State, WeightSource
from qmoe_ray.models.config import MAX_LAYERS, config_int
from qmoe_ray.models.decoder_moe import Qwen2Moe
from qmoe_ray.models.linear_attention import DeltaNetSpec, gated_delta_net
from qmoe_ray.models.rope import RopeSpec, parse_rope

MIXERS = ("linear_attention", "full_attention")


def layer_types(c: Mapping[str, Any], n: int) -> tuple[str, ...]:
    """Each block's token mixer from ``layer_types`` (or ``full_attention_interval``).

    Raises:
        CheckpointError: ``layer_types`` is not a list of ``n`` known mixer names.
    """
    types = c.get("layer_types")
    if types is None:
        every = config_int(c, "full_attention_interval", MAX_LAYERS, default=4)
        return tuple(MIXERS[(i + 1) % every == 0] for i in range(n))
    if not isinstance(types, list) or len(types) != n or any(t not in MIXERS for t in types):
        raise CheckpointError(
            f"config.json 'layer_types' must list {n} entries (num_hidden_layers), each one of "
            f"{', '.join(MIXERS)}; got {str(types)[:80]}"
        )
    return tuple(types)


class Qwen3Next(Qwen2Moe):
    """Qwen3-Next: Gated DeltaNet and gated full attention (see the module doc), interleaved
    DeltaNet projections, ``norm_topk_prob`` (default true), dense blocks by
    ``decoder_sparse_step`` / ``mlp_only_layers`` as in Qwen2-MoE."""

    model_type = "qwen3_next"
    default_partial: ClassVar[float] = 0.25
    delta_layout: ClassVar[str] = "interleaved"

    def __init__(self, config: Mapping[str, Any], names: Sequence[str] | None = None):
        super().__init__(config, names)
        c, s = self.text_config, self.spec
        self.mixers = layer_types(c, s.num_layers)
        self.delta = DeltaNetSpec.from_config(c, s.hidden_size, self.delta_layout)
        self.rope: RopeSpec = parse_rope(c, s.head_dim, self.default_rope_theta,
                                         default_partial=self.default_partial)
        if not s.shared_ff:
            raise ValueError(f"config.json (model_type {self.model_type!r}) lacks "
                             "'shared_expert_intermediate_size'; this family has a shared expert")

    # -- config hooks -----------------------------------------------------------------------------
    def _rope_theta(self, c: Mapping[str, Any]) -> float:
        return self.default_rope_theta  # the RoPE kind (partial) is parsed in __init__

    def _norm_topk(self, c: Mapping[str, Any]) -> bool:
        return bool(c.get("norm_topk_prob", True))

    def _windows(self, c: Mapping[str, Any], n: int) -> tuple[int | None, ...]:
        return (None,) * n

    def _qk_norm(self) -> str:
        return "head"

    def mtp_names(self, W_names: Sequence[str]) -> list[str]:
        """The multi-token-prediction head's tensors (``mtp.*``, Qwen3-Next and Qwen3.5)."""
        return [n for n in W_names if n.startswith("mtp.")]

    def is_linear(self, layer: LayerSpec) -> bool:
        """Whether the block's token mixer is a Gated DeltaNet (else gated full attention)."""
        return self.mixers[layer.block] == "linear_attention"

    # -- names ------------------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.spec
        out = {n: v for n, v in super().expected_shapes().items() if ".self_attn." not in n}
        d, hd = s.hidden_size, s.head_dim
        q, kv = s.num_heads * hd, s.num_kv_heads * hd
        for lay in self.layers():
            if self.is_linear(lay):
                out.update(self.delta.shapes(f"{lay.name}.linear_attn"))
                continue
            p = f"{lay.name}.self_attn"
            out.update({f"{p}.q_proj.weight": (2 * q, d), f"{p}.k_proj.weight": (kv, d),
                        f"{p}.v_proj.weight": (kv, d), f"{p}.o_proj.weight": (d, q),
                        f"{p}.q_norm.weight": (hd,), f"{p}.k_norm.weight": (hd,)})
            if self.text_config.get("attention_bias"):
                out.update({f"{p}.q_proj.bias": (2 * q,), f"{p}.k_proj.bias": (kv,),
                            f"{p}.v_proj.bias": (kv,), f"{p}.o_proj.bias": (d,)})
        return out

    def shape_message(self, name: str, got: Sequence[int], want: Sequence[int]) -> str:
        dn = getattr(self, "delta", None)
        extra = "" if dn is None else (
            f"; linear attention: key/value heads={dn.k_heads}/{dn.v_heads}, key/value head "
            f"dims={dn.k_dim}/{dn.v_dim}, conv kernel={dn.conv}")
        return super().shape_message(name, got, want) + extra

    # -- forward ----------------------------------------------------------------------------------
    def _norm(self, W: WeightSource, name: str, x: torch.Tensor) -> torch.Tensor:
        """The ``(1 + w)`` RMSNorm."""
        return L.rms_norm(x, 1.0 + self._w(W, name, (self.spec.hidden_size,)), self.spec.rms_eps)

    def _attention(self, i: int, W: WeightSource, x: torch.Tensor, state: State) -> torch.Tensor:
        p = f"{self.prefix}layers.{i}"
        get, opt = (lambda n, shape: self._w(W, n, shape)), (lambda n: self._opt(W, n))
        if self.mixers[i] == "linear_attention":
            return gated_delta_net(self.delta, get, opt, f"{p}.linear_attn", x,
                                   state["attention_mask"].to(torch.bool))
        return self._gated_attention(f"{p}.self_attn", get, opt, x, state)

    def _gated_attention(self, p: str, get: Any, opt: Any, x: torch.Tensor,
                         state: State) -> torch.Tensor:
        s = self.spec
        d, hd, h, hkv = s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads
        b, n, _ = x.shape
        qg = L.linear(x, get(f"{p}.q_proj.weight", (2 * h * hd, d)), opt(f"{p}.q_proj.bias"))
        q, gate = qg.view(b, n, h, 2 * hd).split([hd, hd], dim=-1)
        k = L.linear(x, get(f"{p}.k_proj.weight", (hkv * hd, d)), opt(f"{p}.k_proj.bias"))
        v = L.linear(x, get(f"{p}.v_proj.weight", (hkv * hd, d)), opt(f"{p}.v_proj.bias"))
        q = L.rms_norm(q, 1.0 + get(f"{p}.q_norm.weight", (hd,)), s.rms_eps)
        k = L.rms_norm(k.view(b, n, hkv, hd), 1.0 + get(f"{p}.k_norm.weight", (hd,)), s.rms_eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, n, hkv, hd).transpose(1, 2)
        cos, sin = self.rope.cos_sin(state["position_ids"])
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        o = L.attention(q, k, v, L.causal_mask(state["attention_mask"]))
        o = o * torch.sigmoid(gate.reshape(b, n, h * hd))
        return L.linear(o, get(f"{p}.o_proj.weight", (d, h * hd)), opt(f"{p}.o_proj.bias"))


class Qwen3_5MoeText(Qwen3Next):
    """Qwen3.5 / 3.6-MoE's text model (``qwen3_5_moe_text``): separate DeltaNet projections
    (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), top-k always renormalised,
    every block MoE."""

    model_type = "qwen3_5_moe_text"
    delta_layout = "separate"

    def _norm_topk(self, c: Mapping[str, Any]) -> bool:
        return True

    def _sparse_layout(
        self, c: Mapping[str, Any], n: int, e: int
    ) -> tuple[tuple[bool, ...], int, int]:
        shared = config_int(c, "shared_expert_intermediate_size", 2**18, lo=0, default=0)
        return (True,) * n, 0, shared


class Qwen3_5Moe(Qwen3_5MoeText):
    """Qwen3.5 / 3.6-MoE as the Hub ships it: the multimodal wrapper (``text_config``, weights
    under ``model.language_model.``, the vision tower under ``model.visual.`` carried unchanged)."""

    model_type = "qwen3_5_moe"
    prefix = "model.language_model."

    def _text_config(self, c: dict[str, Any]) -> dict[str, Any]:
        text = c.get("text_config")
        if not isinstance(text, Mapping):
            raise ValueError(
                "config.json (model_type 'qwen3_5_moe') has no 'text_config' object: the "
                "multimodal wrapper keeps the language model's sizes there; use the release's "
                "config.json, or model_type 'qwen3_5_moe_text' for a text-only config"
            )
        out = dict(text)
        if "tie_word_embeddings" in c and "tie_word_embeddings" not in out:
            out["tie_word_embeddings"] = c["tie_word_embeddings"]
        return out


__all__ = ["Qwen3Next", "Qwen3_5Moe", "Qwen3_5MoeText", "layer_types"]
