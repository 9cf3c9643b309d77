"""``qmoe-ray export`` of a checkpoint from an untrusted bucket, whose writer may recompute every
hash: copied files are checked against the manifest and never followed out of the folder, a name
never collides with the export's own output, an incomplete checkpoint is refused naming the
expert, and a refused or failed export leaves nothing at the destination (CLI: exit 2, one line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import fsspec
import plain_reader
import pytest
from load_helpers import compressed_checkpoint, copy_checkpoint, data_offset, edit_manifest
from safetensors.torch import load_file, save_file

from qmoe_ray.cli import main
from qmoe_ray.errors import CheckpointError
from qmoe_ray.read.export import INDEX, export
from qmoe_ray.read.export_files import COPIED_MAX_BYTES

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXPERT = "model.layers.0.mlp.experts.3.down_proj.weight"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return compressed_checkpoint(tmp_path_factory)


@pytest.fixture
def bad(ckpt: Path, tmp_path: Path) -> Path:
    """A writable copy of the checkpoint, to make hostile."""
    return copy_checkpoint(ckpt, tmp_path / "bad")


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _plant(root: Path, name: str, data: bytes) -> None:
    """What an attacker does: a file in the folder and its recomputed hash in the manifest."""
    (root / name).write_bytes(data)
    edit_manifest(root, lambda m: m["copied_files"].__setitem__(name, _entry(data)))


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if ".export-" in p.name] == []


def _refused(src: Path, out: Path, match: str, capsys: Any, error: type = CheckpointError,
             cli: tuple[str, ...] = ()) -> None:
    """The API raises ``error`` matching ``match``, the CLI exits 2 with that one line, and no
    file appears at ``out`` (nor a staging folder next to it)."""
    existed = sorted(p.name for p in out.iterdir()) if out.exists() else None
    with pytest.raises(error, match=match):
        export(str(src), str(out))
    assert main(["export", "--quiet", *cli, str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("qmoe-ray export: error: ") and re.search(match, err), err
    if existed is None:
        _nothing_written(out)
    else:
        assert sorted(p.name for p in out.iterdir()) == existed
        assert [p.name for p in out.parent.iterdir() if ".export-" in p.name] == []


@pytest.mark.parametrize("name, why", [
    ("model-00001-of-00005.safetensors", "it collides with the export's own output"),
    (INDEX, "it collides with the export's own output"),
    ("Model.Safetensors.Index.JSON", "it collides with the export's own output"),
    ("manifest.json", "it collides"),
    ("CONFIG.json", "it collides"),  # the same file as config.json on a case-blind filesystem
    ("modeling_evil.py", "only .json"),
    ("pytorch_model.bin", "only .json"),
    (".hidden.json", "it is not a plain file name"),
])
def test_a_copied_file_may_not_take_an_output_name_or_be_code(bad, tmp_path, capsys, name, why):
    if name == "manifest.json":  # listed with the manifest's own hash
        data = (bad / name).read_bytes()
        edit_manifest(bad, lambda m: m["copied_files"].__setitem__(name, _entry(data)))
    else:
        _plant(bad, name, b'{"planted": true}\n')
    _refused(bad, tmp_path / "hf", re.escape(f"copied file {name!r} refused: {why}"), capsys)


@pytest.mark.parametrize("name", ["../evil.json", "sub/tokenizer.json", "/etc/passwd",
                                  "..", "a\\b.json", ""])
def test_a_copied_file_name_is_a_plain_name(bad, tmp_path, capsys, name):
    edit_manifest(bad, lambda m: m["copied_files"].__setitem__(name, _entry(b"x")))
    _refused(bad, tmp_path / "hf", re.escape(f"copied file {name!r} refused: it is not a plain "
                                             "file name"), capsys)


def test_a_changed_copied_file_is_refused(bad, tmp_path, capsys):
    tok = bad / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[100] ^= 1
    tok.write_bytes(bytes(data))  # same size, other bytes
    _refused(bad, tmp_path / "hf", "tokenizer.json fails its checksum", capsys)
    tok.write_bytes(bytes(data) + b" ")
    _refused(bad, tmp_path / "hf", r"tokenizer.json has \d+ bytes, the manifest says", capsys)
    tok.unlink()
    _refused(bad, tmp_path / "hf", "tokenizer.json: listed in the manifest's copied_files but "
             "missing", capsys)


def test_a_symlinked_copied_file_is_not_followed(bad, tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_bytes(b'{"api_key": "hunter2"}\n')
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.json").symlink_to(secret)
    edit_manifest(bad, lambda m: m["copied_files"].__setitem__("tokenizer.json",
                                                               _entry(secret.read_bytes())))
    _refused(bad, tmp_path / "hf", "tokenizer.json is a symbolic link: refused", capsys)
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.json").mkdir()
    _refused(bad, tmp_path / "hf", "tokenizer.json is not a regular file", capsys)


@pytest.mark.parametrize("entry", [
    {"sha256": "ab" * 31, "bytes": 3}, {"sha256": "AB" * 32, "bytes": 3},
    {"sha256": "ab" * 32, "bytes": -1}, {"sha256": "ab" * 32, "bytes": True},
    {"sha256": "ab" * 32, "bytes": COPIED_MAX_BYTES + 1},
    {"sha256": "ab" * 32, "bytes": 3, "path": "/etc/passwd"}, "ab" * 32,
])
def test_a_copied_file_entry_is_a_hash_and_a_small_size(bad, tmp_path, capsys, entry):
    edit_manifest(bad, lambda m: m["copied_files"].__setitem__("tokenizer.json", entry))
    _refused(bad, tmp_path / "hf", r"copied file 'tokenizer.json': entry .* is not", capsys)


def test_copied_files_of_another_type_are_refused(bad, tmp_path, capsys):
    edit_manifest(bad, lambda m: m.__setitem__("copied_files", "tokenizer.json"))
    _refused(bad, tmp_path / "hf", "'copied_files' is str, expected list or dict", capsys)


def test_an_older_checkpoint_without_hashes_loads_and_exports_only_without_its_files(
        bad, tmp_path, capsys):
    from qmoe_ray.read.loader import load

    edit_manifest(bad, lambda m: m.__setitem__("copied_files", sorted(m["copied_files"])))
    _refused(bad, tmp_path / "hf", "copied_files is a list without hashes.*--no-copied-files",
             capsys)
    assert load(str(bad)).config["model_type"] == "mixtral"
    out = tmp_path / "hf"
    assert main(["export", "--quiet", "--no-copied-files", str(bad), str(out)]) == 0
    assert not (out / "tokenizer.json").exists() and (out / INDEX).exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("drop", ["manifest", "shard"])
def test_a_missing_expert_is_refused_by_name(bad, tmp_path, capsys, drop):
    if drop == "manifest":  # the family has 8 experts per layer; the manifest lacks one
        edit_manifest(bad, lambda m: m["quantized"].pop(EXPERT))
        match = re.escape(f"expert 3 of model.layers.0 (down, {EXPERT!r}) is missing")
    else:  # listed (with its hashes) but not stored in its shard
        shard = bad / "shards/layer-00000.safetensors"
        tensors = load_file(shard)
        del tensors[f"{EXPERT}.q.stream"]
        save_file(tensors, shard)
        match = re.escape(f"1 tensors listed in the manifest are not in the shard (first: "
                          f"'{EXPERT}.q.stream')")
    _refused(bad, tmp_path / "hf", match, capsys)


def test_a_quantized_matrix_must_be_an_expert_stored_in_one_shard(bad, tmp_path, capsys):
    other = EXPERT.replace("experts.3", "experts.99")

    def add(m: dict[str, Any]) -> None:
        m["quantized"][other] = m["quantized"][EXPERT]
        for k in [k for k in m["tensors"] if k.startswith(EXPERT + ".")]:
            m["tensors"][k.replace(EXPERT, other)] = m["tensors"][k]

    edit_manifest(bad, add)
    _refused(bad, tmp_path / "hf", re.escape(f"{other!r} is no expert of it"), capsys)
    edit_manifest(bad, lambda m: (m["quantized"].pop(other), m["tensors"][f"{EXPERT}.lo"]
                                  .__setitem__("file", "shards/layer-00001.safetensors")))
    _refused(bad, tmp_path / "hf", re.escape(f"expert matrix {EXPERT!r} has its stored tensors "
                                             "in 2 shards"), capsys)


def _corrupt_last_shard(root: Path) -> None:
    shard = root / "shards/other.safetensors"  # read last: the layer shards are written first
    name = next(iter(load_file(shard)))
    raw = bytearray(shard.read_bytes())
    raw[data_offset(shard, name)] ^= 0xFF
    shard.write_bytes(bytes(raw))


def test_a_failed_export_leaves_nothing_and_keeps_the_old_export(ckpt, bad, tmp_path, capsys):
    _corrupt_last_shard(bad)
    _refused(bad, tmp_path / "hf", "shards/other.safetensors: tensor .* fails its checksum",
             capsys)
    old = tmp_path / "old"
    export(str(ckpt), str(old))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(CheckpointError, match="fails its checksum"):
        export(str(bad), str(old), overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".export-" in p.name] == []


def test_a_non_empty_destination_is_refused_before_any_work(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    missing = tmp_path / "no-such-checkpoint"  # refused before the manifest is even read
    _refused(missing, out, "is not empty; choose another folder or pass overwrite=True",
             capsys, error=FileExistsError)
    with pytest.raises(FileExistsError, match="holds files but no HF checkpoint"):
        export(str(ckpt), str(out), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(FileExistsError, match="an export never replaces one"):
        export(str(ckpt), str(ckpt), overwrite=True)
    assert (ckpt / "manifest.json").exists() and not (ckpt / INDEX).exists()
    (out / "notes.txt").unlink()
    res = export(str(ckpt), str(out))  # an empty folder is fine
    assert res["copied"] == ["tokenizer.json"] and (out / INDEX).exists()
    link = tmp_path / "link"
    link.symlink_to(out)  # overwrite through a link: the link is replaced, its target kept
    export(str(ckpt), str(link), overwrite=True)
    assert link.is_dir() and not link.is_symlink() and (out / INDEX).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "link"]


@pytest.fixture
def memory_ckpt(ckpt: Path, request: Any) -> str:
    """The checkpoint copied to an in-memory object store (no links, only keys)."""
    fs = fsspec.filesystem("memory")
    root = f"/hostile-{request.node.name}"
    for p in ckpt.rglob("*"):
        if p.is_file():
            fs.pipe_file(f"{root}/src/{p.relative_to(ckpt).as_posix()}", p.read_bytes())
    yield root
    fs.rm(root, recursive=True)


def test_an_object_store_checkpoint_exports_and_is_checked(ckpt, memory_ckpt, capsys):
    fs = fsspec.filesystem("memory")
    src, out = f"memory://{memory_ckpt}/src", f"memory://{memory_ckpt}/hf"
    res = export(src, out)
    assert res["copied"] == ["tokenizer.json"]
    assert fs.cat_file(f"{memory_ckpt}/hf/tokenizer.json") == (ckpt / "tokenizer.json").read_bytes()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(memory_ckpt, detail=False)) == ["hf", "src"]
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{memory_ckpt}/hf", detail=False)}
    assert names == {*res["files"], "tokenizer.json", "config.json", INDEX}

    def refused(match: str) -> None:
        with pytest.raises(CheckpointError, match=match):
            export(src, f"memory://{memory_ckpt}/hf2")
        assert not fs.exists(f"{memory_ckpt}/hf2")
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(memory_ckpt, detail=False)) == [
            "hf", "src"]

    tok = f"{memory_ckpt}/src/tokenizer.json"
    fs.pipe_file(tok, fs.cat_file(tok) + b" ")
    refused(r"tokenizer.json has \d+ bytes, the manifest says")
    fs.rm(tok)
    fs.pipe_file(f"{tok}/x", b"{}")  # a "directory" of that name
    refused("tokenizer.json is a directory, not a file")
    fs.rm(tok, recursive=True)
    fs.pipe_file(tok, (ckpt / "tokenizer.json").read_bytes())
    shard = f"{memory_ckpt}/src/shards/other.safetensors"
    raw = bytearray(fs.cat_file(shard))
    raw[data_offset(ckpt / "shards/other.safetensors", next(iter(load_file(
        ckpt / "shards/other.safetensors"))))] ^= 0xFF
    fs.pipe_file(shard, bytes(raw))
    refused("fails its checksum")  # the staging prefix is gone too
    with pytest.raises(CheckpointError, match="fails its checksum"):
        export(src, out, overwrite=True)
    assert fs.cat_file(f"{memory_ckpt}/hf/tokenizer.json") == (ckpt / "tokenizer.json").read_bytes()


def test_the_manifest_hashes_the_copied_files(ckpt):
    manifest = plain_reader.load_manifest(ckpt)
    assert set(manifest["copied_files"]) == {"config.json", "tokenizer.json"}
    for name, entry in manifest["copied_files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert not os.path.islink(ckpt / "tokenizer.json")
