"""``qmoe-ray compress --address``: the job runs on the Ray cluster at that address instead of an
in-process local one. The head is started by this test (``ray start --head`` on 127.0.0.1, ports
and temp dir of its own, as in test_cluster_submit) with one CPU more than this machine has, and
stopped by its PID. The job asks for a worker of that many CPUs: refused without ``--address``
(a local cluster has this machine's cores), done with it, and its driver is the head's."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plain_reader
import pytest
from fixtures_s3 import free_port
from resume_helpers import job_options, make_tiny_mixtral, stop_head

from qmoe_ray.job.cluster import local_cpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
CPUS = local_cpus() + 1
# Ray's token authentication, with a token of this test's own (the head and the job share it)
TOKEN = secrets.token_hex(16)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """``ray start --head --block`` on loopback ports of its own; yields (address, temp dir)."""
    temp = tempfile.mkdtemp(prefix="qa-", dir="/tmp")  # short: Ray's socket paths live in it
    ports = {f: free_port() for f in ("port", "node-manager-port", "object-manager-port",
                                      "ray-client-server-port", "dashboard-agent-listen-port",
                                      "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                      "metrics-export-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--include-dashboard=false", f"--num-cpus={CPUS}",
           f"--object-store-memory={256 * 2**20}", f"--temp-dir={temp}",
           *[f"--{flag}={port}" for flag, port in ports.items()]]
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    address = f"127.0.0.1:{ports['port']}"
    try:
        deadline = time.monotonic() + 90
        while True:  # the GCS port answers, and `ray start` has written its address
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", ports["port"]), timeout=1):
                    pass
                if "Ray runtime started" in log.read_text():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray head not up: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield address, Path(temp)
    finally:
        stop_head(proc, temp)


def _compress(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    opts = job_options(model, out, num_workers=1, cpus_per_worker=CPUS, eval_samples=4)
    argv = [sys.executable, "-m", "qmoe_ray", "compress", "--quiet", *extra]
    for key, value in opts.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=400)


def test_compress_runs_on_the_cluster_at_address(head, tmp_path):
    address, temp = head
    model = make_tiny_mixtral(tmp_path / "mixtral")
    # without --address: a local cluster of this machine's cores cannot hold the workers
    refused = _compress(model, tmp_path / "local")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"the local cluster has {local_cpus()}" in refused.stderr and "--address" in refused.stderr
    assert not (tmp_path / "local" / "manifest.json").exists()

    logs = temp / "session_latest" / "logs"
    drivers_before = set(logs.glob("python-core-driver-*"))
    run = _compress(model, tmp_path / "out", "--address", address)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    manifest = plain_reader.load_manifest(tmp_path / "out")
    assert len(manifest["quantized"]) == 2 * 6 * 3 and manifest["heldout_loss"] > 0
    # the job's driver connected to the head started above (its log is in the head's session)
    assert set(logs.glob("python-core-driver-*")) - drivers_before
