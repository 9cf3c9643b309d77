"""Loading compressed checkpoints: read, verify, decode, and run.

``load(url)`` reads ``manifest.json`` (no manifest: not a checkpoint) and checks everything it
can before reading a shard (``read_manifest`` / ``check_manifest``). A checkpoint comes from a
store, not from a trusted party, and whoever writes its manifest can recompute every checksum, so
checksums prove integrity only, and the manifest is checked as hostile input: its size (against
what the folder's config.json implies) before it is read, its nesting, the type of every field,
every file name (relative, inside the folder), every quantized matrix's codec and the exact shape
of each of its stored tensors, and every declared shape against the model config and the family's
rules. Nothing is allocated or decoded from a shape that has not passed, and every problem is a
``qmoe_ray.errors.CheckpointError`` naming the file, key or tensor. Then it *streams* the shards
in manifest order (each shard's size on the store compared with the manifest's before it is
read): a thread pool fetches byte ranges of the next shards while the current one is verified
and decoded, so decoding overlaps the download. Each shard's safetensors header is parsed by the
project's one safetensors parser (``qmoe_ray.storage.checkpoint.parse_header``: exact sizes,
offsets inside the file; here also no gaps, no extra or missing tensors) and every tensor's SHA-256 is computed over the raw bytes in place, before any byte is
decoded: a flipped byte, a truncated or missing shard is an error, never garbage.

The experts then take one of two forms (``mode``):

- ``"decode"``: decoded once into dense bf16 weights (CuPy kernels on a GPU, the numpy/numba
  decoder on a CPU);
- ``"resident"``: kept encoded (``EncodedWeight``); ``x @ w.T`` decodes on the fly: through the
  fused decode+product kernel on a GPU, by decoding per call on a CPU (nothing cached: the CPU path
  exists to test the GPU one against decode mode).

``EncodedWeight`` honours ``x @ w.T`` (via ``__rmatmul__``), so the families' expert code
(``ExpertSpec.forward``) runs unchanged on dense and encoded experts: no hook in
``qmoe_ray.models.base`` is needed.

The result runs through the project's own block code (``qmoe_ray.models``): logits for token ids
and greedy generation for decoder-only families. ``iter_shards`` is the streaming reader on its
own; ``qmoe_ray.read.export`` uses it to write a plain HF checkpoint one shard at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qmoe_ray import codec
from qmoe_ray.errors import CheckpointError, InputError
from qmoe_ray.format import manifest as mf
from qmoe_ray.format import matrices as layout
from qmoe_ray.format.matrices import CODE_PREFIX
from qmoe_ray.models import LayerSpec, get_family, run_forward
from qmoe_ray.quant import Scheme, dequantize, parse_scheme
from qmoe_ray.storage.checkpoint import MAX_HEADER, parse_header
from qmoe_ray.storage.fs import fs_errors, redact, safe_join, url_to_fs

DEVICES = ("cpu", "cuda")
MODES = ("decode", "resident")
COMPUTE = ("float32", "bf16")  # decode mode's expert products
CHUNK_BYTES = 16 * 2**20  # range-read size: big enough for object stores, small enough to overlap
PREFETCH_SHARDS = 2  # shards being fetched ahead of the one being verified/decoded
FUSED_MAX_TOKENS = 64  # resident mode on GPU: above this, decode transiently and use a GEMM
GPU_INSTALL = ("install the GPU extra: pip install 'qmoe-ray[gpu]' (CuPy for CUDA 12, which CUDA 13 "
               "drivers run too; 'qmoe-ray[gpu-cuda13]' for a CUDA 13 toolkit) on a machine with "
               "an NVIDIA GPU, or load with device='cpu'")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- manifest ----------------------------------------------------------------------------------
def _file_size(fs: Any, path: str, where: str) -> int:
    """The size of a regular file, from the store's metadata (nothing is read).

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a regular file (a folder, a device
            or pipe behind a link), or the store reports no size.
    """
    info = fs.info(path)
    kind = info.get("type")
    if kind not in (None, "file"):
        raise CheckpointError(f"{where} is not a regular file (the store says {str(kind)[:20]!r})")
    size = info.get("size")
    if type(size) is not int or size < 0:
        raise CheckpointError(f"{where}: the store reports no size for it; a checkpoint must be "
                              "on a store that reports file sizes")
    return size


def _read_small(fs: Any, path: str, url: str, where: str, limit: int,
                storage_options: Mapping[str, Any], what: str) -> bytes:
    """At most ``limit`` bytes of ``path``: its size is checked first, then at most
    ``limit + 1`` bytes are read (a file that grew in between is refused too)."""
    with fs_errors(url, "read", storage_options):
        size = _file_size(fs, path, where)
    msg = (f"{where}: more than the {limit:,} bytes {what}; refused without parsing it "
           "(see qmoe_ray.format.manifest for the limits)")
    if size > limit:
        raise CheckpointError(msg.replace("more than", f"{size:,} bytes, more than"))
    with fs_errors(url, "read", storage_options):
        raw = fs.cat_file(path, start=0, end=limit + 1)
    if len(raw) > limit:
        raise CheckpointError(msg)
    return raw


def _family(config: Mapping[str, Any], where: str) -> Any:
    """The family of a config that passed ``manifest.check_config``, its errors as
    ``CheckpointError``."""
    try:
        return get_family(config)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError,
            AttributeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"{where}: config: {msg}") from None


def _implied_tensors(config: Mapping[str, Any], where: str) -> int:
    family = _family(config, where)
    layers = family.layers()
    roles = len(family.expert_spec.roles)
    return mf.implied_tensors(sum(lay.num_experts * roles for lay in layers if lay.moe),
                              len(layers))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def read_manifest(url: str, **storage_options: Any) -> dict[str, Any]:
    """The manifest of the checkpoint at ``url``, fully checked (``check_manifest``).

    Read with a size limit (``qmoe_ray.format.manifest.manifest_size_limit``: proportionate to
    the tensors the folder's ``config.json`` implies, compared with the store's file size before a
    byte is read) and a nesting limit; the folder's ``config.json``, when present, must be the
    manifest's ``config``.

    Raises:
        FileNotFoundError: no ``manifest.json`` (an unfinished or foreign folder), or the store
            cannot be reached.
        PermissionError: access denied / bad credentials.
        CheckpointError: too large, not JSON, another format, a newer format version, or any
            problem ``check_manifest`` finds.
    """
    fs, root = url_to_fs(url, **storage_options)
    base = root.rstrip("/")
    where = f"{redact(url)}/{mf.MANIFEST}"
    cfg_where = f"{redact(url)}/config.json"
    try:
        with fs_errors(url, "read", storage_options):
            fs.info(f"{base}/{mf.MANIFEST}")
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{redact(url)} has no readable {mf.MANIFEST}: not a (finished) qmoe-ray checkpoint "
            f"({exc}). A job that did not finish leaves no manifest: re-run it to complete the "
            "output, or check the URL."
        ) from None
    try:
        raw_cfg = _read_small(fs, f"{base}/config.json", url, cfg_where, mf.CONFIG_MAX_BYTES,
                              storage_options, "a config.json may have")
    except FileNotFoundError:
        config = None
        limit = mf.manifest_size_limit(None)
    else:
        config = mf.parse_json(raw_cfg, cfg_where)
        mf.check_config(config, cfg_where)
        limit = mf.manifest_size_limit(_implied_tensors(config, cfg_where))
    raw = _read_small(fs, f"{base}/{mf.MANIFEST}", url, where, limit, storage_options,
                      "a manifest of the model config.json describes may have" if config
                      else "a manifest may have without a config.json")
    manifest = mf.parse_json(raw, where)
    check_manifest(manifest, where)
    if config is not None and _canonical(config) != _canonical(manifest["config"]):
        raise CheckpointError(f"{where}: its config differs from the folder's config.json; the "
                              "checkpoint is inconsistent: copy it again or re-run the job")
    return manifest


def check_manifest(manifest: Any, where: str = "manifest") -> None:
    """Check a manifest before any shard is read; after it, readers index it without guarding.

    Checks, in order: the schema (``qmoe_ray.format.manifest.check_schema``: the type of every
    field used, every file name relative and inside the folder); every code table and quantized
    matrix against the format (``qmoe_ray.format.matrices.check_matrix``: scheme, codec version,
    and the exact dtype and shape of every stored tensor its shape implies); and every declared
    shape against the model config (``check_against_config``). Nothing is allocated or decoded
    from a declared shape that has not passed these checks.

    Raises:
        CheckpointError: the first problem found, naming the key, tensor or matrix.
    """
    mf.check_schema(manifest, where)
    tensors, tables = manifest["tensors"], manifest.get("tables", {})
    try:
        for tname, meta in tables.items():
            layout.check_table(tname, meta, tensors)
        for name, entry in manifest["quantized"].items():
            layout.check_matrix(name, entry, tensors, tables)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    check_against_config(manifest, where)


def _declared_shapes(family: Any, names: set[str], where: str) -> dict[str, tuple[int, ...]]:
    """The shapes the family says tensors must have: every tensor its forward reads
    (``expected_shapes``)."""
    try:  # the expert layout, from the names (never guessed)
        family.bind(names)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc.args[0] if exc.args else exc}") from None
    return {n: tuple(s) for n, s in family.expected_shapes().items()}


def check_against_config(manifest: Mapping[str, Any], where: str = "manifest") -> None:
    """Check every declared shape against the model config (a manifest that passed the schema).

    - the quantized matrices are exactly the family's routed experts (counted from the config
      before any name is listed), each with the shape the config implies for its role;
    - every other tensor the family declares (``expected_shapes``: attention, norms, routers,
      embeddings, head) is stored with its shape; a tensor the family does not declare has at
      most 4 dimensions and no more elements than the largest declared one.

    Raises:
        CheckpointError: naming the tensor, its declared shape and the shape the config implies.
    """
    config = manifest["config"]
    family = _family(config, where)
    quantized, tensors = manifest["quantized"], manifest["tensors"]
    pieces = {t for n, e in quantized.items() for t in layout.stored_names(n, e)}
    pieces |= {f"{t}.freqs" for t in manifest.get("tables", {})}
    dense = {n: e for n, e in tensors.items() if n not in pieces}
    both = sorted(set(dense) & set(quantized))
    if both:
        raise CheckpointError(f"{where}: {both[0]!r} is both a stored tensor and a quantized "
                              "matrix")
    moe = [lay for lay in family.layers() if lay.moe]
    roles = family.expert_spec.roles
    expected = sum(lay.num_experts for lay in moe) * len(roles)
    model = f"the {family.model_type} config"
    if expected != len(quantized):
        def names():
            for lay in moe:
                for e in range(lay.num_experts):
                    yield from ((lay, e, r, n) for r, n in family.expert_names(lay, e).items())

        detail = ""
        if expected > len(quantized):  # the first missing one is among the first len + 1
            lay, e, r, n = next(x for x in names() if x[3] not in quantized)
            detail = f": expert {e} of {lay.name} ({r}, {n!r}) is missing"
        else:
            extra = sorted(set(quantized) - {x[3] for x in names()})
            detail = f": {extra[0]!r} is no expert of it"
        raise CheckpointError(f"{where}: {model} implies {expected} expert matrices, the "
                              f"manifest has {len(quantized)}{detail}; the manifest does not "
                              "match its config")
    shapes = _declared_shapes(family, set(dense) | set(quantized), where)
    hint = ("; the manifest does not match its config (a checkpoint declares only the shapes "
            "its config implies)")
    for name, entry in quantized.items():
        want = shapes.get(name)
        if want is None:
            raise CheckpointError(f"{where}: quantized matrix {name!r} is no expert of {model}"
                                  f"{hint}")
        if tuple(entry["shape"]) != want:
            raise CheckpointError(f"{where}: quantized matrix {name!r} is declared "
                                  f"{list(entry['shape'])}, {model} implies {list(want)}{hint}")
    for name, want in shapes.items():
        if name in quantized:
            continue
        if name not in dense:
            raise CheckpointError(f"{where}: tensor {name!r}, which {model} implies, is not in "
                                  "the manifest; the checkpoint is incomplete")
        if tuple(dense[name]["shape"]) != want:
            raise CheckpointError(f"{where}: tensor {name!r} is declared "
                                  f"{list(dense[name]['shape'])}, {model} implies "
                                  f"{list(want)}{hint}")
    d = config.get("hidden_size") or config.get("d_model") or 0
    bound = max([math.prod(s) for s in shapes.values()] + [(config.get("vocab_size") or 0) * d])
    for name, e in dense.items():
        if name not in shapes and (len(e["shape"]) > 4 or math.prod(e["shape"]) > bound):
            raise CheckpointError(f"{where}: tensor {name!r} is declared {list(e['shape'])}, "
                                  f"larger than any tensor of {model} ({bound:,} elements)"
                                  f"{hint}")


# -- streaming reader --------------------------------------------------------------------------
@dataclass
class Timings:
    """Seconds spent in each step of a load (thread-seconds for ``read``, which overlaps).

    Attributes:
        read: fetching bytes (summed over reader threads; overlaps verify/decode).
        wait: time the consumer waited for bytes (the part of ``read`` not hidden).
        verify: parsing headers and hashing.
        decode: decoding experts (or preparing them for resident use).
        wall: the whole load.
        bytes: bytes read.
    """

    read: float = 0.0
    wait: float = 0.0
    verify: float = 0.0
    decode: float = 0.0
    wall: float = 0.0
    bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        """The timings as a plain dict."""
        return {"read": self.read, "wait": self.wait, "verify": self.verify,
                "decode": self.decode, "wall": self.wall, "bytes": float(self.bytes)}


def parse_safetensors(buf: bytes | bytearray | memoryview, where: str
                      ) -> dict[str, tuple[str, list[int], int, int]]:
    """Parse and check a safetensors file held in ``buf`` (the header through
    ``qmoe_ray.storage.checkpoint.parse_header``, the one safetensors parser of the project),
    and check that the tensors tile the data exactly.

    Returns:
        ``name -> (torch dtype name, shape, start, end)`` with absolute byte offsets into ``buf``.

    Raises:
        CheckpointError: truncated file, a bad header, unknown dtype, offsets out of bounds,
            overlapping or leaving gaps, or a size that disagrees with dtype and shape. Messages
            never quote the file's bytes.
    """
    fix = "the shard is truncated or corrupted: copy it again or re-run the compression job"
    n = len(buf)
    if n < 8:
        raise CheckpointError(f"{where}: {n} bytes, too short for a safetensors file; {fix}")
    (hlen,) = struct.unpack("<Q", bytes(buf[:8]))
    if hlen > n - 8 or hlen > MAX_HEADER:  # the value is the file's bytes: never shown
        raise CheckpointError(f"{where}: its first 8 bytes declare a safetensors header longer "
                              f"than the file ({n} bytes) or than {MAX_HEADER} bytes; not a "
                              f"safetensors file, or {fix}")
    try:
        infos = parse_header(bytes(buf[8 : 8 + hlen]), where, n)
    except ValueError as exc:
        raise CheckpointError(f"{exc}; {fix}") from None
    base = 8 + hlen
    out = {name: (str(i.dtype).removeprefix("torch."), list(i.shape), i.start, i.end)
           for name, i in infos.items()}
    pos = base
    for start, end in sorted((i.start, i.end) for i in infos.values()):
        if start != pos:
            raise CheckpointError(f"{where}: tensor data is not contiguous at byte {pos}; {fix}")
        pos = end
    if pos != n:
        raise CheckpointError(f"{where}: {n - pos} trailing bytes after the last tensor; {fix}")
    return out


def _as_tensor(buf: bytearray, dtype: str, shape: list[int], start: int, end: int) -> torch.Tensor:
    dt = getattr(torch, dtype)
    if end == start:
        return torch.empty(shape, dtype=dt)
    size = torch.empty((), dtype=dt).element_size()
    if start % size:  # unaligned: copy rather than hand out a misaligned view
        return torch.frombuffer(bytearray(buf[start:end]), dtype=dt).reshape(shape)
    return torch.frombuffer(buf, dtype=dt, count=(end - start) // size, offset=start).reshape(shape)


def verify_shard(buf: bytearray, rel: str, expected: Mapping[str, Mapping[str, Any]]
                 ) -> dict[str, torch.Tensor]:
    """Parse one shard and verify each tensor's dtype, shape and SHA-256 against the manifest.

    Args:
        buf: the shard's bytes (the returned tensors share this memory).
        rel: the shard's name in the manifest (for messages).
        expected: the manifest entries of the tensors this shard must hold (exactly those).

    Returns:
        The shard's tensors, by name.

    Raises:
        CheckpointError: a parse error, a missing or unlisted tensor, a dtype/shape/checksum
            mismatch.
    """
    header = parse_safetensors(buf, rel)
    missing = sorted(set(expected) - set(header))
    if missing:
        raise CheckpointError(f"{rel}: {len(missing)} tensors listed in the manifest are not in "
                              f"the shard (first: {_short(missing[0])}); the checkpoint is "
                              "corrupted: re-run the job")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise CheckpointError(f"{rel}: the shard holds {len(extra)} tensors the manifest does "
                              f"not list (first: {_short(extra[0])}); the checkpoint is "
                              "corrupted: re-run the job")
    view = memoryview(buf)
    out = {}
    for name, entry in expected.items():
        dtype, shape, start, end = header[name]
        if dtype != entry["dtype"] or shape != list(entry["shape"]):
            raise CheckpointError(f"{rel}: tensor {name!r} is stored as {dtype}{_short(shape)}, "
                                  f"the manifest says {entry['dtype']}{list(entry['shape'])}; "
                                  "the checkpoint is corrupted")
        got = hashlib.sha256(view[start:end]).hexdigest()
        if got != entry["sha256"]:
            raise CheckpointError(f"{rel}: tensor {name!r} fails its checksum (sha256 "
                                  f"{got[:12]}..., manifest {entry['sha256'][:12]}...): the "
                                  "checkpoint is corrupted; copy it again or re-run the job")
        out[name] = _as_tensor(buf, dtype, shape, start, end)
    return out


def _header_budget(entries: Mapping[str, Any]) -> int:
    """The most header bytes a shard of these tensors can need: per tensor its name (escaped,
    up to 6 bytes a character) and 160 bytes of dtype, shape and offsets, plus 4 KiB."""
    return min(MAX_HEADER, 4096 + sum(6 * len(n) + 160 for n in entries))


def iter_shards(
    url: str,
    manifest: Mapping[str, Any],
    workers: int = 4,
    prefetch: int = PREFETCH_SHARDS,
    chunk_bytes: int = CHUNK_BYTES,
    timings: Timings | None = None,
    progress: bool | str = False,
    checked: bool = False,
    **storage_options: Any,
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Stream the verified shards of a checkpoint in manifest order.

    Byte ranges of up to ``prefetch`` shards ahead are fetched by ``workers`` threads while the
    caller works on the current one. Each shard's size on the store is compared with what the
    manifest says it holds (its tensors' bytes plus a bounded header) before a byte of it is
    read or its buffer allocated.

    Args:
        url: the checkpoint folder (any fsspec URL).
        manifest: its manifest (see ``read_manifest``; checked here with ``check_manifest``).
        workers: concurrent range reads.
        prefetch: shards fetched ahead of the one being consumed (>= 1).
        chunk_bytes: size of one range read.
        timings: accumulates read/wait/verify seconds and bytes when given.
        progress: a progress bar over the tensor bytes on stderr (a string: its label).
        checked: the manifest already passed ``check_manifest`` (``read_manifest`` returns such
            manifests); else it is checked here.
        **storage_options: fsspec options.

    Yields:
        ``(file name, {tensor name: tensor})`` per shard, every tensor verified.

    Raises:
        FileNotFoundError: a shard is missing or the store unreachable.
        PermissionError: access denied.
        CheckpointError: a bad manifest, a shard of the wrong size, a corrupted, truncated or
            inconsistent shard (see ``verify_shard``).
    """
    if not checked:
        check_manifest(manifest, f"{redact(url)}/{mf.MANIFEST}")
    t = timings if timings is not None else Timings()
    fs, root = url_to_fs(url, **storage_options)
    root = root.rstrip("/")
    files = list(manifest["files"])
    by_file: dict[str, dict[str, Any]] = {f: {} for f in files}
    for name, entry in manifest["tensors"].items():
        by_file[entry["file"]][name] = entry

    def size_of(rel: str) -> int:
        path = safe_join(root, rel)
        try:
            with fs_errors(f"{url}/{rel}", "read", storage_options):
                size = _file_size(fs, path, f"{redact(url)}/{rel}")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shard {rel} listed in the manifest of {redact(url)} is missing: the checkpoint "
                "is incomplete; copy it again or re-run the job"
            ) from None
        data = sum(e["nbytes"] for e in by_file[rel].values())
        budget = _header_budget(by_file[rel])
        if not 8 + 2 + data <= size <= 8 + budget + data:
            raise CheckpointError(
                f"{rel}: {size:,} bytes on the store, but the manifest's {len(by_file[rel])} "
                f"tensors in it take {data:,} bytes plus a header of at most {budget:,}: the "
                "shard is truncated, padded or not the one the manifest describes; copy it "
                "again or re-run the job")
        return size

    def read_range(path: str, rel: str, start: int, end: int) -> bytes:
        t0 = time.perf_counter()
        with fs_errors(f"{url}/{rel}", "read", storage_options):
            data = fs.cat_file(path, start=start, end=end)
        t.read += time.perf_counter() - t0
        return data

    pending: deque[tuple[str, int, list[tuple[int, Future[bytes]]]]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="qmoe-read") as pool:

        def submit(rel: str) -> None:
            path = safe_join(root, rel)
            size = size_of(rel)
            futs = [(s, pool.submit(read_range, path, rel, s, min(s + chunk_bytes, size)))
                    for s in range(0, size, max(1, chunk_bytes))]
            pending.append((rel, size, futs))

        queue = deque(files)
        bar = _progress_bar(progress, sum(e["nbytes"] for e in manifest["tensors"].values()))
        try:
            while queue or pending:
                while queue and len(pending) < max(1, prefetch):
                    submit(queue.popleft())
                rel, size, futs = pending.popleft()
                t0 = time.perf_counter()
                buf = bytearray(size)
                for s, fut in futs:
                    data = fut.result()
                    if len(data) != min(chunk_bytes, size - s):
                        raise CheckpointError(f"{rel}: short read at byte {s} (the shard changed while "
                                         "being read?); retry the load")
                    buf[s : s + len(data)] = data
                t1 = time.perf_counter()
                tensors = verify_shard(buf, rel, by_file[rel])
                t.wait += t1 - t0
                t.verify += time.perf_counter() - t1
                t.bytes += size
                bar.update(sum(e["nbytes"] for e in by_file[rel].values()))
                yield rel, tensors
        finally:
            bar.close()
            for _, _, futs in pending:
                for _, fut in futs:
                    fut.cancel()


def _progress_bar(progress: bool | str, total: int) -> Any:
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else "reading"
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                disable=not progress, leave=False)


def read_verified(url: str, manifest: Mapping[str, Any], workers: int = 4,
                  **storage_options: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Read every shard of the manifest and verify every tensor (all in memory).

    Returns:
        ``(tensors, timings)`` with ``timings`` = seconds spent reading and verifying.

    Raises:
        See ``iter_shards``.
    """
    t = Timings()
    tensors: dict[str, torch.Tensor] = {}
    for _, part in iter_shards(url, manifest, workers=workers, timings=t, **storage_options):
        tensors.update(part)
    return tensors, {"read": t.read, "verify": t.verify}


# -- quantized matrices ------------------------------------------------------------------------
def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: expected one of {DEVICES}")
    if device == "cuda":
        from qmoe_ray import gpu

        if not gpu.available():
            raise RuntimeError(f"device='cuda' needs an NVIDIA GPU visible to CuPy; {GPU_INSTALL}")
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda': CuPy sees a GPU but this torch build has no CUDA; "
                               "install a CUDA build of torch, or load with device='cpu'")


def _table(name: str | None, tables: Mapping[str, Mapping[str, str]],
           tensors: Mapping[str, torch.Tensor], cache: dict[str, codec.Table]
           ) -> codec.Table | None:
    if not name:
        return None
    if name not in cache:
        freqs = tensors[f"{name}.freqs"].numpy()
        cache[name] = codec.Table.from_tensors({"freqs": freqs}, dict(tables[name]))
    return cache[name]


@dataclass(frozen=True)
class EncodedWeight:
    """A quantized matrix kept encoded; ``x @ w.T`` decodes it on the fly (resident mode).

    Attributes:
        name: canonical tensor name.
        scheme: the quantization grid.
        enc: ``EncodedTernary`` / ``EncodedInt2`` / ``PackedCodes`` (host copy).
        params: grid parameters as stored (``lo``/``hi`` bf16 or ``scale`` bf16 / ``zero`` uint8).
        device: ``"cpu"`` (decode per call) or ``"cuda"`` (fused decode + product).
    """

    name: str
    scheme: Scheme
    enc: Any = field(repr=False)
    params: Mapping[str, torch.Tensor] = field(repr=False)
    device: str = "cpu"
    _dev: Any = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.enc.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def nbytes(self) -> int:
        """Bytes held: encoded codes plus grid parameters (a shared table counted once apart)."""
        scales = sum(p.numel() * p.element_size() for p in self.params.values())
        return int(self.enc.nbytes) + scales

    @property
    def T(self) -> _Transposed:
        """A transposed view: ``x @ w.T`` computes ``x W^T`` without keeping ``W`` dense."""
        return _Transposed(self)

    def codes(self) -> np.ndarray:
        """The decoded codes on the host (numpy decoder)."""
        if isinstance(self.enc, codec.EncodedTernary):
            return codec.decode_ternary(self.enc)
        if isinstance(self.enc, codec.EncodedInt2):
            return codec.decode_int2(self.enc)
        return codec.unpack_bits(self.enc)

    def dense(self) -> torch.Tensor:
        """The bf16 weight ``[rows, cols]``, decoded now (on the GPU when resident there).

        Raises:
            CheckpointError: the stored codes do not decode (a corrupted stream, a wrong table).
        """
        try:
            if self.device == "cuda" and self._gpu_ok():
                return _gpu_dequantize(self)
            if isinstance(self.enc, codec.EncodedTernary):
                w = _ternary_bf16(self.enc, self.params["lo"], self.params["hi"])
            elif isinstance(self.enc, codec.EncodedInt2) and self.scheme.group_size is None:
                w = _int2_bf16(self.enc, self.scheme, self.params)
            else:
                codes = self.codes()
                p = {k: v.float()[None] for k, v in self.params.items()}
                w = dequantize(self.scheme, torch.from_numpy(codes)[None], p)[0].to(torch.bfloat16)
        except CheckpointError:
            raise
        except ValueError as exc:
            raise CheckpointError(f"quantized matrix {self.name!r}: {exc}") from None
        return w.to(self.device) if self.device != "cpu" else w

    def _gpu_ok(self) -> bool:
        return (isinstance(self.enc, codec.EncodedTernary | codec.EncodedInt2)
                and self.scheme.group_size is None)

    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` ``[..., cols]`` -> ``[..., rows]`` in ``x``'s dtype."""
        if self.device == "cuda" and self._gpu_ok() and self._dev is not None:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            if 0 < x2.shape[0] <= FUSED_MAX_TOKENS:
                y = _gpu_matvec(self, x2)
                return y.to(x.dtype).reshape(*lead, -1)
        return x @ self.dense().to(device=x.device, dtype=x.dtype).T


def _ternary_bf16(enc: Any, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """bf16 ``hi[row]`` / 0 / ``lo[row]`` for codes +1 / 0 / -1, decoded straight from the stream
    through a per-row lookup table (lo/hi are stored in bf16, so this equals the float32
    dequantization rounded to bf16, bit for bit; no code matrix, no ``torch.where``)."""
    lut = torch.stack([lo.to(torch.bfloat16), torch.zeros_like(lo, dtype=torch.bfloat16),
                       hi.to(torch.bfloat16)], 1).view(torch.int16).numpy()
    # torch allocates the weights, as a bf16 loader would: numpy asks for transparent huge pages
    # on large arrays, and where the kernel cannot give them every first-touch fault tries to
    # compact memory first (a fresh-process load ran 1.2-1.7x slower that way on the 2-core VM)
    out = torch.empty(tuple(enc.shape), dtype=torch.int16)
    codec.decode_ternary_lut(enc, lut, out=out.numpy())
    return out.view(torch.bfloat16)


def _int2_bf16(enc: Any, scheme: Any, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """bf16 weights of per-row 2-bit codes through a per-row table of the four values, each
    computed by ``dequantize`` itself (so equal, bit for bit, to dequantizing the code matrix)."""
    rows = enc.shape[0]
    q = torch.arange(4, dtype=torch.uint8).expand(rows, 4)
    lut = dequantize(scheme, q, dict(params)).to(torch.bfloat16).view(torch.int16).numpy()
    out = torch.empty(tuple(enc.shape), dtype=torch.int16)  # see _ternary_bf16
    codec.decode_int2_lut(enc, lut, out=out.numpy())
    return out.view(torch.bfloat16)


class Bf16Product:
    """A dense bf16 weight used in bf16: ``x @ w.T`` casts ``x`` to bf16, multiplies, and
    returns ``x``'s dtype (decode mode with ``compute="bf16"``)."""

    __slots__ = ("w",)

    def __init__(self, w: torch.Tensor):
        self.w = w

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)  # type: ignore[return-value]

    @property
    def T(self) -> _Transposed:
        return _Transposed(self)

    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.bfloat16) @ self.w.T).to(x.dtype)


class _Transposed:
    """``w.T`` of an ``EncodedWeight`` or ``Bf16Product``: only ``x @ w.T`` is supported."""

    __slots__ = ("w",)

    def __init__(self, w: EncodedWeight | Bf16Product):
        self.w = w

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.matmul_t(x)

    @property
    def shape(self) -> tuple[int, int]:
        r, c = self.w.shape
        return c, r


def _gpu_dequantize(w: EncodedWeight) -> torch.Tensor:
    from qmoe_ray import gpu

    src = w._dev if w._dev is not None else w.enc
    if w.scheme.name == "ternary":
        return gpu.dequantize_ternary(src, w.params["lo"], w.params["hi"])
    return gpu.dequantize_int2(src, w.params["scale"], w.params["zero"])


def _gpu_matvec(w: EncodedWeight, x: torch.Tensor) -> torch.Tensor:
    from qmoe_ray import gpu

    fn = gpu.matvec_ternary if w.scheme.name == "ternary" else gpu.matvec_int2
    a, b = (("lo", "hi") if w.scheme.name == "ternary" else ("scale", "zero"))
    outs = []
    for i in range(0, x.shape[0], 16):  # the kernel takes 1..16 tokens per launch
        y = fn(w._dev, w.params[a], w.params[b], x[i : i + 16])
        outs.append(torch.from_dlpack(y))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def encoded_matrix(
    name: str,
    entry: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tables: Mapping[str, Mapping[str, str]],
    table_cache: dict[str, codec.Table] | None = None,
    device: str = "cpu",
) -> EncodedWeight:
    """An ``EncodedWeight`` from a stored quantized matrix (nothing decoded yet).

    Args:
        name, entry: the matrix and its manifest entry (of a manifest that passed
            ``check_manifest``: its declared shapes are the config's).
        tensors: verified stored tensors holding the matrix's pieces (``iter_shards``).
        tables: the manifest's table metadata; table_cache: tables rebuilt so far, by name.
        device: where the parameters (and, with the GPU extra, the codes) go.

    Raises:
        CheckpointError: a stored tensor or table is missing, an unknown codec version, a table
            hash mismatch, inconsistent sizes (the message names the matrix).
    """
    try:
        scheme = parse_scheme(entry["scheme"], entry.get("quant_group_size"))
        # copies: an encoded matrix must not keep its whole shard buffer alive
        arrays = {f: tensors[f"{name}{CODE_PREFIX}{f}"].numpy().copy() for f in entry["fields"]}
        meta = dict(entry["codec"])
        if scheme.name in ("ternary", "int2"):
            cls = codec.EncodedTernary if scheme.name == "ternary" else codec.EncodedInt2
            table = _table(entry.get("table"), tables, tensors,
                           table_cache if table_cache is not None else {})
            enc = cls.from_tensors(arrays, meta, table=table)
        else:
            enc = codec.PackedCodes.from_tensors(arrays, meta)
        params = {p: tensors[f"{name}.{p}"].clone() for p in entry["params"]}
    except (KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"quantized matrix {name!r}: {msg}") from None
    if list(enc.shape) != list(entry["shape"]):
        raise CheckpointError(f"quantized matrix {name!r}: encoded shape {list(enc.shape)}, "
                              f"manifest says {entry['shape']}")
    w = EncodedWeight(name, scheme, enc, params, device)
    if device == "cuda":
        params = {k: v.to("cuda") for k, v in params.items()}
        dev = None
        if w._gpu_ok():
            from qmoe_ray import gpu

            dev = gpu.upload(enc)
        w = EncodedWeight(name, scheme, enc, params, device, dev)
    return w


def decode_matrix(w: EncodedWeight) -> torch.Tensor:
    """Dense bf16 weight of an encoded matrix (GPU kernels when on cuda, else numpy decoder)."""
    return w.dense()


# -- the model ---------------------------------------------------------------------------------
class LoadedWeights:
    """A ``WeightSource`` over a loaded checkpoint: dense tensors (stored dtype) and experts
    (dense bf16 or ``EncodedWeight``), handed out as float32 on the model's device; a name it
    lacks raises ``CheckpointError`` (the model needs a tensor the checkpoint does not hold)."""

    def __init__(self, dense: Mapping[str, torch.Tensor], experts: Mapping[str, Any],
                 dtype: torch.dtype = torch.float32):
        self._dense = dense
        self._experts = experts
        self._dtype = dtype

    def __call__(self, name: str) -> torch.Tensor:
        t = self._dense.get(name)
        if t is None:
            t = self._experts.get(name)
            if t is None:
                raise CheckpointError(f"tensor {name!r}, which the model reads, is not in the "
                                      f"checkpoint ({len(self._dense) + len(self._experts)} "
                                      "tensors); the checkpoint is incomplete")
            if isinstance(t, EncodedWeight):
                t = t.dense()
        return t.to(self._dtype)

    def __contains__(self, name: str) -> bool:
        return name in self._dense or name in self._experts

    @property
    def names(self) -> list[str]:
        """Every tensor name (dense and experts)."""
        return list(self._dense) + list(self._experts)


class CompressedModel:
    """A loaded compressed checkpoint, runnable through the project's block code.

    Attributes:
        manifest: the checkpoint's manifest; config: the source model's config.
        family: the model family adapter.
        device, mode, compute: as passed to ``load``.
        dense: non-expert tensors (as stored, bf16) by name.
        experts: expert matrices by canonical name: bf16 tensors (decode) or ``EncodedWeight``.
        weights: ``dense`` and ``experts`` in one dict.
        W: a ``WeightSource`` over both (float32).
        timings: seconds spent reading, waiting, verifying and decoding, and the wall time.
    """

    def __init__(self, manifest: dict[str, Any], dense: dict[str, torch.Tensor],
                 experts: dict[str, Any], timings: dict[str, float],
                 device: str = "cpu", mode: str = "decode", compute: str = "float32"):
        self.manifest = manifest
        self.config = manifest["config"]
        self.family = get_family(self.config)
        self.device = device
        self.mode = mode
        self.compute = compute
        self.dense = dense
        self.experts = experts
        self.weights = {**dense, **experts}
        self.W = LoadedWeights(dense, experts)
        self.family.bind(self.W)
        self.timings = timings

    def experts_for(self, layer: LayerSpec):
        """``expert id -> {role: weight}`` for one MoE layer (float32 tensors in decode mode,
        ``Bf16Product`` with ``compute="bf16"``, ``EncodedWeight`` in resident mode; all work
        with ``x @ w.T``)."""
        fam = self.family
        bf16 = self.compute == "bf16"

        def get(e: int) -> dict[str, Any]:
            out = {}
            for r, n in fam.expert_names(layer, e).items():
                w = self.experts[n]
                if isinstance(w, EncodedWeight):
                    out[r] = w
                else:
                    out[r] = Bf16Product(w) if bf16 else w.float()
            return out

        return get

    def _inputs(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.ndim == 2 else inputs[None]
            inputs = {"input_ids": ids.long(),
                      "attention_mask": torch.ones_like(ids, dtype=torch.long)}
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def logits(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """float32 logits ``[B, S, vocab]`` for token ids (a tensor or the family's inputs)."""
        inputs = self._inputs(inputs)
        with torch.device(self.device):  # tensors the block code creates land on our device
            return run_forward(self.family, self.W, inputs, experts_for=self.experts_for)

    @torch.no_grad()
    def loss(self, inputs: Mapping[str, torch.Tensor]) -> tuple[float, int]:
        """``(mean token cross-entropy, predicted tokens)`` as transformers counts them."""
        inputs = self._inputs(inputs)
        ce, n = self.family.loss_terms(self.logits(inputs), inputs)
        return float(ce) / max(int(n), 1), int(n)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16) -> torch.Tensor:
        """Greedy continuation for decoder-only families (recomputes the prefix each step)."""
        if self.family.model_type == "switch_transformers":
            raise ValueError("generate() supports decoder-only families; for Switch use logits()")
        ids = (input_ids if input_ids.ndim == 2 else input_ids[None]).to(self.device)
        for _ in range(max_new_tokens):
            nxt = self.logits(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


def load(url: str, device: str = "cpu", mode: str = "decode", workers: int = 4,
         progress: bool = False, compute: str = "float32", **storage_options: Any
         ) -> CompressedModel:
    """Load a compressed checkpoint, streaming and verifying its shards.

    Args:
        url: the checkpoint folder (any fsspec URL).
        device: ``"cpu"`` (numpy decoder) or ``"cuda"`` (CuPy kernels; needs the GPU extra).
        mode: ``"decode"``: experts decoded once into dense bf16 weights; ``"resident"``: experts
            kept encoded and decoded inside each product (fused kernel on a GPU).
        workers: concurrent range reads.
        progress: show a progress bar (bytes read, verified and decoded) on stderr.
        compute: decode mode's expert products: ``"float32"`` (the weights widened per
            product, the job's arithmetic; the default) or ``"bf16"`` (bf16 activations times
            the bf16 weights, as a bf16 serving stack runs them: the fair baseline for resident
            mode's latency on a GPU).
        **storage_options: fsspec options (credentials, endpoint).

    Returns:
        A ``CompressedModel``; its ``timings`` split the load into read, wait, verify, decode.

    Raises:
        CheckpointError: whatever is wrong with the checkpoint (malformed, inconsistent with its
            config, corrupted, not decodable), naming the file, key or tensor; every declared
            shape is checked against the config before anything is allocated or decoded.
        ValueError: an unknown device, mode or compute.
        RuntimeError: ``device="cuda"`` without a GPU or without CuPy (says how to install it).
        FileNotFoundError: no manifest or a missing shard; PermissionError: access denied.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if compute not in COMPUTE:
        raise ValueError(f"compute={compute!r}: expected one of {COMPUTE}")
    _check_device(device)
    t_start = time.perf_counter()
    manifest = read_manifest(url, **storage_options)  # checked: check_manifest
    quantized = manifest["quantized"]
    tables = manifest.get("tables", {})
    stored = {f"{n}{CODE_PREFIX}{f}" for n, e in quantized.items() for f in e["fields"]}
    stored |= {f"{n}.{p}" for n, e in quantized.items() for p in e["params"]}
    stored |= {f"{t}.freqs" for t in tables}
    need = {n: ([f"{n}{CODE_PREFIX}{f}" for f in e["fields"]] + [f"{n}.{p}" for p in e["params"]]
                + ([f"{e['table']}.freqs"] if e.get("table") else []))
            for n, e in quantized.items()}
    refs: dict[str, int] = {}
    for keys in need.values():
        for k in keys:
            refs[k] = refs.get(k, 0) + 1
    t = Timings()
    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, Any] = {}
    held: dict[str, torch.Tensor] = {}  # stored pieces of matrices not yet complete
    table_cache: dict[str, codec.Table] = {}
    todo = dict(quantized)
    label = "loading" if progress else False
    for _, part in iter_shards(url, manifest, workers=workers, timings=t, progress=label,
                               checked=True, **storage_options):
        t0 = time.perf_counter()
        for name, tensor in part.items():
            if name in stored:
                held[name] = tensor
            else:
                dense[name] = tensor.clone().to(device)  # own the memory, not the shard buffer
        for name in [n for n in todo if all(k in held for k in need[n])]:
            w = encoded_matrix(name, todo.pop(name), held, tables, table_cache, device)
            experts[name] = w if mode == "resident" else w.dense()
            for k in need[name]:  # free pieces no pending matrix needs (tables are shared)
                refs[k] -= 1
                if refs[k] == 0:
                    held.pop(k)
        t.decode += time.perf_counter() - t0
    if todo:
        raise CheckpointError(f"{redact(url)}: {len(todo)} quantized matrices without their "
                              f"stored tensors (first: {sorted(todo)[0]!r})")
    if device == "cuda":
        torch.cuda.synchronize()
    t.wall = time.perf_counter() - t_start
    return CompressedModel(manifest, dense, experts, t.as_dict(), device=device, mode=mode,
                           compute=compute)


def compare_eval(compressed_url: str, original_url: str | None = None, data_spec: str = "embedded",
                 num_samples: int | None = None, seq_len: int | None = None, batch_size: int = 8,
                 storage_options: Mapping[str, Any] | None = None, **eval_kw: Any
                 ) -> dict[str, Any]:
    """Original vs compressed loss and perplexity on the same held-out data (side by side).

    Why the original must be named: a manifest's ``source`` is data from the checkpoint's store,
    not a choice of the user; fetching it would read whatever URL the checkpoint names, with the
    user's storage options (credentials, endpoint). ``source_of`` tells what the manifest names.

    Args:
        compressed_url: the compressed checkpoint.
        original_url: the source model, given explicitly (required).
        data_spec, num_samples, seq_len, batch_size, storage_options, **eval_kw: as
            ``qmoe_ray.read.evaluate.evaluate`` (the same samples are drawn for both models).

    Returns:
        ``{"original": result, "compressed": result, "loss_delta", "perplexity_ratio"}``.

    Raises:
        InputError: no ``original_url`` (the message quotes the manifest's source).
    """
    from qmoe_ray.read.evaluate import evaluate

    opts = dict(storage_options or {})
    if not original_url:
        raise InputError(_name_the_original(compressed_url, source_of(compressed_url, **opts)))
    source = original_url
    args = (data_spec, num_samples, seq_len, batch_size, opts)
    comp = evaluate(compressed_url, *args, **eval_kw)
    orig = evaluate(source, *args, **eval_kw)
    return {"original": {"model": source, **orig},
            "compressed": {"model": compressed_url, **comp},
            "loss_delta": comp["loss"] - orig["loss"],
            "perplexity_ratio": comp["perplexity"] / orig["perplexity"]}


def source_of(url: str, **storage_options: Any) -> str | None:
    """The source model a compressed checkpoint's manifest names (redacted; None if none).
    Only shown to the user, never fetched (see ``compare_eval``)."""
    source = read_manifest(url, **storage_options).get("source")
    return redact(source) if source else None


def _name_the_original(url: str, source: str | None) -> str:
    if not source:
        return (f"{redact(url)}: the manifest names no source model; give the original model's "
                "URL explicitly (eval --compare URL)")
    return (f"the original model must be given explicitly: the manifest of {redact(url)} names "
            f"its source as {_short(source, 200)}; if that is the model to compare with, run "
            f"again with --compare {source} (it is read with your storage options)")
