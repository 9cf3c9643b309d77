"""The trim plan: which experts, MoE layers and blocks a trimmed model keeps (docs/TRIM.md).

Why a plan file between the analysis and its use: scoring (``qmoe-ray analyze``) needs a pass
over calibration data, applying a plan (``eval --trim-plan``, ``compress --trim-plan`` and
the loader) needs none, and a person may want to edit the choice (keep an expert the scores
would drop). So the choice is a small JSON object that names blocks by their checkpoint prefix
(``model.layers.3``, ``decoder.block.2``) and experts by their original ids:

    {"qmoe_ray_trim_plan": 1,
     "model": {"model_type": "mixtral", "blocks": 4, "experts": {"model.layers.0": 8, ...}},
     "drop_blocks": ["model.layers.2"], "drop_layers": ["model.layers.3"],
     "keep_experts": {"model.layers.0": [0, 1, 3, 4, 5, 6, 7], ...},
     "budgets": {...}, "scores": {...}}

A layer missing from ``keep_experts`` keeps every expert. ``model`` is the identity of the model
the plan was made for; a plan is refused on any other model, naming what differs. ``scores`` and
``budgets`` are the analysis's record (read by people, ignored by the forward).

The choice from scores (``plan_from_scores``) follows He, Dong et al. 2024 ("Demystifying the
Compression of Mixture-of-Experts Through a Unified Framework"): Block Drop removes the blocks
whose output is most similar to their input, Layer Drop the MoE layers whose output changes the
residual stream least, Expert Drop the experts with the least mean routing weight, per layer or
under one budget across layers. Blocks go first, then layers among the remaining blocks, then
experts among the remaining MoE layers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qmoe_ray.errors import InputError, shorten
from qmoe_ray.models.base import LayerSpec, MoEFamily

PLAN_KEY = "qmoe_ray_trim_plan"
PLAN_VERSION = 1
_KEYS = {PLAN_KEY, "model", "drop_blocks", "drop_layers", "keep_experts", "budgets", "scores"}
MAX_PLAN_BYTES = 4 * 2**20


def model_identity(family: MoEFamily) -> dict[str, Any]:
    """What a plan records of the model it was made for: ``model_type``, the number of blocks
    and the experts of every MoE layer (by block name)."""
    layers = family.layers()
    return {
        "model_type": family.model_type,
        "blocks": len(layers),
        "experts": {lay.name: lay.num_experts for lay in layers if lay.moe},
    }


@dataclass(frozen=True)
class TrimPlan:
    """A checked trim plan (see the module doc); build it with ``TrimPlan.from_dict`` /
    ``from_json`` or ``plan_from_scores``, apply it with ``qmoe_ray.models.trim.trim``.

    Attributes:
        model: the identity of the model it was made for (``model_identity``).
        drop_blocks: blocks removed whole (attention, norms, feed-forward).
        drop_layers: MoE blocks whose MoE (and its norm) is removed.
        keep_experts: MoE block -> the original ids of the experts kept (sorted); a block not
            listed keeps every expert.
        budgets: the budgets the plan was made for (a record).
        scores: the analysis's scores (a record).
    """

    model: Mapping[str, Any]
    drop_blocks: tuple[str, ...] = ()
    drop_layers: tuple[str, ...] = ()
    keep_experts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    budgets: Mapping[str, Any] | None = None
    scores: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        m = self.model if isinstance(self.model, Mapping) else {}
        blocks, experts = m.get("blocks"), m.get("experts")
        if (not isinstance(m.get("model_type"), str) or type(blocks) is not int
                or not isinstance(experts, Mapping)
                or not all(type(n) is int and n > 0 for n in experts.values())):
            raise InputError("trim plan 'model' must be {model_type: str, blocks: int, experts: "
                             "{block: count}}, as qmoe-ray analyze writes it")
        both = set(self.drop_blocks) & set(self.drop_layers)
        if both:
            raise InputError(f"trim plan lists {sorted(both)[0]!r} in both drop_blocks and "
                             "drop_layers; a dropped block has no MoE left to drop: keep one")
        for kind, names in (("drop_blocks", self.drop_blocks), ("drop_layers", self.drop_layers)):
            if len(set(names)) != len(names):
                raise InputError(f"trim plan {kind} lists a block twice: {list(names)}")
        for name, kept in self.keep_experts.items():
            self._check_kept(name, kept, experts)

    def _check_kept(self, name: str, kept: Sequence[int], experts: Mapping[str, int]) -> None:
        where = f"trim plan keep_experts[{name!r}]"
        if name not in experts:
            raise InputError(f"{where}: not an MoE block of the plan's model (its MoE blocks: "
                             f"{shorten(list(experts), 200)})")
        if name in self.drop_blocks or name in self.drop_layers:
            raise InputError(f"{where}: the block's MoE is dropped (drop_blocks/drop_layers); "
                             "remove its keep_experts entry")
        n = experts[name]
        if not all(type(e) is int and 0 <= e < n for e in kept) or len(set(kept)) != len(kept):
            raise InputError(f"{where} must list distinct expert ids in [0, {n}), got "
                             f"{shorten(list(kept), 120)}")
        if not kept:
            raise InputError(f"{where} keeps no expert: a layer without experts is a Layer "
                             f"Drop; add {name!r} to drop_layers instead")

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan as the JSON object ``qmoe-ray analyze`` writes."""
        out: dict[str, Any] = {PLAN_KEY: PLAN_VERSION, "model": dict(self.model),
                               "drop_blocks": list(self.drop_blocks),
                               "drop_layers": list(self.drop_layers),
                               "keep_experts": {k: list(v) for k, v in self.keep_experts.items()}}
        if self.budgets is not None:
            out["budgets"] = dict(self.budgets)
        if self.scores is not None:
            out["scores"] = dict(self.scores)
        return out

    def to_json(self) -> str:
        """``to_dict`` as indented JSON, each list on one line (hand-editable)."""
        text = json.dumps(self.to_dict(), indent=1)
        return re.sub(r"\[([^\[\]{}]*)\]",
                      lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")
                                                if v.strip()) + "]", text) + "\n"

    @classmethod
    def from_dict(cls, d: Any, origin: str = "trim plan") -> TrimPlan:
        """A plan from its JSON object.

        Raises:
            InputError: not a plan, another version, an unknown key, or a bad entry (named).
        """
        if not isinstance(d, Mapping) or PLAN_KEY not in d:
            raise InputError(f"{origin} is not a trim plan (no {PLAN_KEY!r} key); write one with "
                             "qmoe-ray analyze SOURCE --output plan.json")
        if d[PLAN_KEY] != PLAN_VERSION:
            raise InputError(f"{origin}: trim plan version {shorten(d[PLAN_KEY])} is not "
                             f"supported (this reader reads version {PLAN_VERSION})")
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise InputError(f"{origin}: unknown key {unknown[0]!r} (a plan has "
                             f"{', '.join(sorted(_KEYS))})")
        model = d.get("model")
        if not isinstance(model, Mapping):
            raise InputError(f"{origin}: 'model' is missing (the identity of the model)")
        lists = {}
        for key in ("drop_blocks", "drop_layers"):
            v = d.get(key, [])
            if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
                raise InputError(f"{origin}: {key!r} must be a list of block names")
            lists[key] = tuple(v)
        keep = d.get("keep_experts", {})
        if not isinstance(keep, Mapping) or not all(isinstance(v, list) for v in keep.values()):
            raise InputError(f"{origin}: 'keep_experts' must map block names to lists of ids")
        try:
            return cls(model, lists["drop_blocks"], lists["drop_layers"],
                       {k: tuple(v) for k, v in keep.items()}, d.get("budgets"), d.get("scores"))
        except InputError as e:
            raise InputError(f"{origin}: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes, origin: str = "trim plan") -> TrimPlan:
        """A plan from JSON text (``from_dict``); bad JSON is an ``InputError`` naming
        ``origin``."""
        try:
            d = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{origin} is not valid JSON ({e}); write it with qmoe-ray "
                             "analyze") from None
        return cls.from_dict(d, origin)

    # -- against a model -------------------------------------------------------------------------
    def check(self, family: MoEFamily) -> None:
        """Refuse the plan on a model other than the one it was made for, naming the first
        difference, and check every block it names.

        Raises:
            InputError: the model type, the number of blocks, the MoE blocks or an expert count
                differ, or a named block does not exist / is not MoE / may not be dropped.
        """
        have, want = model_identity(family), self.model
        for key in ("model_type", "blocks"):
            if have[key] != want[key]:
                raise InputError(f"trim plan is for a model with {key} {shorten(want[key])}; "
                                 f"this model has {have[key]}: the plan belongs to another "
                                 "model (run qmoe-ray analyze on this one)")
        if set(have["experts"]) != set(want["experts"]):  # JSON with sorted keys: any order
            raise InputError(f"trim plan's MoE blocks {shorten(list(want['experts']), 160)} "
                             f"differ from this model's {shorten(list(have['experts']), 160)}")
        for name, n in have["experts"].items():
            if want["experts"][name] != n:
                raise InputError(f"trim plan is for a model with {want['experts'][name]} experts "
                                 f"in {name}; this model has {n} there: the plan belongs to "
                                 "another model")
        by_name = {lay.name: lay for lay in family.layers()}
        for name in self.drop_blocks:
            lay = by_name.get(name)
            if lay is None:
                raise InputError(f"trim plan drop_blocks: no block {name!r} in this model")
            if not family.block_droppable(lay):
                raise InputError(f"trim plan drop_blocks: {name!r} may not be dropped "
                                 f"({family.model_type} needs it: see docs/TRIM.md)")
        for name in self.drop_layers:
            if name not in have["experts"]:
                raise InputError(f"trim plan drop_layers: {name!r} is not an MoE block of "
                                 "this model (Layer Drop removes an MoE; use drop_blocks)")

    def kept(self, layer: LayerSpec) -> tuple[int, ...]:
        """The original ids of the experts ``layer`` keeps (all when the plan names none)."""
        return tuple(sorted(self.keep_experts.get(layer.name, range(layer.num_experts))))


def parse_expert_budget(spec: str | int | None) -> tuple[int, bool]:
    """``--drop-experts`` as ``(count, per_layer)``: ``"8"`` is 8 across all MoE layers,
    ``"1/layer"`` one per layer; None or 0 drops none.

    Raises:
        InputError: not ``N`` or ``N/layer`` with ``N >= 0``.
    """
    if spec is None:
        return 0, False
    text = str(spec).strip()
    per_layer = text.endswith("/layer")
    num = text.removesuffix("/layer")
    if not num.isdigit():
        raise InputError(f"--drop-experts {shorten(spec)}: expected N (across layers) or "
                         "N/layer, with N a whole number >= 0")
    return int(num), per_layer


def _pick(ranked: list[tuple[float, int, str]], n: int, what: str, flag: str) -> list[str]:
    if n < 0:
        raise InputError(f"{flag} {n}: must be >= 0")
    if n > len(ranked):
        raise InputError(f"{flag} {n}: the model has only {len(ranked)} {what}")
    return [name for _, _, name in sorted(ranked)[:n]]


def plan_from_scores(family: MoEFamily, scores: Mapping[str, Any], drop_experts: str | int |
                     None = None, drop_layers: int = 0, drop_blocks: int = 0) -> TrimPlan:
    """The plan for the budgets asked, from the scores ``trim_scores`` measured (module doc).

    Args:
        family: the (untrimmed) model family the scores are of.
        scores: ``TrimScores.to_dict()``: ``experts`` (block -> mean routing weight per
            expert), ``layers`` (MoE block -> Layer Drop score), ``blocks`` (block -> Block
            Drop score, None where the block may not be dropped).
        drop_experts: ``N`` (the N least-routed experts across the remaining MoE layers) or
            ``"N/layer"``.
        drop_layers: MoE layers to drop (the highest Layer Drop scores).
        drop_blocks: blocks to drop (the highest Block Drop scores).

    Returns:
        The ``TrimPlan`` (with the budgets and the scores recorded).

    Raises:
        InputError: a budget larger than what the model has, or one that would leave an MoE
            layer without experts (the message names the layer and the fix).
    """
    n_exp, per_layer = parse_expert_budget(drop_experts)
    layers = family.layers()
    blocks = _pick([(-s, lay.index, lay.name) for lay in layers
                    if (s := scores["blocks"].get(lay.name)) is not None],
                   drop_blocks, "blocks that may be dropped", "--drop-blocks")
    moe = [lay for lay in layers if lay.moe and lay.name not in blocks]
    dropped = _pick([(-scores["layers"][lay.name], lay.index, lay.name) for lay in moe],
                    drop_layers, "MoE layers left after the block drop", "--drop-layers")
    moe = [lay for lay in moe if lay.name not in dropped]
    drop: dict[str, set[int]] = {lay.name: set() for lay in moe}
    if per_layer:
        for lay in moe:
            if n_exp >= lay.num_experts:
                raise InputError(f"--drop-experts {n_exp}/layer drops every expert of "
                                 f"{lay.name} ({lay.num_experts} experts): a layer without "
                                 "experts is a Layer Drop; use --drop-layers")
            ranked = sorted((s, e) for e, s in enumerate(scores["experts"][lay.name]))
            drop[lay.name] = {e for _, e in ranked[:n_exp]}
    elif n_exp:
        ranked = sorted((s, lay.index, e, lay.name) for lay in moe
                        for e, s in enumerate(scores["experts"][lay.name]))
        if n_exp > len(ranked):
            raise InputError(f"--drop-experts {n_exp}: the MoE layers left hold only "
                             f"{len(ranked)} experts")
        for _, _, e, name in ranked[:n_exp]:
            drop[name].add(e)
    keep = {}
    for lay in moe:
        if len(drop[lay.name]) == lay.num_experts:
            raise InputError(f"--drop-experts {n_exp} drops every expert of {lay.name} (its "
                             f"{lay.num_experts} experts are among the {n_exp} least routed): "
                             "a layer without experts is a Layer Drop; drop fewer experts, or "
                             "write a plan that lists it in drop_layers")
        if drop[lay.name]:
            keep[lay.name] = tuple(e for e in range(lay.num_experts) if e not in drop[lay.name])
    budgets = {"drop_experts": f"{n_exp}/layer" if per_layer else n_exp,
               "drop_layers": drop_layers, "drop_blocks": drop_blocks}
    return TrimPlan(model_identity(family), tuple(blocks), tuple(dropped), keep, budgets,
                    dict(scores))
