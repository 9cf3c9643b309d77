"""SwitchTransformers (the paper's family) through the whole job: a transformers-saved
encoder-decoder checkpoint compressed on local Ray, loaded back (the job's held-out loss is the
loaded model's), exported, and reloaded by transformers with the same logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plain_reader
import pytest
import torch
from load_helpers import write_manifest

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def switch_model(tmp_path_factory) -> Path:
    """test_switch's tiny SwitchTransformers (a sparse encoder and decoder block) with 8 experts,
    saved in bf16, plus token data."""
    from test_switch import _save

    path = _save(tmp_path_factory.mktemp("switch"), dtype=torch.bfloat16, num_experts=8)
    rng = np.random.default_rng(0)
    np.save(path / "tokens.npy", rng.integers(3, 100, size=(96, 40)).astype(np.int64))
    return path


@pytest.fixture(scope="module")
def compressed(switch_model, tmp_path_factory):
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression

    out = tmp_path_factory.mktemp("switch_out")
    cfg = CompressConfig(source=str(switch_model), output=str(out),
                         data=str(switch_model / "tokens.npy"), num_samples=48, seq_len=32,
                         eval_samples=8, batch_size=16, group_size=4, overwrite=True)
    return out, run_compression(cfg, progress=False), cfg


def test_job_writes_every_sparse_expert(compressed):
    out, rep, _ = compressed
    manifest = plain_reader.load_manifest(out)
    assert manifest["model_type"] == "switch_transformers"
    q = manifest["quantized"]
    # one sparse encoder block and one sparse decoder block, 8 experts, wi and wo each
    assert len(q) == 2 * 8 * 2
    assert {e["role"] for e in q.values()} == {"wi", "wo"}
    assert any(n.startswith("encoder.") for n in q) and any(n.startswith("decoder.") for n in q)
    assert len(rep["layers"]) == 2 and all(r["tokens_routed"] > 0 for r in rep["layers"])
    assert 0 < rep["sizes"]["expert_bits_per_param"] < 16


def test_loaded_model_gives_the_reported_loss(compressed, switch_model):
    from qmoe_ray.data import load_samples
    from qmoe_ray.read.loader import load

    out, rep, cfg = compressed
    model = load(str(out))
    held = load_samples(cfg.data, model.config, cfg.eval_samples, cfg.seq_len, seed=cfg.seed,
                        split="heldout", tokenizer_source=str(switch_model))
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in held.items()}
    ce, n = model.family.loss_terms(model.logits(inputs), inputs)
    assert float(ce) / n == pytest.approx(rep["heldout_loss"], rel=1e-4)


def test_export_reloads_in_transformers_with_our_logits(compressed, tmp_path):
    from qmoe_ray.read.export import export
    from qmoe_ray.read.loader import load

    out, _, _ = compressed
    export(str(out), str(tmp_path / "hf"))
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours = load(str(out))
    rng = np.random.default_rng(1)
    enc = torch.from_numpy(rng.integers(3, 100, size=(2, 12)))
    dec = torch.from_numpy(rng.integers(3, 100, size=(2, 6)))
    inputs = {"input_ids": enc, "attention_mask": torch.ones_like(enc),
              "decoder_input_ids": dec, "decoder_attention_mask": torch.ones_like(dec)}
    with torch.no_grad():
        ref = hf(input_ids=enc, attention_mask=inputs["attention_mask"],
                 decoder_input_ids=dec).logits
    torch.testing.assert_close(ours.logits(inputs), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fault", ["missing", "misshaped"])
def test_loader_refuses_a_switch_manifest_without_a_tensor_its_config_implies(
        fault, compressed, tmp_path):
    """The loader checks every tensor a Switch config implies (``expected_shapes``), not only
    the experts and routers: a dense tensor missing from the manifest, or declared with
    another shape, is refused naming it, before any shard is read."""
    import shutil

    from qmoe_ray.errors import CheckpointError
    from qmoe_ray.format.expected import check_against_config
    from qmoe_ray.read.loader import load

    out, _, _ = compressed
    root = tmp_path / "ckpt"
    shutil.copytree(out, root)
    manifest = plain_reader.load_manifest(root)
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    assert name in manifest["tensors"]
    check_against_config(manifest)  # the intact manifest passes
    if fault == "missing":
        del manifest["tensors"][name]
        says = rf"tensor '{name}', which the switch_transformers config implies, is not in"
    else:
        manifest["tensors"][name]["shape"] = list(reversed(manifest["tensors"][name]["shape"]))
        manifest["tensors"][name]["shape"][0] += 1
        says = rf"tensor '{name}' is declared .*switch_transformers config implies"
    with pytest.raises(CheckpointError, match=says):
        check_against_config(manifest)
    write_manifest(root, manifest)
    with pytest.raises(CheckpointError, match=name):
        load(str(root))
