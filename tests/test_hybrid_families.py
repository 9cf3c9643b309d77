"""Qwen3-Next (``qwen3_next``) and Qwen3.5-MoE (``qwen3_5_moe``, the multimodal wrapper) against
transformers' ``Qwen3NextForCausalLM`` / ``Qwen3_5MoeForConditionalGeneration`` on tiny random
checkpoints it saved itself: per-block outputs (Gated DeltaNet blocks included, on samples longer
than one chunk of the delta rule), routing, logits, loss, ``evaluate``; the delta rule against
transformers' token-by-token recurrence; the recurrent state kept per sample; both expert
layouts; bad configs; the whole job on each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import plain_reader
from fixtures_s3 import save_tiny  # noqa: E402
from hybrid_fixtures import HybridCase, decoder_layers, inputs_for, reference, tiny_hybrid  # noqa: E402
from sigmoid_fixtures import check_loss_and_evaluate  # noqa: E402

from qmoe_ray.errors import CheckpointError  # noqa: E402
from qmoe_ray.models import get_family, run_forward, walk_layers  # noqa: E402
from qmoe_ray.models.linear_attention import CHUNK, chunk_delta_rule  # noqa: E402
from qmoe_ray.storage.checkpoint import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-4
VARIANTS = {"next": "qwen3_next", "q35": "qwen3_5_moe"}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request, tmp_path_factory) -> HybridCase:
    return HybridCase(VARIANTS[request.param], tmp_path_factory.mktemp(request.param), seed=1)


@pytest.mark.parametrize("seq", [9, CHUNK + 17])
def test_blocks_routes_and_logits_match_transformers(case, seq):
    inputs = inputs_for(seed=seq, s=seq)
    ref_logits, ref_blocks = reference(case.model, inputs)
    fam, W = case.family, case.ckpt
    blocks, routes = [], {}
    (state,) = walk_layers(
        fam, W, [fam.embed(W, inputs)],
        on_route=lambda lay, _, x, idx, gate: routes.__setitem__(lay.block, (x, idx, gate)),
        after_layer=lambda lay, states: blocks.append(states[0]["hidden"]),
    )
    assert fam.mixers == ("linear_attention",) * 3 + ("full_attention",)
    assert len(blocks) == len(ref_blocks) == 4
    for i, (ours, ref) in enumerate(zip(blocks, ref_blocks, strict=True)):
        torch.testing.assert_close(ours, ref, atol=ATOL * 10, rtol=1e-4, msg=f"block {i}")
    torch.testing.assert_close(fam.logits(W, state), ref_logits, atol=ATOL * 10, rtol=1e-4)
    assert ref_logits.abs().max() > 1.0
    assert routes and set(routes) == {lay.block for lay in fam.layers() if lay.moe}
    for block, (x, idx, gate) in routes.items():
        with torch.no_grad():
            _, w_ref, i_ref = decoder_layers(case.model)[block].mlp.gate(x.reshape(-1, x.shape[-1]))
        i_ref, w_ref = i_ref.reshape(idx.shape), w_ref.reshape(gate.shape)
        order, ref_order = idx.argsort(-1), i_ref.argsort(-1)
        assert torch.equal(idx.gather(-1, order), i_ref.gather(-1, ref_order))
        torch.testing.assert_close(gate.gather(-1, order), w_ref.gather(-1, ref_order).float())


def test_loss_and_evaluate_match_transformers(case, tmp_path):
    check_loss_and_evaluate(case, tmp_path)


def test_shapes_and_layers(case):
    fam, ck = case.family, case.ckpt
    shapes = fam.expected_shapes()
    carried = {n for n in ck.names if n.startswith("model.visual.")}
    assert set(shapes) == set(ck.names) - carried  # every text tensor transformers wrote
    assert all(tuple(ck.shape(n)) == s for n, s in shapes.items())
    assert fam.rope.dim == 4 < fam.spec.head_dim  # partial RoPE 0.25 of 16
    if fam.model_type == "qwen3_next":
        assert [lay.moe for lay in fam.layers()] == [True, False, True, True]
        assert fam.expert_layout == "per-expert" and not fam.spec.norm_topk
    else:
        assert carried and fam.layers()[0].name == "model.language_model.layers.0"
        assert all(lay.moe for lay in fam.layers()) and fam.spec.norm_topk


def test_delta_rule_matches_the_recurrence():
    """The chunked rule (over 3 chunks, the last one padded) equals transformers' token-by-token
    recurrence of the gated delta rule."""
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        torch_recurrent_gated_delta_rule,
    )

    g = torch.Generator().manual_seed(0)
    b, h, n, kd, vd = 2, 3, 2 * CHUNK + 7, 8, 6
    q, k = (torch.nn.functional.normalize(torch.randn(b, n, h, kd, generator=g), dim=-1)
            for _ in range(2))
    v = torch.randn(b, n, h, vd, generator=g)
    decay = -torch.rand(b, n, h, generator=g) * 0.5
    beta = torch.rand(b, n, h, generator=g)
    want, _ = torch_recurrent_gated_delta_rule(q, k, v, decay, beta)  # scales q by kd^-1/2
    ours = chunk_delta_rule(*(t.transpose(1, 2) for t in (q * kd**-0.5, k, v, decay, beta)))
    torch.testing.assert_close(ours.transpose(1, 2), want, atol=2e-5, rtol=1e-4)


def test_recurrent_state_is_per_sample(case):
    """A batch of whole samples gives each sample what it gives alone (no state crosses samples;
    the activation stores batch whole samples, so calibration sees exactly this)."""
    fam, W = case.family, case.ckpt
    inputs = inputs_for(seed=5, s=CHUNK + 5)
    together = run_forward(fam, W, inputs)
    for i in range(3):
        alone = run_forward(fam, W, {k: v[i:i + 1] for k, v in inputs.items()})
        m = inputs["attention_mask"][i].bool()
        # float32 GEMMs differ with the batch size by a few 1e-5; a state crossing samples
        # changes the logits by O(1)
        torch.testing.assert_close(together[i, m], alone[0, m], atol=1e-4, rtol=1e-4)


def test_activation_store_batches_whole_samples(case):
    """The job's activation store, run with one batch of 4 samples or 4 batches of one, hands
    the workers the same MoE inputs behind a Gated DeltaNet block (samples longer than a chunk):
    calibration runs the linear attention over whole samples, its state per sample."""
    from qmoe_ray.job.stores import ActivationStore

    inputs = {k: v.numpy() for k, v in inputs_for(seed=7, b=4, s=CHUNK + 6).items()}
    first = case.family.layers()[0]
    assert first.moe and case.family.is_linear(first)
    got = []
    for batch in (4, 1):
        store = ActivationStore(str(case.folder), None, inputs, np.ones(4, dtype=bool), batch)
        store.pre_moe(first)
        got.append(store._moe["x"])
    assert got[0].shape == (int(inputs["attention_mask"].sum()), case.family.spec.hidden_size)
    np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-5)


def test_fused_layout(case, tmp_path):
    """The fused save (``mlp.experts.gate_up_proj``, as the Hub ships Qwen3.5) reads to the
    same experts and logits."""
    fused = open_checkpoint(str(save_tiny(case.model, tmp_path / "f", save_original_format=False)))
    fam = get_family(fused.config, fused)
    fam.check_weights(fused.names, fused.shape)
    assert fam.expert_layout == "fused"
    moe = next(lay for lay in fam.layers() if lay.moe)
    a, b = fam.read_experts(moe, fused, [5, 1]), case.family.read_experts(moe, case.ckpt, [5, 1])
    assert all(torch.equal(a[r], b[r]) for r in ("gate", "up", "down"))
    inputs = inputs_for(seed=3)
    torch.testing.assert_close(run_forward(fam, fused, inputs),
                               run_forward(case.family, case.ckpt, inputs))


def test_bad_configs_are_named(case):
    cfg = case.ckpt.config
    if cfg["model_type"] == "qwen3_5_moe":
        with pytest.raises(ValueError, match="no 'text_config'"):
            get_family({k: v for k, v in cfg.items() if k != "text_config"})
        text = {**cfg["text_config"], "model_type": "qwen3_5_moe_text"}
        assert get_family(text).prefix == "model."  # the text-only config, its own type
        bad = {**cfg, "text_config": {**cfg["text_config"], "layer_types": ["linear"] * 4}}
    else:
        bad = {**cfg, "layer_types": ["full_attention"] * 3}
        with pytest.raises(ValueError, match="linear_num_value_heads=3 is not a multiple"):
            get_family({**cfg, "linear_num_value_heads": 3})
        derived = get_family({k: v for k, v in cfg.items() if k != "layer_types"})
        assert derived.mixers == case.family.mixers  # full_attention_interval 4
    with pytest.raises(CheckpointError, match="layer_types"):
        get_family(bad)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_qwen3_next_s3_compress_eval_export_round_trip(tmp_path, moto_endpoint, s3_credentials,
                                                      capsys):
    """The whole job on a tiny Qwen3-Next (bf16 source), source and output on moto's s3, through
    the CLI: compress, eval, export; transformers loads the export and gives our loaded model's
    logits."""
    import transformers as tf
    from fixtures_s3 import make_bucket, upload_dir

    from qmoe_ray.cli import main
    from qmoe_ray.read.loader import load

    src = save_tiny(tiny_hybrid("qwen3_next", seed=5), tmp_path / "src", dtype=torch.bfloat16)
    np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
    fs = make_bucket(moto_endpoint, "qmoe-qnext")
    upload_dir(fs, src, "qmoe-qnext/src")
    opt = ["--storage-option", f"endpoint_url={moto_endpoint}"]
    assert main(["compress", "--source", "s3://qmoe-qnext/src", "--output", "s3://qmoe-qnext/out",
                 "--data", "s3://qmoe-qnext/src/tokens.npy", "--num-samples", "24", "--seq-len",
                 "16", "--eval-samples", "4", "--group-size", "8", "--quiet", *opt]) == 0
    manifest = plain_reader.parse_manifest(fs.cat_file("qmoe-qnext/out/manifest.json"))
    assert len(manifest["quantized"]) == 3 * 8 * 3  # MoE blocks 0, 2, 3 x 8 experts x 3
    assert not any("shared_expert" in n or "linear_attn" in n for n in manifest["quantized"])
    ours = load("s3://qmoe-qnext/out", endpoint_url=moto_endpoint)
    capsys.readouterr()
    assert main(["eval", "s3://qmoe-qnext/out", "--data", str(src / "tokens.npy"), "--samples",
                 "8", "--json", "--quiet", *opt]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert np.isfinite(loss) and 0 < loss < 10
    assert main(["export", "s3://qmoe-qnext/out", str(tmp_path / "hf"), "--quiet", *opt]) == 0
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3NextForCausalLM"
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 97, (2, 10)))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.logits(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_qwen3_5_moe_compress_load_eval_export_round_trip(tmp_path):
    """The whole job on a tiny Qwen3.5-MoE as the Hub ships it (the multimodal wrapper, fused
    experts, bf16, a vision tower and an MTP head): only the text stack's routed experts are
    quantized; the vision tower and the MTP head are carried bit for bit; transformers loads the export and gives our loaded model's logits."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.evaluate import evaluate
    from qmoe_ray.read.export import export
    from qmoe_ray.read.loader import load

    src = save_tiny(tiny_hybrid("qwen3_5_moe", seed=6, mtp_num_hidden_layers=1),
                    tmp_path / "src", dtype=torch.bfloat16, save_original_format=False)
    t = load_file(src / "model.safetensors")
    mtp = {"mtp.fc.weight": torch.randn(32, 64).to(torch.bfloat16),
           "mtp.norm.weight": torch.randn(32).to(torch.bfloat16)}
    save_file({**t, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    visual = {n: v for n, v in t.items() if n.startswith("model.visual.")}
    np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
    out = tmp_path / "c"
    conf = dict(source=str(src), data=str(src / "tokens.npy"), num_samples=24, seq_len=16,
                eval_samples=4, batch_size=12, group_size=8)
    rep = run_compression(CompressConfig(output=str(out), **conf), progress=False)
    manifest = plain_reader.load_manifest(out)
    assert manifest["expert_layout"] == "fused"
    assert len(manifest["quantized"]) == 4 * 8 * 3
    assert all(n.startswith("model.language_model.layers.") for n in manifest["quantized"])
    assert set(visual) | set(mtp) <= set(manifest["tensors"])
    ours = load(str(out))
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 97, (2, 10)))
    logits = ours.logits(ids)
    held = evaluate(str(out), str(src / "tokens.npy"), num_samples=8, seq_len=16)
    assert np.isfinite(held["loss"]) and rep["heldout_loss"] > 0
    res = export(str(out), str(tmp_path / "hf"))
    assert res["mtp_tensors"] == len(mtp)
    exported = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(f))
    assert all(torch.equal(exported[n], v) for n, v in {**visual, **mtp}.items())
    hf = tf.Qwen3_5MoeForConditionalGeneration.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert set(ours.family.mtp_names(list(manifest["tensors"]))) == set(mtp)  # drop_mtp drops these
    from qmoe_ray.read.inspect import inspect

    assert inspect(str(out), verify=False)["mtp"] == {
        "layers": 1, "policy": "carried", "tensors": 2, "bytes": (32 * 64 + 32) * 2}


def test_plan_counts_every_parameter(case):
    """``qmoe-ray plan``'s count from the config alone is the model's (vision tower included)."""
    from qmoe_ray.job.estimate import count_parameters

    counts = count_parameters(case.ckpt.config)
    assert counts["total"] == sum(p.numel() for p in case.model.parameters())
    visual = sum(p.numel() for n, p in case.model.named_parameters() if ".visual." in n)
    assert counts["params"]["vision tower"] == visual
    assert (visual > 0) == (case.family.model_type == "qwen3_5_moe")
    moe_blocks = 3 if case.family.model_type == "qwen3_next" else 4
    assert counts["params"]["routed experts"] == moe_blocks * 8 * 3 * 12 * 32
