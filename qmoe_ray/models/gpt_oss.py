"""The gpt-oss family (``model_type`` ``gpt_oss``: gpt-oss-20b, gpt-oss-120b).

Why its own module over ``DecoderMoE``: the block is the decoder block of Mixtral/Qwen (pre-norm
RMSNorm, grouped-KV attention, top-k routed experts) with five differences, each read from what
transformers' ``GptOssForCausalLM`` saves:

- experts fused as ``mlp.experts.gate_up_proj`` ``[E, d, 2F]`` (multiplied from the left,
  ``x @ W``) with gate and up *interleaved* (gate the even columns, up the odd ones) and
  ``mlp.experts.down_proj`` ``[E, F, d]``; the released checkpoints store both as MXFP4 blocks
  (``*_blocks`` / ``*_scales``), which the storage layer decodes to that logical view
  (``qmoe_ray.storage.quantized``), so this module sees only bf16 tensors;
- per-expert biases ``gate_up_proj_bias`` ``[E, 2F]`` (interleaved too) and ``down_proj_bias``
  ``[E, d]``: the ``ExpertSpec``'s ``bias_roles``, carried unquantized as dense tensors under
  their source names (``expert_biases`` splits them per expert and role) and kept at their source
  precision in the output checkpoint (``stored_dtype``);
- the clamped SwiGLU: ``g = min(x W_g + b_g, limit)``, ``u = clamp(x W_u + b_u, -limit, limit)``,
  ``h = (u + 1) * g * sigmoid(alpha g)`` with ``alpha = 1.702``, ``limit = swiglu_limit`` (7.0);
- the router ``mlp.router`` with a bias: top-k on the logits, then a softmax over the k chosen;
- attention with q/k/v/o biases and a learned sink logit per head (``self_attn.sinks``), full
  and sliding-window (``sliding_window``, 128) layers as ``layer_types`` says (transformers'
  default when absent: sliding on even blocks), YaRN RoPE over whole heads (``rope.RopeSpec``:
  halves, not interleaved; YaRN's ``attention_factor`` scales cos/sin, not the logits).

Our canonical per-expert names (the compressed checkpoint's, as for every decoder family) are
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` ``[out, in]``; an HF export
fuses them back into transformers' layout (``qmoe_ray.read.export``, ``fused_layout``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qmoe_ray.errors import CheckpointError, MissingTensorError
from qmoe_ray.models import layers as L
from qmoe_ray.models.base import ExpertSpec, LayerSpec, State, WeightSource, name_lookup
from qmoe_ray.models.config import MAX_POSITIONS, config_float, config_int
from qmoe_ray.models.decoder_moe import CANONICAL, DecoderMoE
from qmoe_ray.models.rope import RopeSpec, parse_rope

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation (see the module doc), with the in matrices' biases."""

    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        gate = (x @ w["gate"].T + w["gate_bias"]).clamp(max=self.limit)
        up = (x @ w["up"].T + w["up_bias"]).clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)


class GptOss(DecoderMoE):
    """gpt-oss: see the module docstring.

    Raises:
        ValueError / CheckpointError: a missing, inconsistent or out-of-bounds config field
            (named), or a ``layer_types`` entry other than sliding/full attention.
    """

    model_type = "gpt_oss"
    moe_modules = ("mlp",)
    default_rope_theta = 150000.0
    default_eps = 1e-5
    fused_layout = "interleaved"

    def __init__(self, config: Mapping[str, Any], names: Sequence[str] | None = None):
        super().__init__(config, names)
        c = self.config
        self.expert_spec = ExpertSpec(
            ("gate", "up"), ("down",),
            ClampedSwiGLU(config_float(c, "swiglu_alpha", 1.702),
                          config_float(c, "swiglu_limit", 7.0)),
            bias_roles=("gate", "up", "down"))
        self.rope: RopeSpec = parse_rope(c, self.spec.head_dim, self.default_rope_theta,
                                         partial=False)
        self.attention_bias = bool(c.get("attention_bias", True))

    # -- config hooks -----------------------------------------------------------------------------
    def _rope_theta(self, c: Mapping[str, Any]) -> float:
        return self.default_rope_theta  # the RoPE kind is parsed in __init__

    def _expert_count_keys(self) -> tuple[str, ...]:
        return ("num_local_experts", "num_experts")

    def _moe_ff_keys(self) -> tuple[str, ...]:
        return ("intermediate_size",)

    def _norm_topk(self, c: Mapping[str, Any]) -> bool:
        return True  # the softmax runs over the k chosen logits

    def _windows(self, c: Mapping[str, Any], n: int) -> tuple[int | None, ...]:
        types = c.get("layer_types")
        if types is None:
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        if not isinstance(types, list) or len(types) != n or any(t not in LAYER_TYPES
                                                                 for t in types):
            raise CheckpointError(
                f"config.json 'layer_types' must be a list of {n} entries (num_hidden_layers), "
                f"each one of {', '.join(LAYER_TYPES)}")
        window = config_int(c, "sliding_window", MAX_POSITIONS, default=128)
        return tuple(window if t == "sliding_attention" else None for t in types)

    # -- layout -----------------------------------------------------------------------------------
    def bind(self, names: Any) -> GptOss:
        """The expert layout: ``"fused"`` (transformers' ``experts.gate_up_proj``, the released
        and MXFP4-decoded checkpoints) or ``"canonical"`` (a compressed qmoe-ray checkpoint).

        Raises:
            KeyError: the router or the experts of layer 0 are under neither layout.
        """
        has = name_lookup(names).__contains__
        first = self.layers()[0]
        if not has(self.router_name(first)):
            raise MissingTensorError(f"router {self.router_name(first)!r} of layer {first.name} "
                                     f"not found; is this a {self.model_type} checkpoint?")
        for kind in ("fused", "canonical"):
            if has(self._probe(first, "mlp", kind)):
                self._layout = ("mlp", "mlp", kind)
                return self
        tried = [self._probe(first, "mlp", k) for k in ("fused", "canonical")]
        raise MissingTensorError(f"no expert weights of layer {first.name} found (tried "
                                 f"{', '.join(tried)}); is this a {self.model_type} checkpoint?")

    def router_name(self, layer: LayerSpec, W: Any = None) -> str:
        return f"{layer.name}.mlp.router.weight"

    def source_expert_names(self, layer: LayerSpec) -> list[str]:
        """The expert matrices (not their biases: those are dense tensors, carried)."""
        kind = self._lay()[2]
        p = f"{layer.name}.mlp.experts"
        if kind == "fused":
            return [f"{p}.gate_up_proj", f"{p}.down_proj"]
        return [f"{p}.{e}.{CANONICAL[r]}.weight" for e in range(self.spec.num_experts)
                for r in ("gate", "up", "down")]

    def stored_dtype(self, name: str, src: torch.dtype) -> torch.dtype:
        """The router, its bias and the experts' biases keep their source precision."""
        if name.endswith((".mlp.router.bias", "_proj_bias")):
            return src
        return super().stored_dtype(name, src)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.spec
        d, hd, e, f = s.hidden_size, s.head_dim, s.num_experts, s.moe_ff
        q, kv = s.num_heads * hd, s.num_kv_heads * hd
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab_size, d),
                                           "model.norm.weight": (d,)}
        if not s.tie_embeddings:
            out["lm_head.weight"] = (s.vocab_size, d)
        kind = self._lay()[2]
        for lay in self.layers():
            p, a, x = lay.name, f"{lay.name}.self_attn", f"{lay.name}.mlp.experts"
            out.update({f"{p}.input_layernorm.weight": (d,),
                        f"{p}.post_attention_layernorm.weight": (d,),
                        f"{a}.q_proj.weight": (q, d), f"{a}.k_proj.weight": (kv, d),
                        f"{a}.v_proj.weight": (kv, d), f"{a}.o_proj.weight": (d, q),
                        f"{a}.sinks": (s.num_heads,),
                        f"{p}.mlp.router.weight": (e, d), f"{p}.mlp.router.bias": (e,),
                        f"{x}.gate_up_proj_bias": (e, 2 * f), f"{x}.down_proj_bias": (e, d)})
            if self.attention_bias:
                out.update({f"{a}.q_proj.bias": (q,), f"{a}.k_proj.bias": (kv,),
                            f"{a}.v_proj.bias": (kv,), f"{a}.o_proj.bias": (d,)})
            if kind == "fused":
                out[f"{x}.gate_up_proj"] = (e, d, 2 * f)
                out[f"{x}.down_proj"] = (e, f, d)
            else:
                for i in range(e):
                    out.update({f"{x}.{i}.gate_proj.weight": (f, d),
                                f"{x}.{i}.up_proj.weight": (f, d),
                                f"{x}.{i}.down_proj.weight": (d, f)})
        return out

    def shape_message(self, name: str, got: Sequence[int], want: Sequence[int]) -> str:
        msg = super().shape_message(name, got, want)
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            msg += (f"; an MXFP4 source stores it as {name}_blocks [experts, {want[-1]}, "
                    f"blocks, 16] (32 values per block): its block count x 32 must equal "
                    f"{want[-2]} (hidden_size for gate_up_proj, intermediate_size for down_proj)")
        return msg

    # -- experts ----------------------------------------------------------------------------------
    def read_experts(
        self, layer: LayerSpec, W: WeightSource, experts: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """``{gate, up, down}`` as ``[G, out, in]`` (the fused tensors de-interleaved and
        transposed) and their biases (``expert_biases``)."""
        kind = self._lay(W)[2]
        experts = [int(e) for e in experts]
        if kind != "fused":
            out = super().read_experts(layer, W, experts)
        else:
            s = self.spec
            bad = [e for e in experts if not 0 <= e < s.num_experts]
            if bad:
                raise ValueError(f"experts {bad} of layer {layer.name} do not exist (it has "
                                 f"{s.num_experts} routed experts)")
            d, f, n = s.hidden_size, s.moe_ff, s.num_experts
            p = f"{layer.name}.mlp.experts"
            gu = self._rows(W, f"{p}.gate_up_proj", experts, (n, d, 2 * f))
            dn = self._rows(W, f"{p}.down_proj", experts, (n, f, d))
            out = {"gate": gu[..., 0::2].transpose(1, 2).contiguous(),
                   "up": gu[..., 1::2].transpose(1, 2).contiguous(),
                   "down": dn.transpose(1, 2).contiguous()}
        return {**out, **self.expert_biases(layer, W, experts)}

    def expert_biases(
        self, layer: LayerSpec, W: WeightSource, experts: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        s = self.spec
        p = f"{layer.name}.mlp.experts"
        idx = [int(e) for e in experts]
        gu = self._w(W, f"{p}.gate_up_proj_bias", (s.num_experts, 2 * s.moe_ff))[idx]
        dn = self._w(W, f"{p}.down_proj_bias", (s.num_experts, s.hidden_size))[idx]
        return {"gate_bias": gu[:, 0::2].float(), "up_bias": gu[:, 1::2].float(),
                "down_bias": dn.float()}

    # -- forward ----------------------------------------------------------------------------------
    def _sinks(self, W: WeightSource, p: str) -> torch.Tensor:
        return self._w(W, f"{p}.sinks", (self.spec.num_heads,))

    def _rotate(
        self, q: torch.Tensor, k: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope.cos_sin(state["position_ids"])
        return self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)

    def _router(self, layer: LayerSpec, W: WeightSource) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        return (self._w(W, self.router_name(layer), (s.num_experts, s.hidden_size)),
                self._w(W, f"{layer.name}.mlp.router.bias", (s.num_experts,)))

    def route(
        self,
        layer: LayerSpec,
        W: WeightSource,
        x: torch.Tensor,
        state: State,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of the router's logits (weight and bias), softmax over the k chosen."""
        r, b = self._router(layer, W)
        k = self.spec.top_k
        if keep is not None:
            r, b, k = r[keep], b[keep], min(k, len(keep))
        logits = L.linear(x.to(torch.float32), r, b)
        top = logits.topk(k, dim=-1)
        return top.indices.to(torch.int64), torch.softmax(top.values, dim=-1)

    def router_probs(
        self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State
    ) -> torch.Tensor:
        """The softmax over every expert's logit (the order top-k picks from)."""
        r, b = self._router(layer, W)
        return torch.softmax(L.linear(x.to(torch.float32), r, b), dim=-1)

    def post_moe(self, layer: LayerSpec, W: WeightSource, state: State, y: torch.Tensor) -> State:
        return {**state, "hidden": state["hidden"] + y}


__all__ = ["ClampedSwiGLU", "GptOss"]
