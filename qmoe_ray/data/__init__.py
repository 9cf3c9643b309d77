"""Calibration and evaluation data: token ids from files or text, made into model inputs.

``load_samples`` is the entry point used by the compressor and by ``qmoe-ray eval``;
``embedded_model_path`` locates the tiny trained MoE shipped with the package.
"""

from qmoe_ray.data.corruption import SpanCorruption, choose_windows, corrupt_batch, span_corrupt
from qmoe_ray.data.samples import (
    EMBEDDED,
    EMBEDDED_SWITCH,
    SPLITS,
    embedded_model_path,
    embedded_switch_path,
    hessian_token_mask,
    is_encoder_decoder,
    load_samples,
    resolve_data,
    resolve_source,
    sentinel_ids,
    special_token_ids,
)
from qmoe_ray.data.sources import TokenData, load_tokenizer, read_tokens

__all__ = [
    "EMBEDDED",
    "EMBEDDED_SWITCH",
    "SPLITS",
    "SpanCorruption",
    "TokenData",
    "choose_windows",
    "corrupt_batch",
    "embedded_model_path",
    "embedded_switch_path",
    "hessian_token_mask",
    "is_encoder_decoder",
    "load_samples",
    "resolve_data",
    "resolve_source",
    "load_tokenizer",
    "read_tokens",
    "sentinel_ids",
    "span_corrupt",
    "special_token_ids",
]
