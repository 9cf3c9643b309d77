"""qmoe_ray.data: token sources, splits, causal windows, T5 span corruption, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from qmoe_ray.data import (
    SpanCorruption,
    corrupt_batch,
    hessian_token_mask,
    load_samples,
    read_tokens,
    sentinel_ids,
    span_corrupt,
    special_token_ids,
)

DECODER = {"model_type": "mixtral", "vocab_size": 64, "eos_token_id": 2, "bos_token_id": 1}
SWITCH = {"model_type": "switch_transformers", "vocab_size": 200, "eos_token_id": 1,
          "pad_token_id": 0, "decoder_start_token_id": 0}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A small word-level tokenizer.json with T5-style sentinels."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i}" for i in range(40)]
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{k}>" for k in range(100)]
    tok.train_from_iterator([" ".join(words)] * 3,
                            trainers.WordLevelTrainer(special_tokens=specials))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_npy_rows_crop_and_subset(tmp_path):
    ids = np.arange(10 * 12).reshape(10, 12) % 64
    np.save(tmp_path / "ids.npy", ids.astype(np.uint16))
    out = load_samples(str(tmp_path / "ids.npy"), DECODER, 4, 8, seed=1, split="all")
    assert out["input_ids"].shape == (4, 8) and out["input_ids"].dtype == np.int64
    assert (out["attention_mask"] == 1).all()
    # every sample is the start of one of the rows, rows distinct and in file order
    starts = out["input_ids"][:, 0]
    rows = [int(np.flatnonzero(ids[:, 0] == s)[0]) for s in starts]
    assert rows == sorted(set(rows))
    np.testing.assert_array_equal(out["input_ids"], ids[rows, :8])
    again = load_samples(str(tmp_path / "ids.npy"), DECODER, 4, 8, seed=1, split="all")
    np.testing.assert_array_equal(out["input_ids"], again["input_ids"])
    other = load_samples(str(tmp_path / "ids.npy"), DECODER, 4, 8, seed=2, split="all")
    assert not np.array_equal(out["input_ids"], other["input_ids"])


def test_rows_split_disjoint(tmp_path):
    ids = (np.arange(20)[:, None] + np.zeros((1, 6), int)) % 64
    np.save(tmp_path / "ids.npy", ids)
    cal = load_samples(str(tmp_path / "ids.npy"), DECODER, None, None, split="calib")
    held = load_samples(str(tmp_path / "ids.npy"), DECODER, None, None, split="heldout")
    assert len(cal["input_ids"]) == 18 and len(held["input_ids"]) == 2
    assert not set(cal["input_ids"][:, 0]) & set(held["input_ids"][:, 0])


def test_safetensors_stream_windows(tmp_path):
    stream = np.random.default_rng(0).integers(3, 64, size=1000).astype(np.int32)
    save_file({"input_ids": stream}, str(tmp_path / "ids.safetensors"))
    out = load_samples(str(tmp_path / "ids.safetensors"), DECODER, 5, 16, split="all")
    ids = out["input_ids"]
    assert ids.shape == (5, 16)
    aligned = {tuple(stream[i * 16 : (i + 1) * 16]) for i in range(len(stream) // 16)}
    assert all(tuple(row) in aligned for row in ids)  # non-overlapping windows of the stream
    assert len({tuple(r) for r in ids}) == 5


def test_safetensors_needs_input_ids_name(tmp_path):
    save_file({"a": np.zeros(4, np.int32), "b": np.zeros(4, np.int32)},
              str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="input_ids"):
        read_tokens(str(tmp_path / "two.safetensors"))


def test_jsonl_text_tokenized_with_tokenizer(tmp_path, tokenizer_json):
    docs = [{"text": " ".join(f"w{(i * 7 + j) % 40}" for j in range(30))} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    cfg = {**DECODER, "vocab_size": tok.get_vocab_size(), "eos_token_id": 1}
    out = load_samples(str(tmp_path / "d.jsonl"), cfg, 3, 20, split="all",
                       tokenizer_source=str(tokenizer_json))
    words = tok.decode(out["input_ids"][0].tolist(), skip_special_tokens=True).split()
    assert words and all(w.startswith("w") for w in words)
    # held-out = the last document only: every window lies inside doc 9 (+ its EOS)
    held = load_samples(str(tmp_path / "d.jsonl"), cfg, None, 10, split="heldout",
                        tokenizer_source=str(tmp_path / ".." / tokenizer_json.parent.name))
    first = tok.encode(docs[9]["text"]).ids
    assert held["input_ids"][0].tolist() == first[:10]


def test_txt_needs_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="tokenizer"):
        load_samples(str(tmp_path / "a.txt"), DECODER, 1, 4)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_samples(str(tmp_path / "a.txt"), DECODER, 1, 4, tokenizer_source=str(tmp_path))


def test_bad_ids_named_with_fix(tmp_path):
    np.save(tmp_path / "big.npy", np.full((4, 8), 64, np.int32))
    with pytest.raises(ValueError, match=r"big\.npy.*64.*outside.*\[0, 64\).*tokeniz"):
        load_samples(str(tmp_path / "big.npy"), DECODER, 2, 8)
    np.save(tmp_path / "float.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="integer"):
        load_samples(str(tmp_path / "float.npy"), DECODER, 2, 8)


def test_too_short_or_too_few(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((4, 8), np.int32))
    with pytest.raises(ValueError, match=r"s\.npy.*8 tokens long.*16.*--seq-len"):
        load_samples(str(tmp_path / "s.npy"), DECODER, 2, 16, split="all")
    with pytest.raises(ValueError, match=r"s\.npy.*5 samples asked.*4"):
        load_samples(str(tmp_path / "s.npy"), DECODER, 5, 8, split="all")
    np.save(tmp_path / "stream.npy", np.zeros(50, np.int32))
    with pytest.raises(ValueError, match=r"stream\.npy.*too little data"):
        load_samples(str(tmp_path / "stream.npy"), DECODER, 10, 16, split="all")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_samples(str(tmp_path / "missing.npy"), DECODER, 1, 4)
    with pytest.raises(ValueError, match="unknown format"):
        load_samples(str(tmp_path / "x.csv"), DECODER, 1, 4)
    with pytest.raises(ValueError, match="split"):
        load_samples(str(tmp_path / "s.npy"), DECODER, 1, 4, split="train")


def test_span_corruption_structure():
    rng = np.random.default_rng(0)
    tokens = np.arange(10, 110, dtype=np.int64)  # 100 distinct ids
    sentinels = [999 - k for k in range(100)]
    inputs, targets = span_corrupt(tokens, rng, sentinels, eos_id=1)
    noise, spans = SpanCorruption().counts(100)
    assert (noise, spans) == (15, 5)
    assert len(inputs) == 100 - noise + spans + 1 and len(targets) == noise + spans + 1
    assert inputs[-1] == 1 and targets[-1] == 1
    # re-inserting each span after its sentinel gives back the original tokens
    rebuilt, t = [], 0
    tgt = targets[:-1].tolist()
    for tok in inputs[:-1].tolist():
        if tok in sentinels:
            assert tgt[t] == tok
            t += 1
            while t < len(tgt) and tgt[t] not in sentinels:
                rebuilt.append(tgt[t])
                t += 1
        else:
            rebuilt.append(tok)
    assert rebuilt == tokens.tolist()
    assert [x for x in inputs.tolist() if x in sentinels] == sentinels[:spans]


def test_span_corruption_density_statistics():
    rng = np.random.default_rng(1)
    segs = np.tile(np.arange(10, 578), (200, 1))
    out = corrupt_batch(segs, rng, [199 - k for k in range(100)], 1, 0, 0)
    noise, spans = SpanCorruption().counts(568)
    assert abs(noise / 568 - 0.15) < 0.002 and abs(noise / spans - 3.0) < 0.2
    assert out["input_ids"].shape[1] <= 512  # the paper's 568 raw -> <= 512 encoder tokens
    assert SpanCorruption().raw_length(512) >= 568


def test_switch_samples_shapes_and_shift(tmp_path, tokenizer_json):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(3, 90, size=(6, 64)))
    out = load_samples(str(tmp_path / "ids.npy"), SWITCH, 4, 32, split="all", seed=3)
    assert set(out) == {"input_ids", "attention_mask", "decoder_input_ids",
                        "decoder_attention_mask", "labels"}
    assert out["input_ids"].shape[0] == 4 and out["input_ids"].shape[1] <= 32
    lab, dec = out["labels"], out["decoder_input_ids"]
    shifted = np.where(lab[:, :-1] < 0, 0, lab[:, :-1])
    assert (dec[:, 0] == 0).all() and (dec[:, 1:] == shifted).all()
    assert set(np.unique(out["input_ids"])) & {199, 198}  # vocab_size-1-k sentinels
    # with a tokenizer that has <extra_id_k>, its ids are used instead
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    cfg = {**SWITCH, "vocab_size": 200}
    ids = sentinel_ids(cfg, tok, 3)
    assert ids == [tok.token_to_id(f"<extra_id_{k}>") for k in range(3)] and ids[0] != 199
    assert sentinel_ids({"vocab_size": 32128}, None, 2) == [32099, 32098]  # T5's padded vocab
    out2 = load_samples(str(tmp_path / "ids.npy"), cfg, 4, 32, split="all", seed=3,
                        tokenizer_source=str(tokenizer_json))
    assert ids[0] in out2["input_ids"]


def test_hessian_mask_excludes_special_and_pad():
    ids = np.array([[5, 1, 199, 7], [0, 0, 8, 9]])
    att = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    excluded = special_token_ids(SWITCH) + sentinel_ids(SWITCH)
    assert excluded[:2] == [0, 1]
    mask = hessian_token_mask(ids, att, excluded)
    assert mask.tolist() == [[True, False, False, True], [False, False, True, False]]


def test_embedded_sets():
    from qmoe_ray.data import embedded_model_path

    root = embedded_model_path()
    # a missing embedded asset is a packaging bug: fail, never skip
    assert (root / "calib.npy").is_file(), f"embedded calibration set missing under {root}"
    cfg = json.loads((root / "config.json").read_text())
    cal = load_samples("embedded", cfg, 16, 64, split="calib")
    held = load_samples("embedded", cfg, None, None, split="heldout")
    assert cal["input_ids"].shape == (16, 64)
    assert held["input_ids"].shape == np.load(root / "heldout.npy").shape


def test_fsspec_url_memory_filesystem():
    import io

    import fsspec

    buf = io.BytesIO()
    np.save(buf, np.arange(40, dtype=np.int32).reshape(4, 10) % 64)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/qmoe-data/ids.npy", buf.getvalue())
    try:
        out = load_samples("memory://qmoe-data/ids.npy", DECODER, 2, 10, split="all")
        assert out["input_ids"].shape == (2, 10)
    finally:
        fs.rm("/qmoe-data", recursive=True)


def test_text_with_checkpoint_tokenizer_on_embedded(tmp_path):
    """Text is tokenized with the model's own tokenizer.json, read through the checkpoint."""
    from qmoe_ray.data import embedded_model_path
    from qmoe_ray.storage.checkpoint import open_checkpoint

    root = embedded_model_path()
    assert (root / "tokenizer.json").is_file(), f"embedded tokenizer missing under {root}"
    ckpt = open_checkpoint(str(root))
    text = "def add(a, b):\n    return a + b\n" * 40
    (tmp_path / "code.txt").write_text(text)
    out = load_samples(str(tmp_path / "code.txt"), ckpt.config, 2, 32, split="all",
                       tokenizer_source=ckpt)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert tok.decode(out["input_ids"][0].tolist()) in text
