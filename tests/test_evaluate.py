"""qmoe_ray.read.evaluate: layer-major loss vs transformers, the CLI, pluggable weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qmoe_ray.read.evaluate import LayerCache, evaluate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    """A random tiny Mixtral saved by transformers (fp32), token ids, and transformers' loss."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(str(root / "model"), safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 96, size=(6, 20)).astype(np.int32)
    np.save(root / "ids.npy", ids)
    x = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        ref = float(model(x, labels=x).loss)
    return root, ref, model


def test_matches_transformers_loss(tiny_mixtral):
    root, ref, _ = tiny_mixtral
    out = evaluate(str(root / "model"), str(root / "ids.npy"), batch_size=4)
    assert out["samples"] == 6 and out["seq_len"] == 20 and out["tokens"] == 6 * 19
    assert abs(out["loss"] - ref) < 1e-4
    assert abs(out["perplexity"] - np.exp(ref)) < 1e-3 * np.exp(ref)


def test_batch_size_does_not_change_loss(tiny_mixtral):
    root, ref, _ = tiny_mixtral
    a = evaluate(str(root / "model"), str(root / "ids.npy"), batch_size=1)
    b = evaluate(str(root / "model"), str(root / "ids.npy"), batch_size=6)
    assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["loss"] - ref) < 1e-4


def test_weights_read_once_per_layer(tiny_mixtral):
    """Layer-major: every tensor is fetched from the source exactly once for all batches."""
    from qmoe_ray.storage.checkpoint import open_checkpoint

    root, ref, _ = tiny_mixtral
    ckpt = open_checkpoint(str(root / "model"))
    calls: list[str] = []

    class Counting:
        names = ckpt.names

        def __call__(self, name):
            calls.append(name)
            return ckpt(name)

        def __contains__(self, name):
            return name in ckpt

    out = evaluate(data_spec=str(root / "ids.npy"), batch_size=2, weights=Counting(),
                   config=ckpt.config)
    assert abs(out["loss"] - ref) < 1e-4
    assert len(calls) == len(set(calls))
    assert set(calls) <= set(ckpt.names)


def test_experts_for_hook_is_used(tiny_mixtral):
    """A pluggable expert source (what a compressed checkpoint supplies) is what gets used: scaled
    experts through the hook give transformers' loss with the same scaled experts."""
    import copy

    from qmoe_ray.models import get_family
    from qmoe_ray.storage.checkpoint import open_checkpoint

    root, ref, model = tiny_mixtral
    ckpt = open_checkpoint(str(root / "model"))
    fam = get_family(ckpt.config)
    scale = 4.0

    def scaled_experts(layer):
        def get(e):
            return {r: scale * t[0] for r, t in fam.read_experts(layer, ckpt, [e]).items()}

        return get

    out = evaluate(str(root / "model"), str(root / "ids.npy"), experts_for=scaled_experts)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in scaled.named_parameters():
            if ".experts." in name:
                p.mul_(scale)
        x = torch.from_numpy(np.load(root / "ids.npy").astype(np.int64))
        want = float(scaled(x, labels=x).loss)
    assert abs(out["loss"] - want) < 1e-4
    assert abs(out["loss"] - ref) > 1e-3


def test_layer_cache_drop():
    src = {"a": torch.ones(2)}
    reads = []

    def get(name):
        reads.append(name)
        return src[name]

    class Source:
        def __call__(self, name):
            return get(name)

        def __contains__(self, name):
            return name in src

    c = LayerCache(Source())
    c("a")
    c("a")
    assert reads == ["a"] and "a" in c
    c.drop()
    c("a")
    assert reads == ["a", "a"]


def test_cli_json(tiny_mixtral, capsys):
    from qmoe_ray.cli import main

    root, ref, _ = tiny_mixtral
    rc = main(["eval", str(root / "model"), "--data", str(root / "ids.npy"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "tokens"} <= set(out)
    assert abs(out["loss"] - ref) < 1e-4 and out["tokens"] == 114


def test_cli_bad_input(tiny_mixtral, tmp_path, capsys):
    from qmoe_ray.cli import main

    root, _, _ = tiny_mixtral
    np.save(tmp_path / "big.npy", np.full((2, 8), 500, np.int32))
    rc = main(["eval", str(root / "model"), "--data", str(tmp_path / "big.npy"), "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and "big.npy" in err and "vocabulary" in err
    rc = main(["eval", str(tmp_path / "nope"), "--json"])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_switch_span_corruption_matches_transformers(tmp_path):
    """Switch: span-corrupted samples from load_samples, evaluated layer-major, give transformers'
    ``model(input_ids, attention_mask, decoder_input_ids, labels).loss``."""
    from qmoe_ray.data import load_samples
    from qmoe_ray.storage.checkpoint import open_checkpoint

    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_heads=4, num_experts=4,
        expert_capacity=64, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, decoder_start_token_id=0,
    )
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(tmp_path / "switch"), safe_serialization=True)
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(2, 20, size=(5, 40)))
    config = open_checkpoint(str(tmp_path / "switch")).config
    arrays = load_samples(str(tmp_path / "ids.npy"), config, None, 32, split="all")
    assert (arrays["input_ids"] >= 128 - 100).any()  # sentinels present
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in arrays.items()}
        ref = float(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                          decoder_input_ids=t["decoder_input_ids"],
                          decoder_attention_mask=t["decoder_attention_mask"],
                          labels=t["labels"]).loss)
    out = evaluate(str(tmp_path / "switch"), str(tmp_path / "ids.npy"), seq_len=32, batch_size=2)
    assert out["tokens"] == int((arrays["labels"] >= 0).sum())
    assert abs(out["loss"] - ref) < 1e-4
