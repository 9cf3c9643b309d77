"""URLs to fsspec filesystems, safe path joining, and error messages a user can act on.

Why this module: every byte the project reads or writes goes through fsspec so that a local folder,
``file://``, ``s3://`` (and any other fsspec protocol) behave the same. Three things are easy to
get wrong at each call site and are therefore done once here:

* endpoint selection for S3-compatible stores (``endpoint_url=`` or ``AWS_ENDPOINT_URL``), which
  s3fs only takes through ``client_kwargs`` in some versions;
* file names read from an index or manifest are *data*, not trusted paths: ``safe_join`` refuses
  absolute names, ``..``, backslashes and empty components, so a crafted index cannot read or write
  outside the checkpoint folder;
* fsspec/botocore failures arrive as many exception types with messages that say nothing about the
  fix; ``fs_errors`` turns them into ``FileNotFoundError`` / ``PermissionError`` naming the URL and
  the fix, and never echoes credentials (the original exception is not chained, since botocore
  messages and request dumps may carry key ids).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from qmoe_ray.errors import CheckpointError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_SECRET_KEYS = ("key", "secret", "token", "password", "access", "credential")
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_CRED_HINT = (
    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass storage_options "
    "such as key=..., secret=..., anon=True"
)


def scheme(url: str) -> str:
    """The protocol of ``url`` (``"file"`` for plain paths)."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else "file"


def redact(url: str) -> str:
    """``url`` without what may carry a credential: the ``user:password@`` part, and for a URL
    with a protocol the query string and fragment (signed URLs, ``?token=...``). For messages and
    for every URL the job records (manifest, progress, reports)."""
    url = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@]*@", r"\1", url)
    if _SCHEME.match(url):
        url = re.split(r"[?#]", url, maxsplit=1)[0]
    return url


def url_to_fs(url: str, **storage_options: Any) -> tuple[AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for ``url``.

    Args:
        url: a plain path, ``file://...``, ``s3://bucket/key`` or any fsspec URL.
        **storage_options: passed to the filesystem. For ``s3://``, ``endpoint_url`` is honoured
            (moved into ``client_kwargs``), else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
            from the environment.

    Returns:
        ``(fs, path)``.

    Raises:
        ValueError: ``url`` is empty or its protocol has no fsspec implementation installed.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"empty checkpoint URL {url!r}; pass a local path or e.g. s3://bucket/dir")
    opts = dict(storage_options)
    if scheme(url) in ("s3", "s3a"):
        endpoint = opts.pop("endpoint_url", None) or os.environ.get(
            "AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            client_kwargs = dict(opts.get("client_kwargs") or {})
            client_kwargs.setdefault("endpoint_url", endpoint)
            opts["client_kwargs"] = client_kwargs
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as e:
        raise ValueError(
            f"cannot open {redact(url)!r}: {type(e).__name__}: {_clean(str(e), opts)}; install the "
            f"fsspec backend for {scheme(url)}:// (e.g. s3fs, gcsfs) or fix the URL"
        ) from None
    return fs, path


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended by ``/`` (protocol kept, no normalisation)."""
    out = url
    for p in parts:
        if not p:
            continue
        out = out.rstrip("/") + "/" + p.lstrip("/") if out else p
    return out


def check_relname(relname: str) -> str:
    """Validate a relative file name taken from an index or manifest.

    Raises:
        ValueError: the name is empty, absolute, contains a backslash, a protocol, an empty,
            ``.`` or ``..`` component.
    """
    bad = None
    if not isinstance(relname, str) or not relname:
        bad = "it is empty"
    elif "\\" in relname:
        bad = "it contains a backslash"
    elif relname.startswith("/") or re.match(r"^[a-zA-Z]:", relname) or "://" in relname:
        bad = "it is absolute"
    elif any(c in ("", ".", "..") for c in relname.split("/")):
        bad = "it has an empty, '.' or '..' component"
    if bad:
        raise ValueError(
            f"unsafe file name {relname!r} in a checkpoint index/manifest: {bad}; file names must "
            "be relative paths inside the checkpoint folder (e.g. 'model-00001-of-00002"
            ".safetensors')"
        )
    return relname


def safe_join(base: str, relname: str) -> str:
    """``base/relname`` after ``check_relname`` (every name read from an index goes through it).

    Raises:
        ValueError: see ``check_relname``.
    """
    return join(base, check_relname(relname))


def _secrets(opts: Mapping[str, Any]) -> list[str]:
    out = [os.environ[k] for k in _SECRET_ENV if os.environ.get(k)]
    stack: list[Any] = [opts]
    while stack:
        d = stack.pop()
        for k, v in d.items():
            if isinstance(v, Mapping):
                stack.append(v)
            elif isinstance(v, str) and any(s in k.lower() for s in _SECRET_KEYS) and len(v) >= 4:
                out.append(v)
    return out


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]*@")
_QUERY_SECRET = re.compile(r"([?&][^=&\s]*(?:sig|signature|token|key|secret|credential)[^=&\s]*=)"
                           r"[^&\s'\"]*", re.IGNORECASE)


def _clean(msg: str, opts: Mapping[str, Any]) -> str:
    """``msg`` without the storage options' secrets and without credentials that an underlying
    error repeats from a URL (``user:password@``, signed-URL query values)."""
    for s in _secrets(opts):
        msg = msg.replace(s, "***")
    msg = _USERINFO.sub(r"\1", msg)
    msg = _QUERY_SECRET.sub(r"\1***", msg)
    return msg[:300]


@contextlib.contextmanager
def fs_errors(
    url: str, what: str = "read", storage_options: Mapping[str, Any] | None = None
) -> Iterator[None]:
    """Turn fsspec/botocore failures inside the block into errors naming ``url`` and the fix.

    Args:
        url: the URL being accessed (redacted in messages).
        what: the verb for the message (``"read"``, ``"write"``, ...).
        storage_options: options whose secret values are scrubbed from messages.

    Raises:
        FileNotFoundError: the object does not exist, or the store cannot be reached.
        PermissionError: access was denied or credentials are missing/invalid.
    """
    opts = storage_options or {}
    u = redact(url)
    try:
        yield
    except (KeyError, ValueError):
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"cannot {what} {u!r}: not found ({_clean(str(e), opts)}); check the URL, the bucket "
            "and that the checkpoint was written completely"
        ) from None
    except PermissionError as e:
        raise PermissionError(
            f"cannot {what} {u!r}: access denied ({_clean(str(e), opts)}); {_CRED_HINT}"
        ) from None
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors have no common base we can import
        name = type(e).__name__
        msg = _clean(str(e), opts)
        response = getattr(e, "response", None)  # botocore's ClientError: its HTTP status
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") \
            if isinstance(response, Mapping) else None
        if status in (401, 403) or any(
            s in name for s in ("Credential", "Auth", "Signature", "AccessDenied", "Token")
        ):
            raise PermissionError(f"cannot {what} {u!r}: {name}: {msg}; {_CRED_HINT}") from None
        if isinstance(e, (OSError, TimeoutError)) or any(
            s in name for s in ("Connect", "Endpoint", "Timeout", "ClientError", "HTTP")
        ):
            raise FileNotFoundError(
                f"cannot {what} {u!r}: {name}: {msg}; check the endpoint (endpoint_url / "
                "AWS_ENDPOINT_URL), the network and the bucket name"
            ) from None
        raise


def file_size(fs: AbstractFileSystem, path: str, where: str, required: bool = True) -> int | None:
    """The size of a regular file from the store's metadata (nothing is read).

    Args:
        fs, path: the file.
        where: its (redacted) location, for messages.
        required: a store that reports no size is refused (else None is returned).

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a regular file (a folder, a device
            or pipe behind a link), or (``required``) the store reports no size.
    """
    info = fs.info(path)
    kind = info.get("type")
    if kind not in (None, "file"):
        raise CheckpointError(f"{where} is a {str(kind)[:20]}, not a file: it is not a regular "
                              "file, refused")
    size = info.get("size")
    if type(size) is not int or size < 0:
        if not required:
            return None
        raise CheckpointError(f"{where}: the store reports no size for it; a checkpoint must be "
                              "on a store that reports file sizes")
    return size


def read_small(fs: AbstractFileSystem, path: str, limit: int, where: str, *, url: str = "",
               storage_options: Mapping[str, Any] | None = None,
               what: str = "such a file may have", sized: bool = True) -> bytes:
    """At most ``limit`` bytes of the file at ``path`` (a manifest, a config.json, a copied
    file), never more: with ``sized``, its size (``file_size``: a regular file the store reports
    a size for) is compared with ``limit`` before a byte is read; then at most ``limit + 1``
    bytes are read, so a bigger file (or one that grew in between) is refused unread.

    Args:
        fs, path: the file.
        limit: the most bytes it may have.
        where: its (redacted) location, for messages.
        url, storage_options: for ``fs_errors`` (the URL named, secrets scrubbed).
        what: completes "more than the N bytes ..." in the message.
        sized: ask the store for the file's size first (False: for stores that may not report
            one, only the read is capped).

    Raises:
        FileNotFoundError / PermissionError: see ``fs_errors``.
        CheckpointError: more than ``limit`` bytes; with ``sized``, not a regular file or no size.
    """
    size = None
    if sized:
        with fs_errors(url or where, "read", storage_options):
            size = file_size(fs, path, where)
    msg = f"more than the {limit:,} bytes {what}; refused without reading it"
    if size is not None and size > limit:
        raise CheckpointError(f"{where}: {size:,} bytes, {msg}")
    with fs_errors(url or where, "read", storage_options):
        raw = fs.cat_file(path, start=0, end=limit + 1) if size != 0 else b""
    if len(raw) > limit:
        raise CheckpointError(f"{where}: {msg}")
    return raw
