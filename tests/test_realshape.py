"""Real-shaped synthetic checkpoints (``qmoe_ray.bench.realshape``): released configs cut to a few
layers and experts keep their true matrix shapes, and what is written is a checkpoint transformers
and the job's reader both accept."""

from __future__ import annotations

import pytest
import torch
from fixtures_s3 import make_bucket, moto_endpoint, s3_credentials  # noqa: F401

from qmoe_ray.bench.realshape import RELEASED, released_config, shrink_config, write_realshape
from qmoe_ray.errors import InputError
from qmoe_ray.job.estimate import count_parameters

#: released routed-expert matrices (rows, cols), from the model cards / papers
TRUE_EXPERT = {
    "mixtral-8x7b": {(14336, 4096), (4096, 14336)},
    "qwen3-30b-a3b": {(768, 2048), (2048, 768)},
    "qwen3-235b-a22b": {(1536, 4096), (4096, 1536)},
    "deepseek-v3": {(2048, 7168), (7168, 2048)},
    "kimi-k2": {(2048, 7168), (7168, 2048)},
    "switch-base-128": {(3072, 768), (768, 3072)},
    "switch-c-2048": {(6144, 2080), (2080, 6144)},
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_shrunk_configs_keep_the_true_expert_shapes(name):
    full = count_parameters(released_config(name))
    small = count_parameters(shrink_config(released_config(name), layers=2, experts=4, vocab=256))
    assert set(full["expert_matrices"]) == set(small["expert_matrices"]) == TRUE_EXPERT[name]
    assert small["experts_per_layer"] == [4]
    assert small["moe_layers"] == (4 if name.startswith("switch") else 2)
    assert small["total"] < full["total"] / 20


def test_released_sizes_are_the_published_ones():
    billions = {n: count_parameters(released_config(n))["total"] / 1e9 for n in RELEASED}
    assert billions["mixtral-8x7b"] == pytest.approx(46.7, abs=0.1)
    assert billions["qwen3-30b-a3b"] == pytest.approx(30.5, abs=0.1)
    assert billions["qwen3-235b-a22b"] == pytest.approx(235.1, abs=0.2)
    assert billions["kimi-k2"] == pytest.approx(1026, abs=2)  # "1T total"
    assert billions["switch-c-2048"] == pytest.approx(1571, abs=2)  # "1.6T"


@pytest.mark.slow
def test_a_written_qwen3_layer_loads_in_transformers_and_in_the_job_reader(tmp_path):
    from transformers import AutoModelForCausalLM

    from qmoe_ray.models import get_family
    from qmoe_ray.storage.checkpoint import open_checkpoint

    cfg = shrink_config(released_config("qwen3-30b-a3b"), layers=1, experts=2, vocab=256)
    info = write_realshape(str(tmp_path), cfg, tokens=1000)
    model, missing = AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not missing["missing_keys"] and not missing["unexpected_keys"]
    ck = open_checkpoint(str(tmp_path))
    fam = get_family(ck.config, ck)
    fam.check_weights(ck.names, ck.shape)
    assert ck.shape("model.layers.0.mlp.experts.1.down_proj.weight") == (2048, 768)
    assert sum(p.numel() for p in model.parameters()) * 2 <= info["bytes"]
    up = ck.read("model.layers.0.mlp.experts.0.up_proj.weight")
    assert up.dtype == torch.bfloat16 and 0.019 < float(up.float().std()) < 0.021


@pytest.mark.s3
@pytest.mark.slow
def test_written_to_s3_and_read_back(moto_endpoint, s3_credentials):  # noqa: F811
    from qmoe_ray.models import get_family
    from qmoe_ray.storage.checkpoint import open_checkpoint

    make_bucket(moto_endpoint, "realshape")
    opts = {"endpoint_url": moto_endpoint}
    cfg = shrink_config(released_config("switch-base-128"), layers=1, experts=2, vocab=256)
    info = write_realshape("s3://realshape/sb", cfg, tokens=1000, storage_options=opts)
    ck = open_checkpoint("s3://realshape/sb", **opts)
    get_family(ck.config, ck).check_weights(ck.names, ck.shape)
    assert len(info["files"]) == 3  # encoder block, decoder block, the rest
    assert ck.shape("encoder.block.0.layer.1.mlp.experts.expert_1.wi.weight") == (3072, 768)


def test_unknown_names_and_families_are_refused():
    with pytest.raises(InputError, match="known: mixtral-8x7b"):
        released_config("grok-1")
    with pytest.raises(InputError, match="mixtral, qwen2_moe"):
        shrink_config({"model_type": "olmoe"}, layers=1)
