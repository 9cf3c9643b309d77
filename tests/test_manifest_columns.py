"""Format version 3's columnar manifest (qmoe_ray.format.columns): the round trip, the layout
checks on hostile columns, and checkpoints of versions 1 and 2 still loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from load_helpers import compressed_checkpoint, copy_checkpoint

from qmoe_ray.errors import CheckpointError
from qmoe_ray.format import columns
from qmoe_ray.format import manifest as mf


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return compressed_checkpoint(tmp_path_factory)


def _stored(root: Path) -> dict[str, Any]:
    return json.loads((root / mf.MANIFEST).read_bytes())


def _put(root: Path, stored: dict[str, Any]) -> None:
    (root / mf.MANIFEST).write_bytes(mf.dumps(stored))


def test_the_job_writes_columns_that_expand_to_the_entries(ckpt):
    stored = _stored(ckpt)
    assert stored["format_version"] == mf.FORMAT_VERSION == 3
    for key in columns.COLUMNAR:
        assert set(stored[key]) == {"names", "columns"}
    pooled = stored["tensors"]["columns"]["dtype"]
    assert set(pooled) == {"pool", "index"} and len(pooled["pool"]) < 5  # a handful of dtypes
    logical = mf.read_manifest(str(ckpt))
    assert list(logical["tensors"]) == stored["tensors"]["names"]
    assert columns.to_stored(logical) == stored  # the writer's encoding, exactly
    e = next(iter(logical["tensors"].values()))
    assert set(e) == {"file", "dtype", "shape", "nbytes", "sha256"}


def test_encode_pools_repeats_and_keeps_distinct_values_apart():
    coll = {f"t{i}": {"a": i, "b": "x", "c": 1 if i % 2 else True} for i in range(8)}
    enc = columns.encode(coll)
    assert enc["columns"]["a"] == list(range(8))  # distinct: a plain list
    assert enc["columns"]["b"] == {"pool": ["x"], "index": [0] * 8}
    assert enc["columns"]["c"]["pool"] == [True, 1]  # 1 and True are not one value
    assert columns.expand(enc, "m", "t") == coll


def _hostile() -> list[tuple[str, Any, str]]:
    def cols(s):
        return s["tensors"]["columns"]

    return [
        ("objects-in-v3", lambda s: s.update(tensors={"a": {}}), "'tensors' is dict with keys"),
        ("names-missing", lambda s: s["quantized"].pop("names"), "'quantized' is dict"),
        ("names-int", lambda s: s["tensors"]["names"].__setitem__(0, 7), "names is not a list"),
        ("names-repeat", lambda s: s["tensors"]["names"].__setitem__(
            1, s["tensors"]["names"][0]), "names repeats a name"),
        ("column-short", lambda s: cols(s)["sha256"].pop(), r"sha256'\] has \d+ values for"),
        ("column-str", lambda s: cols(s).update(sha256="abc"), r"sha256'\] is str"),
        ("index-out", lambda s: cols(s)["dtype"]["index"].__setitem__(0, 99),
         "not a position in its pool"),
        ("index-negative", lambda s: cols(s)["dtype"]["index"].__setitem__(0, -1),
         "not a position in its pool"),
        ("index-bool", lambda s: cols(s)["dtype"]["index"].__setitem__(0, True),
         "not a position in its pool"),
        ("index-long", lambda s: cols(s)["dtype"]["index"].append(0), r"indices for \d+ names"),
        ("pool-str", lambda s: cols(s)["dtype"].update(pool="bfloat16"), "must be lists"),
        ("key-long", lambda s: cols(s).update({"k" * 100: [0] * len(s["tensors"]["names"])}),
         "longer than 64"),
        # the checks of the expanded entries, through the columns
        ("sha-bad", lambda s: cols(s)["sha256"].__setitem__(0, "0" * 63), "sha256 of 64"),
        ("dtype-bad", lambda s: cols(s)["dtype"]["pool"].__setitem__(0, "complex64"),
         "has dtype 'complex64'"),
        ("file-escape", lambda s: s["files"].__setitem__(0, "../x.safetensors"),
         "unsafe file name"),
        ("file-unlisted", lambda s: cols(s)["file"]["pool"].__setitem__(0, "/etc/passwd"),
         "which is not in the manifest's file list"),
        ("file-dict", lambda s: cols(s)["file"]["pool"].__setitem__(0, {}),
         "which is not in the manifest's file list"),
        ("shape-pooled-bad", lambda s: cols(s)["shape"]["pool"].__setitem__(0, [-1]),
         "non-negative integers"),
        ("codec-pooled-bad", lambda s: s["quantized"]["columns"]["codec"]["pool"][0].update(
            version="9"), "version '9'"),
        ("version-new", lambda s: s.update(format_version=4), "version 4 is not supported"),
    ]


HOSTILE = _hostile()


@pytest.mark.parametrize("name,edit,match", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_columns_are_one_checkpoint_error(ckpt, tmp_path, name, edit, match):
    """Each refused by ``read_manifest`` as a CheckpointError naming the manifest and the key."""
    root = copy_checkpoint(ckpt, tmp_path / "c")
    stored = _stored(root)
    edit(stored)
    _put(root, stored)
    with pytest.raises(CheckpointError, match=match) as ei:
        mf.read_manifest(str(root))
    assert str(ei.value).startswith(f"{root}/manifest.json: ")


def test_a_pooled_value_is_checked_for_every_entry_that_uses_it(ckpt, tmp_path):
    """The checks memoize pooled values (the same object): a bad value is refused wherever it
    sits in the pool, not only for the first entry checked."""
    root = copy_checkpoint(ckpt, tmp_path / "c")
    stored = _stored(root)
    shape = stored["tensors"]["columns"]["shape"]
    last = shape["index"][-1]
    shape["pool"].append([True])  # 1 as a bool: not an integer
    shape["index"][-1] = len(shape["pool"]) - 1
    assert last != shape["index"][-1]
    _put(root, stored)
    with pytest.raises(CheckpointError, match="non-negative integers"):
        mf.read_manifest(str(root))


def test_oversized_v3_manifest_is_refused_unread(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")
    limit = mf.manifest_size_limit(mf.config_implied_tensors(
        json.loads((root / "config.json").read_text()), "c"))
    raw = (root / mf.MANIFEST).read_bytes()
    (root / mf.MANIFEST).write_bytes(raw[:-2] + b" " * (limit + 1 - len(raw)) + raw[-2:])
    with pytest.raises(CheckpointError, match="more than"):
        mf.read_manifest(str(root))


def test_checkpoint_of_version_1_still_loads(ckpt, tmp_path):
    """The same checkpoint with its manifest in version 1's entry objects loads, and computes
    the same logits as version 3."""
    from qmoe_ray.read.loader import load

    root = copy_checkpoint(ckpt, tmp_path / "c")
    m = mf.read_manifest(str(root))
    m["format_version"] = 1
    raw = mf.manifest_bytes(m)
    stored = json.loads(raw)
    assert stored["format_version"] == 1
    assert isinstance(stored["tensors"][next(iter(m["tensors"]))], dict)  # entry objects
    (root / mf.MANIFEST).write_bytes(raw)
    old, new = load(str(root)), load(str(ckpt))
    assert old.manifest["format_version"] == 1 and new.manifest["format_version"] == 3
    ids = torch.arange(8).reshape(1, 8)
    assert torch.equal(old.logits(ids), new.logits(ids))


def test_version_2_is_still_the_trimmed_version(ckpt, tmp_path):
    """A version-2 manifest (entry objects) must carry a trim record, as before version 3; a
    version-1 one must not."""
    root = copy_checkpoint(ckpt, tmp_path / "c")
    m = mf.read_manifest(str(root))
    for version, edit, match in ((2, None, "format version 2 without a 'trim' record"),
                                 (1, {"plan": {}}, "a 'trim' record in a format version 1")):
        bad = {**m, "format_version": version}
        if edit is not None:
            bad["trim"] = edit
        (root / mf.MANIFEST).write_bytes(mf.manifest_bytes(bad))
        with pytest.raises(CheckpointError, match=match):
            mf.read_manifest(str(root))
