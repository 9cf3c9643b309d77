"""The files of an export besides its weights: the checkpoint's copied files, and the staging
folder the export is written in (see ``qmoe_ray.read.export``).

- A copied file (``copied_files``: tokenizer files) must have a plain name of an allowed kind that
  cannot collide with the export's own output, and match its manifest SHA-256 and size; it is
  read without following links (a local symlink is refused) and only if it is a regular file
  under ``COPIED_MAX_BYTES`` (``qmoe_ray.storage.fs.read_small`` on an object store).
- The export is written to a hidden folder next to the destination (``.NAME.export-XXXX.tmp``,
  or that prefix on an object store) and moved into place only when everything is written and
  verified; any failure removes it (``remove``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Mapping
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from qmoe_ray.errors import CheckpointError
from qmoe_ray.format import manifest as mf
from qmoe_ray.storage.fs import file_size, fs_errors, join, read_small, redact

INDEX = "model.safetensors.index.json"
COPIED_MAX_BYTES = 128 * 2**20
"""The largest copied file an export reads (tokenizer.json files are a few to ~35 MB)."""
COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja")
"""The kinds of file an export copies: JSON, vocab/merges text, sentencepiece models, chat
templates; never weights, pickles or code."""
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_copied_name(name: Any, where: str = "manifest") -> str:
    """Validate a ``copied_files`` name before it is used as a path, in the source or the export.

    Allowed: a plain file name (letters, digits, ``.``, ``_``, ``-``; no path separator, no
    ``..``) ending in one of ``COPIED_SUFFIXES``, never a name the export writes itself (its
    shards, ``model.safetensors.index.json``) nor ``manifest.json``.

    Raises:
        CheckpointError: naming the file and why it is refused.
    """
    low = name.lower() if isinstance(name, str) else ""
    bad = None
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        bad = ("it is not a plain file name (letters, digits, '.', '_', '-'; no path separator, "
               "no '..')")
    elif (low in (INDEX, mf.MANIFEST) or low.endswith(".safetensors")
          or (low == "config.json" and name != "config.json")):
        bad = "it collides with the export's own output (its shards and index) or the manifest"
    elif not low.endswith(COPIED_SUFFIXES):
        bad = f"only {', '.join(COPIED_SUFFIXES)} files are copied (never weights, pickles, code)"
    if bad:
        raise CheckpointError(f"{where}: copied file {name!r} refused: {bad}")
    return name


def copied_files(manifest: Mapping[str, Any], where: str = "manifest",
                 ) -> dict[str, dict[str, int | str]]:
    """The files an export copies from the checkpoint, from its manifest's ``copied_files``.

    ``copied_files`` maps each file name to ``{"sha256", "bytes"}`` of the file the job wrote.
    ``config.json`` is left out: the export writes its own from the manifest's ``config``.

    Returns:
        ``name -> {"sha256", "bytes"}``, every name checked with ``check_copied_name``.

    Raises:
        CheckpointError: ``copied_files`` is not such a mapping (an older checkpoint's plain list
            has no hashes: refused, with the way to export without the files), a name is refused,
            or an entry is not a SHA-256 and a size of at most ``COPIED_MAX_BYTES``.
    """
    raw = manifest.get("copied_files", {})
    if isinstance(raw, list):
        raise CheckpointError(
            f"{where}: copied_files is a list without hashes (a checkpoint written before "
            "qmoe-ray hashed them), so its copied files cannot be verified; export the weights "
            "and config without them (copy_files=False, --no-copied-files) and take the "
            "tokenizer files from the source model")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: copied_files is a {type(raw).__name__}, expected an "
                              "object of name -> {sha256, bytes}: the manifest is damaged")
    out: dict[str, dict[str, int | str]] = {}
    for name, entry in raw.items():
        check_copied_name(name, where)
        ok = (isinstance(entry, dict) and set(entry) == {"sha256", "bytes"}
              and isinstance(entry["sha256"], str) and bool(mf.SHA256.fullmatch(entry["sha256"]))
              and type(entry["bytes"]) is int and 0 <= entry["bytes"] <= COPIED_MAX_BYTES)
        if not ok:
            raise CheckpointError(
                f"{where}: copied file {name!r}: entry {json.dumps(entry)[:120]} is not "
                "{\"sha256\": 64 hex digits, \"bytes\": a size of at most "
                f"{COPIED_MAX_BYTES} bytes}}")
        if name != "config.json":
            out[name] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    return out


def _read_local_file(path: str, size: int, where: str) -> bytes:
    """A local file's bytes, without following a symbolic link (refused instead)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: listed in the manifest's copied_files but missing; "
                              "the checkpoint is incomplete") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{where} is a symbolic link: refused, never followed out of "
                                  "the checkpoint folder; replace it with the file itself") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{where} is not a regular file: refused")
        if st.st_size != size:
            raise CheckpointError(f"{where} has {st.st_size} bytes, the manifest says {size}: "
                                  "the file was changed or replaced; refused")
        chunks, got = [], 0
        while got <= size:  # one byte past the size: a file grown since fstat is caught
            chunk = os.read(fd, size + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_copied(fs: AbstractFileSystem, root: str, url: str, name: str,
                 entry: Mapping[str, Any], opts: Mapping[str, Any]) -> bytes:
    """Read one copied file of the checkpoint and check its size and SHA-256 against ``entry``."""
    path, where, size = join(root, check_copied_name(name)), f"{redact(url)}/{name}", entry["bytes"]
    if isinstance(fs, LocalFileSystem):
        data = _read_local_file(path, size, where)
    else:  # object stores have no links: check what the path is and its size before reading
        try:
            with fs_errors(f"{url}/{name}", "read", opts):
                got = file_size(fs, path, where)
        except FileNotFoundError:
            raise CheckpointError(f"{where}: listed in the manifest's copied_files but missing; "
                                  "the checkpoint is incomplete") from None
        if got != size:
            raise CheckpointError(f"{where} has {got} bytes, the manifest says "
                                  f"{size}: the file was changed or replaced; refused")
        data = read_small(fs, path, size, where, url=f"{url}/{name}", storage_options=opts,
                          what="the manifest says it has", sized=False) if size else b""
    got = hashlib.sha256(data).hexdigest()
    if len(data) != size or got != entry["sha256"]:
        raise CheckpointError(f"{where} fails its checksum ({len(data)} bytes, sha256 "
                              f"{got[:12]}...; manifest {size} bytes, {entry['sha256'][:12]}...): "
                              "the file was changed or replaced; refused")
    return data


def check_destination(fs: AbstractFileSystem, root: str, out_dir: str, overwrite: bool,
                       opts: Mapping[str, Any]) -> bool:
    """Refuse a destination the export must not replace; returns whether it exists.

    Raises:
        FileExistsError: a non-empty folder without ``overwrite``; with it, a folder holding a
            qmoe-ray checkpoint or anything but an HF checkpoint; a file.
    """
    with fs_errors(out_dir, "read", opts):
        if not fs.exists(root):
            return False
        if not fs.isdir(root):
            raise FileExistsError(f"{redact(out_dir)} is a file; choose a folder for the export")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    if not names:
        return True
    if mf.MANIFEST in names:
        raise FileExistsError(f"{redact(out_dir)} holds a qmoe-ray checkpoint ({mf.MANIFEST}); "
                              "an export never replaces one: choose another folder")
    if not overwrite:
        raise FileExistsError(f"{redact(out_dir)} is not empty; choose another folder or pass "
                              "overwrite=True (--overwrite) to replace the export there")
    if INDEX not in names and "config.json" not in names:
        raise FileExistsError(f"{redact(out_dir)} holds files but no HF checkpoint ({INDEX} or "
                              "config.json); overwrite replaces only an earlier export: choose "
                              "an empty or new folder")
    return True


def staging_dir(root: str, out_dir: str) -> str:
    """A fresh hidden folder next to ``root`` (same filesystem: the final move is a rename)."""
    parent, sep, name = root.rstrip("/").rpartition("/")
    if not sep or not name or name in (".", ".."):
        raise ValueError(f"cannot export to {redact(out_dir)!r}: choose a folder (inside a bucket "
                         "for an object store)")
    return f"{parent}/.{name}.export-{uuid.uuid4().hex[:12]}.tmp"


def remove(fs: AbstractFileSystem, path: str) -> None:
    """Delete ``path`` (a staging or replaced folder) if it exists; errors are not raised."""
    try:
        if isinstance(fs, LocalFileSystem):
            if os.path.islink(path):
                os.unlink(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:  # noqa: BLE001 - cleanup after the real error, which is the one to report
        pass


def move_into_place(fs: AbstractFileSystem, staging: str, root: str, names: list[str],
                     exists: bool) -> None:
    """Move the complete export from ``staging`` to ``root`` (replacing what is there).

    Local: two renames (the old folder aside, the new one in), put back if the second fails.
    Object stores: the old files removed, then the new ones moved, config and index last.
    """
    if isinstance(fs, LocalFileSystem):
        old = f"{staging}.old"
        if exists:
            os.rename(root, old)
        try:
            os.rename(staging, root)
        except BaseException:
            if exists:
                os.rename(old, root)
            raise
        if exists:
            remove(fs, old)
        return
    if exists:
        fs.rm(root, recursive=True)
    for rel in names:
        fs.mv(f"{staging}/{rel}", f"{root}/{rel}")
    remove(fs, staging)
