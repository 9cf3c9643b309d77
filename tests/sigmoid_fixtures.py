"""Tiny transformers-saved DeepSeek-V3 / GLM-4.5 / MiniMax-M2 checkpoints (the oracles of the
sigmoid-routed families), with their routers' correction biases randomised: transformers
initialises them to zero, which would hide a family that ignores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from fixtures_s3 import COMMON, layer_outputs, randomize, save_tiny

from qmoe_ray.models import get_family, run_forward, walk_layers
from qmoe_ray.storage.checkpoint import open_checkpoint

ATOL = 1e-4

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
    g = torch.Generator().manual_seed(seed + 1)
    model = randomize(model_cls(cfg).eval(), g)
    with torch.no_grad():
        n = 0
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
                n += 1
        assert n > 0
    return model


def inputs_for(seed: int = 0, b: int = 3, s: int = 9) -> dict[str, torch.Tensor]:
    """Token ids with right padding in two rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


class Case:
    def __init__(self, model_type: str, folder: Path, seed: int = 0, **overrides):
        self.model = tiny_sigmoid_model(model_type, seed=seed, **overrides)
        self.folder = save_tiny(self.model, folder)
        self.ckpt = open_checkpoint(str(self.folder))
        self.family = get_family(self.ckpt.config, self.ckpt)


reference = layer_outputs  # transformers' logits and each decoder layer's output


def check_against_transformers(case: Case, inputs) -> None:
    """Blocks, routing (same experts and gates as transformers' router on our MoE input) and
    logits within fp32 tolerance; shared by the GLM / MiniMax tests."""
    ref_logits, ref_blocks = reference(case.model, inputs)
    blocks, routes = [], {}
    fam, W = case.family, case.ckpt
    (state,) = walk_layers(
        fam, W, [fam.embed(W, inputs)],
        on_route=lambda lay, _, x, idx, gate: routes.__setitem__(lay.block, (x, idx, gate)),
        after_layer=lambda lay, states: blocks.append(states[0]["hidden"]),
    )
    logits = fam.logits(W, state)
    assert len(blocks) == len(ref_blocks) == case.model.config.num_hidden_layers
    for i, (ours, ref) in enumerate(zip(blocks, ref_blocks, strict=True)):
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4, msg=f"block {i}")
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=1e-4)
    assert ref_logits.abs().max() > 1.0
    assert routes and set(routes) == {lay.block for lay in fam.layers() if lay.moe}
    for block, (x, idx, gate) in routes.items():
        moe = case.model.model.layers[block].mlp
        with torch.no_grad():
            flat = x.reshape(-1, x.shape[-1])
            if hasattr(moe, "e_score_correction_bias"):  # MiniMax: the bias beside the router
                _, w_ref, i_ref = moe.gate(flat, moe.e_score_correction_bias)
            else:
                _, w_ref, i_ref = moe.gate(flat)
        i_ref, w_ref = i_ref.reshape(idx.shape), w_ref.reshape(gate.shape)
        order, ref_order = idx.argsort(-1), i_ref.argsort(-1)
        assert torch.equal(idx.gather(-1, order), i_ref.gather(-1, ref_order))
        torch.testing.assert_close(gate.gather(-1, order), w_ref.gather(-1, ref_order).float())


def check_loss_and_evaluate(case: Case, tmp_path: Path) -> None:
    """Our loss terms equal transformers' loss (fp32 tolerance) and ``evaluate`` over a token
    file its loss within 0.05%."""
    from qmoe_ray.read.evaluate import evaluate

    inputs = inputs_for(seed=1)
    total, count = case.family.loss_terms(run_forward(case.family, case.ckpt, inputs), inputs)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = case.model(**inputs, labels=labels).loss
    torch.testing.assert_close(total / count, ref, atol=ATOL, rtol=1e-4)
    rows = np.random.default_rng(0).integers(3, 97, size=(6, 12)).astype(np.int64)
    np.save(tmp_path / "rows.npy", rows)
    ours = evaluate(str(case.folder), str(tmp_path / "rows.npy"), batch_size=4)["loss"]
    x = torch.from_numpy(rows)
    with torch.no_grad():
        want = float(case.model(x, labels=x).loss)
    assert abs(ours - want) <= 5e-4 * want, (ours, want)
