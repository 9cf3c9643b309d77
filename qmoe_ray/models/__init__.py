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
    moe_dense,
    run_forward,
)

# model_type -> (module, class). Imported lazily so one family's import cost is not everyone's.
FAMILIES: dict[str, tuple[str, str]] = {
    "switch_transformers": ("qmoe_ray.models.switch", "SwitchTransformers"),
    "mixtral": ("qmoe_ray.models.decoder_moe", "Mixtral"),
    "qwen2_moe": ("qmoe_ray.models.decoder_moe", "Qwen2Moe"),
    "qwen3_moe": ("qmoe_ray.models.decoder_moe", "Qwen3Moe"),
    "olmoe": ("qmoe_ray.models.decoder_moe", "Olmoe"),
}

SUPPORTED = tuple(sorted(FAMILIES))


def get_family(config: Mapping[str, Any]) -> MoEFamily:
    """The family adapter for a parsed ``config.json``.

    Raises:
        ValueError: ``model_type`` is missing or not supported (the message lists the supported).
    """
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"config.json model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED)}"
        )
    module, cls = FAMILIES[model_type]
    return getattr(importlib.import_module(module), cls)(config)


__all__ = [
    "DictWeights",
    "ExpertSpec",
    "FAMILIES",
    "LayerSpec",
    "MoEFamily",
    "SUPPORTED",
    "WeightSource",
    "get_family",
    "moe_dense",
    "run_forward",
]
