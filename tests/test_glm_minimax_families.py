"""GLM-4.5 (``glm4_moe``) and MiniMax-M2 against transformers' ``Glm4MoeForCausalLM`` /
``MiniMaxM2ForCausalLM`` on tiny random checkpoints it saved itself (router correction biases
randomised): blocks, routing, logits, loss, ``evaluate``; both expert layouts; the whole job on a
tiny GLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import plain_reader
from fixtures_s3 import save_tiny  # noqa: E402
from sigmoid_fixtures import (  # noqa: E402
    Case,
    check_against_transformers,
    check_loss_and_evaluate,
    inputs_for,
    tiny_sigmoid_model,
)

from qmoe_ray.models import DictWeights, get_family, run_forward  # noqa: E402
from qmoe_ray.storage.checkpoint import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARTIAL_DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
VARIANTS = {
    # qk norm, q/k/v biases, partial RoPE 0.5, a dense first block, 2 groups, a shared expert
    "glm": ("glm4_moe", {}),
    # no qk norm, no biases, RoPE factor left to the family's default (0.5), no dense block
    "glm_plain": ("glm4_moe", dict(use_qk_norm=False, attention_bias=False,
                                   first_k_dense_replace=0, n_group=1, topk_group=1,
                                   rope_parameters=PARTIAL_DEFAULT)),
    "minimax": ("minimax_m2", {}),
    # the released checkpoints' legacy rotary_dim instead of partial_rotary_factor
    "minimax_rotary_dim": ("minimax_m2", dict(rotary_dim=4, rope_parameters=PARTIAL_DEFAULT)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request, tmp_path_factory) -> Case:
    model_type, overrides = VARIANTS[request.param]
    return Case(model_type, tmp_path_factory.mktemp(request.param), seed=2, **overrides)


def test_blocks_routes_and_logits_match_transformers(case):
    check_against_transformers(case, inputs_for())
    fam = case.family
    want_dim = int(case.model.model.rotary_emb.inv_freq.numel() * 2)
    assert fam.rope.dim == want_dim < fam.spec.head_dim  # partial RoPE, as transformers has it


def test_loss_and_evaluate_match_transformers(case, tmp_path):
    check_loss_and_evaluate(case, tmp_path)


def test_shapes_are_the_checkpoint(case):
    shapes = case.family.expected_shapes()
    assert set(shapes) == set(case.ckpt.names)
    assert all(tuple(case.ckpt.shape(n)) == s for n, s in shapes.items())


def test_bias_is_observable(case):
    fam, ck = case.family, case.ckpt
    inputs = inputs_for(seed=2)
    tensors = {n: ck(n) for n in ck.names}
    for lay in fam.layers():
        if lay.moe:
            tensors[fam.bias_name(lay)] = torch.zeros_like(tensors[fam.bias_name(lay)])
    diff = run_forward(fam, DictWeights(tensors), inputs) - run_forward(fam, ck, inputs)
    assert diff.abs().max() > 1e-2


def test_fused_layout(case, tmp_path):
    fused = open_checkpoint(str(save_tiny(case.model, tmp_path / "f", save_original_format=False)))
    fam = get_family(fused.config, fused)
    fam.check_weights(fused.names, fused.shape)
    assert fam.expert_layout == "fused"
    moe = next(lay for lay in fam.layers() if lay.moe)
    assert fam.bias_name(moe) in fused
    inputs = inputs_for(seed=3)
    torch.testing.assert_close(run_forward(fam, fused, inputs),
                               run_forward(case.family, case.ckpt, inputs))


def test_minimax_names_are_mixtrals(tmp_path):
    c = Case("minimax_m2", tmp_path, seed=4)
    moe = c.family.layers()[0]
    assert c.family.router_name(moe) == "model.layers.0.block_sparse_moe.gate.weight"
    assert c.family.bias_name(moe) == "model.layers.0.block_sparse_moe.e_score_correction_bias"
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in c.ckpt
    assert not c.family.router.n_group > 1 and c.family.router.renormalize


@pytest.mark.ray
@pytest.mark.s3
def test_glm_s3_compress_eval_export_round_trip(tmp_path, moto_endpoint, s3_credentials, capsys):
    """The whole job on a tiny GLM-4.5 (bf16 source), source and output on moto's s3, through
    the CLI: compress, eval (the loaded model's loss), export; transformers loads the export and
    gives our loaded model's logits."""
    import transformers as tf
    from fixtures_s3 import make_bucket, upload_dir

    from qmoe_ray.cli import main
    from qmoe_ray.read.loader import load

    src = save_tiny(tiny_sigmoid_model("glm4_moe", seed=5), tmp_path / "src", dtype=torch.bfloat16)
    np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
    fs = make_bucket(moto_endpoint, "qmoe-glm")
    upload_dir(fs, src, "qmoe-glm/src")
    opt = ["--storage-option", f"endpoint_url={moto_endpoint}"]
    assert main(["compress", "--source", "s3://qmoe-glm/src", "--output", "s3://qmoe-glm/out",
                 "--data", "s3://qmoe-glm/src/tokens.npy", "--num-samples", "24", "--seq-len",
                 "16", "--eval-samples", "4", "--group-size", "8", "--quiet", *opt]) == 0
    manifest = plain_reader.parse_manifest(fs.cat_file("qmoe-glm/out/manifest.json"))
    assert len(manifest["quantized"]) == 2 * 16 * 3  # blocks 1, 2 x 16 experts x 3 matrices
    ours = load("s3://qmoe-glm/out", endpoint_url=moto_endpoint)
    capsys.readouterr()
    assert main(["eval", "s3://qmoe-glm/out", "--data", str(src / "tokens.npy"), "--samples",
                 "8", "--json", "--quiet", *opt]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert np.isfinite(loss) and 0 < loss < 10
    assert main(["export", "s3://qmoe-glm/out", str(tmp_path / "hf"), "--quiet", *opt]) == 0
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 97, (2, 10)))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.logits(ids), rtol=1e-4, atol=1e-4)
