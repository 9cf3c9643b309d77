"""``qmoe-ray inspect``, ``eval`` and ``export`` on ``s3://`` (a moto server on 127.0.0.1), as the
README runs them: each gives what it gives on the local copy of the same checkpoint, the export
lands in the bucket complete and byte-identical to a local export, and a corrupted object in the
bucket is reported."""

from __future__ import annotations

import json
from pathlib import Path

import plain_reader
import pytest
from fixtures_s3 import make_bucket, moto_endpoint, s3_credentials, upload_dir  # noqa: F401
from load_helpers import compressed_checkpoint, data_offset

pytestmark = [pytest.mark.s3, pytest.mark.ray, pytest.mark.slow]

BUCKET = "read-s3"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return compressed_checkpoint(tmp_path_factory)


@pytest.fixture
def remote(ckpt, moto_endpoint, s3_credentials):  # noqa: F811
    fs = make_bucket(moto_endpoint, BUCKET)
    if not fs.exists(f"{BUCKET}/ck/manifest.json"):
        upload_dir(fs, ckpt, f"{BUCKET}/ck")
    return fs, f"endpoint_url={moto_endpoint}"


def _run_json(capsys, argv: list[str]) -> dict:
    from qmoe_ray.cli import main

    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    return json.loads(capsys.readouterr().out)


def test_inspect_on_s3_equals_local(ckpt, remote, capsys):
    _, opts = remote
    there = _run_json(capsys, ["inspect", f"s3://{BUCKET}/ck", "--json", "--quiet",
                               "--storage-option", opts])
    here = _run_json(capsys, ["inspect", str(ckpt), "--json", "--quiet"])
    assert there["checksums"]["status"] == "ok" and there["checksums"]["tensors"] > 0
    assert there["url"] == f"s3://{BUCKET}/ck"
    here.pop("url"), there.pop("url")
    assert there == here  # every checksum read back from the bucket, the same contents


def test_eval_on_s3_equals_local(ckpt, remote, capsys):
    _, opts = remote
    args = ["--samples", "2", "--seq-len", "16", "--json", "--quiet"]
    there = _run_json(capsys, ["eval", f"s3://{BUCKET}/ck", *args, "--storage-option", opts])
    here = _run_json(capsys, ["eval", str(ckpt), *args])
    assert there["tokens"] == here["tokens"] == 2 * 15
    assert there["loss"] == pytest.approx(here["loss"], rel=1e-6) and there["loss"] > 0


def test_export_s3_to_s3_equals_a_local_export(ckpt, remote, tmp_path, capsys):
    from qmoe_ray.cli import main

    fs, opts = remote
    assert main(["export", f"s3://{BUCKET}/ck", f"s3://{BUCKET}/hf", "--quiet",
                 "--storage-option", opts]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--quiet"]) == 0
    local = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    keys = sorted(k.rsplit("/", 1)[-1] for k in fs.find(f"{BUCKET}/hf"))
    assert keys == sorted(local)  # complete, and nothing staged is left behind
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(keys)
    assert not [k for k in fs.ls(BUCKET) if "export" in k and k.endswith(".tmp")]
    for name, data in local.items():
        assert fs.cat_file(f"{BUCKET}/hf/{name}") == data, name
    # a second export to the now non-empty destination is refused (exit 2) without --overwrite
    capsys.readouterr()
    assert main(["export", f"s3://{BUCKET}/ck", f"s3://{BUCKET}/hf", "--quiet",
                 "--storage-option", opts]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_inspect_on_s3_reports_a_corrupted_object(ckpt, remote, capsys):
    from qmoe_ray.cli import main

    fs, opts = remote
    manifest = plain_reader.load_manifest(ckpt)
    name = next(n for n in manifest["tensors"] if n.endswith(".q.stream"))
    shard = manifest["tensors"][name]["file"]
    raw = bytearray((ckpt / shard).read_bytes())
    raw[data_offset(ckpt / shard, name) + 3] ^= 0x01
    upload_dir(fs, ckpt, f"{BUCKET}/bad")
    fs.pipe_file(f"{BUCKET}/bad/{shard}", bytes(raw))
    capsys.readouterr()
    rc = main(["inspect", f"s3://{BUCKET}/bad", "--json", "--quiet", "--storage-option", opts])
    out = capsys.readouterr()
    checks = json.loads(out.out)["checksums"]
    assert rc != 0 and checks["status"] == "failed" and name in checks["error"]
