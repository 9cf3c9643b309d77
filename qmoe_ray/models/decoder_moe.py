"""Decoder-only MoE families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

Why one base class: the four share the block (pre-norm RMSNorm, RoPE attention with grouped KV
heads, top-k softmax router, SwiGLU experts) and differ in a handful of switches, collected in a
frozen ``DecoderSpec`` parsed from ``config.json``:

=========  =========  ============  =========  ================  =============================
family     q/k norm   renorm top-k  shared     dense blocks      source expert tensors
=========  =========  ============  =========  ================  =============================
mixtral    none       always        no         none              ``block_sparse_moe.experts.{e}``
                                                                 ``.w1/.w3/.w2`` (gate/up/down)
qwen2_moe  none       config flag   gated      sparse_step/only  ``mlp.experts.{e}.gate_proj/..``
qwen3_moe  per head   config flag   no         sparse_step/only  ``mlp.experts.{e}.gate_proj/..``
olmoe      full proj  config flag   no         none              ``mlp.experts.{e}.gate_proj/..``
=========  =========  ============  =========  ================  =============================

Attention biases are taken when the checkpoint has them (Qwen2's q/k/v biases), so older configs
without ``qkv_bias`` still load. transformers 5.x holds experts *fused* in memory
(``mlp.experts.gate_up_proj`` ``[E, 2F, d]`` with gate rows first, ``mlp.experts.down_proj``
``[E, d, F]``); its ``save_pretrained`` writes them back per expert by default and fused with
``save_original_format=False`` (newer Hub releases ship fused), so both source layouts are read.
The layout is resolved once from the tensor names (``bind``, which ``get_family(config, names)``
calls): every actor of a job binds the same one from the same index, the job records it in the
manifest, and a family asked for source tensor names with no layout bound raises instead of
assuming the per-expert one (that guess once stored fused experts densely next to their encoded
copies, and rounded Mixtral's router to bf16). Methods given the weights (``route``,
``read_experts``) bind from them when needed.

Config sizes are checked against the bounds of ``qmoe_ray.models.base`` (``config_int``) before
anything is built from them.

Canonical per-expert names (``expert_names``, used for every output checkpoint of these families):
``model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`` for roles
``gate``/``up``/``down``, whatever the source layout or family.

All computation is float32; ``state`` holds ``hidden`` ``[B,S,d]``, ``attention_mask`` ``bool
[B,S]`` and ``position_ids`` ``int64 [B,S]`` (positions count from 0 at the first column, as
transformers does without explicit position ids: pad on the right).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from qmoe_ray.data.samples import special_token_ids
from qmoe_ray.errors import CheckpointError, MissingTensorError
from qmoe_ray.models import layers as L
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
    swiglu_hidden,
)

ROLES = ("gate", "up", "down")
CANONICAL = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the forward needs from ``config.json``, validated.

    Attributes:
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim: shapes.
        rms_eps: RMSNorm epsilon. rope_theta: RoPE base (default RoPE only).
        num_experts, top_k, moe_ff: routed experts, experts per token, expert hidden size.
        norm_topk: renormalise the top-k probabilities to sum to one.
        dense_ff: hidden size of dense (non-MoE) blocks' MLP (0: none).
        shared_ff: hidden size of the gated shared expert (0: none).
        sparse: per block, whether it is an MoE block.
        windows: per block, the sliding-window length (None: full causal attention).
        qk_norm: ``"none"``, ``"head"`` (RMSNorm over each head) or ``"full"`` (over the whole
            projection).
        clip_qkv: clamp q/k/v to ``[-c, c]`` (OLMoE), or None.
        tie_embeddings: the LM head is the embedding matrix.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    num_experts: int
    top_k: int
    moe_ff: int
    norm_topk: bool
    dense_ff: int
    shared_ff: int
    sparse: tuple[bool, ...]
    windows: tuple[int | None, ...]
    qk_norm: str
    clip_qkv: float | None
    tie_embeddings: bool

    def __post_init__(self) -> None:
        for f in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "num_experts",
            "top_k",
            "moe_ff",
        ):
            if getattr(self, f) <= 0:
                raise ValueError(f"config.json: {f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads={self.num_heads} is not a multiple "
                f"of num_key_value_heads={self.num_kv_heads}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"config.json: num_experts_per_tok={self.top_k} exceeds the number of "
                f"experts {self.num_experts}"
            )
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm {self.qk_norm!r} must be none/head/full")
        if len(self.sparse) != self.num_layers or len(self.windows) != self.num_layers:
            raise ValueError("sparse/windows must have one entry per layer")


def _need(config: Mapping[str, Any], model_type: str, *keys: str) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    raise ValueError(
        f"config.json (model_type {model_type!r}) lacks {' or '.join(repr(k) for k in keys)}; "
        "a checkpoint of this family must state it (is this an MoE checkpoint of that family?)"
    )


def _need_int(config: Mapping[str, Any], model_type: str, hi: int, *keys: str) -> int:
    """The first of ``keys`` present, as an integer in ``1..hi`` (``config_int``)."""
    key = next((k for k in keys if config.get(k) is not None), None)
    if key is None:
        _need(config, model_type, *keys)  # raises, naming the keys
    return config_int(config, key, hi)


def _window(config: Mapping[str, Any]) -> int | None:
    """``sliding_window`` (None when absent, null or 0), bounded like every other size."""
    if not config.get("sliding_window"):
        return None
    return config_int(config, "sliding_window", MAX_POSITIONS)


def _rope_theta(config: Mapping[str, Any], default: float) -> float:
    rp = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(
            f"config.json rope type {kind!r} is not supported (default RoPE only); "
            "remove rope_scaling or use a checkpoint without it"
        )
    if rp.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 is not supported")
    theta = rp.get("rope_theta", config.get("rope_theta"))
    return config_float({"rope_theta": theta}, "rope_theta", default)


class DecoderMoE(MoEFamily):
    """Shared implementation of the decoder-only MoE families (see the module docstring).

    Args:
        config: parsed ``config.json``.
        names: the checkpoint's tensor names, to fix the expert layout now (``bind``); without
            them ``router_name`` / ``source_expert_names`` / ``expected_shapes`` raise until
            ``bind`` is called or a method given the weights binds from them.

    Raises:
        ValueError: a required field is missing or inconsistent (the message names it).
        CheckpointError (a ``ValueError``): a size is not an integer or out of bounds.
    """

    expert_spec: ClassVar[ExpertSpec] = ExpertSpec(("gate", "up"), ("down",), swiglu_hidden)
    #: module names holding router and experts, the first one is what save_pretrained writes
    moe_modules: ClassVar[tuple[str, ...]] = ("mlp",)
    #: per-expert source tensor names by role
    source_roles: ClassVar[Mapping[str, str]] = CANONICAL
    default_rope_theta: ClassVar[float] = 10000.0
    default_eps: ClassVar[float] = 1e-6

    def __init__(self, config: Mapping[str, Any], names: Sequence[str] | None = None):
        super().__init__(config)
        self.spec = self._parse(self.config)
        self._layout: tuple[str, str, str] | None = None  # (router module, experts module, kind)
        if names is not None:
            self.bind(names)

    # -- config -----------------------------------------------------------------------------------
    def _parse(self, c: dict[str, Any]) -> DecoderSpec:
        mt = self.model_type
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(
                f"config.json hidden_act {act!r}: only silu (SwiGLU) experts supported"
            )
        hidden = _need_int(c, mt, MAX_HIDDEN, "hidden_size")
        heads = _need_int(c, mt, MAX_HEADS, "num_attention_heads")
        n = _need_int(c, mt, MAX_LAYERS, "num_hidden_layers")
        e = _need_int(c, mt, MAX_EXPERTS, *self._expert_count_keys())
        top_k = _need_int(c, mt, MAX_EXPERTS, "num_experts_per_tok")
        sparse, dense_ff, shared_ff = self._sparse_layout(c, n, e)
        if e * sum(sparse) > MAX_TOTAL_EXPERTS:
            raise CheckpointError(
                f"config.json: {sum(sparse)} MoE layers x {e} experts = {e * sum(sparse)} routed "
                f"experts, above qmoe-ray's bound of {MAX_TOTAL_EXPERTS} (far above any released "
                "model): the config is corrupt"
            )
        clip = c.get("clip_qkv")
        return DecoderSpec(
            vocab_size=_need_int(c, mt, MAX_VOCAB, "vocab_size"),
            hidden_size=hidden,
            num_layers=n,
            num_heads=heads,
            num_kv_heads=config_int(c, "num_key_value_heads", MAX_HEADS, default=heads),
            head_dim=config_int(c, "head_dim", MAX_HEAD_DIM, default=max(hidden // heads, 1)),
            rms_eps=config_float(c, "rms_norm_eps", self.default_eps),
            rope_theta=_rope_theta(c, self.default_rope_theta),
            num_experts=e,
            top_k=top_k,
            moe_ff=_need_int(c, mt, MAX_FF, *self._moe_ff_keys()),
            norm_topk=self._norm_topk(c),
            dense_ff=dense_ff,
            shared_ff=shared_ff,
            sparse=sparse,
            windows=self._windows(c, n),
            qk_norm=self._qk_norm(),
            clip_qkv=None if clip is None else config_float(c, "clip_qkv", 1.0),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    def _expert_count_keys(self) -> tuple[str, ...]:
        return ("num_experts", "num_local_experts")

    def _moe_ff_keys(self) -> tuple[str, ...]:
        return ("moe_intermediate_size",)

    def _norm_topk(self, c: Mapping[str, Any]) -> bool:
        return bool(c.get("norm_topk_prob", False))

    def _sparse_layout(
        self, c: Mapping[str, Any], n: int, e: int
    ) -> tuple[tuple[bool, ...], int, int]:
        return (True,) * n, 0, 0

    def _windows(self, c: Mapping[str, Any], n: int) -> tuple[int | None, ...]:
        return (None,) * n

    def _qk_norm(self) -> str:
        return "none"

    # -- layout -----------------------------------------------------------------------------------
    def bind(self, names: Sequence[str] | Any) -> DecoderMoE:
        """Detect the router module and the expert layout from tensor names (a list, set or a
        ``WeightSource``).

        Expert layouts tried, in order: ``"fused"`` 3-D ``experts.gate_up_proj`` under each of
        ``moe_modules``; ``"per-expert"``, the family's per-expert source names (``source_roles``);
        ``"canonical"``, our per-expert names (``expert_names``: a decompressed qmoe-ray
        checkpoint, whose router stays where the source had it).

        Returns:
            self.

        Raises:
            KeyError: the first MoE layer's router or experts are not found under any layout.
        """
        if isinstance(names, (list, tuple, set, frozenset)):
            names = set(names)
        has = names.__contains__
        first = next((lay for lay in self.layers() if lay.moe), None)
        if first is None:
            self._layout = (self.moe_modules[0], self.moe_modules[0], "per-expert")
            return self
        router = next((m for m in self.moe_modules if has(f"{first.name}.{m}.gate.weight")), None)
        if router is None:
            tried = [f"{first.name}.{m}.gate.weight" for m in self.moe_modules]
            raise MissingTensorError(
                f"router of layer {first.name} not found (tried {', '.join(tried)}); is this a "
                f"{self.model_type} checkpoint?"
            )
        candidates = [(m, "fused") for m in self.moe_modules]
        candidates += [(m, "per-expert") for m in self.moe_modules] + [("mlp", "canonical")]
        for mod, kind in candidates:
            if has(self._probe(first, mod, kind)):
                self._layout = (router, mod, kind)
                return self
        tried = sorted({self._probe(first, m, k) for m, k in candidates})
        raise MissingTensorError(
            f"no expert weights of layer {first.name} found (tried {', '.join(tried)}); is this a "
            f"{self.model_type} checkpoint?"
        )

    def _probe(self, layer: LayerSpec, mod: str, kind: str) -> str:
        p = f"{layer.name}.{mod}.experts"
        if kind == "fused":
            return f"{p}.gate_up_proj"
        return f"{p}.0.{self._roles(kind)['gate']}.weight"

    def _roles(self, kind: str) -> Mapping[str, str]:
        return CANONICAL if kind == "canonical" else self.source_roles

    def _lay(self, W: Any = None) -> tuple[str, str, str]:
        """``(router module, experts module, kind)``; (re)detected from ``W`` when it is given and
        the bound layout does not fit it (one family object may serve a source and its output).

        Raises:
            RuntimeError: no ``W`` and no layout bound (the layout is never guessed).
        """
        if W is not None:
            first = next((lay for lay in self.layers() if lay.moe), None)
            if self._layout is None or (
                first is not None and self._probe(first, *self._layout[1:]) not in W
            ):
                self.bind(W)
        if self._layout is None:
            raise RuntimeError(
                f"the expert layout of this {self.model_type} family is not bound: build it with "
                "get_family(config, names) (or call bind(names)) with the checkpoint's tensor "
                "names before asking for source tensor names (per-expert and fused sources name "
                "their experts and routers differently)"
            )
        return self._layout

    @property
    def expert_layout(self) -> str:
        """``"per-expert"``, ``"fused"`` or ``"canonical"`` (see ``bind``).

        Raises:
            RuntimeError: no layout is bound.
        """
        return self._lay()[2]

    def layers(self) -> list[LayerSpec]:
        s = self.spec
        return [
            LayerSpec(
                i,
                f"model.layers.{i}",
                "decoder",
                i,
                s.sparse[i],
                s.num_experts if s.sparse[i] else 0,
                s.top_k if s.sparse[i] else 0,
            )
            for i in range(s.num_layers)
        ]

    def expert_names(self, layer: LayerSpec, expert: int) -> dict[str, str]:
        return {r: f"{layer.name}.mlp.experts.{expert}.{CANONICAL[r]}.weight" for r in ROLES}

    def router_name(self, layer: LayerSpec, W: Any = None) -> str:
        return f"{layer.name}.{self._lay(W)[0]}.gate.weight"

    def source_expert_names(self, layer: LayerSpec) -> list[str]:
        _, mod, kind = self._lay()
        p = f"{layer.name}.{mod}.experts"
        if kind == "fused":
            return [f"{p}.gate_up_proj", f"{p}.down_proj"]
        roles = self._roles(kind)
        return [f"{p}.{e}.{roles[r]}.weight" for e in range(self.spec.num_experts) for r in ROLES]

    def dense_names(self, W_names: Sequence[str]) -> list[str]:
        self.bind(W_names)
        return super().dense_names(W_names)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward reads (source names, bound layout) with its shape per config."""
        s = self.spec
        d, hd = s.hidden_size, s.head_dim
        q, kv = s.num_heads * hd, s.num_kv_heads * hd
        out: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (s.vocab_size, d),
            "model.norm.weight": (d,),
        }
        if not s.tie_embeddings:
            out["lm_head.weight"] = (s.vocab_size, d)
        _, mod, kind = self._lay()
        roles = self._roles(kind)
        for lay in self.layers():
            p = lay.name
            out.update(
                {
                    f"{p}.input_layernorm.weight": (d,),
                    f"{p}.post_attention_layernorm.weight": (d,),
                    f"{p}.self_attn.q_proj.weight": (q, d),
                    f"{p}.self_attn.k_proj.weight": (kv, d),
                    f"{p}.self_attn.v_proj.weight": (kv, d),
                    f"{p}.self_attn.o_proj.weight": (d, q),
                }
            )
            if s.qk_norm == "head":
                out[f"{p}.self_attn.q_norm.weight"] = (hd,)
                out[f"{p}.self_attn.k_norm.weight"] = (hd,)
            elif s.qk_norm == "full":
                out[f"{p}.self_attn.q_norm.weight"] = (q,)
                out[f"{p}.self_attn.k_norm.weight"] = (kv,)
            if not lay.moe:
                out.update(self._mlp_shapes(f"{p}.mlp", d, s.dense_ff))
                continue
            out[self.router_name(lay)] = (s.num_experts, d)
            if kind == "fused":
                e = f"{p}.{mod}.experts"
                out[f"{e}.gate_up_proj"] = (s.num_experts, 2 * s.moe_ff, d)
                out[f"{e}.down_proj"] = (s.num_experts, d, s.moe_ff)
            else:
                for x in range(s.num_experts):
                    for r, shp in (
                        ("gate", (s.moe_ff, d)),
                        ("up", (s.moe_ff, d)),
                        ("down", (d, s.moe_ff)),
                    ):
                        out[f"{p}.{mod}.experts.{x}.{roles[r]}.weight"] = shp
            if s.shared_ff:
                out.update(self._mlp_shapes(f"{p}.mlp.shared_expert", d, s.shared_ff))
                out[f"{p}.mlp.shared_expert_gate.weight"] = (1, d)
        return out

    @staticmethod
    def _mlp_shapes(p: str, d: int, ff: int) -> dict[str, tuple[int, ...]]:
        return {
            f"{p}.gate_proj.weight": (ff, d),
            f"{p}.up_proj.weight": (ff, d),
            f"{p}.down_proj.weight": (d, ff),
        }

    def shape_message(self, name: str, got: Sequence[int], want: Sequence[int]) -> str:
        s = self.spec
        return (
            f"tensor {name!r} has shape {list(got)} but config.json implies {list(want)} "
            f"(hidden_size={s.hidden_size}, heads={s.num_heads}/{s.num_kv_heads}, "
            f"head_dim={s.head_dim}, experts={s.num_experts}, expert ff={s.moe_ff}, "
            f"vocab={s.vocab_size}); the config.json does not match the weights"
        )

    def _w(self, W: WeightSource, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        t = W(name)
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(self.shape_message(name, tuple(t.shape), shape))
        return t

    def _opt(self, W: WeightSource, name: str) -> torch.Tensor | None:
        return W(name) if name in W else None

    def read_experts(
        self, layer: LayerSpec, W: WeightSource, experts: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        s = self.spec
        experts = [int(e) for e in experts]
        bad = [e for e in experts if not 0 <= e < s.num_experts]
        if bad or not layer.moe:
            raise ValueError(
                f"experts {bad or experts} of layer {layer.name} do not exist "
                f"(it has {layer.num_experts} routed experts)"
            )
        _, mod, kind = self._lay(W)
        p = f"{layer.name}.{mod}.experts"
        d, f = s.hidden_size, s.moe_ff
        if kind == "fused":
            gu = self._rows(W, f"{p}.gate_up_proj", experts, (s.num_experts, 2 * f, d))
            dn = self._rows(W, f"{p}.down_proj", experts, (s.num_experts, d, f))
            return {"gate": gu[:, :f].contiguous(), "up": gu[:, f:].contiguous(), "down": dn}
        want = {"gate": (f, d), "up": (f, d), "down": (d, f)}
        roles = self._roles(kind)
        names = {r: [f"{p}.{e}.{roles[r]}.weight" for e in experts] for r in ROLES}
        flat = [n for r in ROLES for n in names[r]]
        many = getattr(W, "read_many", None)  # a Checkpoint: one coalesced read for the group
        got = many(flat) if many is not None else {n: W(n) for n in flat}
        out = {}
        for r in ROLES:
            for n in names[r]:
                if tuple(got[n].shape) != want[r]:
                    raise ValueError(self.shape_message(n, tuple(got[n].shape), want[r]))
            out[r] = torch.stack([got[n] for n in names[r]]).to(torch.float32)
        return out

    def _rows(
        self, W: WeightSource, name: str, rows: list[int], full: tuple[int, ...]
    ) -> torch.Tensor:
        """Rows ``rows`` of a fused 3-D expert tensor, reading only the span they cover when the
        source supports ``read_slice`` (a ``Checkpoint``)."""
        read_slice = getattr(W, "read_slice", None)
        if read_slice is not None:
            lo, hi = min(rows), max(rows) + 1
            t = read_slice(name, lo, hi).to(torch.float32)
            if tuple(t.shape[1:]) != full[1:]:
                raise ValueError(self.shape_message(name, (full[0], *t.shape[1:]), full))
            return t[[r - lo for r in rows]]
        return self._w(W, name, full)[rows]

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
        emb = self._w(W, "model.embed_tokens.weight", (s.vocab_size, s.hidden_size))
        b, n = ids.shape
        special = torch.tensor(special_token_ids(self.config), dtype=torch.int64)
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
        p = f"model.layers.{i}.self_attn"
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
        cos, sin = L.rope_cos_sin(state["position_ids"], hd, s.rope_theta)
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        allowed = L.causal_mask(state["attention_mask"], s.windows[i])
        o = L.attention(q, k, v, allowed)
        return L.linear(
            o, self._w(W, f"{p}.o_proj.weight", (d, qd)), self._opt(W, f"{p}.o_proj.bias")
        )

    def _mlp(self, W: WeightSource, p: str, x: torch.Tensor, ff: int) -> torch.Tensor:
        d = self.spec.hidden_size
        g = self._w(W, f"{p}.gate_proj.weight", (ff, d))
        u = self._w(W, f"{p}.up_proj.weight", (ff, d))
        return L.linear(
            F.silu(L.linear(x, g)) * L.linear(x, u), self._w(W, f"{p}.down_proj.weight", (d, ff))
        )

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
        self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        r = self._w(W, self.router_name(layer, W), (s.num_experts, s.hidden_size))
        probs = torch.softmax(L.linear(x.to(torch.float32), r), dim=-1, dtype=torch.float32)
        gate, idx = torch.topk(probs, s.top_k, dim=-1)
        if s.norm_topk:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return idx.to(torch.int64), gate

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
        h = self._norm(W, "model.norm.weight", state["hidden"])
        head = (
            "model.embed_tokens.weight"
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


__all__ = ["DecoderMoE", "DecoderSpec", "Mixtral", "Olmoe", "Qwen2Moe", "Qwen3Moe"]
