"""Every family in ``FAMILIES`` implements the whole ``MoEFamily`` contract, and the code that
runs families calls nothing outside it (no probing for optional methods).

Each family is built from a tiny hand-written config (no transformers needed); its weights are
random tensors of exactly ``expected_shapes``, so these tests also pin that the shapes a family
declares are the tensors its forward reads.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from qmoe_ray.models import FAMILIES, DictWeights, get_family, run_forward, walk_layers
from qmoe_ray.models.base import MoEFamily

_DEC = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2)
TINY = {
    "switch_transformers": dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                num_decoder_layers=2, num_heads=4, num_experts=4,
                                expert_capacity=8, relative_attention_num_buckets=8,
                                encoder_sparse_step=2, decoder_sparse_step=2),
    "mixtral": dict(_DEC, intermediate_size=24, num_local_experts=4),
    "qwen2_moe": dict(_DEC, num_hidden_layers=3, intermediate_size=32, moe_intermediate_size=12,
                      shared_expert_intermediate_size=20, num_experts=4, decoder_sparse_step=2),
    "qwen3_moe": dict(_DEC, head_dim=8, moe_intermediate_size=12, num_experts=4,
                      norm_topk_prob=True),
    "olmoe": dict(_DEC, intermediate_size=12, num_experts=4, clip_qkv=3.0),
    "deepseek_v3": dict(_DEC, num_key_value_heads=4, intermediate_size=24,
                        moe_intermediate_size=8, n_routed_experts=8, n_shared_experts=1,
                        kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=4, qk_rope_head_dim=4,
                        v_head_dim=6, n_group=2, topk_group=1, first_k_dense_replace=1),
    "glm4_moe": dict(_DEC, head_dim=8, intermediate_size=24, moe_intermediate_size=8,
                     n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                     first_k_dense_replace=1, use_qk_norm=True, attention_bias=True),
    "minimax_m2": dict(_DEC, head_dim=8, intermediate_size=12, num_local_experts=4,
                       rotary_dim=4),
    "gpt_oss": dict(_DEC, head_dim=8, intermediate_size=12, num_local_experts=4,
                    sliding_window=4),
}
TINY["kimi_k2"] = TINY["deepseek_v3"]
_HYBRID = dict(_DEC, num_hidden_layers=4, head_dim=8, moe_intermediate_size=8, num_experts=4,
               shared_expert_intermediate_size=12, linear_num_key_heads=2,
               linear_num_value_heads=4, linear_key_head_dim=4, linear_value_head_dim=4,
               linear_conv_kernel_dim=3)
TINY["qwen3_next"] = dict(_HYBRID, intermediate_size=24, mlp_only_layers=[2])
TINY["qwen3_5_moe_text"] = _HYBRID
# the multimodal wrapper: sizes in text_config (vocab_size on top too, for this test's inputs)
TINY["qwen3_5_moe"] = dict(vocab_size=64, text_config=_HYBRID)

#: what the contract offers besides MoEFamily's methods and class attributes: the parsed config
_INSTANCE = {"config"}
ROOT = Path(__file__).resolve().parent.parent / "qmoe_ray"


def _family(model_type: str) -> MoEFamily:
    """The family bound to our canonical expert names (and its routers under each module)."""
    fam = get_family({"model_type": model_type, **TINY[model_type]})
    names = set()
    for lay in fam.layers():
        if lay.moe:
            for e in range(lay.num_experts):
                names.update(fam.expert_names(lay, e).values())
            names.update(f"{lay.name}.{m}.{r}.weight" for m in fam.moe_modules or ()
                         for r in ("gate", "router"))
    return fam.bind(names)


class _Reads(DictWeights):
    def __init__(self, tensors):
        super().__init__(tensors)
        self.read: set[str] = set()

    def __call__(self, name):
        self.read.add(name)
        return super().__call__(name)


def _inputs(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.randint(3, vocab, (2, 5), generator=g)}


def test_every_family_has_a_tiny_config_here():
    assert set(TINY) == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_implements_the_whole_contract(model_type):
    fam = _family(model_type)
    cls = type(fam)
    assert not inspect.isabstract(cls), sorted(getattr(cls, "__abstractmethods__", ()))
    assert fam.model_type == model_type and isinstance(fam.expert_layout, str)
    assert fam.moe_modules is None or all(isinstance(m, str) for m in fam.moe_modules)
    assert set(fam.source_roles) == set(fam.expert_spec.roles)
    shapes = fam.expected_shapes()
    g = torch.Generator().manual_seed(1)
    tensors = {n: torch.randn(s, generator=g) * 0.3 for n, s in shapes.items()}
    fam.check_weights(list(tensors), lambda n: tuple(tensors[n].shape))
    W = _Reads(tensors)
    inputs = _inputs(fam.config["vocab_size"])
    logits = run_forward(fam, W, inputs)
    moe = [lay for lay in fam.layers() if lay.moe]
    experts = {n for lay in moe for n in fam.source_expert_names(lay)}
    # the declared shapes are what the forward reads (experts: those the routers picked)
    assert set(shapes) - experts <= W.read <= set(shapes)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    total, count = fam.loss_terms(logits, inputs)
    assert count > 0 and torch.isfinite(total)
    # the walk's pieces: masks and routing per MoE layer, on every batch of a layer-major walk
    seen = []

    def check_route(layer, batch, x, idx, gate):
        assert idx.shape == gate.shape and idx.shape[-1] == layer.top_k
        assert idx.dtype == torch.int64 and int(idx.max()) < layer.num_experts
        seen.append((layer.index, batch))

    states = [fam.embed(W, inputs), fam.embed(W, inputs)]
    walk_layers(fam, W, states, on_route=check_route)
    torch.testing.assert_close(fam.logits(W, states[1]), logits, rtol=0, atol=0)
    assert seen == [(lay.index, b) for lay in moe for b in (0, 1)]
    for lay in moe:
        w = fam.read_experts(lay, W, [0, lay.num_experts - 1])
        spec = fam.expert_spec  # the matrices, and the biases of those that have one
        assert set(w) == set(spec.roles) | {f"{r}_bias" for r in spec.bias_roles}
        assert all(t.dtype == torch.float32 and t.shape[0] == 2 for t in w.values())
    routers = fam.router_names()
    assert routers == {fam.router_name(lay) for lay in moe} and routers <= set(shapes)
    dense = fam.dense_names(list(tensors))
    for n in dense:  # routers (and their correction biases or biases) and the experts'
        # carried biases keep their source precision, the rest is stored in bf16
        keep = ("e_score_correction_bias", ".mlp.router.bias", ".experts.gate_up_proj_bias",
                ".experts.down_proj_bias")
        want = torch.float32 if n in routers or n.endswith(keep) else torch.bfloat16
        assert fam.stored_dtype(n, torch.float32) == want
    assert set(dense) == set(tensors) - experts
    state = fam.embed(W, inputs)
    first = fam.layers()[0]
    assert fam.token_mask(first, state).shape == fam.hessian_mask(first, state).shape


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_check_weights_names_the_missing_and_the_misshaped(model_type):
    fam = _family(model_type)
    shapes = fam.expected_shapes()
    for name in (next(iter(shapes)), fam.router_name(next(lay for lay in fam.layers() if lay.moe))):
        with pytest.raises(KeyError, match=re.escape(name)):
            fam.check_weights([n for n in shapes if n != name], shapes.__getitem__)
        with pytest.raises(ValueError, match=re.escape(repr(name)) + ".*config.json implies"):
            fam.check_weights(list(shapes), lambda n, bad=name: (7, 7, 7) if n == bad else shapes[n])


def test_callers_use_only_the_contract():
    """Every ``family.X`` the job, the read side and the benches call is part of ``MoEFamily``,
    and none probes a family with ``hasattr`` / ``getattr``."""
    offered = {n for n in dir(MoEFamily) if not n.startswith("_")} | _INSTANCE
    offered |= set(inspect.get_annotations(MoEFamily))  # model_type, expert_spec, source_roles
    used: dict[str, str] = {}
    for path in ROOT.rglob("*.py"):
        if path.parent.name == "models":
            continue
        text = path.read_text()
        assert not re.search(r"(hasattr|getattr)\((self\.)?fam(ily)?\b", text), path
        for m in re.finditer(r"\b(?:self\.)?(?:family|fam)\.([A-Za-z_]\w*)", text):
            used.setdefault(m.group(1), str(path.relative_to(ROOT)))
    outside = {k: v for k, v in used.items() if k not in offered}
    assert not outside, outside
