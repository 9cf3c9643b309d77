"""Resume: progress lives in the output; a driver killed after a layer (a subprocess, killed by
PID) is rerun and finishes with the bytes of an uninterrupted run; a rerun with another source,
other options or against a newer format is refused, naming the difference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from resume_helpers import assert_same_bytes, files, job_cfg, job_options, make_tiny_mixtral

from qmoe_ray.format import manifest as mf
from qmoe_ray.job.progress import JOB, Progress, check_same_job, layer_record_name

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def clean(model, tmp_path_factory) -> dict[str, bytes]:
    """An uninterrupted run on 1 worker and 1 store."""
    from qmoe_ray.job.driver import run_compression

    out = tmp_path_factory.mktemp("clean")
    rep = run_compression(job_cfg(model, out), progress=False)
    assert rep["resumed_after_layers"] == 0 and not (out / "progress").exists()
    return files(out)


_CHILD = textwrap.dedent("""
    import json, sys, time
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression

    def hook(event, info):
        if event == "layer_done" and info["layer"].index == 0:
            print("LAYER0-DONE", flush=True)
            time.sleep(600)  # the parent kills us here

    run_compression(CompressConfig(**json.loads(sys.argv[1])), progress=False, hook=hook)
""")


def test_driver_killed_after_layer_then_rerun_is_identical(model, clean, tmp_path):
    from qmoe_ray.job.driver import run_compression

    out = tmp_path / "out"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(job_options(model, out))],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        for line in child.stdout:
            if "LAYER0-DONE" in line or time.monotonic() > deadline:
                break
        assert (out / layer_record_name(0)).exists(), "layer 0 was not recorded in the output"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        try:  # the Ray processes the killed driver had started (its own session, ours to end)
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (out / "manifest.json").exists()
    assert not (out / layer_record_name(1)).exists()
    assert list((out / "progress" / "activations").iterdir())  # the stream after layer 0

    # the same command, now on 2 workers and 2 stores: continues after layer 0
    rep = run_compression(job_cfg(model, out, num_workers=2, num_stores=2), progress=False)
    assert rep["resumed_after_layers"] == 1
    assert not (out / "progress").exists()
    assert_same_bytes(files(out), clean)


def test_rerun_with_other_options_or_source_is_refused(model, tmp_path):
    from qmoe_ray.job.driver import run_compression

    out = tmp_path / "out"

    def stop_after_first_layer(event, info):
        if event == "layer_done":
            raise KeyboardInterrupt  # stands in for a lost driver

    with pytest.raises(KeyboardInterrupt):
        run_compression(job_cfg(model, out), progress=False, hook=stop_after_first_layer)
    assert (out / JOB).exists() and (out / layer_record_name(0)).exists()

    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"scheme='ternary' \(now 'int2'\).*--overwrite"):
        run_compression(job_cfg(model, out, scheme="int2"), progress=False)
    with pytest.raises(ValueError, match=r"group_size=2 \(now 3\)"):
        run_compression(job_cfg(model, out, group_size=3), progress=False)
    other = make_tiny_mixtral(tmp_path / "other", layers=3)
    with pytest.raises(ValueError, match="holds a job of source"):
        run_compression(job_cfg(other, out, data=f"{model}/tokens.npy"), progress=False)
    record = json.loads((out / JOB).read_text())
    record["format_version"] = mf.FORMAT_VERSION + 1
    (out / JOB).write_bytes(mf.dumps(record))
    with pytest.raises(ValueError, match="newer qmoe-ray"):
        run_compression(job_cfg(model, out), progress=False)
    assert time.monotonic() - t0 < 20  # all refused before any cluster work


def test_progress_check_start_and_overwrite(tmp_path):
    """Without Ray: what ``check`` compares and what ``start(overwrite=True)`` clears."""
    prog = Progress(str(tmp_path))
    job = {"source": "s3://b/m", "source_fingerprint": "abc", "options": {"scheme": "ternary",
                                                                         "seed": 0}}
    assert prog.check(job, overwrite=False) is False  # nothing there yet
    prog.start(job, overwrite=False)
    assert prog.check(job, overwrite=False) is True  # a resume
    prog.finish_layer(0, {"file": "shards/layer-00000.safetensors"}, previous=None)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "layer-00000.safetensors").write_bytes(b"x")
    assert [r["file"] for r in prog.done_layers([0, 1, 2])] == ["shards/layer-00000.safetensors"]
    with pytest.raises(ValueError, match="seed=0 \\(now 1\\)"):
        prog.check({**job, "options": {"scheme": "ternary", "seed": 1}}, overwrite=False)
    with pytest.raises(ValueError, match="another model"):
        prog.check({**job, "source_fingerprint": "def"}, overwrite=False)
    assert prog.check({**job, "source_fingerprint": "def"}, overwrite=True) is False
    prog.start({**job, "source_fingerprint": "def"}, overwrite=True)
    assert not (tmp_path / "shards").exists() and prog.done_layers([0]) == []
    assert json.loads((tmp_path / JOB).read_text())["source_fingerprint"] == "def"
    with pytest.raises(ValueError, match="not a qmoe-ray progress record"):
        check_same_job({"format": "other"}, job, "x")


def test_activation_checkpoint_round_trip_is_exact(tmp_path):
    import torch

    prog = Progress(f"file://{tmp_path}")
    state = {"h": torch.randn(2, 5, 4), "mask": torch.tensor([[True, False]]),
             "pos": torch.arange(10).reshape(2, 5)[:, ::2], "b": torch.randn(3).to(torch.bfloat16)}
    prog.save_state(3, 7, state)
    back = prog.load_state(3, 7)
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    prog.finish_layer(4, {"x": 1}, previous=3)  # drops the activations of layer 3
    with pytest.raises(FileNotFoundError, match="--overwrite"):
        prog.load_state(3, 7)


def test_hessian_dtype_is_recorded_and_a_resume_with_another_is_refused(tmp_path):
    """float64 (every job before the option) stays out of the record, so an older job resumes
    with ``--hessian-dtype float64``; the refusal names what an old record meant."""
    from qmoe_ray.errors import InputError
    from qmoe_ray.job.config import CompressConfig

    f32, f64 = CompressConfig().output_options(), CompressConfig(
        hessian_dtype="float64").output_options()
    assert f32["hessian_dtype"] == "float32" and "hessian_dtype" not in f64
    assert {k: v for k, v in f32.items() if k != "hessian_dtype"} == f64
    prog = Progress(str(tmp_path))
    old = {"source": "m", "source_fingerprint": "abc", "options": f64}  # an older job's record
    prog.start(old, overwrite=False)
    assert prog.check(old, overwrite=False) is True
    with pytest.raises(ValueError, match=r"hessian_dtype='float64' \(now 'float32'\)"):
        prog.check({**old, "options": f32}, overwrite=False)
    with pytest.raises(InputError, match="hessian_dtype='float16'.*float32, float64.*"
                                         "--hessian-dtype"):
        CompressConfig(hessian_dtype="float16")
    import argparse

    from qmoe_ray.job.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg, _ = config_from_args(parser.parse_args(["--hessian-dtype", "float64"]))
    assert cfg.hessian_dtype == "float64"
    assert config_from_args(parser.parse_args([]))[0].hessian_dtype == "float32"


def test_auto_group_sizes_are_recorded_and_a_resume_keeps_them(model, clean, tmp_path):
    """``--group-size auto``: the sizes chosen go into the job's record; a resume with more
    memory keeps them (the shards are an uninterrupted ``--group-size 2`` run's), one with too
    little for them or with a fixed size is refused."""
    from qmoe_ray.errors import InputError
    from qmoe_ray.job import grouping
    from qmoe_ray.job.costmodel import load_constants
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.job.plan import prepare

    base = load_constants().worker_base_bytes
    probe = prepare(job_cfg(model, tmp_path / "probe", group_size="auto", worker_memory=1000))
    assert set(probe.group_sizes.values()) == {6}  # all six experts fit 1000 GiB
    wm = grouping.need_bytes(probe.shapes["model.layers.0"], 2, base) / grouping.GIB
    out = tmp_path / "out"

    def stop_after_first_layer(event, info):
        if event == "layer_done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_compression(job_cfg(model, out, group_size="auto", worker_memory=wm),
                        progress=False, hook=stop_after_first_layer)
    sizes = json.loads((out / JOB).read_text())["group_sizes"]
    assert sizes == {"model.layers.0": 2, "model.layers.1": 2}
    with pytest.raises(ValueError, match=r"group_size='auto' \(now 2\)"):
        run_compression(job_cfg(model, out, group_size=2), progress=False)
    with pytest.raises(InputError, match=r"layer model.layers.0: a group of 2 experts needs .*"
                                         r"the job this run resumes chose groups of 2.*--overwrite"):
        run_compression(job_cfg(model, out, group_size="auto", worker_memory=wm * 0.999),
                        progress=False)
    rep = run_compression(job_cfg(model, out, group_size="auto", worker_memory=100),
                          progress=False)
    assert rep["resumed_after_layers"] == 1 and rep["grouping"]["recorded"]
    assert [r["group_size"] for r in rep["layers"]] == [2, 2]
    assert {n: r["group_size"] for n, r in rep["grouping"]["layers"].items()} == sizes
    got = files(out)
    shards = [k for k in clean if k.startswith("shards/")]
    assert len(shards) >= 3 and all(got[k] == clean[k] for k in shards)
