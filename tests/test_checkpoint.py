"""Checkpoint reading: fsspec URLs, safe joins, lazy range reads, bad input, S3 via moto."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from fixtures_s3 import (  # noqa: E402
    FAKE_SECRET,
    make_bucket,
    moto_endpoint,  # noqa: F401 - fixture
    s3_credentials,  # noqa: F401 - fixture
    save_tiny,
    tiny_model,
    upload_dir,
)

from qmoe_ray.models import get_family, run_forward  # noqa: E402
from qmoe_ray.storage.checkpoint import Checkpoint, open_checkpoint, parse_header  # noqa: E402
from qmoe_ray.storage.fs import fs_errors, join, safe_join, url_to_fs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("mixtral", seed=3)


@pytest.fixture(scope="module")
def single(tmp_path_factory, model) -> Path:
    return save_tiny(model, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, model) -> Path:
    return save_tiny(model, tmp_path_factory.mktemp("sharded"), max_shard_size="20KB")


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


class Spy:
    """Wraps an fsspec filesystem and records every data read (path, start, end)."""

    def __init__(self, fs):
        self._fs = fs
        self.reads: list[tuple[str, int | None, int | None]] = []
        self.range_calls = 0

    def cat_file(self, path, start=None, end=None, **kw):
        self.reads.append((path, start, end))
        return self._fs.cat_file(path, start=start, end=end, **kw)

    def cat_ranges(self, paths, starts, ends, **kw):
        self.range_calls += 1
        self.reads.extend(zip(paths, starts, ends, strict=True))
        return self._fs.cat_ranges(paths, starts, ends, **kw)

    def open(self, *a, **kw):
        raise AssertionError("Checkpoint must not open() shards (whole-file reads)")

    def __getattr__(self, name):
        return getattr(self._fs, name)


# -- fs helpers -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "../x.safetensors", "a/../../b", "a\\b", "a//b", "./a", "s3://b/k"]
)
def test_safe_join_refuses_unsafe_names(bad):
    with pytest.raises(ValueError, match="relative"):
        safe_join("s3://bucket/ckpt", bad)


def test_safe_join_and_join():
    assert safe_join("s3://bucket/ckpt/", "sub/model.safetensors") == (
        "s3://bucket/ckpt/sub/model.safetensors"
    )
    assert join("/tmp/a", "b", "", "c") == "/tmp/a/b/c"


def test_url_to_fs_local_and_file_url(tmp_path):
    fs1, p1 = url_to_fs(str(tmp_path))
    fs2, p2 = url_to_fs(f"file://{tmp_path}")
    assert p1 == p2 == str(tmp_path)
    assert "file" in fs1.protocol and "file" in fs2.protocol
    with pytest.raises(ValueError, match="empty"):
        url_to_fs("")
    with pytest.raises(ValueError, match="fsspec backend"):
        url_to_fs("nosuchproto://x/y")


def test_url_to_fs_s3_endpoint_from_option_and_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = url_to_fs("s3://bucket/dir", skip_instance_cache=True)
    assert path == "bucket/dir"
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    fs, _ = url_to_fs(
        "s3://bucket/dir", endpoint_url="http://127.0.0.1:8", skip_instance_cache=True
    )
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:8"


def test_fs_errors_wraps_and_scrubs_secrets():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    with pytest.raises(PermissionError) as ei:
        with fs_errors("s3://user:pw@bucket/x", storage_options={"secret": "hunter2-secret"}):
            raise NoCredentialsError()
    assert "AWS_ACCESS_KEY_ID" in str(ei.value) and "NoCredentialsError" in str(ei.value)
    with pytest.raises(PermissionError) as ei:
        with fs_errors("s3://user:pw@bucket/x", storage_options={"secret": "hunter2-secret"}):
            raise ClientError({"Error": {"Code": "InvalidAccessKeyId",
                                         "Message": "bad key hunter2-secret"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    msg = str(ei.value)
    assert "hunter2-secret" not in msg and "pw@" not in msg
    assert "AWS_ACCESS_KEY_ID" in msg and "s3://bucket/x" in msg
    with pytest.raises(FileNotFoundError, match="endpoint"):
        with fs_errors("s3://bucket/x"):
            raise ConnectionRefusedError("refused")
    with pytest.raises(FileNotFoundError, match="EndpointConnectionError.*check the endpoint"):
        with fs_errors("s3://bucket/x"):
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket/x")


# -- local reading --------------------------------------------------------------------------------
def test_single_file_metadata_and_reads(single):
    ck = open_checkpoint(str(single))
    ref = _all_tensors(single)
    assert ck.config["model_type"] == "mixtral"
    assert ck.names == sorted(ref) and len(ck) == len(ref)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert name in ck and "nope" not in ck
    assert ck.shape(name) == tuple(ref[name].shape) and ck.dtype(name) == torch.float32
    assert torch.equal(ck.read(name), ref[name])
    assert ck(name).dtype == torch.float32
    got = ck.read_many(list(ref))
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_sharded_reads_are_ranged_and_coalesced(sharded):
    assert (sharded / "model.safetensors.index.json").exists()
    ck = open_checkpoint(str(sharded))
    assert len(ck.files) > 1
    ref = _all_tensors(sharded)
    spy = Spy(ck.fs)
    ck.fs = spy
    names = [n for n in ck.names if n.startswith("model.layers.2.block_sparse_moe.experts.")]
    got = ck.read_many(names)
    assert all(torch.equal(got[n], ref[n]) for n in names)
    # adjacent tensors of a shard are fetched in one range; nothing beyond the tensors is read
    assert spy.range_calls == 1 and len(spy.reads) <= len({ck.info(n).file for n in names})
    want = sum(ref[n].numel() * 4 for n in names)
    assert sum(e - s for _, s, e in spy.reads) < want + 2**20
    spy.reads.clear()
    one = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(ck.read(one), ref[one])
    ((_, s, e),) = spy.reads
    assert e - s == ref[one].numel() * 4  # exactly the tensor's bytes, not the shard


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sources(tmp_path, model, dtype):
    folder = save_tiny(model, tmp_path, dtype=dtype)
    ck = open_checkpoint(f"file://{folder}")
    ref = _all_tensors(folder)
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert ck.dtype(name) == dtype
    assert torch.equal(ck.read(name), ref[name])
    assert torch.equal(ck(name), ref[name].float())


def test_read_slice_of_3d_tensor(tmp_path):
    t = torch.arange(5 * 3 * 4, dtype=torch.float32).reshape(5, 3, 4)
    save_file({"x": t, "y": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ck = open_checkpoint(str(tmp_path))
    assert torch.equal(ck.read_slice("x", 1, 4), t[1:4])
    with pytest.raises(ValueError, match="out of range"):
        ck.read_slice("x", 3, 6)


def test_sibling_files(single):
    ck = open_checkpoint(str(single))
    assert ck.has_file("tokenizer.json") and not ck.has_file("tokenizer.model")
    with ck.open_file("tokenizer.json") as f:
        assert json.load(f)["model"]["type"] == "WordLevel"
    with pytest.raises(ValueError, match="relative"):
        ck.open_file("../tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        ck.open_file("tokenizer.model")


def test_checkpoint_is_a_weight_source_for_families(single, model):
    ck = open_checkpoint(str(single))
    assert isinstance(ck, Checkpoint)
    fam = get_family(ck.config)
    fam.check_weights(ck.names, ck.shape)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = run_forward(fam, ck, {"input_ids": ids})
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# -- bad input ------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_missing_config_and_weights(tmp_path, single):
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "mixtral"}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        open_checkpoint(str(tmp_path))


def test_missing_shard(tmp_path, sharded):
    d = _copy(sharded, tmp_path / "c")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (d / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        open_checkpoint(str(d))


def test_tensor_listed_but_absent(tmp_path, sharded):
    d = _copy(sharded, tmp_path / "c")
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.ghost.weight"] = shard
    p.write_text(json.dumps(index))
    with pytest.raises(KeyError) as ei:
        open_checkpoint(str(d))
    assert "model.layers.9.ghost.weight" in str(ei.value) and shard in str(ei.value)


def test_unsafe_name_in_index(tmp_path, sharded):
    d = _copy(sharded, tmp_path / "c")
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    p.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unsafe file name"):
        open_checkpoint(str(d))


def test_unknown_tensor_read(single):
    ck = open_checkpoint(str(single))
    with pytest.raises(KeyError, match="model.layers.7"):
        ck.read("model.layers.7.mlp.gate.weight")


def _header_file(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_header_validation(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    f = tmp_path / "model.safetensors"
    _header_file(f, {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(12))
    with pytest.raises(ValueError, match="needs 16"):
        open_checkpoint(str(tmp_path))
    _header_file(f, {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(8))
    with pytest.raises(ValueError, match="truncated"):
        open_checkpoint(str(tmp_path))
    _header_file(f, {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2))
    with pytest.raises(ValueError, match="unsupported dtype"):
        open_checkpoint(str(tmp_path))
    f.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        open_checkpoint(str(tmp_path))
    hdr = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
    }
    with pytest.raises(ValueError, match="overlap"):
        parse_header(json.dumps(hdr).encode(), "x.safetensors")


# -- S3 through a moto server ---------------------------------------------------------------------
@pytest.mark.s3
def test_s3_roundtrip(moto_endpoint, s3_credentials, sharded):  # noqa: F811
    fs = make_bucket(moto_endpoint, "ckpt-ok")
    upload_dir(fs, sharded, "ckpt-ok/tiny")
    url = "s3://ckpt-ok/tiny"
    ck = open_checkpoint(url, endpoint_url=moto_endpoint, skip_instance_cache=True)
    local = open_checkpoint(str(sharded))
    assert ck.names == local.names and ck.config == local.config
    names = [n for n in ck.names if ".layers.1." in n]
    got, ref = ck.read_many(names), local.read_many(names)
    assert all(torch.equal(got[n], ref[n]) for n in names)
    with ck.open_file("tokenizer.json") as f:
        assert b"WordLevel" in f.read()
    # every tensor, coalesced per shard over S3, equals the local read
    every, every_ref = ck.read_many(ck.names), local.read_many(local.names)
    assert all(torch.equal(every[n], every_ref[n]) for n in ck.names)


@pytest.mark.s3
def test_s3_env_endpoint_and_missing_things(
    moto_endpoint,  # noqa: F811 - fixture
    s3_credentials,  # noqa: F811 - fixture
    monkeypatch,
    single,
):
    fs = make_bucket(moto_endpoint, "ckpt-bad")
    upload_dir(fs, single, "ckpt-bad/tiny")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    assert len(open_checkpoint("s3://ckpt-bad/tiny", skip_instance_cache=True)) > 0
    with pytest.raises(FileNotFoundError, match="s3://ckpt-bad/other/config.json"):
        open_checkpoint("s3://ckpt-bad/other", skip_instance_cache=True)
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        open_checkpoint("s3://no-such-bucket/tiny", skip_instance_cache=True)


@pytest.mark.s3
def test_s3_wrong_credentials(moto_endpoint, s3_credentials, monkeypatch, single):  # noqa: F811
    from fixtures_s3 import moto_checks_keys

    fs = make_bucket(moto_endpoint, "ckpt-auth")
    upload_dir(fs, single, "ckpt-auth/tiny")
    moto_checks_keys(monkeypatch)
    with pytest.raises(PermissionError) as ei:
        open_checkpoint("s3://ckpt-auth/tiny", endpoint_url=moto_endpoint, skip_instance_cache=True)
    msg = str(ei.value)
    assert "s3://ckpt-auth/tiny" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert FAKE_SECRET not in msg


@pytest.mark.s3
def test_s3_unreachable_endpoint_fails_fast(s3_credentials):  # noqa: F811
    from fixtures_s3 import free_port

    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="endpoint"):
        open_checkpoint(
            "s3://b/k",
            endpoint_url=f"http://127.0.0.1:{free_port()}",
            skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1},
        )
    assert time.monotonic() - t0 < 20
