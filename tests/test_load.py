"""Loading compressed checkpoints on CPU: decode vs resident, the job's loss, streaming reads, and
every kind of bad checkpoint refused with a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import plain_reader
import pytest
import torch
from load_helpers import (
    EVAL_SAMPLES,
    SEQ_LEN,
    compressed_checkpoint,
    copy_checkpoint,
    data_offset,
    edit_manifest,
)

from qmoe_ray.format.manifest import read_manifest
from qmoe_ray.format.shards import Timings, iter_shards, parse_safetensors, read_verified
from qmoe_ray.read.loader import load
from qmoe_ray.read.weights import EncodedWeight

pytestmark = pytest.mark.usefixtures("module_ray")  # every job here runs in-process


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return compressed_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def decoded(ckpt):
    return load(str(ckpt))


@pytest.fixture(scope="module")
def resident(ckpt):
    return load(str(ckpt), mode="resident")


def _ids(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(3, 2000, size=shape))


# -- good checkpoints --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(ckpt) -> dict[str, torch.Tensor]:
    """Every expert matrix dequantized independently of the package: the stored tensors read,
    checksummed and decoded by tests/plain_reader.py (json, hashlib, numpy; written from the
    docs), as float32 holding the bf16 values."""

    manifest = plain_reader.read_manifest(ckpt)
    tensors = plain_reader.read_verified(ckpt, manifest)
    return {n: torch.from_numpy(plain_reader.dense_weight(n, manifest, tensors))
            for n in manifest["quantized"]}


def test_decode_and_resident_give_the_reference_weights(decoded, resident, reference):
    """On a CPU, resident mode may multiply through the same dequantization as decode mode, so
    comparing the two alone would compare a path with itself: both are compared with the
    independent reference instead (decode: bit for bit; resident: its products)."""
    assert decoded.experts.keys() == reference.keys() == resident.experts.keys()
    for n, ref in reference.items():
        got = decoded.experts[n]
        assert got.dtype == torch.bfloat16 and torch.equal(got.float(), ref), n
    x = torch.randn(5, max(r.shape[1] for r in reference.values()),
                    generator=torch.Generator().manual_seed(0))
    for n, ref in reference.items():
        w = resident.experts[n]
        assert isinstance(w, EncodedWeight), n
        xi = x[:, :ref.shape[1]]
        torch.testing.assert_close(xi @ w.T, xi @ ref.T, rtol=1e-5, atol=1e-5)
    # the codes really are ternary and sparse (a reference of zeros would match nothing above)
    ref = next(iter(reference.values()))
    assert 0.3 < float((ref == 0).float().mean()) < 1.0


def test_decode_and_resident_give_the_same_logits(decoded, resident):
    ids = _ids()
    a, b = decoded.logits(ids), resident.logits(ids)
    assert a.shape == (2, 12, decoded.config["vocab_size"]) and torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # resident experts stay encoded: far fewer bytes than bf16
    enc = [w for w in resident.experts.values() if isinstance(w, EncodedWeight)]
    assert len(enc) == len(decoded.experts) == len(decoded.manifest["quantized"])
    assert sum(w.nbytes for w in enc) * 4 < sum(t.numel() * 2 for t in decoded.experts.values())
    assert all(t.dtype == torch.bfloat16 for t in decoded.experts.values())


def test_loss_matches_the_job_report(ckpt, decoded):
    from qmoe_ray.data import load_samples

    held = load_samples("embedded", decoded.config, EVAL_SAMPLES, SEQ_LEN, split="heldout")
    loss, n = decoded.loss({k: torch.from_numpy(v) for k, v in held.items()})
    report = json.loads((ckpt / "report.json").read_text())
    assert n > 0 and loss == pytest.approx(report["heldout_loss"], rel=1e-4)
    assert decoded.manifest["heldout_loss"] == pytest.approx(report["heldout_loss"])


def test_generate_is_greedy(decoded):
    ids = _ids(1, (1, 5))
    out = decoded.generate(ids, max_new_tokens=3)
    assert out.shape == (1, 8) and torch.equal(out[:, :5], ids)
    for k in range(5, 8):  # each new token is the argmax of the logits of its prefix
        assert int(decoded.logits(out[:, :k])[0, -1].argmax()) == int(out[0, k])


def test_encoded_weight_product_equals_dense(resident, reference):
    name, w = next(iter(resident.experts.items()))
    x = torch.randn(5, w.shape[1], dtype=torch.float32)
    dense = w.dense()
    assert dense.dtype == torch.bfloat16 and tuple(dense.shape) == w.shape
    assert torch.equal(dense.float(), reference[name])  # not the path under test: the reference
    torch.testing.assert_close(x @ w.T, x @ reference[name].T)
    assert w.T.shape == (w.shape[1], w.shape[0])


def test_streamed_range_reads_equal_whole_reads(ckpt):
    manifest = read_manifest(str(ckpt))
    whole, t1 = read_verified(str(ckpt), manifest)
    t = Timings()
    parts = {}
    for _, p in iter_shards(str(ckpt), manifest, workers=3, prefetch=3, chunk_bytes=4099,
                            timings=t):
        parts.update(p)
    assert parts.keys() == whole.keys() == manifest["tensors"].keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    on_disk = sum((ckpt / f).stat().st_size for f in manifest["files"])
    assert t.bytes == on_disk and t.read > 0 and t.verify > 0 and set(t1) == {"read", "verify"}


def test_timings_split_the_load(decoded):
    t = decoded.timings
    assert {"read", "wait", "verify", "decode", "wall", "bytes"} <= set(t)
    assert all(v >= 0 for v in t.values()) and t["wall"] >= t["decode"]


def test_parse_safetensors_refuses_gaps_and_overlaps():
    from safetensors.torch import save

    raw = bytearray(save({"a": torch.arange(4, dtype=torch.int32)}))
    assert parse_safetensors(raw, "x")["a"][:2] == ("int32", [4])
    with pytest.raises(ValueError, match="trailing bytes"):
        parse_safetensors(raw + b"\0\0\0\0", "x")
    with pytest.raises(ValueError, match="truncated"):
        parse_safetensors(raw[:-3], "x")
    with pytest.raises(ValueError, match="too short"):
        parse_safetensors(raw[:5], "x")


# -- bad checkpoints ---------------------------------------------------------------------------
def _expert_shard(root: Path) -> tuple[Path, str]:
    m = plain_reader.load_manifest(root)
    name = next(n for n in m["tensors"] if ".q.stream" in n)
    return root / m["tensors"][name]["file"], name


def test_flipped_byte_in_data_is_refused(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")
    shard, name = _expert_shard(root)
    raw = bytearray(shard.read_bytes())
    raw[data_offset(shard, name) + 3] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{name}.*fails its checksum"):
        load(str(root))


def test_flipped_byte_in_header_is_refused(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")
    shard, _ = _expert_shard(root)
    raw = bytearray(shard.read_bytes())
    raw[9] ^= 0x41  # inside the JSON header
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="safetensors header|corrupted"):
        load(str(root))


def test_truncated_shard_is_refused(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")
    shard, _ = _expert_shard(root)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load(str(root))


def test_missing_shard_is_refused(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")
    shard, _ = _expert_shard(root)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load(str(root))


def test_path_outside_the_folder_is_refused(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")
    (tmp_path / "evil.safetensors").write_bytes(b"x")

    def escape(m):
        m["files"][0] = "../evil.safetensors"

    edit_manifest(root, escape)
    with pytest.raises(ValueError, match="unsafe file name '../evil.safetensors'"):
        load(str(root))


def test_unknown_format_version_is_refused(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")
    edit_manifest(root, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="version 99 is not supported.*upgrade"):
        load(str(root))


def test_unknown_codec_version_is_refused_before_reading(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")

    def bump(m):
        m["quantized"][next(iter(m["quantized"]))]["codec"]["version"] = "7"

    edit_manifest(root, bump)
    for f in (root / "shards").iterdir():  # nothing may be read: the error comes first
        f.unlink()
    with pytest.raises(ValueError, match="version '7' is unknown"):
        load(str(root))


def test_foreign_table_hash_is_refused(ckpt, tmp_path):
    root = copy_checkpoint(ckpt, tmp_path / "c")

    def other_hash(m):
        name = next(iter(m["tables"]))
        m["tables"][name]["table_hash"] = "0" * 64

    edit_manifest(root, other_hash)
    with pytest.raises(ValueError, match="table hash mismatch"):
        load(str(root))


def test_missing_manifest_wrong_url_and_bad_arguments(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json.*not a .*checkpoint"):
        load(str(tmp_path / "nowhere"))
    root = copy_checkpoint(ckpt, tmp_path / "c")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(str(root))
    with pytest.raises(ValueError, match="mode='fast'"):
        load(str(ckpt), mode="fast")
    with pytest.raises(ValueError, match="device='tpu'"):
        load(str(ckpt), device="tpu")


def test_cuda_without_gpu_says_how_to_install(ckpt):
    from qmoe_ray import gpu

    if gpu.available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=r"pip install 'qmoe-ray\[gpu\]'"):
        load(str(ckpt), device="cuda")


def test_evaluate_reads_a_compressed_checkpoint(ckpt, decoded):
    from qmoe_ray.read.evaluate import evaluate

    res = evaluate(str(ckpt), "embedded", num_samples=2, seq_len=16)
    assert res["tokens"] == 2 * 15 and np.isfinite(res["loss"])


def test_side_by_side_eval(ckpt, capsys):
    from qmoe_ray.cli import main
    from qmoe_ray.read.evaluate import compare_eval

    both = compare_eval(str(ckpt), "embedded", "embedded", 2, 16)
    assert both["original"]["model"] == "embedded" and both["compressed"]["tokens"] == 30
    assert both["original"]["tokens"] == both["compressed"]["tokens"]
    assert both["loss_delta"] == pytest.approx(both["compressed"]["loss"]
                                               - both["original"]["loss"])
    # the original is named on the command line (a bare --compare refuses: test_hostile_...)
    assert main(["eval", str(ckpt), "--compare", "embedded", "--samples", "2",
                 "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "original" in out and "compressed" in out and "delta loss" in out


@pytest.mark.s3
def test_s3_load_and_wrong_credentials(ckpt, moto_endpoint, s3_credentials, monkeypatch):
    """From a bucket: loads with the right keys; with keys the server refuses, a PermissionError
    that names the URL and the credential variables, and never the secret."""
    from fixtures_s3 import FAKE_SECRET, make_bucket, moto_checks_keys, upload_dir

    fs = make_bucket(moto_endpoint, "load-auth")
    upload_dir(fs, ckpt, "load-auth/ck")
    url = "s3://load-auth/ck"
    m = load(url, endpoint_url=moto_endpoint, skip_instance_cache=True)
    assert set(m.experts) == set(m.manifest["quantized"])
    moto_checks_keys(monkeypatch)
    with pytest.raises(PermissionError) as ei:
        load(url, endpoint_url=moto_endpoint, skip_instance_cache=True)
    msg = str(ei.value)
    assert url in msg and "AWS_ACCESS_KEY_ID" in msg and FAKE_SECRET not in msg


@pytest.mark.s3
def test_load_benchmark_pieces_on_a_small_synthetic_checkpoint(tmp_path, tmp_path_factory):
    """The load benchmark's synthetic writer gives a checkpoint the loader accepts (ternary codes
    at P(0) near 0.885 decode to the stored levels), and its report states the split."""
    from qmoe_ray.bench.load import (
        _markdown,
        evict,
        fresh_process,
        load_timings,
        s3_timings,
        synthetic_checkpoint,
        token_latency,
    )

    synthetic_checkpoint(tmp_path, hidden=64, ff=96, layers=2, experts=2, vocab=128)
    m = load(str(tmp_path))
    w = m.weights
    name = "model.layers.1.mlp.experts.1.down_proj.weight"
    expert = w[name]
    assert expert.shape == (64, 96) and expert.dtype == torch.bfloat16
    zero = float((expert == 0).float().mean())
    assert 0.8 < zero < 0.95
    per_row = [set(r.tolist()) - {0.0} for r in expert.float()]
    assert all(len(s) <= 2 for s in per_row)  # each row: its lo, 0, its hi
    n = 2 * 2 * (3 * 64 * 96)
    t = load_timings(str(tmp_path), "decode", repeat=2)
    assert t["expert_weights"] == n and t["wall"] >= t["decode"] > 0
    r = load_timings(str(tmp_path), "resident", repeat=1)
    evict(tmp_path)  # a cold-cache load: the same weights, read from the disk again
    assert torch.equal(load(str(tmp_path)).weights[name].view(torch.int16),
                       expert.view(torch.int16))
    cold = load_timings(str(tmp_path), "decode", repeat=1)
    fresh = {"compressed": fresh_process("compressed", str(tmp_path))}  # a new process each
    assert fresh["compressed"]["seconds"] >= fresh["compressed"]["decode"] > 0
    bf16 = tmp_path_factory.mktemp("bf16") / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.weights.items()}, str(bf16))
    fresh["bf16"] = fresh_process("bf16", str(bf16))
    assert fresh["bf16"]["seconds"] > 0
    with pytest.raises(RuntimeError, match="fresh-process compressed load failed"):
        fresh_process("compressed", str(tmp_path / "missing"))
    s3 = s3_timings(tmp_path, repeat=1)  # a moto server process, stopped on return
    assert s3["load"]["bytes"] == t["bytes"] and s3["load"]["decode"] > 0
    assert s3["read_verify_s"] > 0
    lat = token_latency(str(tmp_path), "cpu", tokens=4, repeat=2)
    assert lat["tokens"] == 4 and min(lat["decode_f32_ms"], lat["decode_bf16_ms"],
                                      lat["resident_ms"]) > 0
    assert lat["ratio_bf16"] == pytest.approx(lat["resident_ms"] / lat["decode_bf16_ms"])
    label = "synthetic"
    text = _markdown({f"{label} | decode": t, f"{label} | resident": r,
                      f"{label} | decode, cold cache": cold, "latency": {label: lat},
                      "s3": s3},
                     "cpu", label, {"seconds": 0.5, "bytes": 2 * n,
                                    "cold_seconds": 0.8, "fresh": fresh})
    assert "| synthetic | decode | 0.1 M |" in text and "x** the bf16 load time" in text
    assert "| synthetic | decode, cold cache | 0.1 M |" in text
    assert f"(**{cold['wall'] / 0.8:.2f}x**)" in text
    ratio = fresh["compressed"]["seconds"] / fresh["bf16"]["seconds"]
    assert f"the bf16 file in {fresh['bf16']['seconds']:.3f} s: **{ratio:.2f}x**" in text
    assert f"in full in {s3['load']['wall']:.3f} s with {s3['load']['decode']:.3f} s" in text
    assert f"| synthetic | 4 | {lat['decode_f32_ms']:.1f} ms |" in text


@pytest.mark.parametrize("group_size", [None, 64])
def test_int2_dense_equals_dequantized_codes(group_size):
    """The int2 load path (per-row table when one scale per row; the generic path with groups)
    gives exactly the bf16 of ``dequantize`` on the decoded codes."""
    from qmoe_ray import codec
    from qmoe_ray.quant import dequantize, parse_scheme

    rng = np.random.default_rng(3)
    rows, cols = 37, 300
    q = rng.integers(0, 4, (rows, cols), dtype=np.uint8)
    scheme = parse_scheme("int2", group_size)
    groups = scheme.num_groups(cols)
    params = {"scale": (torch.rand(rows, groups) * 0.1).to(torch.bfloat16),
              "zero": torch.randint(0, 4, (rows, groups), dtype=torch.uint8)}
    w = EncodedWeight("w", scheme, codec.encode_int2(q, segment_symbols=333), params, "cpu")
    ref = dequantize(scheme, torch.from_numpy(q), params).to(torch.bfloat16)
    assert torch.equal(w.dense().view(torch.int16), ref.view(torch.int16))


def test_progress_bar_only_when_asked(ckpt, capsys):
    from qmoe_ray.read.inspect import inspect

    load(str(ckpt))
    assert "loading" not in capsys.readouterr().err
    load(str(ckpt), progress=True)
    err = capsys.readouterr().err
    assert re.search(r"loading:\s+\d+%\|.*B/s", err)  # a bar over the tensor bytes
    assert inspect(str(ckpt), progress=True)["checksums"]["status"] == "ok"
    assert "verifying" in capsys.readouterr().err


def test_bf16_compute_is_close_to_float32(ckpt, decoded):
    """``compute="bf16"`` runs decode mode's expert products in bf16: same weights, logits within
    bf16 rounding of the float32 ones (and not identical: the products really changed)."""
    m = load(str(ckpt), compute="bf16")
    ids = torch.randint(3, m.config["vocab_size"], (2, 12), generator=torch.Generator()
                        .manual_seed(1))
    a, b = decoded.logits(ids), m.logits(ids)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=2e-2, atol=5e-2)
    with pytest.raises(ValueError, match="compute='fp8'"):
        load(str(ckpt), compute="fp8")


def test_decoding_overlaps_the_download(tmp_path, monkeypatch):
    """Shards are fetched ahead while earlier ones decode: on a store whose every read takes
    0.2 s, some decode runs while a later shard's read is in flight (the reads would all come
    before or after the decodes if the load read and decoded in turn)."""
    import threading
    import time as _time

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    import qmoe_ray.read.weights as loader_mod
    from qmoe_ray.bench.load import synthetic_checkpoint

    reads: list[tuple[float, float]] = []
    decodes: list[tuple[float, float]] = []
    lock = threading.Lock()

    class SlowFS(LocalFileSystem):
        protocol = ("slowfile",)

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("slowfile://"))

        def cat_file(self, path, start=None, end=None, **kwargs):
            t0 = _time.perf_counter()
            _time.sleep(0.2)
            data = super().cat_file(path, start=start, end=end, **kwargs)
            with lock:
                reads.append((t0, _time.perf_counter()))
            return data

    fsspec.register_implementation("slowfile", SlowFS, clobber=True)
    real = loader_mod._ternary_bf16

    def timed(*args, **kwargs):
        t0 = _time.perf_counter()
        out = real(*args, **kwargs)
        decodes.append((t0, _time.perf_counter()))
        return out

    monkeypatch.setattr(loader_mod, "_ternary_bf16", timed)
    synthetic_checkpoint(tmp_path, hidden=64, ff=96, layers=4, experts=2, vocab=128)
    m = load(f"slowfile://{tmp_path}", workers=2)
    assert len(decodes) == len(m.experts) == 4 * 2 * 3 and len(reads) >= 5  # 4 layers + rest
    assert any(r0 < d1 and d0 < r1 for r0, r1 in reads for d0, d1 in decodes)
    ref = load(str(tmp_path))
    assert all(torch.equal(m.weights[k].view(torch.int16), ref.weights[k].view(torch.int16))
               for k in ref.experts)
