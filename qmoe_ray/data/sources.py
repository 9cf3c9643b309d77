"""Reading token ids from where users keep them: ``.npy``, ``.safetensors``, ``.jsonl``, ``.txt``.

Why one reader for all: the compressor and the evaluator take "some data" as one URL, and every
format ends up the same way, as a list of token-id documents (a 1-D array each) or as ready-made
samples (one 2-D array). Everything goes through fsspec so ``s3://`` and ``gs://`` work like local
paths, and only safe formats are read (``np.load(allow_pickle=False)``, safetensors, text).
Text is tokenized with the checkpoint's own ``tokenizer.json`` through the ``tokenizers`` package.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from qmoe_ray.errors import InputError

TOKEN_SUFFIXES = (".npy", ".safetensors")
TEXT_SUFFIXES = (".jsonl", ".txt")


@dataclass(frozen=True)
class TokenData:
    """Token ids read from one source.

    Attributes:
        origin: the file it came from (for error messages).
        rows: ``int64 [samples, length]`` when the source holds ready-made samples, else ``None``.
        docs: the documents as ``int64`` 1-D arrays when the source is a stream or text.
    """

    origin: str
    rows: np.ndarray | None = None
    docs: tuple[np.ndarray, ...] = ()

    def max_id(self) -> int:
        """The largest token id (-1 when empty)."""
        parts = [self.rows] if self.rows is not None else list(self.docs)
        return max((int(p.max()) for p in parts if p.size), default=-1)

    def min_id(self) -> int:
        """The smallest token id (0 when empty)."""
        parts = [self.rows] if self.rows is not None else list(self.docs)
        return min((int(p.min()) for p in parts if p.size), default=0)


def _as_ids(arr: np.ndarray, origin: str) -> np.ndarray:
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{origin}: token ids must be integers, found dtype {arr.dtype}; "
                         f"save them with an integer dtype (e.g. np.int32)")
    return arr.astype(np.int64, copy=False)


def _token_array(arr: np.ndarray, origin: str) -> TokenData:
    arr = _as_ids(np.asarray(arr), origin)
    if arr.ndim == 2:
        return TokenData(origin, rows=arr)
    if arr.ndim == 1:
        return TokenData(origin, docs=(arr,))
    raise ValueError(f"{origin}: token ids must be 1-D (a stream) or 2-D [samples, length], "
                     f"found shape {tuple(arr.shape)}")


def _read_bytes(url: str, storage_options: dict[str, Any] | None) -> bytes:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"data file {url!r} does not exist; pass an existing path or URL")
    return fs.cat_file(path)


def load_tokenizer(source: Any, storage_options: dict[str, Any] | None = None):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` path/URL, a checkpoint folder/URL, an
    object with ``open_file(relname)`` (a ``Checkpoint``) or a ready ``Tokenizer``.

    Raises:
        FileNotFoundError: no ``tokenizer.json`` where pointed.
    """
    from tokenizers import Tokenizer

    if isinstance(source, Tokenizer):
        return source
    if hasattr(source, "open_file"):
        if hasattr(source, "has_file") and not source.has_file("tokenizer.json"):
            raise FileNotFoundError("the checkpoint has no tokenizer.json; pass token ids "
                                    "(.npy/.safetensors) or a tokenizer.json path")
        with source.open_file("tokenizer.json") as f:
            data = f.read()
        return Tokenizer.from_str(data.decode() if isinstance(data, bytes) else data)
    url = str(source)
    if not url.endswith(".json"):
        url = url.rstrip("/") + "/tokenizer.json"
    try:
        text = _read_bytes(url, storage_options).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer at {url!r}; text data needs the checkpoint's "
                                f"tokenizer.json (pass tokenizer_source= / --tokenizer, or give "
                                f"token ids as .npy)") from None
    return Tokenizer.from_str(text)


def _texts(url: str, raw: bytes) -> list[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # never tokenize replacement characters silently
        raise InputError(f"{url}: not UTF-8 text (invalid byte at offset {e.start}); convert it "
                         "to UTF-8 (e.g. iconv -f latin1 -t utf-8) or give token ids "
                         "(.npy/.safetensors)") from None
    if url.lower().endswith(".txt"):
        return [text]
    texts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{url} line {n}: not JSON ({e.msg}); write one JSON object per "
                             f"line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ValueError(f"{url} line {n}: each line needs a string field \"text\"")
        texts.append(rec["text"])
    return texts


def read_tokens(
    url: str,
    tokenizer: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> TokenData:
    """Token ids from one file.

    Args:
        url: path or fsspec URL ending in ``.npy``, ``.safetensors``, ``.jsonl`` or ``.txt``.
        tokenizer: for text only: anything ``load_tokenizer`` accepts.
        storage_options: passed to fsspec.

    Returns:
        ``TokenData``: rows for 2-D arrays; documents for 1-D arrays and text (one per jsonl line,
        one for a ``.txt``).

    Raises:
        FileNotFoundError: the file (or, for text, the tokenizer) does not exist.
        ValueError: an unknown suffix, non-integer ids, a bad shape or bad JSON lines.
        KeyError: a safetensors file with several tensors and none named ``input_ids``.
    """
    lower = url.lower()
    if not lower.endswith(TOKEN_SUFFIXES + TEXT_SUFFIXES):
        raise ValueError(f"data {url!r}: unknown format; use .npy or .safetensors (token ids) or "
                         f".jsonl/.txt (text), or 'embedded'")
    if lower.endswith(TEXT_SUFFIXES) and tokenizer is None:
        raise ValueError(f"data {url!r} is text and needs a tokenizer: pass tokenizer_source "
                         f"(the checkpoint or its tokenizer.json)")
    raw = _read_bytes(url, storage_options)
    if lower.endswith(".npy"):
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{url}: not a plain .npy array ({e}); save with np.save of an "
                             f"integer array") from None
        return _token_array(arr, url)
    if lower.endswith(".safetensors"):
        from safetensors.numpy import load

        tensors = load(raw)
        if "input_ids" in tensors:
            return _token_array(tensors["input_ids"], url)
        if len(tensors) == 1:
            return _token_array(next(iter(tensors.values())), url)
        raise InputError(f"{url}: holds tensors {sorted(tensors)}; name the token ids 'input_ids'")
    tok = load_tokenizer(tokenizer, storage_options)
    texts = _texts(url, raw)
    encs = tok.encode_batch(texts, add_special_tokens=False)
    return TokenData(url, docs=tuple(np.asarray(e.ids, dtype=np.int64) for e in encs))
