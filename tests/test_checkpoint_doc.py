"""docs/CHECKPOINT.md is enough to read a checkpoint without this package: tests/plain_reader.py
(json, hashlib, numpy and the safetensors file layout only, written from the docs) reads the
manifest, verifies every tensor's SHA-256 as the doc says, decodes every ternary expert matrix
from its rANS code and shared table, and gets exactly what ``qmoe_ray.load`` gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import plain_reader
import pytest
from load_helpers import compressed_checkpoint, data_offset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return compressed_checkpoint(tmp_path_factory)


def test_plain_reader_decodes_what_load_gives(ckpt):
    import qmoe_ray

    manifest = plain_reader.read_manifest(ckpt)
    tensors = plain_reader.read_verified(ckpt, manifest)  # every checksum, as the doc says
    assert tensors.keys() == manifest["tensors"].keys()
    model = qmoe_ray.load(str(ckpt))
    ternary = [n for n, e in manifest["quantized"].items() if e["scheme"] == "ternary"]
    assert ternary and len(ternary) == len(model.experts)
    shared = 0
    for name in ternary:
        entry = manifest["quantized"][name]
        shared += entry["codec"]["table"] == "shared"
        codes = plain_reader.ternary_codes(entry, tensors, manifest, name)
        assert codes.shape == tuple(entry["shape"]) and set(np.unique(codes)) <= {-1, 0, 1}
        ours = plain_reader.dense_weight(name, manifest, tensors)
        assert np.array_equal(ours, model.experts[name].float().numpy()), name
    assert shared > 0  # the doc's shared-table path was exercised


def test_plain_reader_refuses_a_flipped_byte(ckpt, tmp_path):
    """The doc's checksum rule catches a changed byte (the reader above can fail)."""
    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    manifest = plain_reader.read_manifest(copy)
    name = next(n for n in manifest["tensors"] if n.endswith(".q.stream"))
    shard = copy / manifest["tensors"][name]["file"]
    raw = bytearray(shard.read_bytes())
    at = data_offset(shard, name) + manifest["tensors"][name]["nbytes"] // 2
    raw[at] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(AssertionError, match=f"checksum of {name}"):
        plain_reader.read_verified(copy, manifest)
