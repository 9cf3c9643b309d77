"""Reading sizes and switches out of an untrusted ``config.json``: the bounds every size is checked
against and the parsers every family uses (a required integer, an optional one, a float, the total
of routed experts).

Why here and not in each family: a bound or a message that differs between families is a bug
report waiting to happen; future families (DeepSeek-V3, GLM) parse their configs with the same
functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qmoe_ray.errors import CheckpointError

# -- config bounds ---------------------------------------------------------------------------------
# A config.json (a source's, or the one stored in a compressed checkpoint's manifest) is untrusted:
# the families size lists of layers and of expert tensor names from it, so every size is checked to
# be an integer within a finite bound before anything is built from it. The bounds are far above any
# released model (largest seen: 126 layers, hidden 16384, intermediate 53248, 128 heads, head_dim
# 256, 2048 experts per layer in switch-c-2048, about 61k routed experts in all, vocab 262k) and
# far below what would exhaust memory.
MAX_LAYERS = 1024  #: blocks per stack
MAX_HIDDEN = 2**16  #: hidden_size / d_model
MAX_FF = 2**18  #: intermediate sizes (dense, routed and shared experts), d_ff
MAX_HEADS = 4096  #: attention / key-value heads
MAX_HEAD_DIM = 4096  #: head_dim / d_kv
MAX_EXPERTS = 16384  #: routed experts per MoE layer
MAX_TOTAL_EXPERTS = 2**18  #: routed experts over all MoE layers of a model
MAX_VOCAB = 2**22  #: vocabulary rows
MAX_POSITIONS = 2**24  #: window lengths, distances, capacities and similar counts


def config_int(
    config: Mapping[str, Any], key: str, hi: int, lo: int = 1, default: int | None = None
) -> int:
    """``config[key]`` as an integer checked to lie in ``lo..hi``.

    Args:
        config: a parsed ``config.json``.
        key: the field (named in the error); may be dotted for messages only.
        hi, lo: inclusive bounds.
        default: used when the key is absent or null (None: the key is required).

    Returns:
        The value.

    Raises:
        CheckpointError: the field is missing (with no default), not an integer (floats, strings
            and booleans are refused, even ``64.0``), or outside ``lo..hi``.
    """
    v = config.get(key)
    if v is None:
        if default is None:
            raise CheckpointError(f"config.json lacks the field {key!r}; add it")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        shown = repr(v) if len(repr(v)) <= 40 else f"a {type(v).__name__}"
        raise CheckpointError(f"config.json {key!r} is {shown}, not an integer")
    if not lo <= v <= hi:
        raise CheckpointError(
            f"config.json {key!r} is {v}: expected an integer in {lo}..{hi} (qmoe-ray's bound, "
            "far above any released model; see qmoe_ray.models.base): the config is corrupt or "
            "not a model's"
        )
    return v


def config_float(
    config: Mapping[str, Any], key: str, default: float, positive: bool = True
) -> float:
    """``config[key]`` as a finite float (``default`` when absent or null).

    Raises:
        CheckpointError: the field is not a finite number (or not > 0 when ``positive``).
    """
    v = config.get(key)
    if v is None:
        return float(default)
    f = math.nan
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            f = float(v)
        except OverflowError:  # an integer of hundreds of digits
            f = math.inf
    if not math.isfinite(f) or (positive and f <= 0):
        shown = repr(v) if len(repr(v)) <= 40 else f"a {type(v).__name__}"
        sign = "positive " if positive else ""
        raise CheckpointError(f"config.json {key!r} is {shown}, not a finite {sign}number")
    return f


def require_int(config: Mapping[str, Any], hi: int, *keys: str, what: str) -> int:
    """The first of ``keys`` present (not null), as an integer in ``1..hi`` (``config_int``).

    Args:
        config: a parsed ``config.json``.
        hi: inclusive upper bound.
        keys: the field and its aliases, in order of preference.
        what: the sentence naming what needs it (raised when every key is absent).

    Raises:
        ValueError: none of ``keys`` is present (the message names them and ``what``).
        CheckpointError: the value is not an integer within the bound.
    """
    key = next((k for k in keys if config.get(k) is not None), None)
    if key is None:
        raise ValueError(what.format(keys=" or ".join(repr(k) for k in keys)))
    return config_int(config, key, hi)


def check_total_experts(n_moe: int, experts: int, unit: str = "layers") -> None:
    """Refuse a config whose routed experts over all MoE ``unit`` exceed ``MAX_TOTAL_EXPERTS``.

    Raises:
        CheckpointError: naming the count of MoE layers (``unit``), the experts per layer and
            their product.
    """
    if n_moe * experts > MAX_TOTAL_EXPERTS:
        raise CheckpointError(
            f"config.json: {n_moe} MoE {unit} x {experts} experts = {n_moe * experts} routed "
            f"experts, above qmoe-ray's bound of {MAX_TOTAL_EXPERTS} (far above any released "
            "model): the config is corrupt"
        )
