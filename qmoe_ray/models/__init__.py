"""Model families, chosen by ``config.json``'s ``model_type``.

Each family implements ``qmoe_ray.models.base.MoEFamily`` in plain torch; transformers is only the
test oracle.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from qmoe_ray.models.base import (
    DictWeights,
    ExpertSpec,
    LayerSpec,
    MoEFamily,
    WeightSource,
    experts_from,
    moe_dense,
    run_forward,
    walk_layers,
)

# model_type -> (module, class). Imported lazily so one family's import cost is not everyone's.
FAMILIES: dict[str, tuple[str, str]] = {
    "switch_transformers": ("qmoe_ray.models.switch", "SwitchTransformers"),
    "mixtral": ("qmoe_ray.models.decoder_moe", "Mixtral"),
    "qwen2_moe": ("qmoe_ray.models.decoder_moe", "Qwen2Moe"),
    "qwen3_moe": ("qmoe_ray.models.decoder_moe", "Qwen3Moe"),
    "olmoe": ("qmoe_ray.models.decoder_moe", "Olmoe"),
    "deepseek_v3": ("qmoe_ray.models.sigmoid_moe", "DeepseekV3"),
    "kimi_k2": ("qmoe_ray.models.sigmoid_moe", "KimiK2"),
    "glm4_moe": ("qmoe_ray.models.sigmoid_moe", "Glm4Moe"),
    "minimax_m2": ("qmoe_ray.models.sigmoid_moe", "MiniMaxM2"),
    "gpt_oss": ("qmoe_ray.models.gpt_oss", "GptOss"),
    "qwen3_next": ("qmoe_ray.models.hybrid_moe", "Qwen3Next"),
    "qwen3_5_moe": ("qmoe_ray.models.hybrid_moe", "Qwen3_5Moe"),
    "qwen3_5_moe_text": ("qmoe_ray.models.hybrid_moe", "Qwen3_5MoeText"),
}

SUPPORTED = tuple(sorted(FAMILIES))


def get_family(config: Mapping[str, Any], names: Any = None) -> MoEFamily:
    """The family adapter for a parsed ``config.json``.

    Args:
        config: the parsed ``config.json`` (a source's, or a compressed checkpoint's manifest
            ``config``); its sizes are bounded before anything is built from them.
        names: the checkpoint's tensor names (a list, a set or a ``WeightSource``). Given, the
            expert layout (per-expert or fused 3-D tensors) is resolved from them now
            (``MoEFamily.bind``); without them, asking for source tensor names raises until
            ``bind`` is called (the layout is never guessed).

    Raises:
        ValueError: ``model_type`` is missing or not supported (the message lists the supported),
            or a required field is missing or inconsistent.
        CheckpointError (a ``ValueError``): a size in the config is not an integer or out of
            bounds (``qmoe_ray.models.config``).
        KeyError: ``names`` hold the experts of the first MoE layer under no known layout.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(
            f"config.json model_type {repr(model_type)[:60]} is not supported; supported model "
            f"types: {', '.join(SUPPORTED)}"
        )
    module, cls = FAMILIES[model_type]
    family = getattr(importlib.import_module(module), cls)(config)
    if names is not None:
        family.bind(names)
    return family


__all__ = [
    "DictWeights",
    "ExpertSpec",
    "FAMILIES",
    "LayerSpec",
    "MoEFamily",
    "SUPPORTED",
    "WeightSource",
    "experts_from",
    "get_family",
    "moe_dense",
    "run_forward",
    "walk_layers",
]
