"""A trimmed checkpoint's record (manifest ``trim``, format version 2 or 3) and the family it
implies.

A checkpoint compressed with a trim plan (``qmoe-ray compress --trim-plan`` or the budget flags;
docs/TRIM.md) holds the *trimmed* model: no tensor of a dropped block, no expert of a dropped
MoE layer, only the kept experts of an Expert-Dropped layer (renumbered ``0..kept-1`` in the
order of their original ids). Its ``config`` stays the source's, so what the checkpoint holds
follows from the config *and* the record::

    "trim": {"plan": {...the TrimPlan JSON: model, drop_blocks, drop_layers, keep_experts,
                      budgets, scores...},
             "router": "kept-rows",
             "experts": {"model.layers.0": {"kept": [0, 1, 3], "top_k": 2}, ...},
             "dropped_blocks": [...], "dropped_layers": [...]}

``plan`` is what the readers apply (``TrimmedFamily``); ``router`` says how a trimmed router
routes (``kept-rows``: the softmax/top-k over the kept rows of the full router weight, which the
checkpoint keeps whole; top-k becomes ``min(top_k, kept)``); ``experts``, ``dropped_blocks``,
``dropped_layers`` repeat the plan for people and other readers. Kept for a Layer-Dropped block:
its attention, its norms and its router (unused, a few KB).

Why a new format version only for trimmed checkpoints: a reader of version 1 would take a
trimmed checkpoint for a damaged one (fewer experts than its config implies); version 2 makes it
say "upgrade". Untrimmed checkpoints kept version 1, so every reader of version 1 read them.
Since version 3 (the columnar layout, ``format.columns``) every checkpoint is written as version 3,
trimmed or not, and the record alone says which it is. The keys here are separate from the rest of the manifest (``manifest.py`` only dispatches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmoe_ray.errors import CheckpointError, InputError

TRIM_KEY = "trim"
TRIM_VERSION = 2  # the format version trimmed checkpoints had before version 3
TRIM_ANY = (2, 3)  # versions a trim record may appear in (3: trimmed or not)
ROUTER_MODE = "kept-rows"
_KEYS = {"plan", "router", "experts", "dropped_blocks", "dropped_layers"}


def trim_record(trimmed: Any) -> dict[str, Any]:
    """The manifest's ``trim`` entry for a ``TrimmedFamily``."""
    plan = trimmed.plan
    experts = {}
    for lay in trimmed.layers():
        if lay.moe:
            experts[lay.name] = {"kept": trimmed.original_ids(lay, range(lay.num_experts)),
                                 "top_k": lay.top_k}
    return {"plan": plan.to_dict(), "router": ROUTER_MODE, "experts": experts,
            "dropped_blocks": list(plan.drop_blocks), "dropped_layers": list(plan.drop_layers)}


def trim_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a report says of a trim (``qmoe_ray.format.trimmed.trim_record``): the dropped
    blocks and MoE layers, the kept experts per MoE layer (original ids) and the budgets."""
    plan = record["plan"]
    return {"dropped_blocks": record["dropped_blocks"],
            "dropped_layers": record["dropped_layers"],
            "kept_experts": {k: v["kept"] for k, v in record["experts"].items()},
            "budgets": plan.get("budgets"), "router": record["router"]}


def trim_line(t: Mapping[str, Any]) -> str:
    """One line for a ``trim_summary``."""
    kept = t["kept_experts"]
    counts = sorted({len(v) for v in kept.values()})
    return (f"{len(t['dropped_blocks'])} blocks dropped {t['dropped_blocks']}, "
            f"{len(t['dropped_layers'])} MoE layers dropped {t['dropped_layers']}, "
            f"{len(kept)} MoE layers kept with {'/'.join(map(str, counts))} experts "
            f"({sum(len(v) for v in kept.values())} in all)")


def read_trim(manifest: Mapping[str, Any], where: str = "manifest") -> Any:
    """The ``TrimPlan`` a manifest records (None for an untrimmed checkpoint).

    Raises:
        CheckpointError: the record is malformed, or its version disagrees with it.
    """
    from qmoe_ray.models.trim_plan import TrimPlan

    rec = manifest.get(TRIM_KEY)
    version = manifest.get("format_version")
    if rec is None:
        if version == TRIM_VERSION:
            raise CheckpointError(f"{where}: format version {TRIM_VERSION} without a 'trim' "
                                  "record; the checkpoint is damaged: re-run the job")
        return None
    if version not in TRIM_ANY:
        raise CheckpointError(f"{where}: a 'trim' record in a format version {version} "
                              f"manifest (trimmed checkpoints are version {TRIM_VERSION} or "
                              "later); the checkpoint is damaged: re-run the job")
    if not isinstance(rec, dict) or set(rec) - _KEYS or "plan" not in rec:
        raise CheckpointError(f"{where}: 'trim' must be an object with 'plan' (and "
                              f"{', '.join(sorted(_KEYS - {'plan'}))})")
    if rec.get("router", ROUTER_MODE) != ROUTER_MODE:
        raise CheckpointError(f"{where}: trim router mode {str(rec.get('router'))[:40]!r} is "
                              f"not supported (this reader knows {ROUTER_MODE!r}); upgrade "
                              "qmoe-ray")
    try:
        return TrimPlan.from_dict(rec["plan"], f"{where} trim.plan")
    except InputError as exc:
        raise CheckpointError(str(exc)) from None


def manifest_family(manifest: Mapping[str, Any], where: str = "manifest") -> Any:
    """The family of the model a checkpoint holds: its config's, trimmed by its ``trim``
    record (unbound: bind it with ``bind_stored``)."""
    from qmoe_ray.models import get_family
    from qmoe_ray.models.trim import TrimmedFamily

    config = manifest["config"]
    try:
        family = get_family(config)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError,
            AttributeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"{where}: config: {msg}") from None
    plan = read_trim(manifest, where)
    if plan is None:
        return family
    try:
        return TrimmedFamily(family, plan)
    except InputError as exc:
        raise CheckpointError(f"{where}: trim.plan: {exc}") from None


def _phantoms(trimmed: Any, names: set[str]) -> set[str]:
    """Names standing in for a trimmed checkpoint's missing parts while the untrimmed family
    binds its layout (``bind`` probes every MoE block, or the first one): each dropped MoE
    block's names are copied from a kept MoE block of the same stack."""
    kept = [lay for lay in trimmed.layers() if lay.moe]
    out: set[str] = set()
    for lay in trimmed.inner.layers():
        if not lay.moe or any(k.name == lay.name for k in kept):
            continue
        like = [k for k in kept if k.stage == lay.stage] or kept
        if not like:
            raise CheckpointError("the trim drops every MoE layer: no expert layout to read")
        src = like[0].name + "."
        out |= {lay.name + "." + n[len(src):] for n in names if n.startswith(src)}
    return out


def bind_stored(family: Any, names: Any) -> Any:
    """Bind ``family`` (``manifest_family``'s) to a checkpoint's tensor names (a list, set or
    ``WeightSource``)."""
    from qmoe_ray.models.trim import TrimmedFamily

    if not isinstance(family, TrimmedFamily):
        return family.bind(names)
    trimmed = family
    have = set(names if isinstance(names, (list, tuple, set, frozenset)) else names.names)
    trimmed.inner.bind(have | _phantoms(trimmed, have))
    return trimmed


def stored_shapes(family: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``family``'s model holds besides its quantized experts'
    codes, with its shape: the family's ``expected_shapes`` (a ``TrimmedFamily``: the untrimmed
    ones, less the dropped blocks' tensors and the dropped experts')."""
    from qmoe_ray.models.trim import TrimmedFamily

    shapes = {n: tuple(s) for n, s in family.expected_shapes().items()}
    if not isinstance(family, TrimmedFamily):
        return shapes
    trimmed = family
    inner = trimmed.inner
    gone = tuple(f"{b}." for b in trimmed.plan.drop_blocks)
    every = {n for lay in inner.layers() if lay.moe for e in range(lay.num_experts)
             for n in inner.expert_names(lay, e).values()}
    kept = {n for lay in family.layers() if lay.moe for e in range(lay.num_experts)
            for n in family.expert_names(lay, e).values()}
    return {n: s for n, s in shapes.items()
            if not n.startswith(gone) and (n not in every or n in kept)}
