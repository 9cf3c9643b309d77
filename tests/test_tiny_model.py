"""The embedded tiny MoE: present, small, trained (loss far below unigram), experts specialise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qmoe_ray.data import embedded_model_path, load_samples

ROOT = embedded_model_path()
FILES = ("config.json", "model.safetensors", "tokenizer.json", "calib.npy", "heldout.npy",
         "metadata.json", "README.md")

# No skip when an asset is missing: the embedded model ships in the package, so a missing file
# is a packaging bug and must fail (test_files_* names it).


@pytest.fixture(scope="module")
def meta():
    return json.loads((ROOT / "metadata.json").read_text())


@pytest.fixture(scope="module")
def embedded_eval():
    from qmoe_ray.read.evaluate import evaluate

    return evaluate("embedded", "embedded", num_samples=32, batch_size=32)


def test_files_and_size(meta):
    for f in FILES:
        assert (ROOT / f).is_file(), f
    total = sum((ROOT / f).stat().st_size for f in FILES)
    assert total < 10 * 2**20
    cfg = json.loads((ROOT / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8
    assert cfg.get("output_router_logits") is False  # transformers' loss must be the plain CE
    from safetensors import safe_open

    with safe_open(str(ROOT / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in names)
    n_params = sum(int(np.prod(safe_open(str(ROOT / "model.safetensors"), "pt").get_slice(n)
                               .get_shape())) for n in names)
    assert n_params == meta["parameters"] and meta["expert_parameters"] > n_params / 2
    for name in ("calib.npy", "heldout.npy"):
        arr = np.load(ROOT / name, allow_pickle=False)
        assert arr.ndim == 2 and arr.shape[1] == meta["seq_len"]
        assert int(arr.max()) < cfg["vocab_size"]


def test_heldout_loss_far_below_unigram(meta, embedded_eval):
    loss = embedded_eval["loss"]
    assert loss < meta["unigram_cross_entropy"] - 1.0, (loss, meta["unigram_cross_entropy"])
    assert embedded_eval["tokens"] == 32 * (meta["seq_len"] - 1)


def test_calib_and_heldout_losses_close(embedded_eval):
    from qmoe_ray.read.evaluate import evaluate

    calib = evaluate("embedded", "embedded", num_samples=32, batch_size=32, split="calib")
    assert abs(calib["loss"] - embedded_eval["loss"]) < 0.75  # not memorised, same domain


def test_unigram_baseline_recomputed(meta):
    """The recorded unigram figure is what the calib tokens give (within sampling noise)."""
    cal = np.load(ROOT / "calib.npy").astype(np.int64).ravel()
    held = np.load(ROOT / "heldout.npy").astype(np.int64)[:, 1:].ravel()
    cfg = json.loads((ROOT / "config.json").read_text())
    counts = np.bincount(cal, minlength=cfg["vocab_size"]) + 1.0
    ce = float(-np.log(counts / counts.sum())[held].mean())
    assert abs(ce - meta["unigram_cross_entropy"]) < 0.3


def test_experts_specialise():
    """Routing, computed with our own family code: the top-1 expert depends on the token far more
    than a uniform router would allow, loads are skewed, and most experts are in use."""
    from qmoe_ray.models import get_family, walk_layers
    from qmoe_ray.storage.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(ROOT))
    fam = get_family(ckpt.config)
    arrays = load_samples("embedded", ckpt.config, 16, None, split="heldout")
    inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
    ids = arrays["input_ids"].ravel()
    n_exp = ckpt.config["num_local_experts"]
    cond, skew = [], []

    def stats(layer, batch, x, idx, gate):
        top1 = idx[..., 0].reshape(-1).numpy()
        frac = np.bincount(idx.reshape(-1).numpy(), minlength=n_exp) / idx.numel()
        assert (frac > 0.01).sum() >= n_exp // 2, frac  # most experts in use
        skew.append(float(frac.max()) * n_exp)
        joint = np.zeros((int(ids.max()) + 1, n_exp))
        np.add.at(joint, (ids, top1), 1.0)
        rows = joint.sum(1)
        p = joint[rows > 0] / rows[rows > 0, None]
        h = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(1)
        cond.append(float((h * rows[rows > 0]).sum() / rows.sum() / math.log(n_exp)))

    with torch.no_grad():
        walk_layers(fam, ckpt, [fam.embed(ckpt, inputs)], on_route=stats)
    assert max(cond) < 0.75, cond  # a uniform router would give ~1
    assert max(skew) > 2.0, skew  # some expert gets over twice its uniform share


def test_tokenizer_decodes_python():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "tokenizer.json"))
    held = np.load(ROOT / "heldout.npy")
    text = "".join(tok.decode(row.tolist()) for row in held[:8])
    assert any(k in text for k in ("def ", "import ", "return", "self"))
    assert tok.get_vocab_size() == json.loads((ROOT / "config.json").read_text())["vocab_size"]


def test_cli_eval_embedded(capsys, meta):
    from qmoe_ray.cli import main

    assert main(["eval", "--json", "--samples", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 16 * (meta["seq_len"] - 1)
    assert out["loss"] < meta["unigram_cross_entropy"]


def test_matches_transformers_on_embedded(tmp_path):
    """Our layer-major walk over the shipped checkpoint gives transformers' loss."""
    transformers = pytest.importorskip("transformers")
    from qmoe_ray.read.evaluate import evaluate

    model = transformers.MixtralForCausalLM.from_pretrained(str(ROOT), dtype=torch.float32).eval()
    rows = np.load(ROOT / "heldout.npy")[:8]
    np.save(tmp_path / "first.npy", rows)
    x = torch.from_numpy(rows.astype(np.int64))
    with torch.no_grad():
        ref = float(model(x, labels=x).loss)
    ours = evaluate("embedded", str(tmp_path / "first.npy"), batch_size=4)
    assert abs(ours["loss"] - ref) < 1e-4
