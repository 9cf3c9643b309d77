"""SwitchTransformers (T5 encoder-decoder with top-1 routed experts) as a layer-by-layer family.

Why it is built this way:

* The walk of ``base.run_forward`` knows nothing about encoders and decoders, so this family folds
  the two stacks into *one* sequence of layers (all encoder blocks, then all decoder blocks) and
  *one* state. While the encoder runs, ``state["hidden"]`` is the encoder stream; the first
  decoder block (``_enter_decoder``) applies ``encoder.final_layer_norm``, parks the result in
  ``state["encoder_output"]`` and replaces ``hidden`` by the decoder's embeddings. The decoder's
  cross-attention therefore consumes whatever the walk produced for the encoder: when the
  compressor walks the layers, that is the output of the *compressed* encoder, as in QMoE.
* Every tensor of the state has the batch as its leading dimension (stores split and concatenate
  it). The relative position bias is not batched, so it is not carried: each block recomputes it
  from block 0's small ``relative_attention_bias`` table (a ``[buckets, heads]`` lookup).
* Routing follows transformers 5.23 bit for bit at inference: the router runs in
  ``config.router_dtype`` (float32), no jitter, top-1 by argmax of the softmax, and
  ``expert_capacity`` is enforced *per sequence* in token order (a token whose position among the
  tokens of its sequence routed to the same expert exceeds the capacity is dropped: ``idx = -1``,
  it passes through the residual). The gate is the top-1 probability. transformers stores but does
  not use ``router_ignore_padding_tokens``; we do the same (padding competes for capacity), so our
  outputs keep matching the oracle.
* Logits follow transformers: with tied embeddings the decoder output is scaled by
  ``d_model ** -0.5`` before the (shared) LM head. Untied checkpoints (``tie_word_embeddings``
  false) written by transformers 5.x hold separate ``encoder.embed_tokens`` /
  ``decoder.embed_tokens`` tables and an unscaled ``lm_head``; each stack uses its own table when
  present, ``shared`` otherwise.
* Hessian masking (QMoE section 5): sentinel tokens (T5's ``<extra_id_*>``) and padding are kept
  out of the Hessians; every token still flows through the model.

Checkpoint layouts: transformers writes one tensor per expert
(``....mlp.experts.expert_{e}.wi.weight``; 5.x holds Switch's experts per expert in memory too, so
``save_original_format=False`` writes the same names). Fused 3-D tensors (``....mlp.experts.wi``
``[E, d_ff, d_model]``, ``....mlp.experts.wo`` ``[E, d_model, d_ff]``) are read as well. Unlike
the decoder families nothing here depends on a guessed layout: the router has one name,
``source_expert_names`` lists both layouts' names and ``read_experts`` looks in the weights it is
given. ``bind`` resolves the layout from the tensor names all the same, for the manifest's record
(``expert_layout``) and to refuse a checkpoint that holds the experts under neither layout.

Config sizes are checked against the bounds of ``qmoe_ray.models.base`` before anything is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qmoe_ray.errors import CheckpointError, MissingTensorError
from qmoe_ray.models.base import (
    MAX_EXPERTS,
    MAX_FF,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_TOTAL_EXPERTS,
    MAX_VOCAB,
    ExpertSpec,
    LayerSpec,
    MoEFamily,
    State,
    WeightSource,
    config_float,
    config_int,
    relu_hidden,
)

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
}

#: Config fields every Switch config.json must carry (no sensible default exists for them), with
#: their upper bounds (``qmoe_ray.models.base``).
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
        return _ACTIVATIONS[self.act](x @ w[self.role].T)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
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


class SwitchTransformers(MoEFamily):
    """The ``switch_transformers`` family (google/switch-base-*, switch-large-128, switch-c-2048).

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
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"config.json dense_act_fn {act!r} is not supported; supported: "
                f"{', '.join(sorted(_ACTIVATIONS))}"
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
        if n_moe * self.num_experts > MAX_TOTAL_EXPERTS:
            raise CheckpointError(
                f"config.json: {n_moe} MoE blocks x {self.num_experts} experts = "
                f"{n_moe * self.num_experts} routed experts, above qmoe-ray's bound of "
                f"{MAX_TOTAL_EXPERTS} (far above any released model): the config is corrupt"
            )
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

    def bind(self, names: Any) -> SwitchTransformers:
        """Resolve the expert layout from tensor names (a list, a set or a ``WeightSource``):
        ``"per-expert"`` (``experts.expert_{e}.wi.weight``, transformers' own), ``"fused"`` (3-D
        ``experts.wi`` / ``experts.wo``), or ``"mixed"`` when MoE blocks differ (``read_experts``
        reads each block's own layout).

        Returns:
            self.

        Raises:
            KeyError: an MoE block's experts are under neither layout (names the block).
        """
        if isinstance(names, (list, tuple, set, frozenset)):
            names = set(names)
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

    # -- the forward walk ----------------------------------------------------------------------
    def embed(self, W: WeightSource, inputs: Mapping[str, torch.Tensor]) -> State:
        """Encoder embeddings plus the token tensors the later blocks need.

        ``inputs``: ``input_ids`` int64 ``[B, S_enc]`` (required), ``attention_mask``,
        ``decoder_input_ids`` ``[B, S_dec]`` (else made from ``labels`` shifted right, as
        transformers does), ``decoder_attention_mask``.

        Raises:
            KeyError: ``input_ids`` is missing, or both ``decoder_input_ids`` and ``labels`` are.
            ValueError: a tensor has the wrong rank/shape or token ids outside the vocabulary.
        """
        if "input_ids" not in inputs:
            raise KeyError("inputs need 'input_ids' (int64 [B, S_enc]) for the encoder")
        ids = self._ids(inputs["input_ids"], "input_ids")
        if "decoder_input_ids" in inputs:
            dec = self._ids(inputs["decoder_input_ids"], "decoder_input_ids")
        elif "labels" in inputs:
            dec = self.shift_right(self._labels(inputs["labels"]))
        else:
            raise KeyError(
                "inputs need 'decoder_input_ids' or 'labels' (int64 [B, S_dec]) for the decoder"
            )
        if dec.shape[0] != ids.shape[0]:
            raise ValueError(
                f"decoder_input_ids batch {dec.shape[0]} != input_ids batch {ids.shape[0]}"
            )
        mask = self._mask(inputs.get("attention_mask"), ids, "attention_mask")
        dmask = self._mask(inputs.get("decoder_attention_mask"), dec, "decoder_attention_mask")
        return {
            "hidden": self._embedding(W, "encoder")[ids],
            "input_ids": ids,
            "attention_mask": mask,
            "decoder_input_ids": dec,
            "decoder_attention_mask": dmask,
        }

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs from labels: start token first, -100 replaced by the pad id."""
        dec = torch.full_like(labels, self.decoder_start_token_id)
        dec[:, 1:] = labels[:, :-1]
        return dec.masked_fill(dec == -100, self.pad_token_id)

    def dense_block(self, layer: LayerSpec, W: WeightSource, state: State) -> State:
        """Attention(s) and the dense ReLU feed-forward of a non-MoE block."""
        state, x = self._pre_ff(layer, W, state)
        ff = f"{self._ff(layer)}.mlp"
        wi = _get(W, f"{ff}.wi.weight", (self.d_ff, self.d_model), self._cfg_hint("dense wi"))
        wo = _get(W, f"{ff}.wo.weight", (self.d_model, self.d_ff), self._cfg_hint("dense wo"))
        y = _ACTIVATIONS[self.act](x @ wi.T) @ wo.T
        state["hidden"] = state["hidden"] + y
        return state

    def pre_moe(
        self, layer: LayerSpec, W: WeightSource, state: State
    ) -> tuple[State, torch.Tensor]:
        """Self-attention (and cross-attention in the decoder), then the FF layer norm."""
        self._check_moe(layer)
        return self._pre_ff(layer, W, state)

    def _pre_ff(
        self, layer: LayerSpec, W: WeightSource, state: State
    ) -> tuple[State, torch.Tensor]:
        """The block up to its feed-forward input, dense or sparse (see ``pre_moe``)."""
        state = dict(state)
        if layer.stage == "decoder" and "encoder_output" not in state:
            self._enter_decoder(W, state)
        elif layer.stage == "encoder" and "encoder_output" in state:
            raise ValueError(
                f"{layer.name} got a state that already left the encoder; run the layers in "
                "the order of layers()"
            )
        h = state["hidden"]
        p = layer.name
        if layer.stage == "encoder":
            self_mask = state["attention_mask"][:, None, None, :]
        else:
            s = h.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool).tril()
            self_mask = causal[None, None] & state["decoder_attention_mask"][:, None, None, :]
        bias = self._position_bias(W, layer.stage, h.shape[1])
        h = h + self._attention(
            W,
            f"{p}.layer.0.SelfAttention",
            self._norm(W, f"{p}.layer.0.layer_norm", h),
            h=None,
            bias=bias,
            allowed=self_mask,
        )
        if layer.stage == "decoder":
            enc = state["encoder_output"]
            cross_mask = state["attention_mask"][:, None, None, :]
            h = h + self._attention(
                W,
                f"{p}.layer.1.EncDecAttention",
                self._norm(W, f"{p}.layer.1.layer_norm", h),
                h=enc,
                bias=None,
                allowed=cross_mask,
            )
        state["hidden"] = h
        return state, self._norm(W, f"{self._ff(layer)}.layer_norm", h)

    def route(
        self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 routing with per-sequence expert capacity, as transformers does at inference.

        Returns:
            ``idx`` int64 ``[B, S, 1]`` (-1 where the expert was over capacity) and ``gate``
            float32 ``[B, S, 1]`` (the top-1 router probability).
        """
        self._check_moe(layer)
        name = self.router_name(layer)
        w = _get(W, name, (self.num_experts, self.d_model), self._cfg_hint("router"))
        logits = x.to(self.router_dtype) @ w.to(self.router_dtype).T
        if self.router_bias:
            b = _get(W, name[: -len("weight")] + "bias", (self.num_experts,), "router_bias=true")
            logits = logits + b.to(self.router_dtype)
        probs = torch.softmax(logits, dim=-1, dtype=self.router_dtype).to(torch.float32)
        gate, idx = probs.max(dim=-1)
        # Per sequence, the n-th token (in order) sent to an expert has priority n; over capacity
        # -> dropped. (idx from max equals argmax's first maximum, as in the reference.)
        onehot = F.one_hot(idx, self.num_experts)
        priority = (onehot.cumsum(dim=1) * onehot).sum(-1)
        idx = torch.where(priority <= self.expert_capacity, idx, torch.full_like(idx, -1))
        return idx[..., None], gate[..., None]

    def post_moe(self, layer: LayerSpec, W: WeightSource, state: State, y: torch.Tensor) -> State:
        """Residual add of the routed experts' output (dropped tokens contribute nothing)."""
        state = dict(state)
        state["hidden"] = state["hidden"] + y.to(state["hidden"].dtype)
        return state

    def logits(self, W: WeightSource, state: State) -> torch.Tensor:
        """Decoder final norm, the ``d_model**-0.5`` rescale when tied, LM head -> float32."""
        if "encoder_output" not in state:
            raise ValueError("logits need a state that went through the decoder blocks")
        h = self._norm(W, "decoder.final_layer_norm", state["hidden"])
        if self.tied:
            head = self._embedding(W)
            h = h * self.d_model**-0.5
        else:
            head = _get(
                W, "lm_head.weight", (self.vocab_size, self.d_model), self._cfg_hint("lm_head")
            )
        return (h @ head.T).to(torch.float32)

    def loss_terms(
        self, logits: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        """Sum of cross-entropies over ``labels != -100`` and their count (transformers' mean =
        sum / count).

        Raises:
            KeyError: ``labels`` missing. ValueError: labels' shape differs from the logits'.
        """
        if "labels" not in inputs:
            raise KeyError("inputs need 'labels' (int64 [B, S_dec], -100 = ignore) for the loss")
        labels = self._labels(inputs["labels"])
        if tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != the logits' [B, S_dec] "
                f"{tuple(logits.shape[:2])}"
            )
        keep = labels != -100
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return total, int(keep.sum())

    def token_mask(self, layer: LayerSpec, state: State) -> torch.Tensor:
        """``attention_mask`` in the encoder, ``decoder_attention_mask`` in the decoder."""
        key = "attention_mask" if layer.stage == "encoder" else "decoder_attention_mask"
        return state[key].to(torch.bool)

    def hessian_mask(self, layer: LayerSpec, state: State) -> torch.Tensor:
        """Real tokens that are neither sentinels (``<extra_id_*>``) nor padding (QMoE sec. 5).

        The decoder's start token is the pad id, so it is masked as well.
        """
        ids = state["input_ids" if layer.stage == "encoder" else "decoder_input_ids"]
        special = (ids >= self.first_sentinel_id) | (ids == self.pad_token_id)
        return self.token_mask(layer, state) & ~special

    # -- pieces ---------------------------------------------------------------------------------
    def _enter_decoder(self, W: WeightSource, state: State) -> None:
        """Encoder -> decoder transition (in place on a fresh dict): final encoder norm, then the
        decoder embeddings become the stream."""
        state["encoder_output"] = self._norm(W, "encoder.final_layer_norm", state["hidden"])
        state["hidden"] = self._embedding(W, "decoder")[state["decoder_input_ids"]]

    def _embedding(self, W: WeightSource, stack: str | None = None) -> torch.Tensor:
        """A stack's token embedding: its own ``{stack}.embed_tokens`` when the checkpoint has one
        (untied checkpoints give each stack its own table), else ``shared``."""
        names = ([f"{stack}.embed_tokens.weight"] if stack else []) + ["shared.weight"]
        for name in names:
            if name in W:
                return _get(W, name, (self.vocab_size, self.d_model), self._cfg_hint("embedding"))
        raise MissingTensorError(
            f"checkpoint has no token embedding ({' or '.join(names)}); "
            "is this a SwitchTransformersForConditionalGeneration checkpoint?"
        )

    def _norm(self, W: WeightSource, prefix: str, x: torch.Tensor) -> torch.Tensor:
        w = _get(W, f"{prefix}.weight", (self.d_model,), self._cfg_hint("layer norm"))
        return _rms_norm(x, w, self.eps)

    def _position_bias(self, W: WeightSource, stage: str, s: int) -> torch.Tensor:
        """``[1, H, S, S]`` from block 0's table (shared by every block of the stack)."""
        table = _get(
            W,
            f"{stage}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (self.num_buckets, self.num_heads),
            self._cfg_hint("relative_attention_num_buckets x num_heads"),
        )
        pos = torch.arange(s)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], stage == "encoder", self.num_buckets, self.max_distance
        )
        return table[buckets].permute(2, 0, 1)[None]

    def _attention(
        self,
        W: WeightSource,
        prefix: str,
        x: torch.Tensor,
        h: torch.Tensor | None,
        bias: torch.Tensor | None,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """T5 attention: unscaled dot products plus position bias; ``h`` is the key/value source
        (None: self-attention); ``allowed`` bool broadcastable to ``[B, H, Sq, Sk]``."""
        inner = self.num_heads * self.d_kv
        hint = self._cfg_hint("attention is [num_heads*d_kv, d_model]")
        wq, wk, wv = (_get(W, f"{prefix}.{n}.weight", (inner, self.d_model), hint) for n in "qkv")
        wo = _get(W, f"{prefix}.o.weight", (self.d_model, inner), hint)
        kv = x if h is None else h
        b, sq, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

        q, k, v = heads(x @ wq.T), heads(kv @ wk.T), heads(kv @ wv.T)
        scores = q @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        ctx = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        return ctx.transpose(1, 2).reshape(b, sq, inner) @ wo.T

    def _ids(self, t: torch.Tensor, name: str) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dim() != 2 or t.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be an integer tensor [B, S]; got {t.dtype} {tuple(t.shape)}"
            )
        t = t.to(torch.int64)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
            raise ValueError(
                f"{name} has token ids outside [0, {self.vocab_size}) (vocab_size of config.json); "
                "was it tokenized with this model's tokenizer?"
            )
        return t

    def _labels(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dim() != 2 or t.dtype.is_floating_point:
            raise ValueError(
                f"labels must be an integer tensor [B, S]; got {t.dtype} {tuple(t.shape)}"
            )
        t = t.to(torch.int64)
        bad = (t != -100) & ((t < 0) | (t >= self.vocab_size))
        if bool(bad.any()):
            raise ValueError(f"labels must be -100 or token ids in [0, {self.vocab_size})")
        return t

    @staticmethod
    def _mask(m: torch.Tensor | None, ids: torch.Tensor, name: str) -> torch.Tensor:
        if m is None:
            return torch.ones_like(ids, dtype=torch.bool)
        m = torch.as_tensor(m)
        if tuple(m.shape) != tuple(ids.shape):
            raise ValueError(
                f"{name} shape {tuple(m.shape)} != its token ids' shape {tuple(ids.shape)}"
            )
        return m.to(torch.bool)


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
