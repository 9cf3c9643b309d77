"""``qmoe-ray plan`` on the released hybrid MoEs: Qwen3.6-35B-A3B (= Qwen3.5-35B-A3B's
architecture), Qwen3.5-397B-A17B and Qwen3-Next-80B-A3B -> parameters, expert share, source and
compressed sizes, whole-model bits per parameter.

No weights and no network: the configs below restate the released ``config.json`` fields the
planner reads, as the model cards give them (hidden sizes, layers, heads, experts, vocabulary, one
MTP layer; the Qwen3.5 vision tower is Qwen3-VL's ViT: 27 blocks of width 1152). The total it
counts is the check that they are the released models' (35B, 397B, 80B).
"""

from __future__ import annotations

from typing import Any

from qmoe_ray.bench import BenchResult

_QWEN35_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                      patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                      num_position_embeddings=2304, in_channels=3)


def _qwen35(hidden: int, layers: int, heads: int, v_heads: int, experts: int, top_k: int,
            ff: int) -> dict[str, Any]:
    text = dict(model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                head_dim=256, linear_num_key_heads=16, linear_num_value_heads=v_heads,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ff,
                shared_expert_intermediate_size=ff, full_attention_interval=4,
                partial_rotary_factor=0.25, mtp_num_hidden_layers=1, tie_word_embeddings=False)
    return dict(model_type="qwen3_5_moe", torch_dtype="bfloat16", tie_word_embeddings=False,
                text_config=text, vision_config={**_QWEN35_VISION, "out_hidden_size": hidden})


CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen3.6-35B-A3B": _qwen35(2048, 40, 16, 32, 256, 8, 512),
    "Qwen3.5-397B-A17B": _qwen35(4096, 60, 32, 64, 512, 10, 1024),
    "Qwen3-Next-80B-A3B": dict(
        model_type="qwen3_next", torch_dtype="bfloat16", vocab_size=151936, hidden_size=2048,
        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512,
        num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        intermediate_size=5120, decoder_sparse_step=1, mlp_only_layers=[],
        full_attention_interval=4, partial_rotary_factor=0.25, mtp_num_hidden_layers=1,
        norm_topk_prob=True, tie_word_embeddings=False),
}


def add_arguments(parser) -> None:
    parser.add_argument("--group-size", type=int, default=16, help="experts per worker call")
    parser.add_argument("--calib-samples", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)


def run(args) -> BenchResult:
    from qmoe_ray.job.estimate import estimate

    figs: dict[str, Any] = {}
    rows = []
    for name, cfg in CONFIGS.items():
        p = estimate(cfg, group_size=args.group_size, num_samples=args.calib_samples,
                     seq_len=args.seq_len)
        total = p["total"]
        per = {s: p["schemes"][s] for s in ("ternary", "int2", "int4")}
        figs[name] = {"parameters": total, "expert_share": p["expert_share"],
                      "vision": p["params"]["vision tower"], "mtp": p["params"]["mtp layers"],
                      "source_bytes": p["source_bytes"],
                      **{s: {"bytes": v["bytes"], "bits_per_param": round(8 * v["bytes"] / total, 3)}
                         for s, v in per.items()},
                      "hessian_bytes_per_group": p["hessian_bytes_per_group"]}
        f = figs[name]
        rows.append(
            f"| {name} | {total / 1e9:.1f}B | {100 * p['expert_share']:.1f}% | "
            f"{p['source_bytes'] / 1e9:.1f} GB | "
            + " | ".join(f"{f[s]['bytes'] / 1e9:.1f} GB ({f[s]['bits_per_param']:.2f})"
                         for s in per)
            + f" | {p['hessian_bytes_per_group'] / 2**20:.0f} MiB |")
    md = "\n".join([
        "`qmoe-ray plan` on the released hybrid MoEs' configs (restated from the model cards in "
        "`qmoe_ray/bench/plan_hybrid.py`; no weights read). Size (whole-model bits per "
        "parameter); routed experts at the scheme's rate, everything else (attention, Gated "
        "DeltaNet, shared experts, embeddings, the MTP layer and the vision tower, carried "
        f"through) at bf16. Hessians: one group of {args.group_size} experts, float64.",
        "",
        "| model | parameters | routed experts | bf16 source | ternary | int2 | int4 | "
        "Hessians / group |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    return BenchResult(figures=figs, markdown=md, notes=[
        "The ternary and int2 rates are the planner's measured ones (0.838 and 1.835 bits per "
        "expert parameter, see its output); the routed experts' share bounds what any expert "
        "scheme can save."])
