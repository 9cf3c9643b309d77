"""``qmoe-ray plan CONFIG --workers N --gpu KIND``: the cost model's options, predictions that
move the right way (more workers or a GPU: not slower; more tokens: slower; GPU-hours = hours x
workers), memory that follows the group, its constants stated (GPU ones as assumptions), JSON
output, and bad input named (an unsupported family, a worker too small for one group)."""

from __future__ import annotations

import json

import pytest

from qmoe_ray.bench.realshape import released_config
from qmoe_ray.cli import main
from qmoe_ray.errors import InputError
from qmoe_ray.job import costmodel as cm
from qmoe_ray.job.estimate import estimate


def _write(tmp_path, name, config=None):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config or released_config(name)))
    return str(path)


def _plan(name="qwen3-30b-a3b", *, workers=1, gpu=None, samples=256, group=16, stores=1,
          **kw):
    p = estimate(released_config(name), group_size=group, num_samples=samples, seq_len=128,
                 num_stores=stores)
    return cm.cluster_plan(p, workers=workers, gpu=gpu, eval_samples=64, **kw)


def test_json_output_carries_the_cost_model(tmp_path, capsys):
    assert main(["plan", _write(tmp_path, "deepseek-v3"), "--workers", "8", "--gpu", "H100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cost = out["cost"]
    assert cost["workers"] == 8 and cost["gpu"] == "H100"
    assert cost["gpu_hours"] == pytest.approx(cost["hours"] * 8)
    for key in ("peak_worker_bytes", "peak_store_bytes", "object_store_bytes",
                "source_bytes_read", "output_bytes"):
        assert cost[key] > 0, key
    assert cost["source_bytes_read"] >= out["source_bytes"] * 0.9  # every expert read once
    assert cost["output_bytes"] == out["schemes"]["ternary"]["bytes"]
    assert cost["constants"]["assumed"]["gpu"] == cm.GPUS["H100"]
    assert "scale benchmark" in cost["constants"]["measured"]
    best = cost["cheapest"]
    assert best["worker_hours"] <= cost["gpu_hours"] + 1e-9  # the asked shape was searched too


def test_text_output_labels_gpu_rates_as_assumptions(tmp_path, capsys):
    cfg = _write(tmp_path, "switch-c-2048")
    assert main(["plan", cfg, "--workers", "1", "--gpu", "A6000"]) == 0
    text = capsys.readouterr().out
    assert "ASSUMED, not measured (A6000)" in text and "GPU-hours" in text
    assert "cheapest shape:" in text and "constants measured:" in text
    assert main(["plan", cfg, "--workers", "2", "--gpu", "none"]) == 0
    text = capsys.readouterr().out
    assert "CPU worker-hours" in text and "ASSUMED" not in text
    assert main(["plan", cfg]) == 0  # without --workers / --gpu: no cost model
    assert "Cost model" not in capsys.readouterr().out


def test_predictions_move_the_right_way():
    one, eight = _plan(workers=1, gpu="H100"), _plan(workers=8, gpu="H100")
    assert eight["hours"] < one["hours"]
    assert eight["gpu_hours"] > one["gpu_hours"]  # the stores' serial part is paid 8 times
    cpu = _plan(workers=1)
    assert cpu["hours"] > one["hours"] and cpu["gpu_hours"] is None
    more = _plan(workers=8, gpu="H100", samples=1024)
    assert more["hours"] > eight["hours"]
    assert more["peak_store_bytes"] > eight["peak_store_bytes"]
    assert _plan(group=4, gpu="H100")["peak_worker_bytes"] < one["peak_worker_bytes"]
    # the Hessian products are float32 whatever dtype sums them: the A6000's 1/64-rate FP64 does
    # not enter, its FP32 peak does (38.7 against the A100's 19.5 TFLOP/s)
    assert _plan(gpu="A6000")["stage_hours"]["hessian"] == pytest.approx(
        _plan(gpu="A100")["stage_hours"]["hessian"] * 19.5 / 38.7)
    assert _plan(stores=4, gpu="H100")["stage_hours"]["dense"] == pytest.approx(
        one["stage_hours"]["dense"] / 4)
    for p in (one, eight, cpu, more):
        assert 0 < p["hours"] < 1e4
        assert sum(p["stage_hours"].values()) <= p["hours"] + 1e-9


def test_a_bigger_model_costs_more():
    small = _plan("qwen3-30b-a3b", workers=8, gpu="H100")
    big = _plan("qwen3-235b-a22b", workers=8, gpu="H100")
    assert big["hours"] > small["hours"] and big["output_bytes"] > small["output_bytes"]


def test_an_unsupported_family_is_named(tmp_path, capsys):
    cfg = _write(tmp_path, "llama", {"model_type": "llama", "hidden_size": 64,
                                     "vocab_size": 100})
    assert main(["plan", cfg, "--workers", "8", "--gpu", "H100"]) != 0
    err = capsys.readouterr().err
    assert "llama" in err and "mixtral" in err and "deepseek_v3" in err


def test_a_worker_too_small_for_one_group_says_what_is_needed():
    with pytest.raises(InputError, match=r"single expert needs [\d.]+ GB per worker"):
        _plan("mixtral-8x7b", gpu="A6000", memory_gb=1.0)
    with pytest.raises(InputError, match=r"largest group that fits is \d+ \(--group-size \d+\)"):
        _plan("deepseek-v3", group=256, gpu="A6000")


def test_bad_options_are_named(tmp_path, capsys):
    cfg = _write(tmp_path, "qwen3-30b-a3b")
    assert main(["plan", cfg, "--workers", "0"]) != 0
    assert "--workers 0" in capsys.readouterr().err
    assert main(["plan", cfg, "--max-hours", "-1", "--gpu", "H100"]) != 0
    assert "--max-hours" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", cfg, "--gpu", "V100"])


def test_no_shape_within_the_time_asked():
    p = _plan("kimi-k2", workers=1, max_hours=0.01)
    assert p["cheapest"] is None


def test_worker_memory_prices_the_hessian_sums_dtype(monkeypatch):
    """The worker's Hessian bytes: the larger of forming them (the sums in --hessian-dtype, then
    the float32 mean) and GPTQ (the float32 Hessians and GPTQ_COPIES working copies)."""
    p32 = estimate(released_config("deepseek-v3"), group_size=8, num_samples=256, seq_len=128)
    p64 = estimate(released_config("deepseek-v3"), group_size=8, num_samples=256, seq_len=128,
                   hessian_dtype="float64")
    s32, s64 = (cm.shape_of(p, eval_samples=0) for p in (p32, p64))
    assert (s32.sum_bytes, s64.sum_bytes) == (4, 8)
    base = cm.worker_bytes(s32, 8, 0.0) - 8 * 7168 ** 2 * 4 * (1 + cm.GPTQ_COPIES)
    assert base > 0  # weights and tokens
    # GPTQ's copies outweigh forming the Hessians in either dtype: the same peak
    assert cm.worker_bytes(s64, 8, 0.0) == cm.worker_bytes(s32, 8, 0.0)
    # were GPTQ to hold no copies, the float64 sums (8 + 4 bytes) would set the peak
    monkeypatch.setattr(cm, "GPTQ_COPIES", 0)
    assert cm.worker_bytes(s64, 8, 0.0) - cm.worker_bytes(s32, 8, 0.0) == 8 * 7168 ** 2 * (12 - 8)
