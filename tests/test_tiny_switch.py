"""The embedded tiny SwitchTransformers: present, small, trained (held-out loss of span-corrupted
text far below the unigram baseline), and usable by name (``embedded-switch``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qmoe_ray.data import embedded_switch_path

ROOT = embedded_switch_path()
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokens.npy", "metadata.json")

pytestmark = pytest.mark.skipif(not (ROOT / "metadata.json").exists(),
                                reason="embedded Switch not built (python jobs/train_tiny_switch.py)")


@pytest.fixture(scope="module")
def meta():
    return json.loads((ROOT / "metadata.json").read_text())


def test_files_size_and_layout(meta):
    for f in FILES:
        assert (ROOT / f).is_file(), f
    assert sum((ROOT / f).stat().st_size for f in FILES) < 10 * 2**20
    cfg = json.loads((ROOT / "config.json").read_text())
    assert cfg["model_type"] == "switch_transformers" and cfg["num_experts"] == 8
    tokens = np.load(ROOT / "tokens.npy", allow_pickle=False)
    assert list(tokens.shape) == meta["tokens_shape"]
    # raw windows never contain the sentinels (the top 100 ids), which span corruption inserts
    assert int(tokens.max()) < cfg["vocab_size"] - 100


def test_heldout_loss_far_below_unigram(meta):
    from qmoe_ray.evaluate import evaluate

    res = evaluate("embedded-switch", "embedded", num_samples=32, batch_size=32)
    assert res["loss"] < meta["unigram_cross_entropy"] - 1.0, (res, meta)
    assert res["loss"] == pytest.approx(meta["heldout_loss"], abs=0.5)  # other samples, same model
