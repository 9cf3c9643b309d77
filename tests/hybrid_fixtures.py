"""Tiny transformers-saved Qwen3-Next / Qwen3.5-MoE checkpoints (the oracles of the hybrid
linear-attention families): three Gated DeltaNet blocks and one gated full-attention block, two
key heads serving four value heads, weights re-drawn as ``fixtures_s3.randomize`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fixtures_s3 import randomize, save_tiny

from qmoe_ray.models import get_family
from qmoe_ray.storage.checkpoint import open_checkpoint

TEXT = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, linear_conv_kernel_dim=4,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, moe_intermediate_size=12, shared_expert_intermediate_size=20,
    num_experts=8, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
NEXT = dict(intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False)
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
              patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
              num_position_embeddings=16)


def tiny_hybrid(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random fp32 model in eval mode: ``Qwen3NextForCausalLM`` (``qwen3_next``, a dense
    block 1, top-k not renormalised) or ``Qwen3_5MoeForConditionalGeneration`` (``qwen3_5_moe``,
    with a one-block vision tower)."""
    import transformers as tf

    torch.manual_seed(seed)
    if model_type == "qwen3_next":
        model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**{**TEXT, **NEXT, **overrides}))
    else:
        cfg = tf.Qwen3_5MoeConfig(text_config={**TEXT, **overrides}, vision_config=VISION)
        model = tf.Qwen3_5MoeForConditionalGeneration(cfg)
    return randomize(model.eval(), torch.Generator().manual_seed(seed + 1))


def decoder_layers(model: Any) -> Any:
    inner = model.model
    return getattr(inner, "language_model", inner).layers


def reference(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """transformers' logits and each decoder block's output."""
    outs: list[torch.Tensor] = []
    hooks = [lay.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple)
                                                                   else o))
             for lay in decoder_layers(model)]
    try:
        with torch.no_grad():
            res = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return res.logits, outs


def inputs_for(seed: int = 0, b: int = 3, s: int = 9) -> dict[str, torch.Tensor]:
    """Token ids with right padding in two rows (the second keeps 2/3, the third 4/9)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.int64)
    if b > 1:
        mask[1, (2 * s) // 3:] = 0
    if b > 2:
        mask[2, (4 * s) // 9:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


class HybridCase:
    def __init__(self, model_type: str, folder: Path, seed: int = 0, **overrides: Any):
        self.model = tiny_hybrid(model_type, seed=seed, **overrides)
        self.folder = save_tiny(self.model, folder)
        self.ckpt = open_checkpoint(str(self.folder))
        self.family = get_family(self.ckpt.config, self.ckpt)
