"""Fused expert sources (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj
[E, H, I]``: what transformers 5 writes with ``save_pretrained(save_original_format=False)`` and
newer Hub releases ship) compress exactly like their per-expert twins.

The expert layout is resolved once from the tensor names (``get_family(config, names)``) by the
driver and by every actor; a family with no layout bound refuses to name source tensors rather
than assume the per-expert layout (which once made the writer store the fused tensors densely next
to the encoded experts, about 2x the size on these tiny models and 6-8x at hidden 128, and round
Mixtral's router to bf16).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import plain_reader
from fixtures_s3 import save_tiny, tiny_model  # noqa: E402
from load_helpers import write_manifest
from safetensors import safe_open  # noqa: E402

from qmoe_ray.job.config import CompressConfig  # noqa: E402
from qmoe_ray.models import get_family  # noqa: E402
from qmoe_ray.storage.checkpoint import open_checkpoint  # noqa: E402

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
HELD = 6  # held-out samples: what the held-out split of 64 token rows holds
ROUTER = {m: "model.layers.0.mlp.gate.weight" for m in FAMILIES}
ROUTER_PER_EXPERT = {**ROUTER, "mixtral": "model.layers.0.block_sparse_moe.gate.weight"}


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family: the same float32 weights saved by transformers the default way (per expert)
    and with ``save_original_format=False`` (fused), plus token data."""
    root = tmp_path_factory.mktemp("fused")
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(3, 97, (64, 32)))
    out = {}
    for i, mt in enumerate(FAMILIES):
        model = tiny_model(mt, seed=i)
        out[mt] = {
            "per-expert": save_tiny(model, root / mt / "per-expert"),
            "fused": save_tiny(model, root / mt / "fused", save_original_format=False),
            "tokens": root / "tokens.npy",
        }
    return out


# -- without Ray -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_fused_twin_is_fused(twins, model_type):
    """Guard the fixture: transformers really wrote 3-D expert tensors (gate rows first)."""
    fused = open_checkpoint(str(twins[model_type]["fused"]))
    per = open_checkpoint(str(twins[model_type]["per-expert"]))
    p = "model.layers.0.mlp.experts"
    assert f"{p}.gate_up_proj" in fused and not any(".experts.0." in n for n in fused.names)
    e, two_i, h = fused.shape(f"{p}.gate_up_proj")
    assert (two_i, h) == (
        2
        * per.shape(
            next(n for n in per.names if ".experts.0." in n and ("gate_proj" in n or ".w1." in n))
        )[0],
        32,
    )
    assert fused.dtype(ROUTER[model_type]) == torch.float32
    assert ROUTER_PER_EXPERT[model_type] in per


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layout_is_bound_from_names_and_never_guessed(twins, model_type):
    src = open_checkpoint(str(twins[model_type]["fused"]))
    fam = get_family(src.config)  # no names: nothing source-specific may be answered
    layer = next(lay for lay in fam.layers() if lay.moe)
    for ask in (
        lambda: fam.source_expert_names(layer),
        lambda: fam.router_name(layer),
        lambda: fam.expected_shapes(),
        lambda: fam.expert_layout,
    ):
        with pytest.raises(
            RuntimeError,
            match="expert layout .* is not bound: build it with "
            r"get_family\(config, names\)",
        ):
            ask()
    fam = get_family(src.config, src)
    assert fam.expert_layout == "fused"
    assert fam.router_name(layer) == ROUTER[model_type]
    assert fam.source_expert_names(layer) == [
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]
    per = open_checkpoint(str(twins[model_type]["per-expert"]))
    fam_p = get_family(per.config, per.names)
    assert fam_p.expert_layout == "per-expert"
    assert fam_p.router_name(layer) == ROUTER_PER_EXPERT[model_type]
    assert len(fam_p.source_expert_names(layer)) == 3 * layer.num_experts


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_writer_keeps_fused_experts_out_of_the_dense_tensors(twins, model_type, tmp_path):
    """The writer (plain class, no Ray) on a fused source: the 3-D expert tensors are experts, not
    dense tensors, and the router is recognised (so it keeps its float32)."""
    from qmoe_ray.job.writer import CheckpointWriter

    src = str(twins[model_type]["fused"])
    w = CheckpointWriter(str(tmp_path / "out"), {}, src, {})
    layer = w.layers[0]
    dense = w.dense_names(layer)
    assert not any("experts" in n for n in dense), dense
    assert ROUTER[model_type] in w.family.router_names() and ROUTER[model_type] in dense
    assert w.family.stored_dtype(ROUTER[model_type], torch.float32) == torch.float32
    # (that the router keeps its float32 in the output: the job test below, from the shard)
    assert w.family.expert_layout == "fused"


# -- the job on Ray ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    """One in-process Ray on 127.0.0.1 for every job of this module (jobs do not stop a Ray
    they did not start)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=256 * 2**20,
    )
    yield
    ray.shutdown()


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.safetensors"))}


def _compress(src: Path, tokens: Path, out: Path) -> dict:
    from qmoe_ray.job.driver import run_compression

    cfg = CompressConfig(
        source=str(src),
        output=str(out),
        data=str(tokens),
        num_samples=32,
        seq_len=32,
        eval_samples=HELD,
        batch_size=16,
        group_size=6,
        num_workers=1,
    )
    return run_compression(cfg, progress=False)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_fused_source_compresses_like_its_per_expert_twin(twins, ray_session, model_type, tmp_path):
    from qmoe_ray.read.loader import load

    outs, reports = {}, {}
    for layout in ("per-expert", "fused"):
        outs[layout] = tmp_path / layout
        reports[layout] = _compress(
            twins[model_type][layout], twins[model_type]["tokens"], outs[layout]
        )
    shards = {k: _shards(v) for k, v in outs.items()}
    size = {k: sum(len(b) for b in v.values()) for k, v in shards.items()}
    # same tensor-file size (was ~2x here: the fused tensors were stored densely as well)
    assert abs(size["fused"] - size["per-expert"]) <= 0.02 * size["per-expert"], size
    # the same held-out loss: the same weights were calibrated and quantized the same way
    assert reports["fused"]["heldout_loss"] == pytest.approx(
        reports["per-expert"]["heldout_loss"], rel=1e-6, abs=1e-6
    )
    for layout, out in outs.items():
        manifest = plain_reader.load_manifest(out)
        assert manifest["expert_layout"] == layout
        assert not any(
            "gate_up_proj" in n or n.endswith("experts.down_proj") for n in manifest["tensors"]
        )
        assert len(manifest["quantized"]) == 3 * sum(
            lay.num_experts for lay in get_family(manifest["config"]).layers() if lay.moe
        )
        router = (ROUTER if layout == "fused" else ROUTER_PER_EXPERT)[model_type]
        with safe_open(str(out / manifest["tensors"][router]["file"]), "pt") as f:
            assert f.get_tensor(router).dtype == torch.float32  # the source's dtype, not bf16
    if model_type != "mixtral":  # same tensor names in both sources: the very same bytes
        assert shards["fused"] == shards["per-expert"]
    # the read side needs nothing for it: the output uses our own per-expert names
    model = load(str(outs["fused"]))
    from qmoe_ray.data import load_samples

    held = load_samples(str(twins[model_type]["tokens"]), model.config, HELD, 32, split="heldout")
    inputs = {k: torch.from_numpy(v) for k, v in held.items()}
    ce, n = model.family.loss_terms(model.logits(inputs), inputs)
    assert float(ce) / n == pytest.approx(reports["fused"]["heldout_loss"], rel=1e-4)
    if model_type == "olmoe":  # once: a manifest's config is bounded by the same family parse
        _config_bounds_apply_to_manifests(outs["fused"], tmp_path / "edited")


def _config_bounds_apply_to_manifests(out: Path, copy: Path) -> None:
    import shutil

    from qmoe_ray.errors import CheckpointError
    from qmoe_ray.read.loader import load

    shutil.copytree(out, copy)
    manifest = plain_reader.load_manifest(copy)
    # within the manifest schema's own loose bound (2**24), above the family's (2**16)
    manifest["config"]["hidden_size"] = 100_000
    write_manifest(copy, manifest)
    (copy / "config.json").write_text(json.dumps(manifest["config"]))
    with pytest.raises(
        CheckpointError,
        match=r"'hidden_size' is 100000: expected an integer in "
        r"1\.\.65536",
    ):
        load(str(copy))
