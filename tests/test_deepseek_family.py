"""DeepSeek-V3 (and Kimi-K2) against transformers' ``DeepseekV3ForCausalLM`` on tiny random
checkpoints it saved itself, router correction biases randomised: per-block outputs, routing,
logits, loss and ``evaluate``; the fused expert layout; the whole job (compress -> load -> eval ->
export -> transformers loads the export); a config that names another family's tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import plain_reader
from fixtures_s3 import save_tiny, tiny_model  # noqa: E402
from load_helpers import write_manifest
from sigmoid_fixtures import DEEPSEEK as DEEPSEEK_TINY  # noqa: E402
from sigmoid_fixtures import YARN as DEEPSEEK_YARN  # noqa: E402
from sigmoid_fixtures import (  # noqa: E402
    Case,
    check_against_transformers,
    check_loss_and_evaluate,
    inputs_for,
    tiny_sigmoid_model,
)

from qmoe_ray.errors import MissingTensorError  # noqa: E402
from qmoe_ray.models import DictWeights, get_family, run_forward  # noqa: E402
from qmoe_ray.storage.checkpoint import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread", "module_ray")

#: the variants: YaRN + q_lora + 4 groups (the default tiny config); plain q_proj, default RoPE,
#: non-interleaved, two dense blocks, no group limit
VARIANTS = {
    "lora_yarn_groups": {},
    "plain_q": dict(q_lora_rank=None, rope_interleave=False, first_k_dense_replace=2,
                    n_group=1, topk_group=1, num_hidden_layers=4, n_shared_experts=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request, tmp_path_factory) -> Case:
    return Case("deepseek_v3", tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])


def test_blocks_routes_and_logits_match_transformers(case):
    check_against_transformers(case, inputs_for())
    cfg = case.model.config
    assert [lay.moe for lay in case.family.layers()] == [
        i >= cfg.first_k_dense_replace for i in range(cfg.num_hidden_layers)
    ]
    assert case.family.expert_layout == "per-expert"


def test_loss_and_evaluate_match_transformers(case, tmp_path):
    check_loss_and_evaluate(case, tmp_path)


def test_router_bias_and_groups_are_observable(case):
    """Guard against a vacuous oracle: a zero correction bias, or no group limit, routes
    differently (so the parity above really checks them)."""
    fam, ck = case.family, case.ckpt
    inputs = inputs_for(seed=2)
    want = run_forward(fam, ck, inputs)
    tensors = {n: ck(n) for n in ck.names}
    for lay in fam.layers():
        if lay.moe:
            tensors[fam.bias_name(lay)] = torch.zeros_like(tensors[fam.bias_name(lay)])
    assert (run_forward(fam, DictWeights(tensors), inputs) - want).abs().max() > 1e-2
    if fam.router.n_group > 1:
        free = get_family({**ck.config, "topk_group": fam.router.n_group}, ck)
        assert (run_forward(free, ck, inputs) - want).abs().max() > 1e-3


def test_fused_layout_and_canonical_names(case, tmp_path):
    """transformers' fused save (``save_original_format=False``) reads to the same experts and
    logits; a decompressed output (canonical per-expert names, routers and biases where the
    source had them) too."""
    fused_dir = save_tiny(case.model, tmp_path / "fused", save_original_format=False)
    fused = open_checkpoint(str(fused_dir))
    fam = get_family(fused.config, fused)
    fam.check_weights(fused.names, fused.shape)
    assert fam.expert_layout == "fused"
    moe = next(lay for lay in fam.layers() if lay.moe)
    a, b = fam.read_experts(moe, fused, [5, 1]), case.family.read_experts(moe, case.ckpt, [5, 1])
    assert all(torch.equal(a[r], b[r]) for r in ("gate", "up", "down"))
    inputs = inputs_for(seed=3)
    want = run_forward(case.family, case.ckpt, inputs)
    torch.testing.assert_close(run_forward(fam, fused, inputs), want)
    src = case.family
    out = {n: case.ckpt(n) for n in src.dense_names(case.ckpt.names)}
    for lay in src.layers():
        if lay.moe:
            w = src.read_experts(lay, case.ckpt, range(lay.num_experts))
            for e in range(lay.num_experts):
                out.update({n: w[r][e] for r, n in src.expert_names(lay, e).items()})
    assert src.bias_name(moe) in out and f"{moe.name}.mlp.shared_experts.up_proj.weight" in out
    torch.testing.assert_close(run_forward(src, DictWeights(out), inputs), want)


def test_shapes_dtypes_and_kimi_alias(case):
    fam, ck = case.family, case.ckpt
    shapes = fam.expected_shapes()
    assert set(shapes) == set(ck.names)  # every tensor transformers wrote, nothing more
    assert all(tuple(ck.shape(n)) == s for n, s in shapes.items())
    moe = next(lay for lay in fam.layers() if lay.moe)
    assert fam.stored_dtype(fam.bias_name(moe), torch.float32) == torch.float32
    assert fam.stored_dtype(fam.router_name(moe), torch.float32) == torch.float32
    assert fam.stored_dtype(f"{moe.name}.self_attn.kv_b_proj.weight", torch.float32) == (
        torch.bfloat16)
    kimi = get_family({**ck.config, "model_type": "kimi_k2"}, ck)
    inputs = inputs_for(seed=4, s=5)
    torch.testing.assert_close(run_forward(kimi, ck, inputs), run_forward(fam, ck, inputs))


def test_bad_configs_are_named():
    cfg = {"model_type": "deepseek_v3", "vocab_size": 97, "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 16,
           "num_experts_per_tok": 3, "moe_intermediate_size": 12, "intermediate_size": 40,
           "kv_lora_rank": 16, "qk_nope_head_dim": 10, "qk_rope_head_dim": 8, "v_head_dim": 12,
           "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1}
    assert get_family(cfg).router.n_group == 4
    with pytest.raises(ValueError, match="n_group=5"):
        get_family({**cfg, "n_group": 5})
    with pytest.raises(ValueError, match="topk_group=7"):
        get_family({**cfg, "topk_group": 7})
    with pytest.raises(ValueError, match="'longrope' is not supported"):
        get_family({**cfg, "rope_scaling": {"type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="scoring_func='softmax' is not supported"):
        get_family({**cfg, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="moe_layer_freq=2"):
        get_family({**cfg, "moe_layer_freq": 2})
    assert get_family({**cfg, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                       "moe_layer_freq": 1}).router.scale == 1.0
    with pytest.raises(ValueError, match="kv_lora_rank"):
        get_family({k: v for k, v in cfg.items() if k != "kv_lora_rank"})
    # the Hub's legacy form: rope_scaling with "type", top-level rope_theta
    legacy = get_family({**cfg, "rope_theta": 10000.0, "max_position_embeddings": 64,
                         "rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 1.0,
                                          "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 16}})
    assert legacy.rope.interleave and legacy.rope.logit_mscale > 1.2 and legacy.rope.dim == 8


def test_config_says_deepseek_but_tensors_are_mixtral(tmp_path):
    """The job refuses before any work, naming the tensor it looked for."""
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.plan import prepare

    src = save_tiny(tiny_model("mixtral"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="deepseek_v3", n_routed_experts=6, moe_intermediate_size=24,
               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
               first_k_dense_replace=0, n_group=1, topk_group=1)
    (src / "config.json").write_text(json.dumps(cfg))
    np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
    conf = CompressConfig(source=str(src), output=str(tmp_path / "out"),
                          data=str(src / "tokens.npy"), num_samples=24, seq_len=16,
                          eval_samples=4, batch_size=12, group_size=6)
    with pytest.raises(MissingTensorError, match=r"model\.layers\.0\.mlp\.gate\.weight"):
        prepare(conf)
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_compress_load_eval_export_round_trip(tmp_path, capsys):
    """The whole job on a tiny DeepSeek-V3 (bf16 source, as checkpoints ship, with an MTP layer):
    compress (Ray, in-process on 127.0.0.1), load, evaluate, export; transformers loads the export
    and gives our loaded model's logits. The MTP layer is carried (inspect says so, the export
    says what happens to it), or left out with ``drop_mtp``."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.evaluate import evaluate
    from qmoe_ray.read.export import export
    from qmoe_ray.read.loader import load

    model = tiny_sigmoid_model("deepseek_v3", seed=3)
    src = save_tiny(model, tmp_path / "src", dtype=torch.bfloat16)
    # a multi-token-prediction layer after the stack, as DeepSeek-V3 ships its layer 61
    t = load_file(src / "model.safetensors")
    mtp = {k.replace("model.layers.2.", "model.layers.3."): v.clone()
           for k, v in t.items() if k.startswith("model.layers.2.")}
    mtp["model.layers.3.eh_proj.weight"] = torch.ones(32, 64, dtype=torch.bfloat16)
    save_file({**t, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
    out = tmp_path / "c"
    rep = run_compression(CompressConfig(
        source=str(src), output=str(out), data=str(src / "tokens.npy"), num_samples=24,
        seq_len=16, eval_samples=4, batch_size=12, group_size=8), progress=False)
    manifest = plain_reader.load_manifest(out)
    moe = [i for i in range(3) if i >= 1]  # first_k_dense_replace=1: blocks 1, 2 are MoE
    assert len(manifest["quantized"]) == len(moe) * 16 * 3
    assert not any("shared_experts" in n for n in manifest["quantized"])
    # the MTP layer is carried through unchanged (dense, bf16), never quantized
    assert {n for n in manifest["tensors"] if n.startswith("model.layers.3.")} == set(mtp)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert manifest["tensors"][bias]["dtype"] in ("BF16", "bfloat16")  # its source precision
    ours = load(str(out))
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 97, (2, 10)))
    logits = ours.logits(ids)
    assert torch.isfinite(logits).all()
    held = evaluate(str(out), str(src / "tokens.npy"), num_samples=8, seq_len=16)
    assert np.isfinite(held["loss"]) and rep["heldout_loss"] > 0
    from qmoe_ray.cli import main
    from qmoe_ray.read.inspect import format_text, inspect

    assert "1, carried through unchanged" in format_text(inspect(str(out)))
    assert inspect(str(out), verify=False)["mtp"] == {
        "layers": 1, "policy": "carried", "tensors": len(mtp),
        "bytes": sum(v.numel() * 2 for v in mtp.values())}
    capsys.readouterr()
    assert main(["export", str(out), str(tmp_path / "hf"), "--quiet"]) == 0
    assert f"{len(mtp)} tensors of the multi-token-prediction layers" in capsys.readouterr().err
    res = export(str(out), str(tmp_path / "hf"), overwrite=True)
    assert res["layout"] == "per-expert" and res["mtp_tensors"] == len(mtp)
    names = set(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
                ["weight_map"])
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in names and bias in names
    assert set(mtp) <= names  # exported under its names; transformers' model skips it
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits, rtol=1e-4, atol=1e-4)

    # the same checkpoint as Kimi-K2 ships its config (model_type kimi_k2, remote code in
    # auto_map): the export says deepseek_v3, which transformers loads with no remote code
    import shutil

    kimi = tmp_path / "kimi"
    shutil.copytree(out, kimi)
    km = plain_reader.load_manifest(kimi)
    km["config"].update(model_type="kimi_k2", auto_map={"AutoConfig": "x.KimiConfig"})
    write_manifest(kimi, km)
    if (kimi / "config.json").exists():
        (kimi / "config.json").write_text(json.dumps(km["config"]))
    export(str(kimi), str(tmp_path / "hf-kimi"))
    exported = json.loads((tmp_path / "hf-kimi" / "config.json").read_text())
    assert exported["model_type"] == "deepseek_v3" and "auto_map" not in exported
    hk = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-kimi"),
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hk(ids).logits, logits, rtol=1e-4, atol=1e-4)

    # --drop-mtp: the same job without the MTP layer; everything else byte-identical
    dropped = tmp_path / "d"
    run_compression(CompressConfig(
        source=str(src), output=str(dropped), data=str(src / "tokens.npy"), num_samples=24,
        seq_len=16, eval_samples=4, batch_size=12, group_size=8, drop_mtp=True), progress=False)
    m2 = plain_reader.load_manifest(dropped)
    assert set(m2["tensors"]) == set(manifest["tensors"]) - set(mtp)
    assert m2["quantized"] == manifest["quantized"]
    assert inspect(str(dropped), verify=False)["mtp"]["policy"] == "dropped"
    assert export(str(dropped), str(tmp_path / "hf2"))["mtp_tensors"] == 0
    torch.testing.assert_close(load(str(dropped)).logits(ids), logits, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [
    {},
    {"truncate": False, "beta_fast": 16, "beta_slow": 2},
    {"attention_factor": 0.9, "mscale": None, "mscale_all_dim": None},
    {"mscale": None, "mscale_all_dim": None, "factor": 8.0},
])
def test_yarn_tables_match_transformers(extra):
    """Our YaRN frequencies, cos/sin scale and softmax scale are transformers' for the variants
    of the rope parameters (rounded or exact correction range, explicit attention factor, no
    mscale)."""
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    rope = {k: v for k, v in {**DEEPSEEK_YARN, **extra}.items() if v is not None}
    cfg = tf.DeepseekV3Config(**{**DEEPSEEK_TINY, "rope_parameters": rope})
    inv, att = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    fam = get_family(json.loads(cfg.to_json_string()))
    assert torch.equal(fam.rope.inv_freq, inv.to(torch.float32))
    assert fam.rope.cos_scale == pytest.approx(att, rel=1e-12)
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    want = yarn_apply_mscale(cfg.rope_parameters, qk**-0.5)
    assert fam.rope.softmax_scale(qk) == pytest.approx(want, rel=1e-12)
