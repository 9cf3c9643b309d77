"""The columnar layout of a manifest's two large collections (format version 3).

A manifest's ``tensors`` and ``quantized`` map a name to an entry, an object whose keys repeat
in every entry: for a c2048-sized checkpoint (122,880 expert matrices, about 600,000 stored
tensors) that is 190 MB of JSON, most of it keys and values repeated (``"dtype":"uint16"``, one
``codec`` object per matrix that its whole group of experts shares). Parsing it took longer than
checking it, and the parsed objects most of the reader's memory (``qmoe_ray.bench.scale``).

Version 3 stores each of the two as columns (measured on 32,768 matrices: the JSON 2.8x smaller,
``json.loads`` 4x faster)::

    "tensors": {"names": ["a.weight", "b.weight", ...],
                "columns": {"dtype": {"pool": ["bfloat16", "uint16"], "index": [0, 1, ...]},
                            "sha256": ["41a5...", "9f0c...", ...], ...}}

- ``names``: the entries' names, in order, each once;
- ``columns``: key -> the values of that key, one per name, either a list or a *pool*: the
  distinct values once (``pool``) and, per name, the position of its value (``index``);
- ``null`` in a column means the entry has no such key (a reader treats both alike).

``expand`` turns them back into the objects of versions 1 and 2, so that every check of
``qmoe_ray.format.manifest`` and every reader runs on one shape of manifest whatever the version:
this module checks only the layout (types, lengths, unique names, indices inside their pool) and
raises ``CheckpointError`` naming the key, like the schema. Pooled values are shared between
entries: readers never modify a manifest they read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NoReturn

from qmoe_ray.errors import CheckpointError, shorten
from qmoe_ray.format.jsonio import dumps

COLUMNS_VERSION = 3  # the first format version with this layout
COLUMNAR = ("tensors", "quantized")  # the collections version 3 stores as columns
MAX_KEY = 64  # characters of a column's key (an entry's keys are short words)


def _pool_key(value: Any) -> Any:
    """A hashable stand-in for a JSON value (equal values, equal keys)."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return (type(value).__name__, value)  # 1, 1.0 and True stay distinct


def encode(collection: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The columnar form of ``collection`` (name -> entry object): a column is pooled when its
    distinct values are at most half its length."""
    names = list(collection)
    keys = sorted({k for e in collection.values() for k in e})
    columns: dict[str, Any] = {}
    for key in keys:
        values = [collection[n].get(key) for n in names]
        where: dict[Any, int] = {}
        index = [where.setdefault(_pool_key(v), len(where)) for v in values]
        if 2 * len(where) <= len(values):
            pool: list[Any] = [None] * len(where)
            for v, i in zip(values, index, strict=True):
                pool[i] = v
            columns[key] = {"pool": pool, "index": index}
        else:
            columns[key] = values
    return {"names": names, "columns": columns}


def _fail(where: str, msg: str) -> NoReturn:
    raise CheckpointError(f"{where}: {msg}; the checkpoint is damaged or was not written by "
                          "qmoe-ray: copy it again or re-run the compression job")


def _column(value: Any, n: int, where: str, what: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != n:
            _fail(where, f"{what} has {len(value)} values for {n} names")
        return value
    if not (isinstance(value, dict) and set(value) == {"pool", "index"}):
        _fail(where, f"{what} is {type(value).__name__}, expected a list or an object with "
                     "'pool' and 'index'")
    pool, index = value["pool"], value["index"]
    if not isinstance(pool, list) or not isinstance(index, list):
        _fail(where, f"{what} pool and index must be lists")
    if len(index) != n:
        _fail(where, f"{what} has {len(index)} indices for {n} names")
    if index and not (set(map(type, index)) == {int} and 0 <= min(index)
                      and max(index) < len(pool)):
        _fail(where, f"{what} index holds a value that is not a position in its pool of "
                     f"{len(pool)}")
    return [pool[i] for i in index]


def expand(value: Any, where: str, what: str) -> dict[str, dict[str, Any]]:
    """The objects (name -> entry) of a columnar collection ``what``, its layout checked.

    Raises:
        CheckpointError: not an object of ``names`` and ``columns``; a name that is not a
            string or repeats; a column key too long; a column of another length than the
            names; a pool index that is not an integer inside its pool.
    """
    if not (isinstance(value, dict) and set(value) == {"names", "columns"}):
        _fail(where, f"{what!r} is {type(value).__name__}{_keys(value)}: format version 3 "
                     "stores it as an object with 'names' and 'columns'")
    names, columns = value["names"], value["columns"]
    if not isinstance(names, list) or not set(map(type, names)) <= {str}:
        _fail(where, f"{what}.names is not a list of strings")
    if not isinstance(columns, dict):
        _fail(where, f"{what}.columns is {type(columns).__name__}, expected an object")
    n = len(names)
    cols = []
    for key, col in columns.items():
        if len(key) > MAX_KEY:
            _fail(where, f"{what}.columns key {shorten(key, 40)} is longer than {MAX_KEY}")
        cols.append(_column(col, n, where, f"{what}.columns[{shorten(key, 40)}]"))
    keys = list(columns)
    out = ({name: dict(zip(keys, row, strict=True))
            for name, row in zip(names, zip(*cols, strict=True), strict=True)}
           if cols else {name: {} for name in names})
    if len(out) != n:
        _fail(where, f"{what}.names repeats a name")
    return out


def _keys(value: Any) -> str:
    return f" with keys {shorten(sorted(value), 60)}" if isinstance(value, dict) else ""


def to_stored(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as version 3 stores it: ``COLUMNAR`` collections encoded, the rest as is."""
    return {k: encode(v) if k in COLUMNAR else v for k, v in manifest.items()}


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """What ``manifest.json`` holds for ``manifest`` (``manifest.build_manifest``'s): its
    columns (``to_stored``) as ``jsonio.dumps`` writes JSON; a manifest of an older version in
    the layout of that version."""
    if manifest.get("format_version", COLUMNS_VERSION) < COLUMNS_VERSION:
        return dumps(manifest)
    return dumps(to_stored(manifest))


def from_stored(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """A version-3 manifest (an object, version checked) with its ``COLUMNAR`` collections
    expanded (``expand``); a missing one stays missing for the schema to name.

    Raises:
        CheckpointError: a layout problem (``expand``).
    """
    return {k: expand(v, where, k) if k in COLUMNAR else v for k, v in manifest.items()}
