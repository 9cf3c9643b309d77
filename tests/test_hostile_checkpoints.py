"""Hostile checkpoints: a bucket is not a trusted source, and whoever writes a manifest can
recompute every checksum in it. Each case edits a copy of one real compressed checkpoint (made
once per session), recomputing hashes where the format has them, and checks that every reader
(``load``, ``inspect``, ``export``, ``eval`` and their command lines) refuses it with one
``CheckpointError`` naming what is wrong, before allocating or decoding anything it declares."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import plain_reader
import pytest
import torch
from load_helpers import compressed_checkpoint, copy_checkpoint, write_manifest

from qmoe_ray import codec
from qmoe_ray.errors import CheckpointError, InputError
from qmoe_ray.format import jsonio
from qmoe_ray.format import manifest as mf
from qmoe_ray.format.shards import serialize_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOWN = "model.layers.0.mlp.experts.0.down_proj.weight"  # ternary [128, 192], shared table
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # bf16 [128, 128]


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return compressed_checkpoint(tmp_path_factory)


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    return copy_checkpoint(ckpt, tmp_path / "c")


def _read(root: Path) -> dict[str, Any]:
    return plain_reader.load_manifest(root)


def _write(root: Path, m: dict[str, Any]) -> None:
    write_manifest(root, m)


def _rewrite_shard(root: Path, m: dict[str, Any], rel: str, edit: Any) -> None:
    """Apply ``edit(tensors)`` to shard ``rel`` and write it back with its manifest entries
    recomputed (dtype, shape, nbytes, sha256): what an attacker who controls the bucket does."""
    from safetensors.torch import load

    tensors = dict(load((root / rel).read_bytes()))
    edit(tensors)
    data, index = serialize_shard(tensors)
    (root / rel).write_bytes(data)
    for k in [k for k, e in m["tensors"].items() if e["file"] == rel]:
        del m["tensors"][k]
    m["tensors"].update({k: {**v, "file": rel} for k, v in index.items()})


def _no_shards(root: Path) -> None:
    """Remove every shard: a refusal must come from the manifest, before any shard is read."""
    for f in (root / "shards").iterdir():
        f.unlink()


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of one command line; stderr is at most one line."""
    from qmoe_ray.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and len(cap.err.strip().splitlines()) <= 1, cap.err
    return rc, cap.out, cap.err


def _refused_everywhere(root: Path, tmp_path: Path, capsys, match: str) -> None:
    """load, inspect and export raise CheckpointError matching ``match``; their command lines
    (and eval's) print one line and exit 2; export writes nothing."""
    from qmoe_ray.read.export import export
    from qmoe_ray.read.inspect import inspect
    from qmoe_ray.read.loader import load

    for fn in (lambda: load(str(root)), lambda: inspect(str(root)),
               lambda: export(str(root), str(tmp_path / "hf"))):
        with pytest.raises(CheckpointError, match=match):
            fn()
    dest = tmp_path / "hf-cli"
    for argv in (["inspect", str(root), "--quiet"], ["eval", str(root), "--quiet"],
                 ["export", str(root), str(dest), "--quiet"]):
        rc, out, err = _cli(argv, capsys)
        assert rc == 2 and "error:" in err and "checksums: ok" not in out, (argv, err)
    assert not (tmp_path / "hf" / "config.json").exists() and not (dest / "config.json").exists()


# -- 1. declared shapes are the config's ----------------------------------------------------------
def _shared_table(root: Path, m: dict[str, Any], name: str) -> codec.Table:
    from safetensors.torch import load

    tname = m["quantized"][name]["table"]
    freqs = load((root / m["tensors"][f"{tname}.freqs"]["file"]).read_bytes())[f"{tname}.freqs"]
    return codec.Table.from_tensors({"freqs": freqs.numpy()}, dict(m["tables"][tname]))


def test_memory_bomb_expert_of_any_shape_is_refused_before_decoding(ckpt, tmp_path, capsys,
                                                                   monkeypatch):
    """A consistent, re-hashed expert of 2048x2048 (an all-zero matrix: a few KB decode to
    8 MiB; the same trick asked for 64 GiB) where the config implies 128x192."""
    import qmoe_ray.format.shards as shards

    root = _copy(ckpt, tmp_path)
    m = _read(root)
    rows = cols = 2048
    enc = codec.encode_ternary(torch.zeros(rows, cols, dtype=torch.int8).numpy(),
                               table=_shared_table(root, m, DOWN))
    entry = m["quantized"][DOWN]
    entry.update(shape=[rows, cols], codec={**enc.metadata(), "table": "shared"})

    def bomb(t: dict[str, torch.Tensor]) -> None:
        for f, arr in enc.to_tensors().items():
            t[f"{DOWN}.q.{f}"] = torch.from_numpy(arr.copy())
        t[f"{DOWN}.lo"] = -torch.ones(rows, dtype=torch.bfloat16)
        t[f"{DOWN}.hi"] = torch.ones(rows, dtype=torch.bfloat16)

    _rewrite_shard(root, m, m["tensors"][f"{DOWN}.lo"]["file"], bomb)
    _write(root, m)
    read = []
    monkeypatch.setattr(shards, "verify_shard", lambda *a: read.append(a) or {})
    _refused_everywhere(root, tmp_path, capsys,
                        rf"{DOWN}' is declared \[2048, 2048\], the mixtral config implies "
                        r"\[128, 192\]")
    assert read == []  # refused from the manifest: no shard was parsed, nothing decoded


def test_swapped_but_consistent_shape_is_refused(ckpt, tmp_path, capsys):
    """128x192 re-declared as 64x384: the same code stream (row-major), lo/hi cut to 64 rows,
    every hash recomputed. It used to be exported with exit status 0."""
    root = _copy(ckpt, tmp_path)
    m = _read(root)
    entry = m["quantized"][DOWN]
    entry["shape"] = [64, 384]
    entry["codec"]["shape"] = "64,384"

    def swap(t: dict[str, torch.Tensor]) -> None:
        t[f"{DOWN}.lo"], t[f"{DOWN}.hi"] = t[f"{DOWN}.lo"][:64].clone(), t[f"{DOWN}.hi"][:64].clone()

    _rewrite_shard(root, m, m["tensors"][f"{DOWN}.lo"]["file"], swap)
    _write(root, m)
    _refused_everywhere(root, tmp_path, capsys, r"declared \[64, 384\].*implies \[128, 192\]")


def test_dense_tensor_of_another_shape_is_refused(ckpt, tmp_path):
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    m = _read(root)
    _rewrite_shard(root, m, m["tensors"][Q_PROJ]["file"],
                   lambda t: t.update({Q_PROJ: t[Q_PROJ].reshape(64, 256).clone()}))
    _write(root, m)
    with pytest.raises(CheckpointError, match=rf"{Q_PROJ}' is declared \[64, 256\].*"
                                              r"implies \[128, 128\]"):
        load(str(root))


@pytest.mark.parametrize("case", ["lo-length", "seg-count", "stream-bound", "table-freqs",
                                  "undeclared-dense", "missing-expert", "zero-dtype"])
def test_stored_tensor_shapes_follow_from_the_matrix(ckpt, tmp_path, case):
    """Scales of the wrong length, a segment count other than the shape's, a stream longer than
    the matrix can need, a table of the wrong size, a dense tensor larger than any the config
    implies, an expert missing: each refused from the manifest (the shards are gone)."""
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    m = _read(root)
    t = m["tensors"]
    table = m["quantized"][DOWN]["table"]
    if case == "lo-length":  # a consistent shard edit too: the manifest alone must refuse it
        t[f"{DOWN}.lo"].update(shape=[64], nbytes=128)
        match = r"\.lo' is declared bfloat16\[64\], but the matrix's shape needs bfloat16\[128\]"
    elif case == "seg-count":
        t[f"{DOWN}.q.seg_words"].update(shape=[3], nbytes=6)
        match = r"seg_words' is declared uint16\[3\].*needs uint16\[2\]"
    elif case == "stream-bound":
        t[f"{DOWN}.q.stream"].update(shape=[10**9], nbytes=2 * 10**9)
        match = r"stream' is declared uint16\[1000000000\].*needs uint16\[<= 4920\]"
    elif case == "table-freqs":
        t[f"{table}.freqs"].update(shape=[300], nbytes=600)
        match = rf"code table '{table}'.*declared uint16\[300\].*uint16\[243\]"
    elif case == "undeclared-dense":
        t["model.extra.weight"] = {**t[Q_PROJ], "shape": [2**20, 2**20], "nbytes": 2**41}
        match = r"model.extra.weight' is declared \[1048576, 1048576\], larger than any tensor"
    elif case == "missing-expert":
        del m["quantized"][DOWN]
        match = (r"implies 96 expert matrices, the manifest has 95: expert 0 of model.layers.0 "
                 rf"\(down, '{DOWN}'\) is missing")
    else:
        t[f"{DOWN}.hi"]["dtype"] = "float16"
        match = r"\.hi' is declared float16\[128\]"
    _write(root, m)
    _no_shards(root)
    with pytest.raises(CheckpointError, match=match):
        load(str(root))


def test_stream_that_does_not_decode_is_a_checkpoint_error(ckpt, tmp_path):
    """A flipped code word with its hash recomputed: the rANS end-state check refuses it, as a
    CheckpointError naming the matrix (in decode and in resident mode)."""
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    m = _read(root)

    def flip(t: dict[str, torch.Tensor]) -> None:
        s = t[f"{DOWN}.q.stream"].clone()
        s[5] ^= 0x0101
        t[f"{DOWN}.q.stream"] = s

    _rewrite_shard(root, m, m["tensors"][f"{DOWN}.lo"]["file"], flip)
    _write(root, m)
    with pytest.raises(CheckpointError, match=rf"{DOWN}'.*corrupted stream"):
        load(str(root))
    model = load(str(root), mode="resident")
    with pytest.raises(CheckpointError, match=rf"{DOWN}'.*corrupted stream"):
        model.experts[DOWN].dense()


# -- 2. sizes are bounded before anything is read ---------------------------------------------
def test_manifest_size_limit_is_proportionate(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    n = mf.config_implied_tensors(cfg, "config.json")
    assert n == mf.implied_tensors(4 * 8 * 3, 4) == 6 * 96 + 32 * 4 + 16
    limit = mf.manifest_size_limit(n)
    assert limit == mf.MANIFEST_FLOOR + mf.MANIFEST_PER_TENSOR * n
    assert 5 * (ckpt / "manifest.json").stat().st_size < limit < 2 * mf.MANIFEST_FLOOR
    assert mf.manifest_size_limit(None) == mf.MANIFEST_FLOOR
    assert mf.manifest_size_limit(10**12) == mf.MANIFEST_CEILING


def test_manifest_over_the_limit_is_refused_unread(ckpt, tmp_path):
    from qmoe_ray.format.manifest import read_manifest
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    raw = (root / "manifest.json").read_bytes()
    limit = mf.manifest_size_limit(mf.implied_tensors(96, 4))
    (root / "manifest.json").write_bytes(raw[:-2] + b" " * (limit - len(raw)) + raw[-2:])
    assert (root / "manifest.json").stat().st_size == limit
    assert set(load(str(root)).experts) == set(_read(ckpt)["quantized"])  # at the limit: fine
    with open(root / "manifest.json", "r+b") as f:  # sparse: 256 MiB on disk for free
        f.truncate(256 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"manifest.json: 268,435,456 bytes, more than "
                                                  rf"the {limit:,} bytes a manifest"):
            read_manifest(str(root))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # nothing near the file's size was read


def test_config_json_must_be_the_manifests(ckpt, tmp_path):
    """config.json sets the manifest's size limit, so a bigger model there is refused."""
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 4096}))
    with pytest.raises(CheckpointError, match="config differs from the folder's config.json"):
        load(str(root))
    (root / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    with pytest.raises(CheckpointError, match=r"config.json: config.num_hidden_layers is "
                                              r"1000000000: expected an integer in 0..4096"):
        load(str(root))
    (root / "config.json").unlink()  # no config.json: the floor limit, and it loads
    assert len(load(str(root)).experts) == 96


@pytest.mark.parametrize("depth", [40, 200_000])
def test_deep_nesting_is_refused(ckpt, tmp_path, depth):
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    raw = (root / "manifest.json").read_text().rstrip()
    deep = "[" * depth + "]" * depth
    (root / "manifest.json").write_text(raw[:-1] + f', "options": {{"x": {deep}}}}}')
    with pytest.raises(CheckpointError, match="nested"):
        load(str(root))


def _walk_depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((_walk_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_walk_depth(x) for x in v), default=0)
    return 0


@pytest.mark.parametrize("chunk", [1, 3, 1 << 23])
def test_json_depth_counts_brackets_outside_strings_only(chunk, monkeypatch):
    """The byte-level nesting measure equals a walk of the parsed value, with brackets, quotes
    and backslashes inside strings and keys, and whatever the chunk boundaries."""
    monkeypatch.setattr(jsonio, "_DEPTH_CHUNK", chunk)
    cases = [{}, [], 5, "s[{", {"a": [1, {"b": "x]]]\\"}]}, {'k"{': '\\\\"[[['},
             [[[[]]]], {"s": "\\"}, {"a": [[1], [2, [3]]], "b": '\\"', "c": "}}}"},
             {"\\": [{"\"": ["]"]}]}]
    for value in cases:
        raw = json.dumps(value).encode()
        assert jsonio.json_depth(raw) == _walk_depth(value), raw
    assert jsonio.json_depth(b"[" * 50 + b"]" * 50) == 50


def test_utf16_manifest_is_refused(ckpt, tmp_path):
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    raw = (root / "manifest.json").read_text()
    (root / "manifest.json").write_bytes(raw.encode("utf-16"))
    with pytest.raises(CheckpointError, match="not UTF-8"):
        load(str(root))


def test_shard_of_the_wrong_size_is_refused_before_it_is_read(ckpt, tmp_path):
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    shard = root / "shards" / "layer-00000.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # sparse: 1 GiB more on the store, nothing on disk
        f.truncate(size + 2**30)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=rf"layer-00000.safetensors: {size + 2**30:,} "
                                                  "bytes on the store, but the manifest's"):
            load(str(root))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20  # the shard's buffer was never allocated
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load(str(root))


# -- 3. one strict safetensors parser -------------------------------------------------------------
def _file(header: Any, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "U16", "shape": [3, 6148914691236517206], "data_offsets": [0, 4]}, "needs"),
    ({"dtype": "U16", "shape": [-1, -2], "data_offsets": [0, 4]}, "bad shape"),
    ({"dtype": "U16", "shape": [2.0], "data_offsets": [0, 4]}, "bad shape"),
    ({"dtype": "U16", "shape": [True, 2], "data_offsets": [0, 4]}, "bad shape"),
    ({"dtype": "U16", "shape": "22", "data_offsets": [0, 4]}, "bad shape"),
    ({"dtype": "U16", "shape": {"a": 2}, "data_offsets": [0, 4]}, "bad shape"),
    ({"dtype": "U16", "shape": [2], "data_offsets": [4, 0]}, "data_offsets"),
    ({"dtype": "U16", "shape": [2], "data_offsets": [-4, 0]}, "data_offsets"),
    ({"dtype": "U16", "shape": [2], "data_offsets": [0, 4.0]}, "data_offsets"),
    ({"dtype": "U16", "shape": [2], "data_offsets": "04"}, "data_offsets"),
    ({"dtype": "U16", "shape": [2], "data_offsets": {"0": 0, "4": 4}}, "data_offsets"),
    ({"dtype": ["U16"], "shape": [2], "data_offsets": [0, 4]}, "unsupported dtype"),
    ("U16", "lacks dtype/shape/data_offsets"),
])
def test_safetensors_header_fields_are_checked_exactly(entry, match):
    from qmoe_ray.format.shards import parse_safetensors
    from qmoe_ray.storage.checkpoint import parse_header

    raw = _file({"a": entry}, bytes(4))
    with pytest.raises(CheckpointError, match=match):
        parse_safetensors(raw, "x.safetensors")
    with pytest.raises(CheckpointError, match=match):  # the source reader: the same parser
        parse_header(raw[8:-4], "x.safetensors", len(raw))


def test_loader_uses_the_one_safetensors_parser(monkeypatch):
    import qmoe_ray.format.shards as loader
    from qmoe_ray.storage import checkpoint

    calls = []

    def spy(*a):
        calls.append(a[1])
        return checkpoint.parse_header(*a)

    monkeypatch.setattr(loader, "parse_header", spy)
    raw = _file({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))
    assert loader.parse_safetensors(raw, "y.safetensors")["a"][:2] == ("uint8", [4])
    assert calls == ["y.safetensors"]
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CheckpointError, match="nested too deeply"):
        loader.parse_safetensors(len(deep).to_bytes(8, "little") + deep, "z")


# -- 4. one error type, wrong JSON types named ------------------------------------------------------
def _first(m: dict[str, Any], suffix: str) -> str:
    return next(n for n in m["tensors"] if n.endswith(suffix))


def _mutations() -> list[tuple[str, Any, str]]:
    def q(m):
        return m["quantized"][DOWN]

    def lay0(m):
        return m["experts"]["shards/layer-00000.safetensors"][0]

    return [
        ("tensors-list", lambda m: m.update(tensors=list(m["tensors"])), "'tensors' is list"),
        ("tensor-str", lambda m: m["tensors"].update({Q_PROJ: "x"}), "expected an object"),
        ("shape-str", lambda m: m["tensors"][Q_PROJ].update(shape="128"), "shape is str"),
        ("shape-negative", lambda m: m["tensors"][Q_PROJ].update(shape=[-128, -128]),
         "non-negative integers"),
        ("shape-float", lambda m: m["tensors"][Q_PROJ].update(shape=[128.0, 128]),
         "non-negative integers"),
        ("shape-bool", lambda m: m["tensors"][Q_PROJ].update(shape=[True, 128]),
         "non-negative integers"),
        ("nbytes-negative", lambda m: m["tensors"][Q_PROJ].update(nbytes=-32768),
         r"nbytes is -32768, expected a non-negative"),
        ("nbytes-str", lambda m: m["tensors"][Q_PROJ].update(nbytes="32768"), "nbytes is"),
        ("nbytes-wrong", lambda m: m["tensors"][Q_PROJ].update(nbytes=10), "has nbytes 10"),
        ("file-int", lambda m: m["tensors"][Q_PROJ].update(file=3), "names file 3"),
        ("dtype-unknown", lambda m: m["tensors"][Q_PROJ].update(dtype="complex64"),
         "has dtype 'complex64'"),
        ("sha-short", lambda m: m["tensors"][Q_PROJ].update(sha256="abc"), "sha256 of 64"),
        ("files-str", lambda m: m.update(files="shards/other.safetensors"), "'files' is str"),
        ("files-int", lambda m: m["files"].__setitem__(0, 1), "files name 1"),
        ("files-escape", lambda m: m["files"].__setitem__(0, "../x.safetensors"),
         "unsafe file name '../x.safetensors'"),
        ("fields-str", lambda m: q(m).update(fields="stream"), "fields is str"),
        ("q-shape-1d", lambda m: q(m).update(shape=[128]), r"\[rows, cols\]"),
        ("q-codec-list", lambda m: q(m).update(codec=[]), "codec is list"),
        ("q-params-null", lambda m: q(m).update(params=None), "params is NoneType"),
        ("q-no-scheme", lambda m: q(m).pop("scheme"),  # version 3: a null in its column
         rf"{DOWN}' (lacks key 'scheme'|scheme is None)"),
        ("q-scheme-other", lambda m: q(m).update(scheme="int9"), "unknown quantization scheme"),
        ("q-group-str", lambda m: q(m).update(quant_group_size="8"), "quant_group_size is '8'"),
        ("q-codec-version", lambda m: q(m)["codec"].update(version="7"), "version '7'"),
        ("q-segments", lambda m: q(m)["codec"].update(segment_symbols="0"),
         "segment_symbols is '0'"),
        ("no-config", lambda m: m.pop("config"), "key 'config' is missing"),
        ("no-quantized", lambda m: m.pop("quantized"), "key 'quantized' is missing"),
        ("config-list", lambda m: m.update(config=[]), "'config' is list"),
        ("config-hidden-str", lambda m: m["config"].update(hidden_size="128"),
         "config.hidden_size is '128'"),
        ("config-hidden-list", lambda m: m["config"].update(hidden_size=[128]),
         "config.hidden_size is"),
        ("config-arch", lambda m: m["config"].update(architectures=[1]), "architectures"),
        ("config-other", lambda m: m["config"].update(rms_norm_eps=0.5), "differs from"),
        ("tables-list", lambda m: m.update(tables=[]), "'tables' is list"),
        ("table-meta-int", lambda m: next(iter(m["tables"].values())).update(group=5),
         "expected a short string"),
        ("table-hash", lambda m: m["tables"][q(m)["table"]].update(table_hash="0" * 64),
         "table hash mismatch"),
        ("experts-int", lambda m: m["experts"].update({"shards/layer-00000.safetensors": 5}),
         "expected a list"),
        ("routed-str", lambda m: lay0(m).update(routed_tokens="many"), "routed_tokens is"),
        ("fallback-list", lambda m: lay0(m).update(fallback=["no_tokens"]), "fallback is list"),
        ("options-list", lambda m: m.update(options=[]), "'options' is list"),
        ("heldout-str", lambda m: m.update(heldout_loss="low"), "'heldout_loss' is str"),
        ("version-bool", lambda m: m.update(format_version=True), "format version True"),
        ("version-new", lambda m: m.update(format_version=99), "version 99 is not supported"),
        ("not-an-object", lambda m: (m.clear(), m.update(format="qmoe-ray", format_version=1)),
         "key 'config' is missing"),
    ]


MUTATIONS = _mutations()


@pytest.mark.parametrize("name,edit,match", MUTATIONS, ids=[c[0] for c in MUTATIONS])
def test_wrong_json_is_one_checkpoint_error_naming_the_key(ckpt, tmp_path, capsys, name, edit,
                                                           match):
    """Every reader refuses it from the manifest (the shards are gone: nothing else is read) as
    a CheckpointError whose message starts with the manifest's path; every command line prints
    one line and exits 2 (no traceback)."""
    root = _copy(ckpt, tmp_path)
    m = _read(root)
    edit(m)
    _write(root, m)
    _no_shards(root)
    from qmoe_ray.read.loader import load

    with pytest.raises(CheckpointError, match=match) as ei:
        load(str(root))
    assert str(ei.value).startswith(f"{root}/manifest.json: ")
    _refused_everywhere(root, tmp_path, capsys, match)


def test_inspect_refuses_negative_sizes(ckpt, tmp_path, capsys):
    """A negative nbytes used to be shown as a negative size."""
    root = _copy(ckpt, tmp_path)
    m = _read(root)
    m["tensors"][Q_PROJ]["nbytes"] = -(2**40)
    _write(root, m)
    rc, out, err = _cli(["inspect", str(root), "--json"], capsys)
    assert rc == 2 and f"tensor '{Q_PROJ}' nbytes is -1099511627776" in err and out == ""


# -- 5. eval --compare: the original is named by the user ---------------------------------------------
def test_bare_compare_names_the_source_and_evaluates_nothing(ckpt, tmp_path, capsys,
                                                            monkeypatch):
    import qmoe_ray.read.evaluate as ev
    from qmoe_ray.read.evaluate import compare_eval

    calls = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(a) or {})
    rc, _, err = _cli(["eval", str(ckpt), "--compare", "--quiet"], capsys)
    assert rc == 2 and "names its source as 'embedded'" in err and "--compare embedded" in err
    root = _copy(ckpt, tmp_path)
    m = _read(root)
    m["source"] = "s3://somebody-elses-bucket/model"
    _write(root, m)
    rc, _, err = _cli(["eval", str(root), "--compare"], capsys)
    assert rc == 2 and "--compare s3://somebody-elses-bucket/model" in err
    with pytest.raises(InputError, match="given explicitly"):
        compare_eval(str(root))
    assert calls == []  # nothing was evaluated, the source was never opened


# -- 6. messages never quote a file's bytes -------------------------------------------------------
def test_a_symlinked_file_is_never_echoed(ckpt, tmp_path):
    from qmoe_ray.read.inspect import inspect
    from qmoe_ray.read.loader import load

    root = _copy(ckpt, tmp_path)
    shard = root / "shards" / "layer-00001.safetensors"
    secret = tmp_path / "secret"
    secret.write_bytes(b"hunter2!" + b"\x00" * (shard.stat().st_size - 8))  # same size
    shard.unlink()
    os.symlink(secret, shard)
    leaks = ("hunter2", str(int.from_bytes(b"hunter2!", "little")), "0x" + b"hunter2!".hex())
    with pytest.raises(CheckpointError, match="declare a safetensors header longer") as ei:
        load(str(root))
    info = inspect(str(root))
    assert info["checksums"]["status"] == "failed"
    for text in (str(ei.value), info["checksums"]["error"]):
        assert not any(leak in text for leak in leaks), text
    # a header length that fits, over bytes that are not UTF-8: still not quoted
    secret.write_bytes((9).to_bytes(8, "little") + b"\xffhunter2!" + b"\x00" * (
        shard.stat().st_size - 17))
    with pytest.raises(CheckpointError, match="not UTF-8") as ei:
        load(str(root))
    assert "hunter2" not in str(ei.value) and "0xff" not in str(ei.value)
