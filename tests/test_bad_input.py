"""Bad input on the command line: every user error of ``compress`` ends with one line naming the
input and the fix and exit status 2, never a traceback, and nothing at the output changes; a
refused ``--overwrite`` leaves the checkpoint it was meant to replace loadable and byte-identical;
defaults that cannot fit the data are reduced with a warning; URLs are recorded without
credentials."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from load_helpers import compressed_checkpoint, copy_checkpoint

from qmoe_ray.cli import main


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or nothing) by relative path -> sha256."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(err: str, prog: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err, err
    errors = [l for l in lines if l.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Small bad input files: a latin-1 text, a YAML file that is not YAML, one with a typo."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (d / "bad.yaml").write_text("scheme: [ternary\n")
    (d / "typo.yaml").write_text("schem: ternary\n")
    (d / "list.yaml").write_text("- ternary\n")
    # the embedded model without its first router: an incomplete source checkpoint
    from safetensors.torch import load_file, save_file

    from qmoe_ray.data import resolve_source

    src = Path(resolve_source("embedded"))
    (d / "norouter").mkdir()
    for f in ("config.json", "tokenizer.json"):
        (d / "norouter" / f).write_bytes((src / f).read_bytes())
    tensors = load_file(src / "model.safetensors")
    router = next(n for n in tensors if n.endswith("block_sparse_moe.gate.weight"))
    del tensors[router]
    save_file(tensors, d / "norouter" / "model.safetensors", metadata={"format": "pt"})
    return d


CASES = [  # (flags, what the one line must say)
    (["--source", "does-not-exist"], "does-not-exist/config.json"),
    (["--scheme", "int5"], "scheme='int5': expected one of"),
    (["--token-cap", "nan"], "token_cap=nan: expected a finite number (--token-cap"),
    (["--cpus-per-worker", "inf"], "cpus_per_worker=inf: expected a finite number"),
    (["--num-workers", "0"], "num_workers=0: expected an integer >= 1"),
    (["--num-workers", "1000"], "--num-workers 1000 x --cpus-per-worker 1 = 1000 CPUs, but the "
                                "local cluster has"),
    (["--data", "{d}/latin1.txt"], "latin1.txt: not UTF-8 text (invalid byte at offset 3)"),
    (["--data", "{d}/missing.npy"], "missing.npy"),
    (["--data", "{d}/bad.yaml"], "bad.yaml"),
    (["--config", "{d}/bad.yaml"], "bad.yaml: not a YAML file"),
    (["--config", "{d}/typo.yaml"], "unknown config key 'schem'"),
    (["--config", "{d}/list.yaml"], "expected a mapping of option: value"),
    (["--config", "{d}/none.yaml"], "none.yaml"),
    (["--num-samples", "1", "--seq-len", "16"], "only 16 calibration tokens"),
    (["--source-option", "endpoint_url"], "--source-option 'endpoint_url': expected KEY=VALUE"),
    (["--source", "https://alice:s3cret@127.0.0.1:9/model?sig=topsecret"], "127.0.0.1:9/model"),
    (["--source", "{d}/norouter"], "router of layer model.layers.0 not found"),
    # nothing listens on 127.0.0.1:9: refused in seconds, not after minutes of Ray's retries
    (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9: no Ray head answers there"),
]


@pytest.mark.parametrize("flags,message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_compress_user_errors_are_one_line_exit_2(flags, message, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", "--output", str(out), "--quiet",
            *[f.format(d=inputs) for f in flags]]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = _one_error_line(err, "qmoe-ray compress")
    assert message.format(d=inputs) in line, line
    assert "s3cret" not in err and "topsecret" not in err
    assert _tree(out) == {}  # nothing written, not even an empty folder


def test_python_dash_m_is_the_cli(tmp_path):
    """``python -m qmoe_ray`` behaves as the ``qmoe-ray`` script: one line, exit 2."""
    res = subprocess.run([sys.executable, "-m", "qmoe_ray", "compress", "--source",
                          str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    _one_error_line(res.stderr, "qmoe-ray compress")
    assert "nope/config.json" in res.stderr


def test_internal_errors_keep_their_traceback(monkeypatch):
    """Only user errors become one line: a bug still shows where it is."""
    from qmoe_ray.job import cli as job

    def boom(args):
        raise IndexError("an internal bug")

    monkeypatch.setattr(job, "main", boom)
    with pytest.raises(IndexError):
        main(["compress"])


def test_recorded_urls_carry_no_credentials():
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.plan import source_label

    cfg = CompressConfig(source="https://u:pw@host/m?X-Amz-Signature=abc",
                         data="s3://bucket/c4.jsonl?token=abc")
    opts = cfg.output_options()
    assert opts["source"] == "https://host/m" and opts["data"] == "s3://bucket/c4.jsonl"
    assert source_label(cfg.source) == "https://host/m"
    assert "pw" not in json.dumps(opts) and "abc" not in json.dumps(opts)
    assert source_label("/plain/path") == "/plain/path"


def test_storage_errors_do_not_repeat_url_credentials():
    """An underlying error that quotes the URL it failed on loses the URL's credentials."""
    from qmoe_ray.storage.fs import fs_errors

    with pytest.raises(FileNotFoundError) as info:
        with fs_errors("https://bob:pw1@h:9/x", storage_options={"secret": "k3y-hunter2"}):
            raise ConnectionRefusedError(
                "cannot connect to https://bob:pw1@h:9/x?X-Amz-Signature=abc&part=1 (key k3y-hunter2)")
    msg = str(info.value)
    assert "pw1" not in msg and "abc" not in msg and "hunter2" not in msg
    assert "https://h:9/x" in msg and "part=1" in msg


@pytest.mark.ray
@pytest.mark.slow
def test_refused_overwrite_keeps_the_old_checkpoint(tmp_path_factory, tmp_path, capsys,
                                                    monkeypatch):
    import qmoe_ray

    out = copy_checkpoint(compressed_checkpoint(tmp_path_factory), tmp_path / "ckpt")
    before = _tree(out)
    monkeypatch.setenv("QMOE_RESOURCE_WAIT_S", "0")
    refused = [
        (["--num-samples", "1", "--seq-len", "16"], "only 16 calibration tokens"),  # data check
        (["--gpus-per-worker", "1"], "has 0 GPU but 1 workers x 1 GPU"),  # after Ray started
        ([], "already holds a compressed checkpoint"),  # no --overwrite at all
    ]
    for flags, message in refused:
        ow = [] if not flags else ["--overwrite"]
        rc = main(["compress", "--output", str(out), "--quiet", *ow, *flags])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert message in _one_error_line(err, "qmoe-ray compress")
        assert _tree(out) == before, flags
    assert qmoe_ray.load(str(out)).manifest["heldout_loss"] is not None

    # an overwrite that can run does replace it; 200 rows hold only 20 held-out samples, so
    # the default --eval-samples 64 is reduced with a warning instead of failing
    data = tmp_path / "rows.npy"
    np.save(data, np.random.default_rng(0).integers(3, 90, size=(200, 32)).astype(np.int64))
    rc = main(["compress", "--output", str(out), "--quiet", "--overwrite", "--data", str(data),
               "--num-samples", "32", "--seq-len", "32", "--batch-size", "16"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "--eval-samples 64: the held-out split of" in err and "holds 20 samples" in err
    assert _tree(out) != before
    report = json.loads((out / "report.json").read_text())
    assert report["heldout_tokens"] == 20 * 31  # next-token targets per 32-token sample
    assert qmoe_ray.load(str(out)).manifest["options"]["data"] == str(data)
