"""``qmoe-ray export``: the decompressed model as a plain HF bf16 checkpoint that transformers
loads with its own classes and that gives the logits of our decoded model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plain_reader
import pytest
import torch
from load_helpers import compressed_checkpoint

from qmoe_ray.read.export import INDEX, expert_layout, export
from qmoe_ray.read.loader import load

pytestmark = pytest.mark.usefixtures("module_ray")  # every job here runs in-process


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return compressed_checkpoint(tmp_path_factory)


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _ids(vocab: int, shape=(2, 10)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(3, vocab, size=shape))


@pytest.mark.parametrize("layout", ["auto", "fused"])
def test_export_loads_in_transformers_with_our_logits(ckpt, tmp_path, layout):
    out = tmp_path / "hf"
    res = export(str(ckpt), str(out), layout=layout)
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(res["files"])
    assert res["copied"] == ["tokenizer.json"]  # verified against its manifest hash
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the staging folder is gone
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "mixtral"
    ours = load(str(ckpt))
    ids = _ids(ours.config["vocab_size"])
    torch.testing.assert_close(_hf_logits(out, ids), ours.logits(ids), rtol=1e-4, atol=1e-4)
    names = set(index["weight_map"])
    if layout == "auto":  # the embedded model keeps Mixtral's per-expert w1/w2/w3 names
        assert res["layout"] == "per-expert"
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    else:
        assert "model.layers.0.block_sparse_moe.experts.gate_up_proj" in names


def test_export_refuses_an_existing_output_and_bad_layout(ckpt, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite"):
        export(str(ckpt), str(out))
    with pytest.raises(ValueError, match="layout='stacked'"):
        export(str(ckpt), str(tmp_path / "x"), layout="stacked")
    res = export(str(ckpt), str(out), overwrite=True)
    assert res["tensors"] == len(json.loads((out / INDEX).read_text())["weight_map"])


def test_expert_layout_names_every_quantized_matrix(ckpt):
    manifest = plain_reader.load_manifest(ckpt)
    kind, names = expert_layout(manifest)
    assert kind == "per-expert" and set(names) == set(manifest["quantized"])
    assert len({v[0] for v in names.values()}) == len(names)  # no two matrices share a name


def test_cli_export(ckpt, tmp_path, capsys):
    from qmoe_ray.cli import main

    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    assert "tensors" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "hf2")]) == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_transformers_saved_round_trip(tmp_path, model_type):
    """A tiny decoder MoE of each other family saved by transformers (Qwen2-MoE: shared expert,
    a dense layer): compress, export, load with transformers, same logits as our decoded model."""
    from fixtures_s3 import save_tiny, tiny_model

    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression

    src = save_tiny(tiny_model(model_type), tmp_path / "src", dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    np.save(src / "tokens.npy", rng.integers(3, 97, size=(48, 16)).astype(np.int64))
    out = tmp_path / "c"
    run_compression(CompressConfig(source=str(src), output=str(out), data=str(src / "tokens.npy"),
                                   num_samples=24, seq_len=16, eval_samples=4, batch_size=12,
                                   group_size=6, method="rtn"), progress=False)
    res = export(str(out), str(tmp_path / "hf"))
    assert res["layout"] == "per-expert"
    ours = load(str(out))
    ids = _ids(97)
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", ids), ours.logits(ids),
                               rtol=1e-4, atol=1e-4)
