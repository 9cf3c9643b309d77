"""JSON as a checkpoint writes and reads it: deterministic compact bytes (``dumps``) and the
parse of untrusted bytes with a nesting limit (``parse_json``; the depth is measured on the bytes,
``json_depth``, several times faster than a walk of the parsed object on a large manifest).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import numpy as np

from qmoe_ray.errors import CheckpointError

MAX_DEPTH = 32  # JSON nesting (a manifest nests 5 deep, configs a few levels more)


def dumps(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no NaN), compact: a c2048-sized manifest is tens of
    MB, and indentation made it a fifth larger and slower to read (``qmoe-ray inspect`` is the
    human view)."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                       default=_json_default) + "\n").encode()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def check_depth(value: Any, where: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a parsed JSON value nested deeper than ``max_depth`` (iteratively: no recursion of
    our own). ``parse_json`` measures the bytes instead (``json_depth``: several times faster on
    a large manifest); this is for values built in memory.

    Raises:
        CheckpointError: too deep.
    """
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > max_depth:
            _too_deep(where, max_depth)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values() if isinstance(x, (dict, list)))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))


def _too_deep(where: str, max_depth: int) -> NoReturn:
    raise CheckpointError(f"{where}: JSON nested more than {max_depth} levels deep; refused (a "
                          "qmoe-ray manifest nests 5 levels)")


_DEPTH_CHUNK = 1 << 23  # bytes per numpy pass: bounded memory whatever the manifest's size


def json_depth(raw: bytes) -> int:
    """The deepest nesting of containers in ``raw``, valid UTF-8 JSON (already parsed: so every
    backslash starts an escape and every unescaped quote delimits a string): 1 for ``{}``.

    Escaped backslashes, then escaped quotes, are removed (left to right, as a parser reads
    them); the remaining quotes open and close strings, and the brackets outside strings are
    counted, a few MB at a time.
    """
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b"\\\"", b"")
    a = np.frombuffer(raw, np.uint8)
    depth, quotes, deepest = 0, 0, 0
    for i in range(0, len(a), _DEPTH_CHUNK):
        c = a[i:i + _DEPTH_CHUNK]
        q = np.flatnonzero(c == 34)  # '"'
        opens = np.flatnonzero((c == 123) | (c == 91))  # '{' '['
        closes = np.flatnonzero((c == 125) | (c == 93))  # '}' ']'
        at = np.concatenate([opens, closes])
        step = np.concatenate([np.ones(len(opens), np.int64), -np.ones(len(closes), np.int64)])
        order = np.argsort(at, kind="stable")
        at, step = at[order], step[order]
        outside = (np.searchsorted(q, at) + quotes) % 2 == 0  # an even number of quotes before
        d = np.cumsum(step[outside]) + depth
        if len(d):
            deepest, depth = max(deepest, int(d.max())), int(d[-1])
        quotes += len(q)
    return deepest


def parse_json(raw: bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON bytes (a manifest, a config.json) with a nesting limit.

    Raises:
        CheckpointError: not UTF-8 JSON, or nested too deeply (the message never quotes the
            bytes).
    """
    if json.detect_encoding(raw) != "utf-8":  # UTF-16/32 or a byte-order mark: not ours
        raise CheckpointError(f"{where}: not UTF-8 text, so not JSON")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply to parse; refused") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: not UTF-8 text, so not JSON") from None
    except ValueError as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    if json_depth(raw) > max_depth:
        _too_deep(where, max_depth)
    return value
