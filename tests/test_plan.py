"""``qmoe-ray plan CONFIG``: parameter counts equal the models transformers builds from the same
configs, released configs give their published sizes, the packed schemes' sizes are the bytes the
format writes, and bad input is named."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qmoe_ray.cli import main
from qmoe_ray.errors import InputError
from qmoe_ray.job.estimate import count_parameters, estimate, expert_bits

transformers = pytest.importorskip("transformers")

_TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TINY = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=6, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=24, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        moe_intermediate_size=16, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, num_nextn_predict_layers=0)),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=8, num_experts_per_tok=2,
                                       n_shared_experts=1, moe_intermediate_size=16,
                                       first_k_dense_replace=1, head_dim=8,
                                       num_nextn_predict_layers=0)),
}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_counts_equal_the_model_transformers_builds(model_type):
    cls, extra = TINY[model_type]
    cfg = getattr(transformers, cls)(**_TINY, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    state = model.state_dict()
    counts = count_parameters(cfg.to_dict())
    # every tensor the model has, counted once (a tied head is one tensor), and no more
    want = sum(p.numel() for p in model.parameters())
    biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("correction_bias"))
    assert counts["total"] == want + biases
    experts = sum(t.numel() for n, t in state.items() if ".experts." in n or n.endswith(
        ("experts.gate_up_proj", "experts.down_proj")))
    assert counts["params"]["routed experts"] == experts > 0
    assert counts["moe_layers"] == sum(1 for n in state if n.endswith("gate.weight")
                                       and "shared_expert" not in n)


def test_switch_counts_equal_the_model_transformers_builds():
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=4, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=2)
    model = transformers.SwitchTransformersForConditionalGeneration(cfg)
    counts = count_parameters(cfg.to_dict())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts["params"]["routed experts"] == experts
    assert counts["expert_matrices"] == [(32, 48), (48, 32)]


# released configs (their sizes fields only), with the parameter counts their model cards publish
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "vocab_size": 129280, "max_position_embeddings": 163840, "rope_theta": 10000,
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
MIXTRAL_8X7B = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    "max_position_embeddings": 32768, "rope_theta": 1e6, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("config, billions, share", [
    (MIXTRAL_8X7B, 46.70, 0.96),  # "46.7B total parameters"
    (QWEN3_30B_A3B, 30.53, 0.95),  # "30.5B in total"
])
def test_released_configs_give_their_published_sizes(config, billions, share):
    p = estimate(config, group_size=16, num_samples=256, seq_len=128)
    assert p["total"] / 1e9 == pytest.approx(billions, abs=0.01)
    assert p["expert_share"] == pytest.approx(share, abs=0.01)
    assert p["source_bytes"] == 2 * p["total"] and p["source_precision"] == "bfloat16"


def test_deepseek_v3_fp8_with_its_mtp_layer():
    p = estimate(DEEPSEEK_V3, group_size=16, num_samples=256, seq_len=128)
    main_stack = p["total"] - p["params"]["mtp layers"]
    assert main_stack / 1e9 == pytest.approx(671.0, abs=0.1)  # "671B total parameters"
    assert p["total"] / 1e9 == pytest.approx(685.0, abs=1.0)  # "685B" with the MTP module
    assert p["params"]["routed experts"] / main_stack == pytest.approx(0.974, abs=0.001)
    assert p["source_precision"].startswith("fp8")
    # FP8 with one float32 scale per 128x128 block: a little over a byte per linear weight
    assert p["total"] < p["source_bytes"] < 1.02 * p["total"]
    # the Hessians of 16 experts: one 7168^2 (gate/up input) + one 2048^2 (down input), their
    # sums float32 by default, float64 on request (twice the bytes)
    assert p["hessian_bytes_per_group"] == 16 * 4 * (7168 ** 2 + 2048 ** 2)
    p64 = estimate(DEEPSEEK_V3, group_size=16, num_samples=256, seq_len=128,
                   hessian_dtype="float64")
    assert p64["hessian_bytes_per_group"] == 2 * p["hessian_bytes_per_group"]
    with pytest.raises(InputError, match="--hessian-dtype 'float16'"):
        estimate(DEEPSEEK_V3, group_size=16, num_samples=256, seq_len=128,
                 hessian_dtype="float16")
    assert p["activation_bytes"] == 256 * 128 * 7168 * 4
    t = p["schemes"]["ternary"]
    rest = p["total"] - p["params"]["routed experts"]
    assert t["bytes"] == int(p["params"]["routed experts"] * t["expert_bits_per_param"] / 8
                             + 2 * rest)


@pytest.mark.parametrize("scheme, group", [("int3", None), ("int4", 32), ("int8", None)])
def test_packed_scheme_bits_are_what_the_format_writes(scheme, group):
    from qmoe_ray.format.matrices import pack_matrix
    from qmoe_ray.quant.grids import parse_scheme

    rows, cols = 24, 96
    sch = parse_scheme(scheme, group)
    g = math.ceil(cols / group) if group else 1
    codes = torch.randint(0, 2 ** sch.bits, (rows, cols), dtype=torch.uint8)
    params = {"scale": torch.rand(rows, g) + 0.1, "zero": torch.full((rows, g), 1.0)}
    tensors, entry = pack_matrix("m", sch, codes, params)
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    assert written * 8 / (rows * cols) == pytest.approx(expert_bits(scheme, rows, cols, group))


def test_the_command_prints_json_and_text(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    assert main(["plan", str(tmp_path), "--json", "--group-size", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_type"] == "mixtral" and out["group_size"] == 8
    assert out["hessian_bytes_per_group"] == 8 * 4 * (4096 ** 2 + 14336 ** 2)
    assert set(out["schemes"]) == {"ternary", "int2", "int3", "int4", "int8", "ternary-sym256"}
    assert main(["plan", str(tmp_path / "config.json")]) == 0
    text = capsys.readouterr().out
    assert "46.703B parameters" in text and "| ternary | 0.838 |" in text


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "no such file"),
    ("{not json", [], "not JSON"),
    ("[1, 2]", [], "expected a JSON object"),
    (json.dumps({**MIXTRAL_8X7B, "quantization_config": {"quant_method": "bitsandbytes"}}), [],
     "quant_method 'bitsandbytes'"),
    (json.dumps({**MIXTRAL_8X7B, "model_type": "llama"}), [], "not supported"),
    (json.dumps(MIXTRAL_8X7B), ["--group-size", "0"], "--group-size 0"),
])
def test_bad_input_is_named(tmp_path, capsys, content, flags, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    assert main(["plan", str(path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_quantization_is_refused_by_the_api():
    with pytest.raises(InputError, match="compressed-tensors"):
        estimate({**MIXTRAL_8X7B, "quantization_config": {"quant_method": "awq"}},
                 group_size=1, num_samples=1, seq_len=1)


# gpt-oss as released (the sizes fields of openai/gpt-oss-20b's and -120b's config.json): MXFP4
# experts; the model card's parameter counts and checkpoint sizes
GPT_OSS_20B = {
    "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
    "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
    "num_local_experts": 32, "num_experts_per_tok": 4, "vocab_size": 201088,
    "sliding_window": 128, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "attention_bias": True, "swiglu_limit": 7.0, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]},
}
GPT_OSS_120B = {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128}


@pytest.mark.parametrize("config, billions, gib", [
    (GPT_OSS_20B, 20.91, 12.8),  # "20.91B" total parameters, a 12.8 GiB checkpoint
    (GPT_OSS_120B, 116.83, 60.8),  # "116.83B", 60.8 GiB
])
def test_gpt_oss_configs_give_their_published_sizes(config, billions, gib):
    p = estimate(config, group_size=16, num_samples=256, seq_len=128)
    assert p["total"] / 1e9 == pytest.approx(billions, abs=0.01)
    assert p["source_precision"].startswith("mxfp4")
    assert p["source_bytes"] / 2**30 == pytest.approx(gib, abs=0.1)
    # the routed experts' matrices only: their biases are carried (norms and biases)
    assert p["expert_matrices"] == [(2880, 2880)] * 3
    assert p["params"]["routed experts"] == p["moe_layers"] * config["num_local_experts"] * 3 * (
        2880 * 2880)


def test_gpt_oss_counts_equal_the_model_transformers_builds():
    cfg = transformers.GptOssConfig(**_TINY, num_local_experts=4, num_experts_per_tok=2,
                                    head_dim=8)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    counts = count_parameters(cfg.to_dict())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters()
                  if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert counts["params"]["routed experts"] == experts > 0
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("_proj_bias"))
    assert counts["params"]["norms and biases"] > biases > 0
