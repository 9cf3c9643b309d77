"""README options of ``qmoe-ray compress`` through the CLI on a tiny Mixtral (2 MoE layers of 6
experts): ``--config FILE.yaml`` (keys from the file, flags win), the int schemes with scale
groups through job -> load -> export -> transformers, ``--no-sequential-experts``,
``--token-cap`` and ``--eval-samples 0``.

Three jobs share one in-process Ray and one YAML file:
  A: the file (int2 in it, ``sequential_experts: false``, ``token_cap: 0``, ``eval_samples: 0``)
     with ``--scheme int4 --quant-group-size 8`` on the command line;
  B: A plus ``--sequential-experts --eval-samples 8``;
  C: the file plus ``--token-cap 1`` (the file's int2 scheme).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import plain_reader
import pytest
import torch
from resume_helpers import make_tiny_mixtral

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROLES_IN = ("gate_proj", "up_proj")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def jobs(ray_session, tmp_path_factory) -> dict[str, Path]:
    from qmoe_ray.cli import main

    root = tmp_path_factory.mktemp("options")
    model = make_tiny_mixtral(root / "mixtral")
    config = root / "job.yaml"
    config.write_text(
        f"source: {model}\n"
        f"data: {model}/tokens.npy\n"
        "scheme: int2\n"
        "num-samples: 48\n"  # dashes are accepted for underscores
        "seq_len: 32\n"
        "batch_size: 8\n"
        "group_size: 3\n"
        "sequential_experts: false\n"
        "token_cap: 0\n"
        "eval_samples: 0\n"
    )
    runs = {
        "A": ["--scheme", "int4", "--quant-group-size", "8"],
        "B": ["--scheme", "int4", "--quant-group-size", "8", "--sequential-experts",
              "--eval-samples", "8"],
        "C": ["--token-cap", "1"],
    }
    out = {}
    for name, flags in runs.items():
        out[name] = root / name
        rc = main(["compress", "--config", str(config), "--output", str(out[name]), "--quiet",
                   *flags])
        assert rc == 0, name
    out["model"] = model
    return out


def _manifest(folder: Path) -> dict:
    return plain_reader.load_manifest(folder)


def _experts(manifest: dict, shard: str) -> list[dict]:
    return sorted(manifest["experts"][shard], key=lambda e: e["expert"])


def test_config_file_keys_apply_and_flags_win(jobs):
    a, c = _manifest(jobs["A"]), _manifest(jobs["C"])
    # from the file
    for m in (a, c):
        o = m["options"]
        assert (o["num_samples"], o["seq_len"], o["group_size"]) == (48, 32, 3)
        assert o["source"] == str(jobs["model"])
    assert c["options"]["scheme"] == "int2" and c["options"]["sequential_experts"] is False
    # the flags over the file
    assert a["options"]["scheme"] == "int4" and a["options"]["quant_group_size"] == 8
    assert c["options"]["token_cap"] == 1 and c["options"]["eval_samples"] == 0
    assert {(e["scheme"], e["quant_group_size"]) for e in a["quantized"].values()} == {("int4", 8)}
    assert {e["scheme"] for e in c["quantized"].values()} == {"int2"}
    assert {e["codec"]["format"] for e in c["quantized"].values()} == {"qmoe-rans"}


def test_no_sequential_experts_changes_only_the_output_matrices(jobs):
    """A (off) and B (on) quantize gate/up on the same inputs, so those are the same bytes (B's
    held-out samples must not reach a Hessian either); the down matrices see the quantized (B)
    or the original (A) hidden activations."""
    a, b = _manifest(jobs["A"]), _manifest(jobs["B"])
    assert a["options"]["sequential_experts"] is False and b["options"]["sequential_experts"]
    same, differ = [], []
    for name in a["quantized"]:
        if not name.startswith("model.layers.0."):  # layer 1's inputs differ already
            continue
        keys = [k for k in a["tensors"] if k.startswith(name + ".")]
        equal = all(a["tensors"][k]["sha256"] == b["tensors"][k]["sha256"] for k in keys)
        (same if equal else differ).append(name.split(".")[-2])
    assert same and set(same) <= set(ROLES_IN) and same.count("gate_proj") == 6
    assert same.count("up_proj") == 6
    assert differ and set(differ) == {"down_proj"}


def test_token_cap_limits_the_hessian_tokens(jobs):
    """Layer 0 sees the same tokens in A (cap off) and C (``--token-cap 1``): C keeps at most
    ceil(1 x the mean) of each expert's Hessian tokens, and all of them below that."""
    a, c = _manifest(jobs["A"]), _manifest(jobs["C"])
    shard = "shards/layer-00000.safetensors"
    ea, ec = _experts(a, shard), _experts(c, shard)
    assert [e["routed_tokens"] for e in ea] == [e["routed_tokens"] for e in ec]
    uncapped = [e["hessian_tokens"] for e in ea]
    cap = math.ceil(1.0 * np.mean(uncapped))
    assert [e["hessian_tokens"] for e in ec] == [min(h, cap) for h in uncapped]
    assert any(h > cap for h in uncapped)  # the cap did bind on this router


def test_eval_samples_zero_measures_no_heldout_loss(jobs):
    from qmoe_ray.read.loader import load

    a = _manifest(jobs["A"])
    assert a["heldout_loss"] is None
    assert json.loads((jobs["A"] / "report.json").read_text())["heldout_loss"] is None
    # with held-out samples (B) the loss is there, and it is the loaded model's
    c = _manifest(jobs["B"])
    assert isinstance(c["heldout_loss"], float) and c["heldout_loss"] > 0
    from qmoe_ray.data import load_samples

    model = load(str(jobs["B"]))
    held = load_samples(f"{jobs['model']}/tokens.npy", model.config, 8, 32, split="heldout")
    loss, _ = model.loss({k: torch.from_numpy(v) for k, v in held.items()})
    assert loss == pytest.approx(c["heldout_loss"], rel=1e-4)


@pytest.mark.parametrize("job", ["A", "C"], ids=["int4-group8", "int2"])
def test_int_schemes_export_to_transformers_with_our_logits(jobs, job, tmp_path):
    import transformers as tf

    import qmoe_ray
    from qmoe_ray.cli import main

    ours = qmoe_ray.load(str(jobs[job]))
    # int4 groups (bit packing) and int2 (rANS), dequantized independently from the stored tensors
    import plain_reader

    manifest = plain_reader.read_manifest(jobs[job])
    tensors = plain_reader.read_verified(jobs[job], manifest)
    for name in manifest["quantized"]:
        want = plain_reader.dense_weight(name, manifest, tensors)
        assert np.array_equal(ours.experts[name].float().numpy(), want), name
    assert main(["export", str(jobs[job]), str(tmp_path / "hf"), "--quiet"]) == 0
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 97, size=(2, 10)))
    with torch.no_grad():
        theirs = hf(ids).logits
    mine = ours.logits(ids)
    # the same bf16 weights in float32 arithmetic on both sides
    torch.testing.assert_close(theirs, mine, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(mine[0], mine[1])  # not a constant output


def test_readme_documents_group_size_auto_and_worker_memory():
    rows = {r.split("|")[1].strip(): r for r in
            (Path(__file__).parents[1] / "README.md").read_text().splitlines()
            if r.startswith("| `--")}
    assert "`auto`" in rows["`--group-size`"] and "--worker-memory" in rows["`--group-size`"]
    row = rows["`--worker-memory`"]
    assert "GiB per worker" in row and "available memory" in row and "memory` resource" in row


def test_group_size_auto_on_the_embedded_model(ray_session, tmp_path):
    """``--group-size auto --worker-memory`` through the CLI: a budget of exactly three of the
    embedded Mixtral's eight experts gives groups of three in every layer (three groups of 3, 3
    and 2 experts: three code tables per matrix kind), as the report and the manifest say."""
    from qmoe_ray.cli import main
    from qmoe_ray.job import grouping
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.costmodel import load_constants
    from qmoe_ray.job.plan import prepare

    opts = dict(num_samples=32, seq_len=64, eval_samples=8)
    probe = prepare(CompressConfig(output=str(tmp_path / "p"), group_size="auto",
                                   worker_memory=1000, **opts))
    wm = grouping.need_bytes(probe.shapes["model.layers.0"], 3,
                             load_constants().worker_base_bytes) / grouping.GIB
    out = tmp_path / "out"
    assert main(["compress", "--output", str(out), "--quiet", "--group-size", "auto",
                 "--worker-memory", repr(wm), "--num-samples", "32", "--seq-len", "64",
                 "--eval-samples", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    g = report["grouping"]
    assert report["options"]["group_size"] == "auto" and g["budget_gib"] == pytest.approx(wm, abs=1e-4)
    assert [r["group_size"] for r in report["layers"]] == [3, 3, 3, 3]
    assert {r["group_size"] for r in g["layers"].values()} == {3}
    for row in g["layers"].values():
        assert row["measured_worker_peak_gib"] > 0 and row["heaviest_group_vs_uniform"] >= 1
    assert "expert groups of auto (3, 3, 3, 3 per MoE layer" in (out / "report.md").read_text()
    tables = _manifest(out)["tables"]  # one code table per group and role
    for i in range(4):
        pre = f"model.layers.{i}.qmoe_table.group"
        assert {k[len(pre):].split(".")[0] for k in tables if k.startswith(pre)} == {"0", "1", "2"}
