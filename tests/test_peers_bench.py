"""The ``peers`` benchmark's own parts, without the peers' environment: the expert-only module
list its recipe quantizes, the group it picks, the reader of a peer's fake-quantized weights
(checked and merged into an HF folder our evaluator scores), the bit counting and the table."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from qmoe_ray.bench.job import _baseline_loss
from qmoe_ray.bench.peers import (
    merge_fake_quant,
    nominal_bits,
    peer_group_size,
    quantized_modules,
    ratios,
    source_name,
    table,
)
from qmoe_ray.data import embedded_model_path
from qmoe_ray.errors import InputError
from qmoe_ray.models import get_family
from qmoe_ray.storage.checkpoint import open_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROLES = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def family():
    ckpt = open_checkpoint(str(embedded_model_path()))
    fam = get_family(ckpt.config, ckpt)
    names = sorted(n for lay in fam.layers() if lay.moe for n in fam.source_expert_names(lay))
    return ckpt.config, names


def _linearized(config) -> tuple[list[str], list[str]]:
    """Linear module names of the embedded Mixtral as llm-compressor's ``linearize_moe`` leaves
    it (the router a Linear too, as older transformers have it), and the experts among them."""
    experts, other = [], ["lm_head"]
    for i in range(config["num_hidden_layers"]):
        other += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj")]
        other.append(f"model.layers.{i}.mlp.gate")
        experts += [f"model.layers.{i}.mlp.experts.{e}.{r}"
                    for e in range(config["num_local_experts"]) for r in ROLES]
    return sorted(experts + other), sorted(experts)


def test_ignore_list_leaves_exactly_the_experts(family):
    config, source_experts = family
    linear, experts = _linearized(config)
    got = quantized_modules(linear)
    assert got == experts and len(got) == 96
    # each maps onto one source expert tensor, together all of them
    assert sorted(source_name(f"{n}.weight") for n in got) == source_experts
    with pytest.raises(InputError, match="not a routed expert"):
        source_name("model.layers.0.self_attn.q_proj.weight")


def test_group_size_divides_every_expert_width():
    assert peer_group_size({128, 192}, 128) == 64
    assert peer_group_size({768, 3072}, 128) == 128
    assert peer_group_size({128, 192}, 32) == 32
    with pytest.raises(InputError, match="--group-size"):
        peer_group_size({128}, 0)


def _fake_quant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest per group, dequantized (what a peer writes)."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(rows, cols).to(w.dtype)


def _peer_file(tmp_path, bits: int = 2, group: int = 64, skip: str | None = None,
               raw: str | None = None) -> tuple[str, dict]:
    src = load_file(str(embedded_model_path() / "model.safetensors"))
    out = {}
    for name, w in src.items():
        if ".experts." not in name:
            continue
        layer = name.split(".")[2]
        expert = name.split(".experts.")[1].split(".")[0]
        role = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[name.split(".")[-2]]
        peer = f"model.layers.{layer}.mlp.experts.{expert}.{role}.weight"
        if peer == skip:
            continue
        out[peer] = w if peer == raw else _fake_quant(w, bits, group)
    path = tmp_path / "weights.safetensors"
    save_file(out, str(path))
    return str(path), src


def test_fake_quant_reader_merges_and_our_evaluator_scores_it(tmp_path, family):
    _, experts = family
    path, src = _peer_file(tmp_path)
    got = merge_fake_quant(embedded_model_path(), path, tmp_path / "hf", 2, 64, experts)
    assert got == {"experts": 96, "max_levels": 4, "changed": 96}
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(merged) == set(src)
    name = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    assert torch.equal(merged[name], _fake_quant(src[name], 2, 64))
    assert torch.equal(merged["model.layers.2.self_attn.q_proj.weight"],
                       src["model.layers.2.self_attn.q_proj.weight"])
    base = _baseline_loss(str(embedded_model_path()), "embedded", 4, 32)
    rtn2 = _baseline_loss(str(tmp_path / "hf"), "embedded", 4, 32)
    assert rtn2 > base + 0.01  # 2-bit round-to-nearest experts do cost loss


def test_fake_quant_reader_refuses_what_a_peer_must_not_write(tmp_path, family):
    _, experts = family
    one = "model.layers.1.mlp.experts.3.up_proj.weight"
    path, _ = _peer_file(tmp_path, raw=one)  # bf16 weights left as they were
    with pytest.raises(InputError, match="up_proj.weight has .* values in a group of 64"):
        merge_fake_quant(embedded_model_path(), path, tmp_path / "a", 2, 64, experts)
    path, _ = _peer_file(tmp_path, skip=one)
    with pytest.raises(InputError, match="1 experts were not quantized"):
        merge_fake_quant(embedded_model_path(), path, tmp_path / "b", 2, 64, experts)
    path, _ = _peer_file(tmp_path, bits=3)  # 8 levels read as a 2-bit grid
    with pytest.raises(InputError, match="more than a 2-bit grid"):
        merge_fake_quant(embedded_model_path(), path, tmp_path / "c", 2, 64, experts)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_bits_and_table():
    assert nominal_bits(2, 128) == 2.25 and nominal_bits(2, 64) == 2.5
    rows = [
        {"who": "ours", "label": "qmoe-ray GPTQ", "grid": "int2, per row", "scheme": "int2",
         "bits": 2, "coded_bits": 1.8, "nominal_bits": 2.2, "loss": 3.36, "rise": 0.01,
         "wall": 10.0, "oneshot": None},
        {"who": "gptq", "label": "llm-compressor GPTQ", "grid": "W2 g64", "scheme": "int2",
         "bits": 2, "coded_bits": 2.5, "nominal_bits": 2.5, "loss": 3.39, "rise": 0.04,
         "wall": 40.0, "oneshot": 20.0},
    ]
    r = ratios(rows)
    assert r == pytest.approx({"rise": 0.25, "wall": 0.25, "wall_vs_quantizer": 0.5,
                               "coded_bits": 0.72})
    assert ratios(rows, peer="autoround") == {}
    assert ratios(rows, group=64) == {}  # no row of ours at the peer's group yet
    rows.append({**rows[0], "grid": "int2, g64", "group": 64, "rise": 0.02, "coded_bits": 2.0})
    assert ratios(rows, group=64)["rise"] == pytest.approx(0.5)
    assert ratios(rows)["rise"] == pytest.approx(0.25)  # per row still the per-row one
    rows.pop()
    md = table(rows)
    assert len(md) == 4 and "| llm-compressor GPTQ | W2 g64 | 2.500 | 2.500 | 3.3900 | +0.0400 |"\
        " 40.0 | 20.0 |" in md
