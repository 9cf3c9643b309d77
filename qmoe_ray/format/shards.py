"""Shards of a compressed checkpoint: written (``serialize_shard``), read back verified
(``verify_shard``), and streamed with read-ahead (``iter_shards``).

A shard is a plain safetensors file. Its header is parsed by the project's one safetensors parser
(``qmoe_ray.storage.safetensors.header_length`` / ``parse_header``: exact sizes, offsets inside
the file; here also no gaps, no extra or missing tensors), and every tensor's SHA-256 is computed
over its raw bytes in place and compared with the manifest before any byte is decoded: a flipped
byte, a truncated or missing shard is an error, never garbage. Checksums prove integrity only
(whoever writes a manifest can recompute them); the manifest itself is checked as hostile input by
``qmoe_ray.format.manifest.read_manifest`` before a shard is read.

``iter_shards`` streams the shards in manifest order (each shard's size on the store compared with
the manifest's before it is read): a thread pool fetches byte ranges of the next shards while the
current one is verified and decoded, so decoding overlaps the download.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as st_save

from qmoe_ray.errors import CheckpointError
from qmoe_ray.errors import shorten as _short
from qmoe_ray.format import manifest as mf
from qmoe_ray.storage.fs import file_size, fs_errors, redact, safe_join, url_to_fs
from qmoe_ray.storage.safetensors import MAX_HEADER, header_length, parse_header

CHUNK_BYTES = 16 * 2**20  # range-read size: big enough for object stores, small enough to overlap
PREFETCH_SHARDS = 2  # shards being fetched ahead of the one being verified/decoded
_FIX = "the shard is truncated or corrupted: copy it again or re-run the compression job"


# -- writing --------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def checksum(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw bytes (what ``verify_shard`` recomputes in place)."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def serialize_shard(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """Serialize tensors to safetensors bytes (keys sorted, so the bytes are deterministic).

    Returns:
        ``(data, index)``: the file's bytes and, per tensor, its manifest entry less its file:
        ``dtype``, ``shape``, ``sha256`` and ``nbytes``.
    """
    ordered = {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}
    index = {
        k: {
            "dtype": str(v.dtype).removeprefix("torch."),
            "shape": list(v.shape),
            "sha256": checksum(v),
            "nbytes": v.numel() * v.element_size(),
        }
        for k, v in ordered.items()
    }
    return st_save(ordered), index


# -- reading --------------------------------------------------------------------------------------
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
    """Parse and check a safetensors file held in ``buf`` (its length and header through
    ``qmoe_ray.storage.safetensors``, the one safetensors parser of the project), and check that
    the tensors tile the data exactly.

    Returns:
        ``name -> (torch dtype name, shape, start, end)`` with absolute byte offsets into ``buf``.

    Raises:
        CheckpointError: truncated file, a bad header, unknown dtype, offsets out of bounds,
            overlapping or leaving gaps, or a size that disagrees with dtype and shape. Messages
            never quote the file's bytes.
    """
    n = len(buf)
    hlen = header_length(buf[:8], n, where, _FIX)
    try:
        infos = parse_header(bytes(buf[8 : 8 + hlen]), where, n)
    except ValueError as exc:
        raise CheckpointError(f"{exc}; {_FIX}") from None
    out = {name: (str(i.dtype).removeprefix("torch."), list(i.shape), i.start, i.end)
           for name, i in infos.items()}
    pos = 8 + hlen
    for start, end in sorted((i.start, i.end) for i in infos.values()):
        if start != pos:
            raise CheckpointError(f"{where}: tensor data is not contiguous at byte {pos}; {_FIX}")
        pos = end
    if pos != n:
        raise CheckpointError(f"{where}: {n - pos} trailing bytes after the last tensor; {_FIX}")
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
    """Parse one shard and verify each tensor's dtype, shape and SHA-256 against the manifest
    (the format's one checksum verifier).

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
        manifest: its manifest (see ``qmoe_ray.format.manifest.read_manifest``).
        workers: concurrent range reads.
        prefetch: shards fetched ahead of the one being consumed (>= 1).
        chunk_bytes: size of one range read.
        timings: accumulates read/wait/verify seconds and bytes when given.
        progress: a progress bar over the tensor bytes on stderr (a string: its label).
        checked: the manifest already passed ``check_manifest`` (``read_manifest`` returns such
            manifests, and callers pass it along); else it is checked here.
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
        mf.check_manifest(manifest, f"{redact(url)}/{mf.MANIFEST}")
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
                size = file_size(fs, path, f"{redact(url)}/{rel}")
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
                if not pending:
                    submit(queue.popleft())
                rel, size, futs = pending.popleft()
                while queue and len(pending) < max(1, prefetch):  # ahead while this one is used
                    submit(queue.popleft())
                t0 = time.perf_counter()
                buf = bytearray(size)
                for s, fut in futs:
                    data = fut.result()
                    if len(data) != min(chunk_bytes, size - s):
                        raise CheckpointError(f"{rel}: short read at byte {s} (the shard changed "
                                              "while being read?); retry the load")
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


def read_verified(url: str, manifest: Mapping[str, Any], workers: int = 4, checked: bool = False,
                  **storage_options: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Read every shard of the manifest and verify every tensor (all in memory).

    Returns:
        ``(tensors, timings)`` with ``timings`` = seconds spent reading and verifying.

    Raises:
        See ``iter_shards``.
    """
    t = Timings()
    tensors: dict[str, torch.Tensor] = {}
    for _, part in iter_shards(url, manifest, workers=workers, timings=t, checked=checked,
                               **storage_options):
        tensors.update(part)
    return tensors, {"read": t.read, "verify": t.verify}
