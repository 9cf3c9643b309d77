"""SwitchTransformers (T5 encoder-decoder with top-1 routed experts) as a layer-by-layer family.

Why it is built this way:

* The walk (``base.walk_layers``) knows nothing about encoders and decoders, so this family folds
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

The config, the blocks, the tensor names and the expert layout are ``switch_layout``'s
(``SwitchLayout``, this family's base class); the T5 pieces (layer norm, relative position bias,
attention, the capacity router) are ``qmoe_ray.models.layers``'.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from qmoe_ray.errors import MissingTensorError
from qmoe_ray.models import layers as L
from qmoe_ray.models.base import LayerSpec, State, WeightSource
from qmoe_ray.models.layers import relative_position_bucket  # noqa: F401 - re-exported
from qmoe_ray.models.switch_layout import ActHidden, SwitchLayout, _get

__all__ = ["ActHidden", "SwitchTransformers", "relative_position_bucket"]


class SwitchTransformers(SwitchLayout):
    """The ``switch_transformers`` family: ``SwitchLayout``'s config, blocks and names, and the
    encoder-decoder forward folded into one walk (see the module doc).

    Args:
        config: the parsed ``config.json``.
        first_sentinel_id: lowest sentinel token id masked out of Hessians (default: 32000 for the
            standard 32128-row T5 vocabulary, else ``vocab_size - 100``).

    Raises:
        ValueError: a required field (model shape or ``num_experts`` / ``expert_capacity``) is
            missing or invalid.
        CheckpointError (a ``ValueError``): a size is not an integer or out of bounds.
    """

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
        y = L.ACTIVATIONS[self.act](x @ wi.T) @ wo.T
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
        self,
        layer: LayerSpec,
        W: WeightSource,
        x: torch.Tensor,
        state: State,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 routing with per-sequence expert capacity, as transformers does at inference
        (``keep``: over those experts' router rows only, the capacity unchanged).

        Returns:
            ``idx`` int64 ``[B, S, 1]`` (-1 where the expert was over capacity) and ``gate``
            float32 ``[B, S, 1]`` (the top-1 router probability).
        """
        w, b = self._router(layer, W)
        if keep is not None:
            w, b = w[keep], None if b is None else b[keep]
        return L.top1_capacity_router(x, w, b, self.router_dtype, self.expert_capacity)

    def router_probs(
        self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State
    ) -> torch.Tensor:
        """The router's softmax over every expert, in ``router_dtype`` as ``route`` computes it."""
        w, b = self._router(layer, W)
        logits = x.to(self.router_dtype) @ w.to(self.router_dtype).T
        if b is not None:
            logits = logits + b.to(self.router_dtype)
        return torch.softmax(logits, dim=-1, dtype=self.router_dtype).to(torch.float32)

    def block_droppable(self, layer: LayerSpec) -> bool:
        """Not block 0 of either stack: it holds the stack's relative attention bias."""
        return layer.block != 0

    def _router(self, layer: LayerSpec, W: WeightSource) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_moe(layer)
        name = self.router_name(layer)
        w = _get(W, name, (self.num_experts, self.d_model), self._cfg_hint("router"))
        b = None
        if self.router_bias:
            b = _get(W, name[: -len("weight")] + "bias", (self.num_experts,), "router_bias=true")
        return w, b

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
        return L.t5_layer_norm(x, w, self.eps)

    def _position_bias(self, W: WeightSource, stage: str, s: int) -> torch.Tensor:
        """``[1, H, S, S]`` from block 0's table (shared by every block of the stack)."""
        table = _get(
            W,
            f"{stage}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (self.num_buckets, self.num_heads),
            self._cfg_hint("relative_attention_num_buckets x num_heads"),
        )
        return L.t5_position_bias(table, s, stage == "encoder", self.max_distance)

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
        return L.t5_attention(x, kv, wq, wk, wv, wo, self.num_heads, bias, allowed)

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
