"""HF export of a trimmed checkpoint (docs/TRIM.md, "HF export"): what vanilla transformers can
express, and the renaming that expresses it.

transformers builds every MoE layer of a model from one config, so a trimmed model is
expressible when its trim is one of:

- **Block Drop**: the kept blocks are renumbered ``0..kept-1`` (tensor names and
  ``num_hidden_layers``); per-layer config lists (``layer_types``) keep the kept blocks' entries.
  Refused when the family's config then implies another dense/MoE pattern for the renumbered
  blocks than the kept blocks have (``decoder_sparse_step``, ``first_k_dense_replace``,
  ``mlp_only_layers``...), or when a sliding-window layer split (``max_window_layers``) would
  move;
- **uniform Expert Drop**: every MoE layer left keeps the same number of experts, at least
  top-k. The config's expert count becomes the kept count, each router keeps the rows of its
  kept experts (in original-id order, as the experts are renumbered), so transformers' softmax
  and top-k run over the kept experts exactly as the trimmed forward does.

Refused, with the reason: a Layer Drop (transformers has no MoE block without its MoE; exporting
zero experts instead is not exact for routers that renormalise), per-layer expert counts, fewer
experts kept than top-k, and families whose routers group experts (DeepSeek-V3's ``n_group``,
GLM, Kimi, MiniMax: their sigmoid routers and expert groups are not checked here) or
SwitchTransformers (per-stack sparse steps).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from qmoe_ray.errors import InputError

#: families whose trimmed checkpoints export (their routers: softmax over the router's rows)
EXPORTABLE = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts",
              "qwen3_moe": "num_experts", "olmoe": "num_experts"}


class TrimExport:
    """How a trimmed checkpoint's tensors and config are written for transformers.

    Built by ``trim_export`` (which refuses what transformers cannot express)."""

    def __init__(self, trimmed: Any, config: Mapping[str, Any]):
        self.trimmed = trimmed
        inner = trimmed.inner
        kept = trimmed.layers()
        self.renumber = {lay.index: i for i, lay in enumerate(kept)}
        self.rows = {trimmed.router_name(lay): torch.tensor(
            trimmed.original_ids(lay, range(lay.num_experts))) for lay in kept
            if lay.moe and lay.num_experts < trimmed.original(lay).num_experts}
        n_all = len(inner.layers())
        out = dict(config)
        out["num_hidden_layers"] = len(kept)
        for k, v in config.items():
            if isinstance(v, list) and len(v) == n_all and k != "architectures":
                out[k] = [v[lay.index] for lay in kept]
        moe = [lay for lay in kept if lay.moe]
        if moe:
            out[EXPORTABLE[trimmed.model_type]] = moe[0].num_experts
        self.config = out

    def name(self, name: str) -> str:
        """The exported name of a stored (or exported expert) tensor."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m is None:
            return name
        i = int(m.group(1))
        if i not in self.renumber:
            raise InputError(f"tensor {name!r} belongs to a dropped block")
        return f"model.layers.{self.renumber[i]}.{name[m.end():]}"

    def tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A stored dense tensor as exported (a router: its kept rows)."""
        rows = self.rows.get(name)
        return t if rows is None else t[rows].contiguous()


def trim_export(family: Any, config: Mapping[str, Any]) -> TrimExport | None:
    """The export of a checkpoint whose family is ``family`` (``manifest_family``'s, bound);
    None when it is not trimmed.

    Raises:
        InputError: the trim cannot be expressed by vanilla transformers (the reason named).
    """
    from qmoe_ray.models import get_family
    from qmoe_ray.models.trim import TrimmedFamily

    if not isinstance(family, TrimmedFamily):
        return None
    trimmed = family
    plan, mt = trimmed.plan, trimmed.model_type
    why = "export --format hf of this trimmed checkpoint is refused: "
    if mt not in EXPORTABLE:
        raise InputError(f"{why}exporting a trimmed {mt} checkpoint is not supported (only "
                         f"{', '.join(sorted(EXPORTABLE))}; their routers are a softmax over "
                         "the router's rows); load it with qmoe_ray.load instead")
    if plan.drop_layers:
        raise InputError(f"{why}it Layer-Drops {list(plan.drop_layers)}, and transformers "
                         "builds no block without its MoE; trim with Block Drop instead, or "
                         "load it with qmoe_ray.load")
    moe = [lay for lay in family.layers() if lay.moe]
    counts = sorted({lay.num_experts for lay in moe})
    if len(counts) > 1:
        per = {lay.name: lay.num_experts for lay in moe}
        raise InputError(f"{why}its MoE layers keep different numbers of experts ({per}); "
                         "transformers has one expert count per model: drop the same number "
                         "in every layer (--drop-experts N/layer)")
    k = trimmed.original(moe[0]).top_k
    if counts and counts[0] < k:
        raise InputError(f"{why}it keeps {counts[0]} experts per layer, fewer than top-k {k} "
                         "(num_experts_per_tok), which transformers' router needs")
    out = TrimExport(family, config)
    if config.get("use_sliding_window") and plan.drop_blocks:
        raise InputError(f"{why}Block Drop with use_sliding_window: the window's layer split "
                         "(max_window_layers) would move")
    want = [lay.moe for lay in family.layers()]
    got = [lay.moe for lay in get_family(out.config).layers()]
    if want != got:
        raise InputError(f"{why}the {mt} config cannot express the kept blocks' dense/MoE "
                         f"pattern {want} once renumbered (it would give {got})")
    return out
