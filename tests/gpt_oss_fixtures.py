"""Tiny transformers-saved gpt-oss checkpoints (the oracles of the ``gpt_oss`` family): sliding
and full layers, attention sinks, q/k/v/o, router and expert biases all drawn non-zero, YaRN, and a
SwiGLU limit low enough that the clamps act; and the same model with its experts hand-packed as
MXFP4 (``*_blocks`` / ``*_scales``, as the released checkpoints ship them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from fixtures_s3 import COMMON, randomize, save_tiny
from safetensors.torch import load_file, save_file

from qmoe_ray.storage.quantized import FP4_VALUES, mxfp4_encode

GPT_OSS = dict(
    intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, head_dim=16,
    sliding_window=4, swiglu_limit=0.8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 16},
)
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def tiny_gpt_oss(seed: int = 0, **overrides: Any) -> Any:
    """A tiny random fp32 ``GptOssForCausalLM`` (eval mode), weights as ``fixtures_s3.randomize``
    draws them and the sinks ``N(0, 1)`` (so that they matter)."""
    import transformers as tf

    cfg = tf.GptOssConfig(**{**COMMON, **GPT_OSS, **overrides})
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = randomize(tf.GptOssForCausalLM(cfg).eval(), g)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(cfg.num_attention_heads, generator=g))
    return model


def mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``qmoe_ray.storage.quantized.mxfp4_encode``: blocks and scales of a logical tensor."""
    return mxfp4_encode(w)


def save_mxfp4(model: Any, folder: Path) -> tuple[Path, Path]:
    """``model`` saved twice: with MXFP4 experts (``folder / "mxfp4"``, bf16 elsewhere) and as
    its dequantized twin (``folder / "dequant"``, every tensor bf16, the experts the values the
    blocks decode to). Returns both folders."""
    plain = save_tiny(model, folder / "plain", dtype=torch.bfloat16)
    t = load_file(plain / "model.safetensors")
    packed, twin = {}, {}
    for name, v in t.items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            blocks, scales = mxfp4_pack(v)
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
            vals = torch.stack((lut[(blocks & 0xF).long()], lut[(blocks >> 4).long()]), -1)
            vals = vals.flatten(-2) * torch.exp2(scales.float() - 127)[..., None]
            twin[name] = vals.flatten(-2).transpose(-2, -1).to(torch.bfloat16).contiguous()
        else:
            packed[name] = twin[name] = v
    config = json.loads((plain / "config.json").read_text())
    out = []
    for sub, tensors, cfg in (("mxfp4", packed, {**config, "quantization_config": MXFP4_CONFIG}),
                              ("dequant", twin, config)):
        d = folder / sub
        d.mkdir(parents=True)
        save_file(tensors, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "tokenizer.json").write_text((plain / "tokenizer.json").read_text())
        out.append(d)
    return out[0], out[1]
