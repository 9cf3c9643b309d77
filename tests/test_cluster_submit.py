"""``ray job submit`` as users run it: a head started with ``ray start --head`` (by this test, on
127.0.0.1, stopped by its PID), ``--working-dir .`` carrying the code, ``python jobs/compress.py``
with source and output on ``s3://`` of a moto server. Credentials reach the job the way the docs
say: in the environment of the Ray node processes, never in the job's runtime_env."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fixtures_s3 import FAKE_KEY, FAKE_SECRET, free_port, make_bucket, moto_endpoint, upload_dir  # noqa: F401
from resume_helpers import make_tiny_mixtral, stop_head

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Ray's token authentication, with a token of this test's own (the head and the CLI share it)
TOKEN = secrets.token_hex(16)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, **extra)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """``ray start --head --block`` on loopback ports of its own; yields the job server URL."""
    temp = tempfile.mkdtemp(prefix="qr-", dir="/tmp")  # short: Ray's socket paths live in it
    ports = {f: free_port() for f in ("port", "dashboard-port", "node-manager-port",
                                      "object-manager-port", "ray-client-server-port",
                                      "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                      "runtime-env-agent-port", "metrics-export-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
           f"--object-store-memory={256 * 2**20}",
           # a temp dir of its own: `ray start` records its address there, not in the shared
           # /tmp/ray/ray_current_cluster that a plain ray.init() elsewhere would connect to
           f"--temp-dir={temp}",
           *[f"--{flag}={port}" for flag, port in ports.items()]]
    # the node's environment is where the job (and its actors) get their S3 credentials from
    env = _env(AWS_ACCESS_KEY_ID=FAKE_KEY, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
               AWS_DEFAULT_REGION="us-east-1")
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {log.read_text()[-2000:]}")
            try:
                import urllib.request

                req = urllib.request.Request(f"{url}/api/version",
                                             headers={"Authorization": f"Bearer {TOKEN}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job server not up: {log.read_text()[-2000:]}") from None
                time.sleep(1)
        yield url
    finally:
        stop_head(proc, temp)


def test_ray_job_submit_s3_to_s3(head, moto_endpoint, tmp_path, monkeypatch):  # noqa: F811
    import torch

    from qmoe_ray.data import load_samples
    from qmoe_ray.models import get_family
    from qmoe_ray.models.base import run_forward
    from qmoe_ray.read.loader import load
    from qmoe_ray.storage.checkpoint import open_checkpoint

    for k, v in {"AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    model = make_tiny_mixtral(tmp_path / "mixtral")
    fs = make_bucket(moto_endpoint, "submit")
    upload_dir(fs, model, "submit/src")
    job = ["python", "jobs/compress.py", "--source", "s3://submit/src", "--output",
           "s3://submit/out", "--data", "s3://submit/src/tokens.npy", "--num-samples", "48",
           "--seq-len", "32", "--eval-samples", "8", "--batch-size", "8", "--group-size", "3",
           "--num-workers", "2", "--quiet",
           "--source-option", f"endpoint_url={moto_endpoint}",
           "--output-option", f"endpoint_url={moto_endpoint}"]
    t0 = time.monotonic()
    run = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head,
                          "--working-dir", ".", "--", *job], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "succeeded" in out and "s3://submit/out/report.md" in out
    assert FAKE_SECRET not in out
    assert time.monotonic() - t0 < 240

    assert fs.exists("submit/out/manifest.json") and not fs.exists("submit/out/progress")
    ckpt = load("s3://submit/out", endpoint_url=moto_endpoint)  # checksums verified
    assert len(ckpt.manifest["quantized"]) == 2 * 6 * 3

    # the compressed model's held-out loss is the one the job reported, and within the target
    # of the original bf16 model's loss on the same samples (ternary experts, tiny random model)
    held = load_samples(str(model / "tokens.npy"), ckpt.config, 8, 32, split="heldout")
    inputs = {k: torch.from_numpy(v) for k, v in held.items()}
    ce, n = ckpt.family.loss_terms(ckpt.logits(inputs), inputs)
    src = open_checkpoint(str(model))
    fam = get_family(src.config)
    ce0, n0 = fam.loss_terms(run_forward(fam, src, inputs), inputs)
    loss, base = float(ce) / n, float(ce0) / n0
    assert loss == pytest.approx(ckpt.manifest["heldout_loss"], rel=1e-4)
    print(f"held-out loss: bf16 {base:.4f}, compressed {loss:.4f}")
    assert loss - base < 0.1  # nats; measured +0.013
