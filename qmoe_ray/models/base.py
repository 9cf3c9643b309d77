"""The contract between model families and everything that runs them.

Why this shape: the compressor, the evaluator and the loader all walk a model *one layer at a
time* over batches of token ids, so that neither the model nor all activations ever sit in one
process. A family therefore does not build an ``nn.Module``; it exposes the steps of that walk as
plain functions of (layer, weights, state):

    state = family.embed(W, inputs)
    for layer in family.layers():
        if not layer.moe:
            state = family.dense_block(layer, W, state)
            continue
        state, x = family.pre_moe(layer, W, state)        # attention, norms -> MoE input [B,S,d]
        idx, gate = family.route(layer, W, x, state)      # [B,S,k] expert ids (-1: dropped), weights
        y = <sum over k of gate * expert(x)>              # done by the caller: dense, quantized, ...
        state = family.post_moe(layer, W, state, y)       # residual add, shared experts, ...
    logits = family.logits(W, state)

That loop is written once, ``walk_layers`` (layer-major over a list of batch states, with hooks
after each routing and each block); ``run_forward``, the evaluator, the loaded model, the benches
and the tests run it. The compressor's stores run the same steps split across Ray calls, with the
experts' sum done by the workers.

``state`` is a ``dict[str, torch.Tensor]`` whose tensors all have the batch as leading dimension, so
a store can split, concatenate and ship it as numpy arrays. ``W`` is any ``WeightSource``: a lazy
checkpoint reader during compression, a dict of decoded tensors at load time.

Experts are described by an ``ExpertSpec``: which matrices read the expert input (``wi``, or
``gate``/``up``), which read the hidden activation (``wo`` or ``down``), and how the hidden
activation is formed. That is all the quantizer needs to quantize the second matrix on the outputs
of the (already quantized) first, as a sequential GPTQ does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from qmoe_ray.errors import MissingTensorError
from qmoe_ray.models.config import (  # noqa: F401 - the config bounds and parsers, re-exported
    MAX_EXPERTS,
    MAX_FF,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_TOTAL_EXPERTS,
    MAX_VOCAB,
    config_float,
    config_int,
)
from qmoe_ray.quant.hessian import rows_by_id

State = dict[str, torch.Tensor]

class WeightSource(Protocol):
    """Anything that hands out tensors by their checkpoint name (float32, on CPU unless stated).

    ``names`` lists every tensor it holds (a ``Checkpoint``'s index, a loaded checkpoint's dense
    and expert tensors): what ``MoEFamily.bind`` resolves the expert layout from.
    """

    def __call__(self, name: str) -> torch.Tensor: ...

    def __contains__(self, name: str) -> bool: ...

    @property
    def names(self) -> list[str]: ...


class DictWeights:
    """A ``WeightSource`` over an in-memory mapping (tests, decoded checkpoints)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self._t = tensors
        self._dtype = dtype

    def __call__(self, name: str) -> torch.Tensor:
        try:
            t = self._t[name]
        except KeyError:
            raise MissingTensorError(f"tensor {name!r} not found among {len(self._t)} tensors") from None
        return t.to(self._dtype)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    @property
    def names(self) -> list[str]:
        """Every tensor name, in the mapping's order."""
        return list(self._t)


def name_lookup(names: Any) -> Any:
    """Tensor names as something ``in`` answers fast: a set of a list, tuple or set, else the
    ``WeightSource`` itself (its ``__contains__``); what ``MoEFamily.bind`` resolves from."""
    if isinstance(names, (list, tuple, set, frozenset)):
        return set(names)
    return names


@dataclass(frozen=True)
class LayerSpec:
    """One transformer block, in processing order.

    Attributes:
        index: position in processing order (0-based over all blocks of all stacks).
        name: the checkpoint prefix of the block, e.g. ``model.layers.3`` or ``encoder.block.1``.
        stage: ``"decoder"`` for decoder-only models; ``"encoder"`` / ``"decoder"`` for Switch.
        block: index of the block within its stack.
        moe: whether the block's feed-forward is a mixture of experts.
        num_experts: number of routed experts (0 for dense blocks).
        top_k: experts per token (0 for dense blocks).
    """

    index: int
    name: str
    stage: str
    block: int
    moe: bool
    num_experts: int = 0
    top_k: int = 0


@dataclass(frozen=True)
class ExpertSpec:
    """The structure of one routed expert.

    Attributes:
        in_roles: matrices applied to the expert input, each ``[d_ff, d_model]``.
        out_roles: matrices applied to the hidden activation, each ``[d_model, d_ff]``.
        hidden: ``hidden({role: W_in}, x) -> h``: the activation that feeds the out matrices, for
            one expert (``W`` ``[d_ff, d_model]``, ``x`` ``[T, d_model]``, ``h`` ``[T, d_ff]``).
        bias_roles: the matrices with a per-expert bias (gpt-oss: all three). The bias of role
            ``r`` is the vector ``{r}_bias`` ``[out]`` beside the matrices in the weights mapping
            (``hidden`` adds the in matrices', ``forward`` the out matrix's); biases are carried
            unquantized in the family's dense tensors (``MoEFamily.expert_biases``).
    """

    in_roles: tuple[str, ...]
    out_roles: tuple[str, ...]
    hidden: Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
    bias_roles: tuple[str, ...] = ()

    @property
    def roles(self) -> tuple[str, ...]:
        return self.in_roles + self.out_roles

    def forward(self, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The expert's output for tokens ``x`` ``[T, d_model]`` -> ``[T, d_model]``."""
        h = self.hidden(weights, x)
        (out_role,) = self.out_roles
        y = h @ weights[out_role].T
        return y + weights[f"{out_role}_bias"] if out_role in self.bias_roles else y


def relu_hidden(role: str) -> Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``h = act(x W_role^T)`` with ReLU (Switch/T5 ``wi``)."""

    def hidden(w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ w[role].T)

    return hidden


def swiglu_hidden(w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``h = silu(x gate^T) * (x up^T)`` (Mixtral, Qwen-MoE, OLMoE)."""
    return F.silu(x @ w["gate"].T) * (x @ w["up"].T)


class MoEFamily(ABC):
    """A model family: config parsing, tensor names and the layer-by-layer forward (see module doc).

    This is the whole contract between a family and its users: the job (driver, stores, workers,
    writer), the read side (loader, evaluate, export), the benches and the tests call a family
    through these methods and attributes only, never probing for optional ones. Subclasses set
    ``model_type`` / ``expert_spec`` and implement the abstract methods; the concrete ones below
    are shared by every family (override where a family differs). Constructors validate the
    config and raise ``ValueError`` naming the missing or bad field.

    Attributes:
        model_type: ``config.json``'s ``model_type``.
        expert_spec: the routed experts' structure (roles, hidden activation).
        moe_modules: module names under a block that hold router and experts in source
            checkpoints, the one ``save_pretrained`` writes first (export rebuilds source names
            from them); None where the canonical expert names are the source's own (Switch).
        source_roles: per-expert source tensor name by role (``{"gate": "w1", ...}``).
        fused_layout: how an HF export fuses experts: ``"rows"`` (``gate_up_proj`` ``[E, 2F,
            d]``, gate rows first; ``down_proj`` ``[E, d, F]``) or ``"interleaved"`` (gpt-oss:
            ``[E, d, 2F]`` with gate in the even columns; ``[E, F, d]``; its only save layout).
        config: the parsed ``config.json``.
    """

    model_type: ClassVar[str]
    expert_spec: ClassVar[ExpertSpec]
    moe_modules: ClassVar[tuple[str, ...] | None] = None
    fused_layout: ClassVar[str] = "rows"
    source_roles: ClassVar[Mapping[str, str]]

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)

    # -- layout --------------------------------------------------------------------------------
    @abstractmethod
    def layers(self) -> list[LayerSpec]:
        """Every block in processing order (encoder before decoder for Switch)."""

    @abstractmethod
    def expert_names(self, layer: LayerSpec, expert: int) -> dict[str, str]:
        """Our canonical per-expert tensor names ``{role: name}`` (used for the output checkpoint).

        For checkpoints that store experts fused in 3-D tensors these names are still per expert;
        ``read_experts`` handles the source layout.
        """

    @abstractmethod
    def read_experts(
        self, layer: LayerSpec, W: WeightSource, experts: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """The weights of ``experts`` of ``layer`` as ``{role: float32 [G, out, in]}``, and their
        biases (``expert_biases``) where the family has them."""

    def expert_biases(
        self, layer: LayerSpec, W: WeightSource, experts: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """The per-expert biases of ``experts`` as ``{f"{role}_bias": float32 [G, out]}`` for
        the ``expert_spec.bias_roles``, read from the dense tensors that carry them (never
        quantized; ``read_experts`` includes them). None (``{}``) by default."""
        return {}

    @abstractmethod
    def router_name(self, layer: LayerSpec) -> str:
        """Name of the router weight of an MoE layer."""

    def router_names(self) -> set[str]:
        """The router weights of every MoE layer (bound layout)."""
        return {self.router_name(lay) for lay in self.layers() if lay.moe}

    def dense_names(self, W_names: Sequence[str]) -> list[str]:
        """Names from a checkpoint's tensor list that are not routed-expert weights."""
        expert = set()
        for layer in self.layers():
            if layer.moe:
                expert.update(self.source_expert_names(layer))
        return [n for n in W_names if n not in expert]

    def export_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The ``config.json`` an HF export writes for this family's ``config`` (the source's,
        unchanged by default)."""
        return dict(config)

    def mtp_names(self, W_names: Sequence[str]) -> list[str]:
        """Names from a checkpoint's tensor list that belong to its multi-token-prediction
        layers (outside the forward; the job carries them through, or drops them with
        ``drop_mtp``). None by default."""
        return []

    @abstractmethod
    def source_expert_names(self, layer: LayerSpec) -> list[str]:
        """The source checkpoint's tensor names holding this layer's routed experts."""

    @abstractmethod
    def bind(self, names: Any) -> MoEFamily:
        """Fix the source's expert layout from its tensor names (a list, a set or a
        ``WeightSource``); ``get_family(config, names)`` calls it.

        Returns:
            self.

        Raises:
            KeyError: the first MoE layer's experts (or router) are found under no layout.
        """

    @property
    @abstractmethod
    def expert_layout(self) -> str:
        """The bound expert layout (``"per-expert"``, ``"fused"``, ...; recorded in manifests).

        Raises:
            RuntimeError: no layout is bound yet (never guessed).
        """

    # -- weights check -------------------------------------------------------------------------
    @abstractmethod
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward reads (source names under the bound layout) with the shape
        ``config.json`` implies.

        Raises:
            RuntimeError: no layout is bound (``bind`` first).
        """

    @abstractmethod
    def shape_message(self, name: str, got: Sequence[int], want: Sequence[int]) -> str:
        """The error message for tensor ``name`` stored ``got`` where the config implies ``want``
        (names the config fields the shape follows from)."""

    def check_weights(self, names: Sequence[str], shape: Callable[[str], Sequence[int]]) -> None:
        """Check that every tensor the forward needs exists with the shape config.json implies,
        from the index alone (no tensor data is read).

        Call it right after opening a checkpoint: ``family.check_weights(ckpt.names, ckpt.shape)``.

        Args:
            names: the checkpoint's tensor names (the layout is bound from them).
            shape: ``name -> shape`` as the index declares it.

        Raises:
            KeyError (``MissingTensorError``): a needed tensor is missing (names it).
            ValueError: a tensor's shape disagrees with config.json (names both shapes).
        """
        self.bind(names)
        have = set(names)
        for name, want in self.expected_shapes().items():
            if name not in have:
                raise MissingTensorError(
                    f"tensor {name!r} needed by {self.model_type} (per config.json) is "
                    "not in the checkpoint; the checkpoint is incomplete or its "
                    "config.json belongs to another model"
                )
            got = tuple(shape(name))
            if got != tuple(want):
                raise ValueError(self.shape_message(name, got, want))

    def stored_dtype(self, name: str, src: torch.dtype) -> torch.dtype:
        """The dtype a non-expert tensor is stored in by the output checkpoint: routers keep
        their source precision ``src`` (routing decisions are sensitive to it); everything else
        is bf16."""
        return src if name in self.router_names() else torch.bfloat16

    # -- the forward walk ----------------------------------------------------------------------
    @abstractmethod
    def embed(self, W: WeightSource, inputs: Mapping[str, torch.Tensor]) -> State:
        """Initial state from token ids (``inputs`` as made by ``qmoe_ray.data``)."""

    @abstractmethod
    def dense_block(self, layer: LayerSpec, W: WeightSource, state: State) -> State:
        """A whole non-MoE block."""

    @abstractmethod
    def pre_moe(
        self, layer: LayerSpec, W: WeightSource, state: State
    ) -> tuple[State, torch.Tensor]:
        """The block up to the MoE input; returns the new state and ``x`` ``[B, S, d_model]``."""

    @abstractmethod
    def route(
        self,
        layer: LayerSpec,
        W: WeightSource,
        x: torch.Tensor,
        state: State,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router: ``(idx int64 [B,S,k], gate float32 [B,S,k])``; ``idx == -1`` means dropped.

        ``keep`` (Expert Drop, ``qmoe_ray.models.trim``): int64 original ids of the experts
        kept; the router runs over their rows only, top-k becomes ``min(k, len(keep))`` and
        ``idx`` indexes ``keep`` (the trimmed model's expert numbering).
        """

    def router_probs(
        self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State
    ) -> torch.Tensor | None:
        """The full routing distribution ``float32 [B, S, num_experts]`` (Expert Drop scores),
        or None for a router that only has top-k weights (the scores then use those)."""
        return None

    def block_droppable(self, layer: LayerSpec) -> bool:
        """Whether Block Drop may remove this block (Switch: not block 0 of a stack, which
        holds the relative attention bias every block of the stack reads)."""
        return True

    @abstractmethod
    def post_moe(self, layer: LayerSpec, W: WeightSource, state: State, y: torch.Tensor) -> State:
        """Finish the block given the routed experts' combined output ``y`` ``[B, S, d_model]``."""

    @abstractmethod
    def logits(self, W: WeightSource, state: State) -> torch.Tensor:
        """Final norm + LM head: ``[B, S, vocab]`` float32."""

    @abstractmethod
    def loss_terms(
        self, logits: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        """``(sum of token cross-entropies, number of predicted tokens)`` as transformers counts."""

    @abstractmethod
    def token_mask(self, layer: LayerSpec, state: State) -> torch.Tensor:
        """``bool [B, S]``: the positions of ``x`` that are real tokens (not padding)."""

    def hessian_mask(self, layer: LayerSpec, state: State) -> torch.Tensor:
        """``bool [B, S]``: the tokens allowed into Hessians (default: ``token_mask``; Switch also
        masks sentinel tokens, as the paper does)."""
        return self.token_mask(layer, state)


def moe_dense(
    spec: ExpertSpec,
    experts: Mapping[int, Mapping[str, torch.Tensor]] | Callable[[int], Mapping[str, torch.Tensor]],
    x: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """The combined routed-expert output, with dense expert weights.

    Args:
        spec: the family's ``ExpertSpec``.
        experts: ``expert id -> {role: [out, in]}`` (a mapping or a function).
        x: ``[..., d_model]`` MoE input.
        idx: ``int64 [..., k]`` expert ids, -1 for dropped slots.
        gate: ``[..., k]`` gate weights.

    Returns:
        ``[..., d_model]``: ``sum_k gate[..., k] * expert_{idx[..., k]}(x)``.
    """
    get = experts if callable(experts) else experts.__getitem__
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    k = idx.shape[-1]
    idx_f = idx.reshape(-1, k)
    gate_f = gate.reshape(-1, k).to(xf.dtype)
    out = torch.zeros_like(xf)
    for e, sel in rows_by_id(idx_f.reshape(-1)):
        if e < 0:
            continue
        tok = sel // k
        y = spec.forward(get(e), xf[tok])
        out.index_add_(0, tok, y * gate_f.reshape(-1)[sel, None])
    return out.reshape(shape)


ExpertsFor = Callable[[LayerSpec], Callable[[int], Mapping[str, Any]]]
"""``layer -> (expert id -> {role: weight})``: where a walk gets one MoE layer's experts."""


def experts_from(family: MoEFamily, W: WeightSource) -> ExpertsFor:
    """The default ``ExpertsFor``: each expert read from ``W`` (``family.read_experts``) when
    the walk asks for it."""

    def for_layer(layer: LayerSpec) -> Callable[[int], dict[str, torch.Tensor]]:
        def get(e: int) -> dict[str, torch.Tensor]:
            return {r: t[0] for r, t in family.read_experts(layer, W, [e]).items()}

        return get

    return for_layer


def walk_layers(
    family: MoEFamily,
    W: WeightSource,
    states: list[State],
    experts_for: ExpertsFor | None = None,
    *,
    layers: Sequence[LayerSpec] | None = None,
    on_route: Callable[[LayerSpec, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
    | None = None,
    after_layer: Callable[[LayerSpec, list[State]], None] | None = None,
    after_moe: Callable[[LayerSpec, int, State, State], None] | None = None,
) -> list[State]:
    """The one walk over a model's blocks (see the module doc): every batch's state through
    ``layers``, layer-major, with dense experts (``moe_dense``). ``run_forward``, the evaluator,
    the loaded model, the benches and the tests all run their forward through it; the
    compressor's stores run the same family steps, split across Ray calls.

    Args:
        family: the model family.
        W: weights of everything (and of the experts unless ``experts_for`` is given).
        states: one state per batch (from ``family.embed``); updated in place (each batch's old
            state is released as its new one is made) and returned.
        experts_for: ``layer -> (expert id -> {role: weight})``, asked once per MoE layer for
            all batches; default ``experts_from(family, W)``.
        layers: the blocks to run, in order (default: ``family.layers()``).
        on_route: ``(layer, batch index, x, idx, gate)`` after each MoE layer's routing.
        after_layer: ``(layer, states)`` after each block has run over every batch (a weight
            cache drops the layer's tensors here).
        after_moe: ``(layer, batch index, before, after)`` after each MoE layer's ``post_moe``:
            the state entering the MoE (``pre_moe``'s) and the one leaving it (trim scores).

    Returns:
        ``states``, now after the last of ``layers``.
    """
    experts_for = experts_for or experts_from(family, W)
    for layer in family.layers() if layers is None else layers:
        if not layer.moe:
            for i, s in enumerate(states):
                states[i] = family.dense_block(layer, W, s)
        else:
            get = experts_for(layer)
            for i, s in enumerate(states):
                s, x = family.pre_moe(layer, W, s)
                idx, gate = family.route(layer, W, x, s)
                if on_route is not None:
                    on_route(layer, i, x, idx, gate)
                y = moe_dense(family.expert_spec, get, x, idx, gate)
                states[i] = family.post_moe(layer, W, s, y)
                if after_moe is not None:
                    after_moe(layer, i, s, states[i])
            del get  # the layer's experts go before the next layer's are read
        if after_layer is not None:
            after_layer(layer, states)
    return states


def run_forward(
    family: MoEFamily,
    W: WeightSource,
    inputs: Mapping[str, torch.Tensor],
    experts_for: ExpertsFor | None = None,
) -> torch.Tensor:
    """The whole model's logits for one batch: ``embed``, ``walk_layers``, ``logits``
    (reference path for tests, evaluation and loaded checkpoints).

    Args:
        family: the model family.
        W: weights of everything (and of the experts unless ``experts_for`` is given).
        inputs: token tensors as made by ``qmoe_ray.data``.
        experts_for: ``layer -> (expert id -> {role: weight})``; default reads them from ``W``.

    Returns:
        float32 logits ``[B, S, vocab]``.
    """
    (state,) = walk_layers(family, W, [family.embed(W, inputs)], experts_for)
    return family.logits(W, state)
