"""``qmoe-ray inspect``: figures agree with the job's report and manifest; checksum status."""

from __future__ import annotations

import json
from pathlib import Path

import plain_reader
import pytest
import torch
from load_helpers import compressed_checkpoint, copy_checkpoint, data_offset

from qmoe_ray.format.sizes import tensor_kind
from qmoe_ray.read.inspect import format_text, inspect


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return compressed_checkpoint(tmp_path_factory)


def test_inspect_agrees_with_the_job_report(ckpt):
    info = inspect(str(ckpt))
    report = json.loads((ckpt / "report.json").read_text())
    sizes, bits = info["sizes"], info["bits_per_param"]
    assert info["model"]["model_type"] == "mixtral" and info["scheme"] == "ternary"
    assert sizes["total_params"] == report["sizes"]["total_params"]
    assert sizes["expert_params"] == report["sizes"]["expert_params"]
    assert bits["experts"] == pytest.approx(report["sizes"]["expert_bits_per_param"], rel=1e-6)
    assert bits["whole_model"] == pytest.approx(report["sizes"]["bits_per_param"], rel=1e-6)
    assert sum(v["tensors"] for v in sizes["by_kind"].values()) == sizes["tensors"]
    assert sizes["by_kind"]["router"]["tensors"] == info["model"]["moe_layers"]
    assert info["fallbacks"]["experts"] == len(report["fallbacks"])
    assert info["fallbacks"]["of"] == 4 * 8
    cov = info["coverage"]
    assert len(cov) == 4 and all(c["with_tokens"] + sum(
        1 for f in info["fallbacks"]["list"] if f["file"] == c["file"]) >= c["experts"]
        for c in cov)
    assert info["checksums"]["status"] == "ok"
    assert info["checksums"]["tensors"] == sizes["tensors"]
    text = format_text(info)
    assert "bits/param: experts" in text and "checksums: ok" in text


def test_inspect_reports_a_corrupted_shard(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")
    m = plain_reader.load_manifest(root)
    name = next(n for n in m["tensors"] if n.endswith(".lo"))
    shard = root / m["tensors"][name]["file"]
    raw = bytearray(shard.read_bytes())
    raw[data_offset(shard, name)] ^= 1
    shard.write_bytes(bytes(raw))
    info = inspect(str(root))
    assert info["checksums"]["status"] == "failed" and name in info["checksums"]["error"]
    assert inspect(str(root), verify=False)["checksums"]["status"] == "not checked"


def test_cli_inspect_json_and_exit_codes(ckpt, tmp_path, capsys):
    from qmoe_ray.cli import main

    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checksums"]["status"] == "ok"
    assert main(["inspect", str(ckpt), "--no-verify"]) == 0
    assert "not checked" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_tensor_kinds():
    q = {"m.layers.0.mlp.experts.1.up_proj.weight": {}}
    t = {"m.layers.0.qmoe_table.group0.up": {}}
    assert tensor_kind("m.layers.0.mlp.experts.1.up_proj.weight.q.stream", q, t) == "expert codes"
    assert tensor_kind("m.layers.0.mlp.experts.1.up_proj.weight.hi", q, t) == "expert scales"
    assert tensor_kind("m.layers.0.qmoe_table.group0.up.freqs", q, t) == "code tables"
    assert tensor_kind("model.layers.0.block_sparse_moe.gate.weight", q, t) == "router"
    assert tensor_kind("model.layers.0.self_attn.q_proj.weight", q, t) == "attention"
    assert tensor_kind("model.norm.weight", q, t) == "norms"
    assert tensor_kind("lm_head.weight", q, t) == "embeddings/head"
