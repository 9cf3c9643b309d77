"""The decoder-only MoE families' config, blocks, tensor names and expert layout
(``DecoderLayout``, the base class of ``qmoe_ray.models.decoder_moe.DecoderMoE``).

Why one base class: the four families share the block (pre-norm RMSNorm, RoPE attention with
grouped KV heads, top-k softmax router, SwiGLU experts) and differ in a handful of switches,
collected in a frozen ``DecoderSpec`` parsed from ``config.json``:

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

Config sizes are checked against the bounds of ``qmoe_ray.models.config`` (``config_int``) before
anything is built from them; ``expected_shapes`` lists every tensor the forward reads, so
``check_weights`` refuses a checkpoint from its index alone.

Canonical per-expert names (``expert_names``, used for every output checkpoint of these families):
``model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`` for roles
``gate``/``up``/``down``, whatever the source layout or family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qmoe_ray.errors import MissingTensorError
from qmoe_ray.models.base import (
    ExpertSpec,
    LayerSpec,
    MoEFamily,
    WeightSource,
    name_lookup,
    swiglu_hidden,
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
    require_int,
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


def _need_int(config: Mapping[str, Any], model_type: str, hi: int, *keys: str) -> int:
    """The first of ``keys`` present, as an integer in ``1..hi`` (``require_int``)."""
    return require_int(
        config, hi, *keys,
        what=f"config.json (model_type {model_type!r}) lacks {{keys}}; a checkpoint of this "
        "family must state it (is this an MoE checkpoint of that family?)",
    )


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


class DecoderLayout(MoEFamily):
    """The decoder-only MoE families' config, blocks, tensor names and expert layout (see the
    module docstring); ``qmoe_ray.models.decoder_moe.DecoderMoE`` adds the forward.

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
    #: where the decoder stack's tensors sit: ``{prefix}embed_tokens``, ``{prefix}layers.N``,
    #: ``{prefix}norm`` (a multimodal wrapper nests it, e.g. ``model.language_model.``)
    prefix: ClassVar[str] = "model."

    def __init__(self, config: Mapping[str, Any], names: Sequence[str] | None = None):
        super().__init__(config)
        self.text_config = self._text_config(self.config)
        self.spec = self._parse(self.text_config)
        self._layout: tuple[str, str, str] | None = None  # (router module, experts module, kind)
        if names is not None:
            self.bind(names)

    # -- config -----------------------------------------------------------------------------------
    def _text_config(self, c: dict[str, Any]) -> dict[str, Any]:
        """The part of ``config.json`` describing the decoder stack (a multimodal wrapper's
        ``text_config``; the whole config here)."""
        return c

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
        check_total_experts(sum(sparse), e, "layers")
        clip = c.get("clip_qkv")
        return DecoderSpec(
            vocab_size=_need_int(c, mt, MAX_VOCAB, "vocab_size"),
            hidden_size=hidden,
            num_layers=n,
            num_heads=heads,
            num_kv_heads=config_int(c, "num_key_value_heads", MAX_HEADS, default=heads),
            head_dim=config_int(c, "head_dim", MAX_HEAD_DIM, default=max(hidden // heads, 1)),
            rms_eps=config_float(c, "rms_norm_eps", self.default_eps),
            rope_theta=self._rope_theta(c),
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

    def _rope_theta(self, c: Mapping[str, Any]) -> float:
        """The default-RoPE base (a family with another RoPE kind parses it itself)."""
        return _rope_theta(c, self.default_rope_theta)

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
    def bind(self, names: Sequence[str] | Any) -> DecoderLayout:
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
        names = name_lookup(names)
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
                f"{self.prefix}layers.{i}",
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
            f"{self.prefix}embed_tokens.weight": (s.vocab_size, d),
            f"{self.prefix}norm.weight": (d,),
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
