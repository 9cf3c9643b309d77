"""Lazy reading of Hugging Face-layout safetensors checkpoints from any fsspec URL.

Why this design: a trillion-parameter source is thousands of GB in shards of a few GB each, and a
compression worker needs a few tensors of one layer at a time. Downloading a shard to read one
tensor would move the whole model through every worker. The safetensors format makes this
unnecessary: a shard is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw data. So ``open_checkpoint`` reads only ``config.json``,
the index and the shard *headers* (two concurrent range reads per shard), validates them, and
``read`` / ``read_many`` fetch each tensor with one range read (adjacent tensors of a shard are
coalesced into one read). Only JSON and raw little-endian tensor bytes are parsed: no pickles.

Problems are found at open time, before any long work: a missing shard, a tensor listed in the
index but absent from its shard, a header whose offsets fall outside the file or disagree with the
shape and dtype.

Quantized sources are decoded under the reader (``qmoe_ray.storage.quantized``): an FP8
checkpoint (float8 weights plus a ``weight_scale_inv`` per block: DeepSeek-V3, Kimi-K2, the
``-FP8`` releases) or a compressed-tensors int4 one (Kimi-K2-Thinking) is presented as its
dequantized model, every weight under its plain name, ``config`` without the quantization block.
What the reader does not decode is refused at open time, naming the key or the tensor: another
``quant_method``, or a tensor whose dtype is not plain floating point and not part of a declared
encoding (raw float8 values without their scales, GPTQ/AWQ ``qweight`` integers, MXFP4 blocks
would otherwise be read as silently wrong weights). ``DTYPES`` stays the parser's full table
(``qmoe_ray.storage.safetensors``, the one safetensors parser), since the compressed-checkpoint
reader parses our own shards (uint8/int16/int32 codes and tables) with ``parse_header`` too.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import torch

from qmoe_ray.errors import MissingTensorError
from qmoe_ray.storage import quantized as qz
from qmoe_ray.storage.fs import fs_errors, join, read_small, redact, safe_join, url_to_fs
from qmoe_ray.storage.quantized import QUANT_KEYS, SOURCE_DTYPES  # noqa: F401  (re-exported)
from qmoe_ray.storage.safetensors import DTYPES, TensorInfo, header_length, parse_header  # noqa: F401

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HEADER_PROBE = 64 * 2**10  # first read of a shard: length + (usually) the whole header
COALESCE_GAP = 1 * 2**20  # merge ranges of one shard closer than this into one read

CONFIG_MAX_BYTES = 16 * 2**20  # a config.json is a few KB; a bigger one is not read


def _to_tensor(buf: bytes | memoryview, info: TensorInfo) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    t = torch.frombuffer(bytearray(buf), dtype=info.dtype)
    return t.reshape(info.shape)


def _rows(i: TensorInfo, start: int, stop: int) -> TensorInfo:
    """Rows ``start:stop`` along dim 0 of the stored tensor ``i``."""
    row = (i.end - i.start) // i.shape[0] if i.shape[0] else 0
    return TensorInfo(i.file, i.dtype, (stop - start, *i.shape[1:]), i.start + start * row,
                      i.start + stop * row)


class Checkpoint:
    """A lazily read safetensors checkpoint (a ``WeightSource`` of ``qmoe_ray.models.base``).

    Build with ``open_checkpoint``. Headers are read once at open time; tensor data is read on
    demand with range reads and not cached (callers decide what to keep). A quantized source is
    seen through its decoded view: ``names``, ``shape``, ``dtype`` and the reads are those of the
    logical weights (``qmoe_ray.storage.quantized``), ``config`` has no quantization block
    (``raw_config`` is the file's), ``stored`` lists the tensors as stored.

    Raises (at construction):
        CheckpointError: a quantization scheme or a tensor the reader does not decode.
    """

    def __init__(
        self,
        url: str,
        fs: Any,
        root: str,
        config: dict[str, Any],
        tensors: dict[str, TensorInfo],
        storage_options: dict[str, Any] | None = None,
    ):
        self.url = url
        self.fs = fs
        self.root = root
        self.raw_config = config
        self._scheme = qz.source_scheme(config, redact(join(url, CONFIG)))
        self.config = qz.model_config(config)
        self._stored = tensors
        self._tensors, self._decoded = qz.source_view(tensors, self._scheme)
        self._opts = storage_options or {}

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """All (logical) tensor names, sorted."""
        return sorted([*self._tensors, *self._decoded])

    @property
    def stored(self) -> dict[str, TensorInfo]:
        """The tensors as stored (a quantized source's encodings included), by name."""
        return dict(self._stored)

    @property
    def source_precision(self) -> str:
        """The stored precision in words, e.g. ``"bf16"`` or ``"fp8-block128 (e4m3, float32
        scales)"``."""
        return qz.precision(self._stored, self._scheme)

    @property
    def files(self) -> list[str]:
        """The shard files (relative names), sorted."""
        return sorted({i.file for i in self._stored.values()})

    def info(self, name: str) -> TensorInfo:
        """Location, dtype and shape of ``name``; for a decoded weight: the file and byte range of
        its main stored part, the decoded dtype and the logical shape.

        Raises:
            KeyError: no such tensor (the message names the checkpoint).
        """
        if name in self._decoded:
            d = self._decoded[name]
            main = self._stored[next(iter(d.parts.values()))]  # weight / packed / blocks
            return TensorInfo(main.file, d.dtype, tuple(d.shape), main.start, main.end)
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensorError(
                f"tensor {name!r} is not in checkpoint {redact(self.url)!r} "
                f"({len(self)} tensors); check the name and model_type"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name``."""
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Stored torch dtype of ``name``."""
        return self.info(name).dtype

    def __contains__(self, name: object) -> bool:
        return name in self._tensors or name in self._decoded

    def __len__(self) -> int:
        return len(self._tensors) + len(self._decoded)

    def __repr__(self) -> str:
        n, f = len(self), len(self.files)
        return f"Checkpoint({redact(self.url)!r}, {n} tensors, {f} files)"

    # -- data -------------------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """``name`` in its stored dtype, read with one range read.

        Raises:
            KeyError: no such tensor.
            FileNotFoundError / PermissionError: the shard cannot be read (message has the fix).
        """
        return self.read_many([name])[name]

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` along dim 0 of ``name`` (e.g. some experts of a fused 3-D expert
        tensor), read with one range read of just those rows (for a decoded weight of 3 or more
        dimensions, those rows of each stored part; of 2, the whole weight, then the rows).

        Raises:
            KeyError: no such tensor. ValueError: the tensor is 0-d or the rows are out of range.
        """
        i = self.info(name)
        if not i.shape or not 0 <= start <= stop <= i.shape[0]:
            raise ValueError(
                f"rows {start}:{stop} of tensor {name!r} with shape {list(i.shape)} "
                "are out of range"
            )
        d = self._decoded.get(name)
        if d is None:
            return self._read_infos({name: _rows(i, start, stop)})[name]
        if len(d.shape) < 3:
            return self.read(name)[start:stop]
        infos = {p: (self._stored[p] if role == "shape" else _rows(self._stored[p], start, stop))
                 for role, p in d.parts.items()}
        got = self._read_infos(infos)
        return qz.decode(d, {role: got[p] for role, p in d.parts.items()}, self._scheme)

    def __call__(self, name: str) -> torch.Tensor:
        """``name`` as float32 (the ``WeightSource`` protocol)."""
        return self.read(name).to(torch.float32)

    def read_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors in their stored (or decoded) dtypes, with the range reads of each
        shard coalesced.

        Ranges of one shard that lie within ``COALESCE_GAP`` bytes of each other become one read;
        all reads are issued together through ``fs.cat_ranges`` (concurrent on object stores). A
        decoded weight is read as its stored parts, then decoded.

        Returns:
            ``name -> tensor`` for every requested name.

        Raises:
            KeyError: a name is not in the checkpoint (raised before any read).
        """
        names = list(dict.fromkeys(names))
        infos: dict[str, TensorInfo] = {}
        for n in names:
            d = self._decoded.get(n)
            if d is None:
                infos[n] = self.info(n)
            else:
                infos.update((p, self._stored[p]) for p in d.parts.values())
        got = self._read_infos(infos)
        return {n: got[n] if n not in self._decoded else qz.decode(
                    self._decoded[n], {r: got[p] for r, p in self._decoded[n].parts.items()},
                    self._scheme) for n in names}

    def _read_infos(self, infos: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
        groups: list[tuple[str, int, int, list[str]]] = []
        for file in sorted({i.file for i in infos.values()}):
            members = sorted(
                (n for n, i in infos.items() if i.file == file), key=lambda n: infos[n].start
            )
            for n in members:
                i = infos[n]
                if groups and groups[-1][0] == file and i.start - groups[-1][2] <= COALESCE_GAP:
                    f, s, e, ns = groups[-1]
                    groups[-1] = (f, s, max(e, i.end), ns + [n])
                else:
                    groups.append((file, i.start, i.end, [n]))
        if not groups:
            return {}
        paths = [safe_join(self.root, g[0]) for g in groups]
        with fs_errors(join(self.url, groups[0][0]), "read", self._opts):
            blobs = self.fs.cat_ranges(
                paths, [g[1] for g in groups], [g[2] for g in groups], on_error="raise"
            )
        out: dict[str, torch.Tensor] = {}
        for (file, s, e, members), blob in zip(groups, blobs, strict=True):
            if isinstance(blob, Exception):
                with fs_errors(join(self.url, file), "read", self._opts):
                    raise blob
            if len(blob) != e - s:
                raise FileNotFoundError(
                    f"{redact(join(self.url, file))}: short read ({len(blob)} of {e - s} bytes); "
                    "the shard is truncated or changed after opening: re-open or re-upload it"
                )
            view = memoryview(blob)
            for n in members:
                i = infos[n]
                out[n] = _to_tensor(view[i.start - s : i.end - s], i)
        return {n: out[n] for n in infos}

    # -- sibling files ----------------------------------------------------------------------------
    def has_file(self, relname: str) -> bool:
        """Whether ``relname`` (e.g. ``tokenizer.json``) exists next to the weights."""
        path = safe_join(self.root, relname)
        with fs_errors(join(self.url, relname), "check", self._opts):
            return bool(self.fs.exists(path))

    def open_file(self, relname: str, mode: str = "rb") -> IO[Any]:
        """Open a sibling file such as ``tokenizer.json`` for reading.

        Raises:
            ValueError: ``relname`` is not a safe relative name, or ``mode`` is not a read mode.
            FileNotFoundError / PermissionError: it cannot be opened.
        """
        if mode not in ("rb", "r"):
            raise ValueError(
                f"open_file mode {mode!r}: checkpoints are opened read-only ('rb'/'r')"
            )
        path = safe_join(self.root, relname)
        with fs_errors(join(self.url, relname), "open", self._opts):
            return self.fs.open(path, mode)


def _read_json(fs: Any, path: str, url: str, opts: dict[str, Any], limit: int | None = None) -> Any:
    if limit is None:
        with fs_errors(url, "read", opts):
            raw = fs.cat_file(path)
    else:  # at most limit + 1 bytes are read: a bigger file is refused without reading it all
        raw = read_small(fs, path, limit, redact(url), url=url, storage_options=opts,
                         what="a config.json may have", sized=False)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"{redact(url)}: not valid JSON ({why}); re-save it") from None


def _read_headers(
    fs: Any, root: str, url: str, files: Sequence[str], opts: dict[str, Any], workers: int = 16
) -> dict[str, dict[str, TensorInfo]]:
    def one(file: str) -> dict[str, TensorInfo]:
        path = safe_join(root, file)
        furl = join(url, file)
        with fs_errors(furl, "read", opts):
            size = fs.info(path)["size"]
            # one speculative read usually covers the whole header (a few KiB per 100 tensors)
            head = fs.cat_file(path, start=0, end=min(size, HEADER_PROBE)) if size >= 8 else b""
        n = header_length(head, size, redact(furl), "re-download or re-save it")
        raw = head[8 : 8 + n]
        if len(raw) < n:
            with fs_errors(furl, "read", opts):
                raw += fs.cat_file(path, start=8 + len(raw), end=8 + n)
        return parse_header(raw, file, size, SOURCE_DTYPES)

    if len(files) == 1:
        return {files[0]: one(files[0])}
    with ThreadPoolExecutor(max_workers=min(workers, len(files))) as pool:
        return dict(zip(files, pool.map(one, files), strict=True))


def open_checkpoint(url: str, **storage_options: Any) -> Checkpoint:
    """Open a Hugging Face-layout checkpoint folder for lazy tensor reads.

    Reads ``config.json``, then ``model.safetensors.index.json`` (sharded) or ``model.safetensors``
    (single file), and every shard's header. No tensor data is read. A quantization scheme or a
    tensor the reader does not decode is refused here, before any work
    (``qmoe_ray.storage.quantized``).

    Args:
        url: local folder, ``file://``, ``s3://bucket/prefix`` or any fsspec URL.
        **storage_options: filesystem options (``endpoint_url``, ``key``, ``secret``, ``anon``...).

    Returns:
        A ``Checkpoint``.

    Raises:
        FileNotFoundError: ``config.json``, the weights or a shard listed in the index is missing,
            or the store cannot be reached.
        PermissionError: access denied (message says which credentials to check).
        KeyError: a tensor listed in the index is absent from its shard.
        ValueError: malformed JSON, index or safetensors header.
        CheckpointError (a ``ValueError``): ``config.json`` declares a quantization the reader
            does not decode, a quantized weight is incomplete or inconsistent, or a tensor's
            dtype is neither one of ``SOURCE_DTYPES`` nor part of a declared encoding (the
            message names the key or the tensor); a config.json over ``CONFIG_MAX_BYTES``.
    """
    fs, root = url_to_fs(url, **storage_options)
    root = root.rstrip("/") or root
    opts = dict(storage_options)
    cfg_url = join(url, CONFIG)
    config = _read_json(
        fs, posixpath.join(root, CONFIG) if root else CONFIG, cfg_url, opts, CONFIG_MAX_BYTES
    )
    if not isinstance(config, dict):
        raise ValueError(f"{redact(cfg_url)}: expected a JSON object; re-save config.json")
    qz.source_scheme(config, redact(cfg_url))  # refused before the shards are touched
    index_path = safe_join(root, INDEX)
    with fs_errors(join(url, INDEX), "check", opts):
        sharded = fs.exists(index_path)
        single = (not sharded) and fs.exists(safe_join(root, SINGLE))
    weight_map: dict[str, str] | None = None
    if sharded:
        index = _read_json(fs, index_path, join(url, INDEX), opts)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(
                f"{redact(join(url, INDEX))}: no 'weight_map' of name -> file; "
                "re-save the checkpoint with save_pretrained"
            )
        files = sorted(set(weight_map.values()))
        for f in files:
            safe_join(root, f)  # validate every name before touching the store
    elif single:
        files = [SINGLE]
    else:
        raise FileNotFoundError(
            f"{redact(url)}: neither {INDEX} nor {SINGLE} found next to config.json; only "
            "safetensors checkpoints are read (convert .bin/.pt files with save_pretrained("
            "safe_serialization=True))"
        )
    headers = _read_headers(fs, root, url, files, opts)
    tensors: dict[str, TensorInfo] = {}
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in headers[f]:
                raise MissingTensorError(
                    f"tensor {name!r} is listed in {INDEX} under {f!r} but {f!r} does "
                    f"not contain it; the index and the shards disagree: re-save or "
                    "re-upload the checkpoint"
                )
            tensors[name] = headers[f][name]
    else:
        tensors = headers[SINGLE]
    return Checkpoint(url, fs, root, config, tensors, opts)  # refuses what is not decoded


@dataclass(frozen=True)
class SourceIndex:
    """What ``open_checkpoint`` reads before any tensor data: ``config.json`` and the parsed
    tensor index (every shard's header). Picklable, holds no credentials.

    The compression driver opens the source once, takes its index (``source_index``) and hands it
    to every actor, which then opens the source with ``open_from_index``: no actor re-reads the
    config, the index or a shard header (with W workers and S stores, a source of F shards would
    otherwise cost (W + S + 1) x 2F requests per start, again after every restart).
    """

    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def to_json(self) -> bytes:
        """The index as JSON (``from_json`` reads it back equal)."""
        tensors = {n: [i.file, str(i.dtype).removeprefix("torch."), list(i.shape), i.start, i.end]
                   for n, i in self.tensors.items()}
        return json.dumps({"config": self.config, "tensors": tensors}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SourceIndex:
        """The index ``to_json`` wrote."""
        doc = json.loads(raw)
        return cls(doc["config"], {
            n: TensorInfo(f, getattr(torch, dt), tuple(shape), start, end)
            for n, (f, dt, shape, start, end) in doc["tensors"].items()})


def source_index(ckpt: Checkpoint) -> SourceIndex:
    """The index of an opened checkpoint, for ``open_from_index``."""
    return SourceIndex(ckpt.raw_config, ckpt.stored)


def open_from_index(url: str, index: SourceIndex, **storage_options: Any) -> Checkpoint:
    """Open ``url`` for lazy tensor reads from an index already read (``source_index``).

    Makes no request: the config, the index and the shard headers are taken from ``index``, which
    ``open_checkpoint`` validated when it read them. Tensor reads are those of ``open_checkpoint``.
    """
    fs, root = url_to_fs(url, **storage_options)
    root = root.rstrip("/") or root
    return Checkpoint(url, fs, root, dict(index.config), dict(index.tensors),
                      dict(storage_options))


def open_source(url: str, storage_options: Any = None, index: SourceIndex | None = None
                ) -> Checkpoint:
    """``open_from_index`` when an index is given, else ``open_checkpoint``."""
    opts = dict(storage_options or {})
    return open_checkpoint(url, **opts) if index is None else open_from_index(url, index, **opts)
