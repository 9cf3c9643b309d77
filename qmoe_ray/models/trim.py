"""A trimmed model: a ``TrimPlan`` applied to a family, in plain torch (docs/TRIM.md).

Why a wrapper that *is* an ``MoEFamily``: every user of a family (the walk, the evaluator, the
compressor's stores and workers, the loader, export) reads the model through the family's
``layers()`` and its steps. ``TrimmedFamily`` presents the trimmed model through the same
contract, so each of them runs a trimmed model unchanged:

* a dropped block is not in ``layers()``;
* a Layer-Dropped MoE block is a dense block (``moe=False``) whose ``dense_block`` runs the
  block up to its MoE and stops: the MoE, its norm (and a shared expert) are skipped, the
  residual stream passes through;
* an Expert-Dropped layer has ``num_experts = len(kept)`` and ``top_k = min(top_k, kept)``;
  its experts are renumbered ``0..kept-1`` in the order of their original ids: ``route`` runs
  the family's router over the kept rows (``MoEFamily.route(keep=...)``), ``read_experts`` and
  ``experts_for`` map the new ids to the original ones, ``expert_names`` are the trimmed
  model's own (renumbered) names, as a checkpoint of the trimmed model holds them.

``LayerSpec.index`` and ``name`` keep the original model's values: they identify a block in both
views (plans, progress records). The source-layout methods (``bind``, ``expected_shapes``,
``source_expert_names``, ``dense_names``) are the untrimmed model's: the trimmed model reads
its weights from the untrimmed source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from qmoe_ray.errors import InputError
from qmoe_ray.models.base import (
    ExpertsFor,
    LayerSpec,
    MoEFamily,
    State,
    WeightSource,
    walk_layers,
)
from qmoe_ray.models.trim_plan import TrimPlan


class TrimmedFamily(MoEFamily):
    """``family`` with ``plan`` applied (see the module doc).

    Args:
        family: the untrimmed family (bound or not).
        plan: the plan; checked against ``family`` (``TrimPlan.check``).

    Raises:
        InputError: the plan is for another model, or names a block this model does not have
            or may not drop.
    """

    def __init__(self, family: MoEFamily, plan: TrimPlan):
        if isinstance(family, TrimmedFamily):
            raise InputError("the model is already trimmed; apply one plan to the untrimmed model")
        plan.check(family)
        super().__init__(family.config)
        self.inner, self.plan = family, plan
        self.model_type = family.model_type
        self.expert_spec = family.expert_spec
        self.moe_modules = family.moe_modules
        self.source_roles = family.source_roles
        self._orig: dict[str, LayerSpec] = {}
        self._keep: dict[str, torch.Tensor] = {}
        self._layers: list[LayerSpec] = []
        for lay in family.layers():
            if lay.name in plan.drop_blocks:
                continue
            self._orig[lay.name] = lay
            if lay.name in plan.drop_layers:
                lay = replace(lay, moe=False, num_experts=0, top_k=0)
            elif lay.moe and lay.name in plan.keep_experts:
                kept = plan.kept(lay)
                self._keep[lay.name] = torch.tensor(kept, dtype=torch.int64)
                lay = replace(lay, num_experts=len(kept), top_k=min(lay.top_k, len(kept)))
            self._layers.append(lay)

    def original(self, layer: LayerSpec) -> LayerSpec:
        """The untrimmed model's spec of ``layer``."""
        return self._orig[layer.name]

    def original_ids(self, layer: LayerSpec, experts: Sequence[int]) -> list[int]:
        """The original ids of the trimmed layer's experts ``experts``."""
        keep = self._keep.get(layer.name)
        return list(experts) if keep is None else [int(keep[e]) for e in experts]

    def experts_for(self, inner: ExpertsFor) -> ExpertsFor:
        """An untrimmed model's ``experts_for`` (a compressed checkpoint's decoded experts)
        as the trimmed model's: new ids mapped to original ones."""

        def for_layer(layer: LayerSpec):
            get = inner(self.original(layer))
            keep = self._keep.get(layer.name)
            return get if keep is None else (lambda e: get(int(keep[e])))

        return for_layer

    # -- layout: the trimmed model's blocks, the source's names ------------------------------
    def layers(self) -> list[LayerSpec]:
        return list(self._layers)

    def expert_names(self, layer: LayerSpec, expert: int) -> dict[str, str]:
        return self.inner.expert_names(self.original(layer), expert)

    def read_experts(self, layer: LayerSpec, W: WeightSource, experts: Sequence[int]
                     ) -> dict[str, torch.Tensor]:
        return self.inner.read_experts(self.original(layer), W, self.original_ids(layer, experts))

    def expert_biases(self, layer: LayerSpec, W: WeightSource, experts: Sequence[int]
                      ) -> dict[str, torch.Tensor]:
        return self.inner.expert_biases(self.original(layer), W, self.original_ids(layer, experts))

    def router_name(self, layer: LayerSpec) -> str:
        return self.inner.router_name(self.original(layer))

    def source_expert_names(self, layer: LayerSpec) -> list[str]:
        return self.inner.source_expert_names(self.original(layer))

    def dense_names(self, W_names: Sequence[str]) -> list[str]:
        return self.inner.dense_names(W_names)

    def mtp_names(self, W_names: Sequence[str]) -> list[str]:
        return self.inner.mtp_names(W_names)

    def export_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.export_config(config)

    def bind(self, names: Any) -> TrimmedFamily:
        self.inner.bind(names)
        return self

    @property
    def expert_layout(self) -> str:
        return self.inner.expert_layout

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.inner.expected_shapes()

    def shape_message(self, name: str, got: Sequence[int], want: Sequence[int]) -> str:
        return self.inner.shape_message(name, got, want)

    def stored_dtype(self, name: str, src: torch.dtype) -> torch.dtype:
        return self.inner.stored_dtype(name, src)

    def block_droppable(self, layer: LayerSpec) -> bool:
        return self.inner.block_droppable(self.original(layer))

    # -- the forward -----------------------------------------------------------------------------
    def embed(self, W: WeightSource, inputs: Mapping[str, torch.Tensor]) -> State:
        return self.inner.embed(W, inputs)

    def dense_block(self, layer: LayerSpec, W: WeightSource, state: State) -> State:
        orig = self.original(layer)
        if not orig.moe:
            return self.inner.dense_block(orig, W, state)
        state, _ = self.inner.pre_moe(orig, W, state)  # Layer Drop: no norm, no MoE
        return state

    def pre_moe(self, layer: LayerSpec, W: WeightSource, state: State
                ) -> tuple[State, torch.Tensor]:
        return self.inner.pre_moe(self.original(layer), W, state)

    def route(self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if keep is not None:
            raise InputError("a trimmed model's router takes no further keep=; trim the "
                             "untrimmed model with one plan")
        return self.inner.route(self.original(layer), W, x, state, self._keep.get(layer.name))

    def router_probs(self, layer: LayerSpec, W: WeightSource, x: torch.Tensor, state: State
                     ) -> torch.Tensor | None:
        probs = self.inner.router_probs(self.original(layer), W, x, state)
        keep = self._keep.get(layer.name)
        if probs is None or keep is None:
            return probs
        logp = probs[..., keep].clamp_min(1e-30).log()  # the softmax over the kept rows
        return torch.softmax(logp, dim=-1)

    def post_moe(self, layer: LayerSpec, W: WeightSource, state: State, y: torch.Tensor) -> State:
        return self.inner.post_moe(self.original(layer), W, state, y)

    def logits(self, W: WeightSource, state: State) -> torch.Tensor:
        return self.inner.logits(W, state)

    def loss_terms(self, logits: torch.Tensor, inputs: Mapping[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, int]:
        return self.inner.loss_terms(logits, inputs)

    def token_mask(self, layer: LayerSpec, state: State) -> torch.Tensor:
        return self.inner.token_mask(self.original(layer), state)

    def hessian_mask(self, layer: LayerSpec, state: State) -> torch.Tensor:
        return self.inner.hessian_mask(self.original(layer), state)


def trim(family: MoEFamily, plan: TrimPlan | None) -> MoEFamily:
    """``family`` with ``plan`` applied (``TrimmedFamily``), or ``family`` itself for no plan."""
    return family if plan is None else TrimmedFamily(family, plan)


def untrimmed(family: MoEFamily) -> MoEFamily:
    """The model's own family under a ``TrimmedFamily`` (``family`` itself when not trimmed)."""
    return family.inner if isinstance(family, TrimmedFamily) else family


@dataclass
class TrimScores:
    """The three trimming scores of one pass over calibration data (He, Dong et al. 2024).

    Attributes:
        experts: MoE block -> mean routing weight per expert over real tokens (the full softmax;
            the top-k gates for a router without one).
        layers: MoE block -> mean over tokens of ``cos(x', x' + MoE(Norm(x')))``, ``x'`` the
            residual stream entering the MoE's norm (high: the MoE changes little).
        blocks: block -> mean ``cos(block input, block output)``; None where the block may not
            be dropped (``MoEFamily.block_droppable``).
        tokens: block -> the number of tokens its scores average over.
    """

    experts: dict[str, list[float]]
    layers: dict[str, float]
    blocks: dict[str, float | None]
    tokens: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """The scores as plain JSON values (what a plan records)."""
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 6)

        return {"experts": {k: [r(v) for v in vs] for k, vs in self.experts.items()},
                "layers": {k: r(v) for k, v in self.layers.items()},
                "blocks": {k: r(v) for k, v in self.blocks.items()}, "tokens": self.tokens}


class _Sums:
    """Running sums over tokens, per block."""

    def __init__(self) -> None:
        self.value: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, per_token: torch.Tensor, mask: torch.Tensor) -> None:
        v = per_token[mask].to(torch.float64).sum(0)
        self.value[name] = self.value.get(name, 0) + v
        self.count[name] = self.count.get(name, 0) + int(mask.sum())

    def mean(self, name: str) -> torch.Tensor:
        return self.value[name] / max(self.count[name], 1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.to(torch.float32), b.to(torch.float32), dim=-1, eps=1e-12)


def trim_scores(family: MoEFamily, W: WeightSource, states: list[State],
                experts_for: ExpertsFor | None = None, after_layer: Any = None) -> TrimScores:
    """Every trimming score in one walk over ``states`` (the family's ``walk_layers``).

    Each stack of an encoder-decoder model is scored on its own stream (a Switch decoder
    block's input is the previous decoder block's output; the first block of each stack is
    never droppable there).

    Args:
        family: the model family (untrimmed, or a ``TrimmedFamily`` to score a trimmed model).
        W: its weights.
        states: one embedded state per calibration batch (``family.embed``); walked in place.
        experts_for: where the experts come from (default: read from ``W``).
        after_layer: ``(layer, states)`` after each block (a weight cache drops it here).

    Returns:
        The ``TrimScores``.
    """
    probs, moe_cos, block_cos = _Sums(), _Sums(), _Sums()
    before = [s["hidden"] for s in states]
    layers = family.layers()

    def on_route(layer: LayerSpec, i: int, x: torch.Tensor, idx: torch.Tensor,
                 gate: torch.Tensor) -> None:
        p = family.router_probs(layer, W, x, states[i])
        if p is None:  # top-k-only router: the routing weights it gives
            p = torch.zeros(*idx.shape[:-1], layer.num_experts, dtype=torch.float32)
            ok = idx >= 0
            p.scatter_add_(-1, idx.clamp_min(0), torch.where(ok, gate.float(), 0.0))
        probs.add(layer.name, p, family.token_mask(layer, states[i]))

    def after_moe(layer: LayerSpec, i: int, pre: State, post: State) -> None:
        moe_cos.add(layer.name, _cos(pre["hidden"], post["hidden"]), family.token_mask(layer, pre))

    def after(layer: LayerSpec, sts: list[State]) -> None:
        for i, s in enumerate(sts):
            if family.block_droppable(layer):
                block_cos.add(layer.name, _cos(before[i], s["hidden"]), family.token_mask(layer, s))
            before[i] = s["hidden"]
        if after_layer is not None:
            after_layer(layer, sts)

    with torch.no_grad():
        walk_layers(family, W, states, experts_for, on_route=on_route, after_layer=after,
                    after_moe=after_moe)
    moe = [lay.name for lay in layers if lay.moe]
    return TrimScores(
        experts={n: [float(v) for v in probs.mean(n)] for n in moe},
        layers={n: float(moe_cos.mean(n)) for n in moe},
        blocks={lay.name: float(block_cos.mean(lay.name)) if lay.name in block_cos.value
                else None for lay in layers},
        tokens={lay.name: (probs.count if lay.moe else block_cos.count).get(lay.name, 0)
                for lay in layers},
    )
