"""Process deaths at a realistic calibration size: a quantization worker, an activation store and
the writer are each killed with SIGKILL (what the OOM killer does) in the middle of a layer, on a
local Ray runtime, with 2048 x 512 calibration token ids (8 MiB of ids and 8 MiB of masks: far
beyond what Ray inlines in a call, so this is the size at which a store whose samples were
constructor arguments could not be restarted). The job must finish with the bytes of an
undisturbed run. The processes are found by their own process tree: each PID an actor reports must
descend from this test process (the Ray runtime it started), never a process found by name."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_s3 import save_tiny, tiny_model
from resume_helpers import assert_same_bytes, files, job_cfg

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SAMPLES, SEQ = 2048, 512


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # hidden 16: attention over 512-token samples is the bulk of the run's time
    path = tmp_path_factory.mktemp("mixtral")
    save_tiny(tiny_model("mixtral", num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=SEQ), path,
              dtype=torch.bfloat16)
    rng = np.random.default_rng(1)
    # 2304 rows: the held-out tenth leaves 2073 calibration rows for the 2048 asked
    np.save(path / "big.npy", rng.integers(3, 97, size=(2304, SEQ)).astype(np.int64))
    return path


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=768 * 2**20, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _cfg(model: Path, out: Path):
    return job_cfg(model, out, data=str(model / "big.npy"), num_samples=SAMPLES, seq_len=SEQ,
                   eval_samples=8, batch_size=256, group_size=2, num_workers=2, num_stores=2)


def _ancestors(pid: int) -> list[int]:
    """``pid``'s parent chain from /proc (bounded: at most 64 steps)."""
    chain = []
    for _ in range(64):
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4: ppid
        chain.append(pid)
        if pid <= 1:
            break
    return chain


class Killer:
    """A driver hook: SIGKILLs a worker as its group is dispatched and a store mid-layer (both
    in layer 0), and the writer in layer 1 after it received a group; each once."""

    def __init__(self):
        self.killed: list[tuple[str, str, int]] = []
        self._pids: dict[str, int] = {}

    def _kill(self, kind: str, actor, layer_name: str) -> None:
        import ray

        pid = self._pids.get(kind) or ray.get(actor.pid.remote(), timeout=60)
        assert os.getpid() in _ancestors(pid), f"{kind} pid {pid} is not in this test's Ray"
        os.kill(pid, signal.SIGKILL)
        self.killed.append((kind, layer_name, pid))

    def __call__(self, event, info):
        import ray

        actors, layer = info["actors"], info["layer"]
        done = {k for k, _, _ in self.killed}
        if event == "layer_start" and layer.index == 0 and not self._pids:
            # idle now: ask each actor its PID before it is busy with a group
            self._pids = {"worker": ray.get(actors.workers[0].pid.remote()),
                          "store": ray.get(actors.stores[0].pid.remote()),
                          "writer": ray.get(actors.writer.pid.remote())}
        if event != "group_dispatched":
            return
        if layer.index == 0 and info["group"] == 0 and "worker" not in done:
            self._kill("worker", actors.workers[info["worker"]], layer.name)
        elif layer.index == 0 and info["group"] == 1 and "store" not in done:
            self._kill("store", actors.stores[0], layer.name)
        elif layer.index == 1 and info["group"] == 1 and "writer" not in done:
            time.sleep(0.5)  # let group 0 reach the writer: it holds state when it dies
            self._kill("writer", actors.writer, layer.name)


def test_killed_worker_store_and_writer_give_the_same_bytes(local_ray, model, tmp_path):
    from qmoe_ray.job.driver import run_compression

    clean_out, out = tmp_path / "clean", tmp_path / "killed"
    run_compression(_cfg(model, clean_out), progress=False)
    inputs = clean_out / "progress"
    assert not inputs.exists()  # the progress folder (inputs included) goes with the manifest

    killer = Killer()
    rep = run_compression(_cfg(model, out), progress=False, hook=killer)
    assert [k for k, _, _ in killer.killed] == ["worker", "store", "writer"]
    # the worker's group is retried by Ray itself; the store and the writer held state, so the
    # driver restored the stores and redid their layers
    redone = [r["layer"] for r in rep["recoveries"]]
    assert redone == ["model.layers.0", "model.layers.1"], rep["recoveries"]
    assert_same_bytes(files(out), files(clean_out))
