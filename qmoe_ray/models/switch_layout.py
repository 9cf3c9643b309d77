"""SwitchTransformers' config, blocks, tensor names and expert layout (``SwitchLayout``, the base
class of ``qmoe_ray.models.switch.SwitchTransformers``, which adds the forward).

Checkpoint layouts: transformers writes one tensor per expert
(``....mlp.experts.expert_{e}.wi.weight``; 5.x holds Switch's experts per expert in memory too, so
``save_original_format=False`` writes the same names). Fused 3-D tensors (``....mlp.experts.wi``
``[E, d_ff, d_model]``, ``....mlp.experts.wo`` ``[E, d_model, d_ff]``) are read as well. Unlike
the decoder families nothing here depends on a guessed layout: the router has one name,
``source_expert_names`` lists both layouts' names and ``read_experts`` looks in the weights it is
given. ``bind`` resolves the layout from the tensor names all the same, for the manifest's record
(``expert_layout``) and to refuse a checkpoint that holds the experts under neither layout.

Config sizes are checked against the bounds of ``qmoe_ray.models.config`` before anything is
built. ``expected_shapes`` lists every tensor the forward reads (the embedding table each stack
uses, attention, norms, position-bias tables, dense feed-forwards, routers, the experts as stored,
``lm_head`` when untied), so ``check_weights`` refuses a source from its index alone, naming the
missing or mis-shaped tensor, as for the decoder families.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qmoe_ray.errors import CheckpointError, MissingTensorError
from qmoe_ray.models import layers as L
from qmoe_ray.models.base import (
    ExpertSpec,
    LayerSpec,
    MoEFamily,
    WeightSource,
    name_lookup,
    relu_hidden,
)
from qmoe_ray.models.config import (
    MAX_EXPERTS,
    MAX_FF,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    check_total_experts,
    config_float,
    config_int,
)

#: Config fields every Switch config.json must carry (no sensible default exists for them), with
#: their upper bounds (``qmoe_ray.models.config``).
_REQUIRED = {
    "vocab_size": MAX_VOCAB,
    "d_model": MAX_HIDDEN,
    "d_kv": MAX_HEAD_DIM,
    "d_ff": MAX_FF,
    "num_layers": MAX_LAYERS,
    "num_heads": MAX_HEADS,
    "relative_attention_num_buckets": MAX_HEAD_DIM,
}
_EXPERT_FIELDS = {"num_experts": MAX_EXPERTS, "expert_capacity": MAX_POSITIONS}

#: Every released Switch/T5 checkpoint: 32000 SentencePiece pieces, then the 100 ``<extra_id_*>``
#: sentinels (ids 32000..32099), then 28 never-used rows padding the table to a multiple of 128.
_T5_VOCAB = 32128
_T5_FIRST_SENTINEL = 32000
_NUM_SENTINELS = 100

@dataclass(frozen=True)
class ActHidden:
    """``h = act(x W_role^T)`` for a named activation (picklable, unlike a closure)."""

    role: str
    act: str

    def __call__(self, w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return L.ACTIVATIONS[self.act](x @ w[self.role].T)


class SwitchLayout(MoEFamily):
    """The ``switch_transformers`` family's config, blocks, names and layout (the forward is
    ``SwitchTransformers``'; google/switch-base-*, switch-large-128, switch-c-2048).

    Args:
        config: the parsed ``config.json``.
        first_sentinel_id: lowest sentinel token id masked out of Hessians (default: 32000 for the
            standard 32128-row T5 vocabulary, else ``vocab_size - 100``).

    Raises:
        ValueError: a required field (model shape or ``num_experts`` / ``expert_capacity``) is
            missing or invalid.
        CheckpointError (a ``ValueError``): a size is not an integer or out of bounds.
    """

    model_type = "switch_transformers"
    expert_spec = ExpertSpec(in_roles=("wi",), out_roles=("wo",), hidden=relu_hidden("wi"))
    source_roles = {"wi": "wi", "wo": "wo"}  # transformers' own names are the canonical ones

    def __init__(self, config: Mapping[str, Any], first_sentinel_id: int | None = None):
        super().__init__(config)
        c = self.config
        if c.get("model_type", self.model_type) != self.model_type:
            raise ValueError(
                f"config.json model_type {c.get('model_type')!r} is not {self.model_type!r}; "
                "use qmoe_ray.models.get_family(config) to pick the family"
            )
        for key, hi in _REQUIRED.items():
            _positive_int(c, key, "config.json of a SwitchTransformers checkpoint", hi)
        for key, hi in _EXPERT_FIELDS.items():
            _positive_int(
                c,
                key,
                "a SwitchTransformers config.json (expert field; is this a dense T5 checkpoint? "
                "only MoE checkpoints can be compressed)",
                hi,
            )
        self.vocab_size = int(c["vocab_size"])
        self.d_model = int(c["d_model"])
        self.d_kv = int(c["d_kv"])
        self.d_ff = int(c["d_ff"])
        self.num_heads = int(c["num_heads"])
        self.num_experts = int(c["num_experts"])
        self.expert_capacity = int(c["expert_capacity"])
        self.num_buckets = int(c["relative_attention_num_buckets"])
        self.max_distance = config_int(
            c, "relative_attention_max_distance", MAX_POSITIONS, default=128
        )
        self.eps = config_float(c, "layer_norm_epsilon", 1e-6)
        self.tied = bool(c.get("tie_word_embeddings", True))
        self.router_bias = bool(c.get("router_bias", False))
        self.pad_token_id = config_int(c, "pad_token_id", MAX_VOCAB, lo=0, default=0)
        self.decoder_start_token_id = config_int(
            c, "decoder_start_token_id", MAX_VOCAB, lo=0, default=self.pad_token_id
        )
        dtype_name = c.get("router_dtype", "float32")
        if dtype_name not in ("float32", "float16", "bfloat16"):
            raise ValueError(
                f"config.json router_dtype {dtype_name!r} is not one of float32/float16/bfloat16"
            )
        self.router_dtype = getattr(torch, dtype_name)
        act = c.get("dense_act_fn", "relu")
        if act not in L.ACTIVATIONS:
            raise ValueError(
                f"config.json dense_act_fn {act!r} is not supported; supported: "
                f"{', '.join(sorted(L.ACTIVATIONS))}"
            )
        self.act = act
        if act != "relu":
            # Instance attribute shadows the class default (ReLU, the original Switch models).
            self.expert_spec = ExpertSpec(("wi",), ("wo",), ActHidden("wi", act))
        self.num_encoder_layers = int(c["num_layers"])
        self.num_decoder_layers = config_int(
            c, "num_decoder_layers", MAX_LAYERS, lo=0, default=self.num_encoder_layers
        )
        self.encoder_sparse_step = _sparse_step(c, "encoder", self.num_encoder_layers)
        self.decoder_sparse_step = _sparse_step(c, "decoder", self.num_decoder_layers)
        if first_sentinel_id is None:
            first_sentinel_id = (
                _T5_FIRST_SENTINEL
                if self.vocab_size == _T5_VOCAB
                else max(self.vocab_size - _NUM_SENTINELS, 0)
            )
        self.first_sentinel_id = int(first_sentinel_id)
        self._layers = self._build_layers()
        n_moe = sum(lay.moe for lay in self._layers)
        check_total_experts(n_moe, self.num_experts, "blocks")
        self._layout: str | None = None
        self._role_layouts: dict[tuple[int, str], str] = {}  # (layer index, role) -> layout
        self._tables: dict[str, str] = {}  # stack -> the embedding table it reads

    # -- layout --------------------------------------------------------------------------------
    def _build_layers(self) -> list[LayerSpec]:
        out: list[LayerSpec] = []
        for stage, n, step in (
            ("encoder", self.num_encoder_layers, self.encoder_sparse_step),
            ("decoder", self.num_decoder_layers, self.decoder_sparse_step),
        ):
            for i in range(n):
                # transformers' rule (SwitchTransformersStack): sparse when i % step == 1 or
                # step == 1, so with step 2 the odd blocks are sparse.
                moe = step > 0 and (i % step == 1 or step == 1)
                out.append(
                    LayerSpec(
                        index=len(out),
                        name=f"{stage}.block.{i}",
                        stage=stage,
                        block=i,
                        moe=moe,
                        num_experts=self.num_experts if moe else 0,
                        top_k=1 if moe else 0,
                    )
                )
        return out

    def layers(self) -> list[LayerSpec]:
        """Encoder blocks ``encoder.block.{i}``, then decoder blocks ``decoder.block.{i}``."""
        return list(self._layers)

    @staticmethod
    def _ff(layer: LayerSpec) -> str:
        """Prefix of the block's feed-forward sub-layer (after self- and cross-attention)."""
        return f"{layer.name}.layer.{1 if layer.stage == 'encoder' else 2}"

    def _check_moe(self, layer: LayerSpec) -> None:
        if not layer.moe:
            raise ValueError(f"layer {layer.name} is a dense block; it has no experts or router")

    def expert_names(self, layer: LayerSpec, expert: int) -> dict[str, str]:
        """``{"wi": ...experts.expert_{e}.wi.weight, "wo": ...}`` (transformers' own names)."""
        self._check_moe(layer)
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"expert {expert} out of range for {layer.name} (num_experts={self.num_experts})"
            )
        base = f"{self._ff(layer)}.mlp.experts.expert_{expert}"
        return {role: f"{base}.{role}.weight" for role in self.expert_spec.roles}

    def _fused_names(self, layer: LayerSpec) -> dict[str, str]:
        return {role: f"{self._ff(layer)}.mlp.experts.{role}" for role in self.expert_spec.roles}

    def source_expert_names(
        self, layer: LayerSpec, available: Sequence[str] | None = None
    ) -> list[str]:
        """Names holding this layer's experts, in both layouts (per-expert and fused 3-D).

        Args:
            layer: an MoE layer.
            available: if given, keep only the names present in it (the checkpoint's list).

        Returns:
            Per-expert names followed by the fused names; a checkpoint holds one of the two.
        """
        self._check_moe(layer)
        names = [n for e in range(self.num_experts) for n in self.expert_names(layer, e).values()]
        names += list(self._fused_names(layer).values())
        if available is not None:
            have = set(available)
            names = [n for n in names if n in have]
        return names

    def bind(self, names: Any) -> SwitchLayout:
        """Resolve the expert layout from tensor names (a list, a set or a ``WeightSource``):
        ``"per-expert"`` (``experts.expert_{e}.wi.weight``, transformers' own), ``"fused"`` (3-D
        ``experts.wi`` / ``experts.wo``), or ``"mixed"`` when MoE blocks differ (``read_experts``
        reads each block's own layout).

        Returns:
            self.

        Raises:
            KeyError: an MoE block's experts are under neither layout (names the block).
        """
        names = name_lookup(names)
        roles: dict[tuple[int, str], str] = {}
        for lay in self._layers:
            if not lay.moe:
                continue
            per, fused = self.expert_names(lay, 0), self._fused_names(lay)
            if per["wi"] not in names and fused["wi"] not in names:
                raise MissingTensorError(
                    f"no expert weights of {lay.name} found (tried {per['wi']}, {fused['wi']}); "
                    f"is this a {self.model_type} checkpoint?"
                )
            for role in self.expert_spec.roles:  # as read_experts reads each role
                kind = "per-expert" if per[role] in names or fused[role] not in names else "fused"
                roles[lay.index, role] = kind
        kinds = {roles[lay.index, "wi"] for lay in self._layers if lay.moe}
        self._layout = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "per-expert")
        self._role_layouts = roles
        self._tables = {
            stack: (own if own in names else "shared.weight")
            for stack, own in (("encoder", "encoder.embed_tokens.weight"),
                               ("decoder", "decoder.embed_tokens.weight"))
        }
        return self

    @property
    def expert_layout(self) -> str:
        """``"per-expert"``, ``"fused"`` or ``"mixed"`` (see ``bind``).

        Raises:
            RuntimeError: no layout is bound.
        """
        if self._layout is None:
            raise RuntimeError(
                "the expert layout of this switch_transformers family is not bound: build it "
                "with get_family(config, names) (or call bind(names))"
            )
        return self._layout

    def router_name(self, layer: LayerSpec) -> str:
        """``{block}.layer.{1|2}.mlp.router.classifier.weight``."""
        self._check_moe(layer)
        return f"{self._ff(layer)}.mlp.router.classifier.weight"

    def read_experts(
        self, layer: LayerSpec, W: WeightSource, experts: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """``{"wi": [G, d_ff, d_model], "wo": [G, d_model, d_ff]}`` float32.

        Raises:
            ValueError: an expert id is out of range or a tensor's shape disagrees with config.json.
            KeyError: neither the per-expert nor the fused tensors are in the checkpoint.
        """
        self._check_moe(layer)
        experts = [int(e) for e in experts]
        for e in experts:
            if not 0 <= e < self.num_experts:
                raise ValueError(
                    f"expert {e} out of range for {layer.name} (num_experts={self.num_experts})"
                )
        shapes = {"wi": (self.d_ff, self.d_model), "wo": (self.d_model, self.d_ff)}
        fused = self._fused_names(layer)
        per0 = self.expert_names(layer, 0)
        out: dict[str, torch.Tensor] = {}
        for role, shape in shapes.items():
            if per0[role] in W or fused[role] not in W:
                mats = [
                    _get(W, self.expert_names(layer, e)[role], shape, self._cfg_hint(role))
                    for e in experts
                ]
                out[role] = (
                    torch.stack(mats) if mats else torch.empty((0, *shape), dtype=torch.float32)
                )
            else:
                full = _get(W, fused[role], (self.num_experts, *shape), self._cfg_hint(role))
                out[role] = full[experts].float().contiguous()
        return out

    def _cfg_hint(self, what: str) -> str:
        return (
            f"config.json says d_model={self.d_model}, d_ff={self.d_ff}, d_kv={self.d_kv}, "
            f"num_heads={self.num_heads}, num_experts={self.num_experts}, "
            f"vocab_size={self.vocab_size} ({what})"
        )

    def shape_message(self, name: str, got: Sequence[int], want: Sequence[int]) -> str:
        return (
            f"tensor {name!r} has shape {list(got)} but config.json implies {list(want)} "
            f"({self._cfg_hint('tensor shapes')}); the config.json does not match the weights"
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward reads (source names, bound layout) with its shape per config:
        the embedding table(s) each stack reads, attention, layer norms, the position-bias table
        of each stack's block 0, dense feed-forwards, routers (and their biases with
        ``router_bias``), the experts as stored (per expert or fused 3-D), the final norms and,
        untied, ``lm_head``.

        Raises:
            RuntimeError: no layout is bound (``bind`` first).
        """
        _ = self.expert_layout  # raises RuntimeError when no layout is bound
        d, ff, E = self.d_model, self.d_ff, self.num_experts
        inner = self.num_heads * self.d_kv
        emb = (self.vocab_size, d)
        out: dict[str, tuple[int, ...]] = {}
        for stack, n in (("encoder", self.num_encoder_layers), ("decoder", self.num_decoder_layers)):
            out[self._tables[stack]] = emb
            if n:
                bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                out[bias] = (self.num_buckets, self.num_heads)
            out[f"{stack}.final_layer_norm.weight"] = (d,)
        if self.tied:
            out["shared.weight"] = emb  # the LM head
        else:
            out["lm_head.weight"] = emb

        def attention(prefix: str) -> None:
            out.update({f"{prefix}.{n}.weight": (inner, d) for n in "qkv"})
            out[f"{prefix}.o.weight"] = (d, inner)

        for lay in self._layers:
            p = lay.name
            out[f"{p}.layer.0.layer_norm.weight"] = (d,)
            attention(f"{p}.layer.0.SelfAttention")
            if lay.stage == "decoder":
                out[f"{p}.layer.1.layer_norm.weight"] = (d,)
                attention(f"{p}.layer.1.EncDecAttention")
            f = self._ff(lay)
            out[f"{f}.layer_norm.weight"] = (d,)
            if not lay.moe:
                out[f"{f}.mlp.wi.weight"] = (ff, d)
                out[f"{f}.mlp.wo.weight"] = (d, ff)
                continue
            router = self.router_name(lay)
            out[router] = (E, d)
            if self.router_bias:
                out[router[: -len("weight")] + "bias"] = (E,)
            fused = self._fused_names(lay)
            for role, shape in (("wi", (ff, d)), ("wo", (d, ff))):
                if self._role_layouts[lay.index, role] == "fused":
                    out[fused[role]] = (E, *shape)
                else:
                    out.update({self.expert_names(lay, e)[role]: shape for e in range(E)})
        return out


def _positive_int(c: Mapping[str, Any], key: str, where: str, hi: int) -> None:
    """Check ``c[key]`` is present and an integer in ``1..hi``.

    Raises:
        ValueError: absent. CheckpointError: not a positive integer within the bound.
    """
    if c.get(key) is None:
        raise ValueError(f"{where} lacks the field {key!r}; add it to config.json")
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        shown = repr(v) if len(repr(v)) <= 40 else f"a {type(v).__name__}"
        raise CheckpointError(f"config.json field {key!r} must be a positive integer, got {shown}")
    config_int(c, key, hi)


def _sparse_step(c: Mapping[str, Any], stack: str, n_layers: int) -> int:
    """``{stack}_sparse_step`` as transformers resolves it: the saved field wins (even over a
    disagreeing ``num_sparse_{stack}_layers``); absent, it is derived from that count."""
    key = f"{stack}_sparse_step"
    if c.get(key) is None:
        if c.get(f"num_sparse_{stack}_layers") is None:
            raise ValueError(
                f"config.json lacks both '{stack}_sparse_step' and 'num_sparse_{stack}_layers'; "
                f"add one (e.g. '{stack}_sparse_step': 2 for the released Switch models)"
            )
        n_sparse = config_int(c, f"num_sparse_{stack}_layers", MAX_LAYERS, lo=0)
        return n_layers // n_sparse if n_sparse > 0 else n_layers
    return config_int(c, key, MAX_LAYERS, lo=0)


def _get(W: WeightSource, name: str, shape: tuple[int, ...], hint: str) -> torch.Tensor:
    """``W(name)`` as float32, checked against the shape config.json implies."""
    t = W(name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}: {hint}. "
            "Check that config.json belongs to this checkpoint."
        )
    return t.to(torch.float32)
