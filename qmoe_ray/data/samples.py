"""Calibration and evaluation samples for a model family: ``load_samples``.

Why this shape: the compressor (calibration) and the evaluator (held-out loss) both need a batch of
model inputs as plain numpy arrays that Ray can ship, built deterministically from a seed, and
checked *before* any long work (bad ids or too-short data fail here, naming the file and the fix).

Splits: a source is cut into a calibration part and a held-out part so the same file can serve
both without overlap: documents (jsonl lines, 2-D rows) are split by position, the last
``heldout_fraction`` of them held out; a single document (``.txt``, a 1-D array) is split by token
position. ``split="all"`` uses everything (what ``qmoe-ray eval --data FILE`` does). The embedded
tiny model ships its two sets as separate files, so there ``calib``/``heldout`` pick the file.

Decoder-only models get plain causal windows (documents joined with EOS, cut into ``seq_len``
windows); Switch models get T5 span corruption (QMoE section 5.1; see ``corruption.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from qmoe_ray.data.corruption import SpanCorruption, choose_windows, corrupt_batch
from qmoe_ray.data.sources import TokenData, load_tokenizer, read_tokens
from qmoe_ray.errors import MissingTensorError

SPLITS = ("calib", "heldout", "all")
EMBEDDED = "embedded"
NUM_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>
T5_PADDED_VOCAB, T5_TOKENIZER_SIZE = 32128, 32100  # released T5/Switch: 28 unused padding rows


EMBEDDED_SWITCH = "embedded-switch"


def embedded_model_path() -> Path:
    """The folder of the embedded tiny MoE (HF layout plus ``calib.npy`` / ``heldout.npy``)."""
    return Path(str(resources.files("qmoe_ray") / "assets" / "tiny_moe"))


def embedded_switch_path() -> Path:
    """The folder of the embedded tiny SwitchTransformers (HF layout plus ``tokens.npy``: raw
    windows whose last 10% come from held-out files; ``jobs/train_tiny_switch.py``)."""
    return Path(str(resources.files("qmoe_ray") / "assets" / "tiny_switch"))


def resolve_source(source: str) -> str:
    """``"embedded"`` / ``"embedded-switch"`` -> the packaged tiny models' folders; anything else
    unchanged."""
    if source == EMBEDDED:
        return str(embedded_model_path())
    if source == EMBEDDED_SWITCH:
        return str(embedded_switch_path())
    return source


def resolve_data(data: str, source: str) -> str:
    """``data="embedded"`` with ``source="embedded-switch"`` -> that model's own token windows
    (the default data set belongs to the default Mixtral); anything else unchanged."""
    if data == EMBEDDED and source == EMBEDDED_SWITCH:
        return str(embedded_switch_path() / "tokens.npy")
    return data


def text_view(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config of the language model: a multimodal wrapper's ``text_config`` (Qwen3.5-MoE:
    vocabulary and special ids live there) over its top level; any other config unchanged."""
    text = config.get("text_config")
    if "vocab_size" in config or not isinstance(text, Mapping):
        return config
    return {**config, **text}


def is_encoder_decoder(config: Mapping[str, Any]) -> bool:
    """Whether the family takes encoder and decoder inputs (Switch / T5)."""
    return bool(config.get("is_encoder_decoder")) or config.get("model_type") == (
        "switch_transformers")


def _first_id(value: Any, default: int | None) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else default
    return default if value is None else int(value)


def sentinel_ids(config: Mapping[str, Any], tokenizer: Any = None,
                 count: int = NUM_SENTINELS) -> list[int]:
    """Ids of ``<extra_id_0..count-1>``: looked up in the tokenizer when it has them, else
    ``vocab_size - 1 - k`` (T5's layout when the vocabulary is not padded).

    Released T5/Switch checkpoints pad ``vocab_size`` to 32128 past the 32100-token tokenizer;
    for them the fallback is ``32099 - k`` (the same rule as ``qmoe_ray.models.switch``).
    """
    vocab = int(config["vocab_size"])
    if tokenizer is not None:
        found = [tokenizer.token_to_id(f"<extra_id_{k}>") for k in range(count)]
        if all(i is not None for i in found):
            return [int(i) for i in found]
    top = T5_TOKENIZER_SIZE if vocab == T5_PADDED_VOCAB else vocab
    return [top - 1 - k for k in range(count)]


def special_token_ids(config: Mapping[str, Any]) -> list[int]:
    """The pad / BOS / EOS / decoder-start ids named in ``config`` (those present)."""
    ids = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        v = config.get(key)
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None:
                ids.add(int(i))
    return sorted(ids)


def hessian_token_mask(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    excluded_ids: Sequence[int],
) -> np.ndarray:
    """``bool`` mask of the tokens allowed into Hessians: real (unpadded) and not special.

    QMoE masks sentinel and special tokens out of the Hessians (section 5.1; base128 ternary
    2.16 -> 1.99 with masking). Pass ``special_token_ids(config)`` plus, for Switch encoders,
    ``sentinel_ids(config, tokenizer)``.

    Args:
        input_ids: ``[B, S]`` token ids.
        attention_mask: ``[B, S]`` 1 for real tokens, or ``None``.
        excluded_ids: ids never allowed into Hessians.

    Returns:
        ``bool [B, S]``.
    """
    mask = ~np.isin(input_ids, np.asarray(list(excluded_ids), dtype=np.int64))
    if attention_mask is not None:
        mask &= attention_mask.astype(bool)
    return mask


def _check_ids(data: TokenData, vocab: int) -> None:
    hi, lo = data.max_id(), data.min_id()
    if hi >= vocab or lo < 0:
        bad = hi if hi >= vocab else lo
        raise ValueError(
            f"{data.origin}: token id {bad} is outside the model's vocabulary [0, {vocab}); the "
            f"ids were made with another tokenizer: give the text (.jsonl/.txt) so it is "
            f"tokenized with this checkpoint's tokenizer.json, or re-tokenize")


def _split(data: TokenData, split: str, fraction: float) -> TokenData:
    if split == "all":
        return data
    if data.rows is not None:
        n = len(data.rows)
        if n < 2:
            raise ValueError(f"{data.origin}: one sample cannot be split into calib/heldout; "
                             f"use split='all' or give more samples")
        k = min(n - 1, max(1, round(n * fraction)))
        rows = data.rows[: n - k] if split == "calib" else data.rows[n - k :]
        return TokenData(data.origin, rows=rows)
    docs = data.docs
    if len(docs) >= 2:
        k = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
        part = docs[: len(docs) - k] if split == "calib" else docs[len(docs) - k :]
        return TokenData(data.origin, docs=tuple(part))
    (doc,) = docs
    cut = len(doc) - max(1, round(len(doc) * fraction))
    return TokenData(data.origin, docs=(doc[:cut] if split == "calib" else doc[cut:],))


def _read(spec: str, split: str, tokenizer: Any, storage_options) -> tuple[TokenData, str]:
    """The data and the split still to apply (embedded sets are already split)."""
    if spec != EMBEDDED:
        return read_tokens(spec, tokenizer, storage_options), split
    root = embedded_model_path()
    names = {"calib": ["calib.npy"], "heldout": ["heldout.npy"],
             "all": ["calib.npy", "heldout.npy"]}[split]
    parts = [read_tokens(str(root / n)) for n in names]
    rows = np.concatenate([p.rows for p in parts])
    return TokenData(f"embedded {'+'.join(names)}", rows=rows), "all"


def _pick_rows(data: TokenData, num: int | None, rng: np.random.Generator,
               fewer_ok: bool = False) -> np.ndarray:
    rows = data.rows
    if num is None:
        return rows
    if fewer_ok:
        num = min(num, len(rows))
    if num > len(rows):
        raise ValueError(f"{data.origin}: {num} samples asked, the split holds {len(rows)}; "
                         f"ask for at most {len(rows)} samples or give more data")
    return rows[np.sort(rng.choice(len(rows), size=num, replace=False))]


def _stream(data: TokenData, eos: int | None) -> np.ndarray:
    sep = [np.asarray([eos], np.int64)] if eos is not None else []
    parts = []
    for d in data.docs:
        parts.append(d)
        parts.extend(sep)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _segments(data: TokenData, num: int | None, length: int | None, eos: int | None,
              rng: np.random.Generator, what: str, fewer_ok: bool = False) -> np.ndarray:
    """``[N, length]`` raw segments: whole rows (cropped) or windows of the joined documents."""
    if data.rows is not None:
        have = data.rows.shape[1]
        if length is not None and length > have:
            raise ValueError(f"{data.origin}: samples are {have} tokens long, {what} needs "
                             f"{length}; pass a shorter sequence length (--seq-len) or longer "
                             f"samples")
        return _pick_rows(data, num, rng, fewer_ok)[:, : length or have]
    if length is None:
        raise ValueError(f"{data.origin}: documents have no fixed length; pass seq_len "
                         f"(--seq-len)")
    stream = _stream(data, eos)
    if fewer_ok and num is not None:
        num = max(1, min(num, len(stream) // length))
    try:
        return choose_windows(stream, num, length, rng)
    except ValueError as e:
        raise ValueError(f"{data.origin}: too little data for {what}: {e}; ask for fewer or "
                         f"shorter samples, or give more text") from None


def load_samples(
    spec: str,
    family_config: Mapping[str, Any],
    num_samples: int | None,
    seq_len: int | None,
    seed: int = 0,
    split: str = "calib",
    tokenizer_source: Any = None,
    *,
    heldout_fraction: float = 0.1,
    corruption: SpanCorruption | None = None,
    storage_options: dict[str, Any] | None = None,
    fewer_ok: bool = False,
) -> dict[str, np.ndarray]:
    """Model inputs for calibration or evaluation.

    Args:
        spec: ``"embedded"`` or a path/URL of ``.npy`` / ``.safetensors`` token ids (``[samples,
            length]`` rows, or a 1-D stream) or ``.jsonl`` (field ``"text"``) / ``.txt`` text.
        family_config: the checkpoint's ``config.json`` (vocab size, special ids, model type).
        num_samples: how many samples (``None``: all that the split holds).
        seq_len: tokens per sample (encoder input length for Switch); ``None``: the rows' length.
        seed: seeds the choice of windows and the corruption spans.
        split: ``"calib"``, ``"heldout"`` or ``"all"`` (see module doc).
        tokenizer_source: for text: the checkpoint (``open_file``), its folder/URL or
            ``tokenizer.json``; for Switch it also supplies the ``<extra_id_k>`` ids.
        heldout_fraction: share of documents held out.
        corruption: span-corruption settings (Switch only; default 0.15 / 3).
        storage_options: fsspec options for ``spec`` and the tokenizer.
        fewer_ok: return all the split holds when it holds fewer than ``num_samples`` (the
            caller sees how many from the arrays' length) instead of raising.

    Returns:
        ``int64`` arrays: decoder-only ``input_ids``, ``attention_mask`` ``[N, S]``; Switch also
        ``decoder_input_ids``, ``decoder_attention_mask``, ``labels`` (-100 on padding).

    Raises:
        ValueError: bad split/sizes, ids outside the vocabulary, too little or too short data.
        FileNotFoundError: the data or the tokenizer is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (or None for all), got {num_samples}")
    if seq_len is not None and seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (or None), got {seq_len}")
    family_config = text_view(family_config)
    if "vocab_size" not in family_config:
        raise MissingTensorError("family_config has no vocab_size; pass the checkpoint's config.json")
    vocab = int(family_config["vocab_size"])
    corruption = corruption or SpanCorruption()
    tokenizer = None
    is_text = spec.lower().endswith((".jsonl", ".txt"))
    if tokenizer_source is not None and is_text:
        tokenizer = load_tokenizer(tokenizer_source, storage_options)
    elif tokenizer_source is not None and is_encoder_decoder(family_config):
        try:  # only for the <extra_id_k> ids; without it the vocab_size rule applies
            tokenizer = load_tokenizer(tokenizer_source, storage_options)
        except FileNotFoundError:
            tokenizer = None
    data, split = _read(spec, split, tokenizer, storage_options)
    _check_ids(data, vocab)
    data = _split(data, split, heldout_fraction)
    rng = np.random.default_rng(seed)
    eos = _first_id(family_config.get("eos_token_id"), None)
    if not is_encoder_decoder(family_config):
        ids = _segments(data, num_samples, seq_len, eos, rng, f"seq_len {seq_len}", fewer_ok)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if seq_len is None and data.rows is not None:
        seq_len = corruption.lengths(data.rows.shape[1])[0]
    raw = corruption.raw_length(seq_len) if seq_len is not None else None
    segs = _segments(data, num_samples, raw, eos, rng,
                     f"span corruption to {seq_len} input tokens ({raw} raw tokens)", fewer_ok)
    pad = _first_id(family_config.get("pad_token_id"), 0)
    start = _first_id(family_config.get("decoder_start_token_id"), pad)
    return corrupt_batch(segs, rng, sentinel_ids(family_config, tokenizer),
                         eos if eos is not None else 1, pad, start, corruption)
