"""Tiny transformers-saved DeepSeek-V3 / GLM-4.5 / MiniMax-M2 checkpoints (the oracles of the
sigmoid-routed families), with their routers' correction biases randomised: transformers
initialises them to zero, which would hide a family that ignores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fixtures_s3 import COMMON, save_tiny

YARN = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
    "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 1.0,
    "beta_fast": 32, "beta_slow": 1,
}

DEEPSEEK = dict(
    intermediate_size=40, moe_intermediate_size=12, num_key_value_heads=4, n_shared_experts=2,
    n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
    qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=10, n_group=4, topk_group=2,
    num_experts_per_tok=3, first_k_dense_replace=1, rope_parameters=YARN,
)
GLM = dict(
    intermediate_size=40, moe_intermediate_size=12, n_shared_experts=1, n_routed_experts=16,
    routed_scaling_factor=1.5, n_group=2, topk_group=1, num_experts_per_tok=3,
    first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
MINIMAX = dict(
    intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)


def tiny_sigmoid_model(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random fp32 ``*ForCausalLM`` (eval mode): weights drawn as in
    ``fixtures_s3.tiny_model`` and every ``e_score_correction_bias`` ``N(0, 0.3)``."""
    import transformers as tf

    cfg_cls, model_cls, kw = {
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, DEEPSEEK),
        "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, GLM),
        "minimax_m2": (tf.MiniMaxM2Config, tf.MiniMaxM2ForCausalLM, MINIMAX),
    }[model_type]
    cfg = cfg_cls(**{**COMMON, **kw, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        n = 0
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
                n += 1
        assert n > 0
    return model


def save_sigmoid(model: Any, path: Path, **kw: Any) -> Path:
    """``fixtures_s3.save_tiny``."""
    return save_tiny(model, path, **kw)
