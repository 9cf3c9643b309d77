"""The rANS sub-1-bit format: exact round trips, sizes near the entropy, pinned bytes, bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmoe_ray import codec
from qmoe_ray.codec import _fast, rans
from qmoe_ray.codec.encoded import to_symbols

TERN = np.array([-1, 0, 1], np.int8)


def ternary(rng, shape, p0):
    p = (1 - p0) / 2
    return rng.choice(TERN, size=shape, p=[p, p0, p])


def entropy(p0):
    p = (1 - p0) / 2
    return float(-sum(q * np.log2(q) for q in (p0, p, p) if q > 0))


def lcg_ternary(rows, cols, p0):
    """Deterministic pseudo-random ternary codes from integer arithmetic (numpy-version proof)."""
    u = (np.arange(rows * cols, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(12345)) % (
        np.uint64(1) << np.uint64(32)
    )
    u = (u >> np.uint64(8)).astype(np.float64) / 2**24
    c = np.where(u < (1 - p0) / 2, -1, np.where(u > 1 - (1 - p0) / 2, 1, 0))
    return c.astype(np.int8).reshape(rows, cols)


def digest(enc) -> str:
    h = hashlib.sha256()
    for k, v in sorted(enc.to_tensors().items()):
        h.update(k.encode() + str(v.dtype).encode() + v.tobytes())
    h.update(json.dumps(enc.metadata(), sort_keys=True).encode())
    return h.hexdigest()


@pytest.fixture(params=["numba", "numpy"])
def backend(request, monkeypatch):
    if request.param == "numba":  # numba is a dependency: its absence is a broken install
        assert _fast.AVAILABLE, "numba (a dependency of qmoe-ray) does not import"
    monkeypatch.setenv("QMOE_CODEC_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("p0", [0.0, 0.3, 0.5, 0.8, 0.885, 0.95, 0.99, 1.0])
def test_ternary_round_trip_across_sparsity(backend, p0):
    rng = np.random.default_rng(int(p0 * 1000))
    c = ternary(rng, (37, 515), p0)
    enc = codec.encode_ternary(c, segment_symbols=97)
    out = codec.decode_ternary(enc)
    assert out.dtype == np.int8 and out.shape == c.shape
    np.testing.assert_array_equal(out, c)


@pytest.mark.parametrize("shape, group, seg", [((37, 515), 5, 97), ((1, 1), 5, 4096),
                                               ((3, 7), 4, 2), ((64, 300), 3, 500)])
def test_decode_ternary_lut_equals_lookup_of_codes(backend, shape, group, seg):
    rng = np.random.default_rng(sum(shape))
    c = ternary(rng, shape, 0.85)
    enc = codec.encode_ternary(c, segment_symbols=seg, group=group)
    lut = rng.integers(-(2**15), 2**15, size=(shape[0], 3), dtype=np.int16)
    out = codec.decode_ternary_lut(enc, lut)
    assert out.dtype == np.int16 and out.shape == shape
    np.testing.assert_array_equal(out, np.take_along_axis(lut, c.astype(np.int64) + 1, axis=1))
    with pytest.raises(ValueError, match="lut must be int16"):
        codec.decode_ternary_lut(enc, lut[:, :2])
    # into the caller's memory (the loader's torch tensors): same values, that memory returned
    mem = np.full(shape, 7, np.int16)
    assert np.shares_memory(codec.decode_ternary_lut(enc, lut, out=mem), mem)
    np.testing.assert_array_equal(mem, out)
    strided = np.empty((shape[0], 2 * shape[1]), np.int16)[:, ::2]
    for wrong in (np.empty(shape, np.int32), np.empty((shape[0] + 1, shape[1]), np.int16),
                  *([strided] if not strided.flags.c_contiguous else [])):
        with pytest.raises(ValueError, match="out must be"):
            codec.decode_ternary_lut(enc, lut, out=wrong)
    tensors = {k: v.copy() for k, v in enc.to_tensors().items()}  # the stored form, public path
    tensors["stream"][-1] ^= 0x0F0F
    bad = codec.EncodedTernary.from_tensors(tensors, enc.metadata())
    with pytest.raises(ValueError, match="corrupted stream"):
        codec.decode_ternary_lut(bad, lut)


@pytest.mark.parametrize("shape, group, seg", [((19, 333), 4, 50), ((1, 1), 4, 4096),
                                               ((5, 9), 3, 2), ((64, 301), 1, 700)])
def test_decode_int2_lut_equals_lookup_of_codes(backend, shape, group, seg):
    rng = np.random.default_rng(sum(shape) + group)
    q = rng.choice(np.arange(4, dtype=np.uint8), size=shape, p=[0.1, 0.76, 0.09, 0.05])
    enc = codec.encode_int2(q, segment_symbols=seg, group=group)
    lut = rng.integers(-(2**15), 2**15, size=(shape[0], 4), dtype=np.int16)
    out = codec.decode_int2_lut(enc, lut)
    assert out.dtype == np.int16 and out.shape == shape
    np.testing.assert_array_equal(out, np.take_along_axis(lut, q.astype(np.int64), axis=1))
    with pytest.raises(ValueError, match=r"lut must be int16 \[\d+, 4\]"):
        codec.decode_int2_lut(enc, lut[:, :3])
    mem = np.zeros(shape, np.int16)
    assert np.shares_memory(codec.decode_int2_lut(enc, lut, out=mem), mem)
    np.testing.assert_array_equal(mem, out)
    with pytest.raises(ValueError, match="out must be"):
        codec.decode_int2_lut(enc, lut, out=np.zeros(shape, np.uint16))
    with pytest.raises(ValueError, match="needs an EncodedInt2"):
        codec.decode_int2_lut(codec.encode_ternary(q.astype(np.int8) % 2), lut)


@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_int2_round_trip(backend, group):
    rng = np.random.default_rng(group)
    c = rng.choice(np.arange(4, dtype=np.uint8), size=(19, 333), p=[0.1, 0.76, 0.09, 0.05])
    enc = codec.encode_int2(c, group=group, segment_symbols=50)
    out = codec.decode_int2(enc)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, c)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 41),
    p0=st.floats(0.0, 1.0),
    seg=st.integers(1, 40),
    group=st.integers(1, 5),
    seed=st.integers(0, 2**31),
)
def test_ternary_round_trip_property(rows, cols, p0, seg, group, seed):
    c = ternary(np.random.default_rng(seed), (rows, cols), p0)
    enc = codec.encode_ternary(c, segment_symbols=seg, group=group)
    np.testing.assert_array_equal(codec.decode_ternary(enc), c)
    # the numpy coder writes the same bytes and decodes the same
    sym = to_symbols(c, "ternary", group)
    s2, w2 = rans.encode_segments(sym, enc.table.freqs, enc.table.prob_bits, seg)
    np.testing.assert_array_equal(s2, enc.stream)
    np.testing.assert_array_equal(w2, enc.seg_words)
    starts = enc.segment_starts()
    got = rans.decode_segments(
        enc.stream, starts, 0, enc.num_segments, sym.size, enc.table.freqs, 14, seg
    )
    np.testing.assert_array_equal(got, sym)


@pytest.mark.parametrize(
    "c",
    [
        np.zeros((1, 1), np.int8),
        np.ones((1, 1), np.int8),
        -np.ones((1, 1), np.int8),
        np.zeros((5, 1), np.int8),
        np.zeros((300, 7), np.int8),
        np.tile(np.array([1, -1], np.int8), (3, 501)),  # alternating, max-entropy pairs
        np.eye(97, dtype=np.int8)[:, :89],  # mostly zero with a diagonal
        np.concatenate([np.zeros((4, 13), np.int8), np.ones((4, 13), np.int8)]),  # zero rows
        np.full((1, 4099), -1, np.int8),  # single row, width prime-ish
    ],
    ids=["zero1", "one1", "neg1", "col", "allzero", "alt", "eye", "blocks", "row"],
)
def test_adversarial_patterns(backend, c):
    for seg in (1, 3, 4096):
        enc = codec.encode_ternary(c, segment_symbols=seg)
        np.testing.assert_array_equal(codec.decode_ternary(enc), c)


def test_decode_rows_matches_full_decode(backend):
    c = ternary(np.random.default_rng(5), (53, 77), 0.88)
    enc = codec.encode_ternary(c, segment_symbols=64)
    for a, b in [(0, 1), (3, 9), (52, 53), (0, 53), (17, 18)]:
        np.testing.assert_array_equal(codec.decode_rows(enc, a, b), c[a:b])
    with pytest.raises(ValueError, match="row range"):
        codec.decode_rows(enc, 5, 5)
    with pytest.raises(ValueError, match="row range"):
        codec.decode_rows(enc, 0, 54)


@pytest.mark.parametrize("p0", [0.8, 0.857, 0.885, 0.95])
def test_size_within_5_percent_of_entropy(p0):
    c = ternary(np.random.default_rng(7), (768, 3072), p0)
    enc = codec.encode_ternary(c)
    assert enc.bits_per_weight <= 1.05 * entropy(p0)
    if p0 == 0.885:
        assert enc.bits_per_weight <= 0.667


def test_worst_case_uniform_is_bounded():
    c = ternary(np.random.default_rng(8), (512, 1000), 1 / 3)
    enc = codec.encode_ternary(c)
    assert enc.bits_per_weight < 1.7
    u = np.random.default_rng(9).integers(0, 4, (512, 1000), dtype=np.uint8)
    assert codec.encode_int2(u).bits_per_weight < 2.05


def test_all_zero_costs_only_states():
    enc = codec.encode_ternary(np.zeros((2080, 6144), np.int8))
    assert np.all(enc.seg_words == 2)  # nothing but the final state per segment
    assert enc.bits_per_weight < 0.01


def test_nbytes_counts_every_array():
    c = ternary(np.random.default_rng(1), (40, 50), 0.9)
    enc = codec.encode_ternary(c)
    assert enc.nbytes == sum(v.nbytes for v in enc.to_tensors().values())
    table = codec.build_table(codec.symbol_counts(c))
    shared = codec.encode_ternary(c, table=table)
    assert "freqs" not in shared.to_tensors()
    assert shared.nbytes == enc.nbytes - enc.table.nbytes + (
        shared.stream.nbytes - enc.stream.nbytes
    )


# ---- pinned bytes: an accidental format change must fail these --------------------------------


def test_exact_bytes_small_ternary():
    c = np.array([[0, 0, -1, 0, 1, 0, 0], [-1, 0, 1, 0, 0, -1, 0], [1, 0, 0, -1, 0, 1, 0]], np.int8)
    enc = codec.encode_ternary(c, segment_symbols=2)
    t = enc.to_tensors()
    assert t["stream"].dtype == np.uint16 and t["seg_words"].dtype == np.uint16
    assert t["stream"].tolist() == [1, 42601, 1, 42601, 4, 52425]
    assert t["seg_words"].tolist() == [2, 2, 2]
    f = t["freqs"]
    assert f.shape == (243,) and np.flatnonzero(f).tolist() == [0, 99]
    assert f[[0, 99]].tolist() == [3277, 13107]
    assert enc.metadata() == {
        "format": "qmoe-rans",
        "version": "1",
        "kind": "ternary",
        "group": "5",
        "prob_bits": "14",
        "table_hash": "30b8a3416e5d086a666f82c45dff4b8293949ec34c958f67b8c5ffc0ad38e112",
        "shape": "3,7",
        "segment_symbols": "2",
        "table": "embedded",
    }


def test_exact_bytes_int2_and_digest():
    c2 = (np.arange(18).reshape(2, 9) * 5 % 4).astype(np.uint8)
    e2 = codec.encode_int2(c2, segment_symbols=3)
    assert e2.stream.tolist() == [2, 6558, 6, 3278]
    assert e2.metadata()["table_hash"].startswith("8e500a6479ddd457")
    big = codec.encode_ternary(lcg_ternary(64, 100, 0.88), segment_symbols=256)
    assert digest(big) == PINNED_DIGEST


PINNED_DIGEST = "3f92a83af4b14976b0ce9a301b7fcae4a0bb76eff0749acfe5b471b077b59b70"


# ---- serialization and tables -------------------------------------------------------------------


def test_serialization_round_trip_embedded_and_shared():
    rng = np.random.default_rng(3)
    mats = [ternary(rng, (30, 41), 0.87) for _ in range(3)]
    counts = sum(codec.symbol_counts(m) for m in mats)
    table = codec.build_table(counts)
    ttab = codec.Table.from_tensors(table.to_tensors("t."), table.metadata("t."), "t.")
    assert ttab.hash == table.hash
    for m in mats:
        for tab in (None, table):
            enc = codec.encode_ternary(m, table=tab)
            tensors = {k: v.copy() for k, v in enc.to_tensors("e.").items()}
            back = codec.EncodedTernary.from_tensors(tensors, enc.metadata("e."), ttab, "e.")
            np.testing.assert_array_equal(codec.decode_ternary(back), m)


def test_safetensors_file_round_trip(tmp_path):
    from safetensors.numpy import load_file, save_file

    c = ternary(np.random.default_rng(4), (100, 203), 0.9)
    enc = codec.encode_ternary(c)
    save_file(enc.to_tensors(), tmp_path / "x.safetensors", metadata=enc.metadata())
    from safetensors import safe_open

    with safe_open(tmp_path / "x.safetensors", "np") as f:
        md = f.metadata()
    back = codec.EncodedTernary.from_tensors(load_file(tmp_path / "x.safetensors"), md)
    np.testing.assert_array_equal(codec.decode_ternary(back), c)


def test_table_hash_mismatch_is_refused():
    rng = np.random.default_rng(6)
    a, b = ternary(rng, (20, 30), 0.9), ternary(rng, (20, 30), 0.6)
    ta = codec.build_table(codec.symbol_counts(a))
    tb = codec.build_table(codec.symbol_counts(b))
    enc = codec.encode_ternary(a, table=ta)
    with pytest.raises(ValueError, match="hash mismatch"):
        codec.EncodedTernary.from_tensors(enc.to_tensors(), enc.metadata(), tb)
    with pytest.raises(KeyError, match="shared table"):
        codec.EncodedTernary.from_tensors(enc.to_tensors(), enc.metadata())
    # an embedded table whose content was altered no longer matches its hash
    emb = codec.encode_ternary(a)
    t = emb.to_tensors()
    f = t["freqs"].copy()
    i, j = np.flatnonzero(f)[:2]
    f[i] += 1
    f[j] -= 1
    t["freqs"] = f
    with pytest.raises(ValueError, match="hash mismatch"):
        codec.EncodedTernary.from_tensors(t, emb.metadata())


def test_unknown_version_and_kind_refused():
    enc = codec.encode_ternary(np.zeros((2, 2), np.int8))
    md = enc.metadata()
    with pytest.raises(ValueError, match="version '2' is unknown"):
        codec.EncodedTernary.from_tensors(enc.to_tensors(), {**md, "version": "2"})
    with pytest.raises(ValueError, match="not 'qmoe-rans'"):
        codec.EncodedTernary.from_tensors(enc.to_tensors(), {**md, "format": "other"})
    with pytest.raises(ValueError, match="int2 decoder"):
        codec.EncodedTernary.from_tensors(enc.to_tensors(), {**md, "kind": "int2"})
    with pytest.raises(KeyError, match="stream"):
        codec.EncodedTernary.from_tensors(
            {"seg_words": enc.seg_words, "freqs": enc.table.freqs}, md
        )


def test_shared_table_must_cover_symbols():
    a = np.zeros((10, 10), np.int8)
    tight = codec.build_table(codec.symbol_counts(a), cover_all=False)
    with pytest.raises(ValueError, match="cannot encode symbols"):
        codec.encode_ternary(np.ones((10, 10), np.int8), table=tight)
    cover = codec.build_table(codec.symbol_counts(a), cover_all=True)
    ones = np.ones((10, 10), np.int8)
    np.testing.assert_array_equal(
        codec.decode_ternary(codec.encode_ternary(ones, table=cover)), ones
    )


def test_build_table_quantization_is_near_optimal():
    rng = np.random.default_rng(11)
    c = ternary(rng, (256, 1024), 0.95)
    counts = codec.symbol_counts(c)
    t = codec.build_table(counts, cover_all=False)
    p = counts / counts.sum()
    ideal = -(p[p > 0] * np.log2(p[p > 0])).sum() / t.group
    assert t.bits_per_weight(counts) <= ideal * 1.005
    assert int(t.freqs.sum()) == 1 << t.prob_bits


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.array([[2]], np.int8), "must lie in"),
        (np.array([[-2, 0]], np.int8), "must lie in"),
        (np.zeros((2, 2), np.float32), "integer"),
        (np.zeros(4, np.int8), "2-D"),
        (np.zeros((0, 3), np.int8), "empty"),
        ([[0, 1]], "numpy array"),
    ],
)
def test_bad_codes_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        codec.encode_ternary(bad)


def test_bad_int2_and_params_rejected():
    with pytest.raises(ValueError, match="must lie in 0..3"):
        codec.encode_int2(np.array([[4]], np.uint8))
    with pytest.raises(ValueError, match="group"):
        codec.encode_ternary(np.zeros((2, 2), np.int8), group=6)
    with pytest.raises(ValueError, match="prob_bits"):
        codec.encode_ternary(np.zeros((2, 2), np.int8), prob_bits=16)
    with pytest.raises(ValueError, match="segment_symbols"):
        codec.encode_ternary(np.zeros((2, 2), np.int8), segment_symbols=0)
    with pytest.raises(ValueError, match="EncodedTernary"):
        codec.decode_ternary(codec.encode_int2(np.zeros((2, 2), np.uint8)))


def _corrupt(enc, **arrays):
    t = {**enc.to_tensors(), **arrays}
    return type(enc).from_tensors(t, enc.metadata())


def test_truncated_and_corrupted_streams_raise(backend):
    c = ternary(np.random.default_rng(12), (64, 300), 0.88)
    enc = codec.encode_ternary(c, segment_symbols=500)
    with pytest.raises(ValueError, match="sum to"):
        _corrupt(enc, stream=enc.stream[:-1])
    w = enc.seg_words.copy()
    w[0] += 5
    with pytest.raises(ValueError, match="sum to"):  # offsets pointing past the stream
        _corrupt(enc, seg_words=w)
    w = enc.seg_words.copy()
    w[0] += 3
    w[1] -= 3
    with pytest.raises(ValueError, match="corrupted stream"):
        codec.decode_ternary(_corrupt(enc, seg_words=w))
    w = enc.seg_words.copy()
    w[2] = 1
    with pytest.raises(ValueError, match="shorter than"):
        _corrupt(enc, seg_words=w)
    with pytest.raises(ValueError, match="segments stored"):
        _corrupt(enc, seg_words=enc.seg_words[:-1])
    detected = 0
    for k in range(0, enc.stream.size, max(1, enc.stream.size // 40)):
        s = enc.stream.copy()
        s[k] ^= 0x1234
        try:
            out = codec.decode_ternary(_corrupt(enc, stream=s))
        except ValueError:
            detected += 1
        else:
            assert out.shape == c.shape  # undetected flips still never read out of bounds
    assert detected >= 35


# ---- pack_bits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    c = rng.integers(0, 1 << bits, (13, 29), dtype=np.uint8)
    p = codec.pack_bits(c, bits)
    assert p.nbytes == -(-13 * 29 * bits // 8)
    back = codec.PackedCodes.from_tensors(p.to_tensors("w."), p.metadata("w."), "w.")
    np.testing.assert_array_equal(codec.unpack_bits(back), c)


def test_pack_bits_exact_bytes_and_errors():
    p = codec.pack_bits(np.array([[1, 2, 3, 4, 5]], np.uint8), 3)
    # bits LSB-first: 001 010 011 100 101 -> 0b11010001, 0b01011000 -> 0xD1, 0x58
    assert p.data.tolist() == [0xD1, 0x58]
    with pytest.raises(ValueError, match="0..7"):
        codec.pack_bits(np.array([[8]], np.uint8), 3)
    with pytest.raises(ValueError, match="bits"):
        codec.pack_bits(np.array([[1]], np.uint8), 9)
    with pytest.raises(ValueError, match="truncated"):
        codec.PackedCodes.from_tensors({"packed": p.data[:1]}, p.metadata())


@pytest.mark.parametrize("kind,dtype", [("ternary", np.int8), ("ternary", np.int32),
                                         ("ternary", np.int64), ("int2", np.uint8),
                                         ("int2", np.int8), ("int2", np.int64)])
def test_compiled_symbols_equal_numpy(monkeypatch, kind, dtype):
    """The compiled grouping (encode's first pass) gives the numpy one's symbols for every
    group, integer dtype and padded tail."""
    assert _fast.AVAILABLE, "numba (a dependency of qmoe-ray) does not import"
    rng = np.random.default_rng(5)
    values = np.array([-1, 0, 1] if kind == "ternary" else [0, 1, 2, 3])
    for group in (1, 2, 3, 4, 5) if kind == "ternary" else (1, 2, 3, 4):
        for shape in ((1, 1), (7, 13), (33, 101)):
            c = rng.choice(values, size=shape).astype(dtype)
            monkeypatch.setenv("QMOE_CODEC_BACKEND", "numpy")
            want = to_symbols(c, kind, group)
            monkeypatch.delenv("QMOE_CODEC_BACKEND")
            got = to_symbols(c, kind, group)
            assert got.dtype == np.uint8 and np.array_equal(got, want), (group, shape)
