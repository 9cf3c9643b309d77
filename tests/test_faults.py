"""Object-storage faults: transient errors (timeouts, connection failures, 5xx) are retried with
backoff, permanent ones fail at once naming the URL and the cause; a writer whose filesystem fails
its first writes still writes the shard; a moto S3 server stopped mid-job and restarted is ridden
out, and one that never comes back fails the job cleanly with no manifest."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from fixtures_s3 import free_port, make_bucket, s3_credentials  # noqa: F401
from resume_helpers import job_cfg, make_tiny_mixtral

from qmoe_ray.storage.retry import is_transient, with_retries

URL = "http://127.0.0.1:9/b"


def client_error(status: int, code: str, op: str = "PutObject") -> ClientError:
    """botocore's own ClientError, as boto3 raises it for an HTTP error response."""
    return ClientError({"Error": {"Code": code, "Message": f"{code} (test)"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def _id(exc: BaseException) -> str:
    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
    return f"{type(exc).__name__}-{code}" if code else type(exc).__name__


def flaky(n: int, exc: BaseException):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= n:
            raise exc
        return "done"

    return fn, calls


@pytest.mark.parametrize("exc", [
    TimeoutError("read timed out"), ConnectionResetError("reset"), OSError(5, "Internal Error"),
    # botocore's own classes (none is an OSError or a builtin TimeoutError/ConnectionError)
    ReadTimeoutError(endpoint_url=URL), ConnectTimeoutError(endpoint_url=URL),
    EndpointConnectionError(endpoint_url=URL), ConnectionClosedError(endpoint_url=URL),
    client_error(503, "SlowDown"), client_error(500, "InternalError"),
    client_error(503, "ServiceUnavailable", "GetObject"),
    # S3's idle-socket timeout and throttling answered with a 4xx status: transient by their
    # error code (botocore's own retry handler retries both)
    client_error(400, "RequestTimeout"), client_error(400, "ThrottlingException"),
    client_error(429, "TooManyRequests"),
], ids=lambda e: _id(e))
def test_transient_errors_are_retried(exc):
    fn, calls = flaky(2, exc)
    assert is_transient(exc)
    assert with_retries(fn, "writing s3://b/x", attempts=3, base_delay=0.0) == "done"
    assert len(calls) == 3


@pytest.mark.parametrize("exc", [PermissionError("AccessDenied"), FileNotFoundError("NoSuchBucket"),
                                 client_error(403, "AccessDenied"),
                                 client_error(404, "NoSuchKey", "GetObject"),
                                 client_error(400, "InvalidArgument")],
                         ids=lambda e: _id(e))
def test_permanent_errors_fail_at_once_naming_the_url(exc):
    fn, calls = flaky(1, exc)
    assert not is_transient(exc)
    with pytest.raises(Exception) as info:
        with_retries(fn, "writing s3://b/x/shards/layer-00001.safetensors", base_delay=0.0)
    assert len(calls) == 1
    if isinstance(exc, OSError):
        assert "s3://b/x/shards/layer-00001.safetensors" in str(info.value)
        assert type(exc).__name__ in str(info.value)
    else:  # not a storage error qmoe-ray wraps: botocore's own, unchanged, for fs_errors to name
        assert info.value is exc


def test_retries_run_out_with_the_cause():
    fn, calls = flaky(10, TimeoutError("read timed out"))
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"writing s3://b/x failed \(after 3 attempts\): "
                                      r"TimeoutError: read timed out"):
        with_retries(fn, "writing s3://b/x", attempts=3, base_delay=0.05)
    assert len(calls) == 3 and time.monotonic() - t0 >= 0.05 + 0.1  # backoff doubled


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))


def test_writer_survives_failing_first_writes(model, tmp_path):
    """A wrapper filesystem whose first two writes fail with botocore's errors (no Ray)."""
    from qmoe_ray.job.writer import CheckpointWriter

    writer = CheckpointWriter(str(tmp_path / "out"), {}, str(model), {})
    real = writer.fs.pipe_file
    failures = []

    errors = [ReadTimeoutError(endpoint_url=URL), EndpointConnectionError(endpoint_url=URL)]

    def pipe_file(path, data, **kw):  # what s3fs lets through once botocore's retries are spent
        if len(failures) < len(errors):
            failures.append(path)
            raise errors[len(failures) - 1]
        return real(path, data, **kw)

    writer.fs.pipe_file = pipe_file
    res = writer.write_other()
    assert len(failures) == 2
    assert (tmp_path / "out" / res["file"]).stat().st_size == res["bytes"]


# -- with Ray and a moto server we stop and start --------------------------------------------------
class Moto:
    """A moto S3 server on a fixed port that can be stopped and started again (its buckets live
    in this process, so they survive)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def moto():
    m = Moto()
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def _storage(endpoint: str):
    from fixtures_s3 import FAKE_KEY, FAKE_SECRET

    from qmoe_ray.job.config import StorageOptions

    # the Ray session predates this test's environment, so the (fake) credentials reach the
    # actors as storage options; one botocore attempt per try: qmoe-ray's own backoff rides out
    # the outage
    opts = {"endpoint_url": endpoint, "key": FAKE_KEY, "secret": FAKE_SECRET,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    return StorageOptions(output=opts)


@pytest.mark.ray
@pytest.mark.s3
def test_moto_outage_mid_job_is_ridden_out(model, moto, s3_credentials, ray_session):  # noqa: F811
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.loader import load

    fs = make_bucket(moto.url, "faults")
    outage = {}

    def hook(event, info):
        if event == "layer_done" and info["layer"].index == 0 and not outage:
            moto.stop()
            outage["t"] = time.monotonic()
            threading.Timer(2.0, moto.start).start()

    rep = run_compression(job_cfg(model, "s3://faults/out"), _storage(moto.url), progress=False,
                          hook=hook)
    assert outage and moto.server is not None
    assert fs.exists("faults/out/manifest.json") and not fs.exists("faults/out/progress")
    assert not rep["recoveries"]  # storage retries, not layer redos
    ckpt = load("s3://faults/out", endpoint_url=moto.url)  # every checksum verified
    assert len(ckpt.manifest["quantized"]) == 2 * 6 * 3


@pytest.mark.ray
@pytest.mark.s3
def test_storage_lost_for_good_fails_cleanly(model, moto, s3_credentials, ray_session):  # noqa: F811
    from qmoe_ray.job.driver import run_compression

    fs = make_bucket(moto.url, "gone")

    def hook(event, info):
        if event == "layer_done" and info["layer"].index == 0:
            moto.stop()

    with pytest.raises(RuntimeError) as info:
        run_compression(job_cfg(model, "s3://gone/out"), _storage(moto.url), progress=False,
                        hook=hook)
    msg = str(info.value)
    assert "compression failed at layer model.layers.1" in msg
    assert "s3://gone/out/" in msg and "after 5 attempts" in msg
    assert "EndpointConnectionError" in msg or "Connect" in msg
    moto.start()
    assert not fs.exists("gone/out/manifest.json")
    assert fs.exists("gone/out/progress/layer-00000.json")  # a rerun resumes from here
