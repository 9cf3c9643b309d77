"""Storage retries: the one place that decides which storage errors are transient (timeouts,
connection failures, throttling, 5xx) and retries them with exponential backoff. No Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              FileExistsError)
_TRANSIENT_NAMES = ("Timeout", "Connect", "Throttl", "SlowDown", "ServiceUnavailable",
                    "InternalError", "ResponseParserError", "IncompleteRead")
# error codes of HTTP error responses (botocore's ClientError) that are transient whatever their
# status: S3 answers an idle socket with 400 RequestTimeout, and throttling may come as a 4xx
_TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown",
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded"})


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying.

    Timeouts, connection failures (botocore's own ``ConnectionError`` family is not an
    ``OSError``), throttling and 5xx responses are; missing objects, denied access and anything
    that is not a storage error are not.
    """
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    name = type(exc).__name__
    if any(s in name for s in _TRANSIENT_NAMES):
        return True
    status = getattr(exc, "response", None)
    if isinstance(status, Mapping):
        error = status.get("Error")
        if isinstance(error, Mapping) and error.get("Code") in _TRANSIENT_CODES:
            return True
        code = status.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return isinstance(code, int) and (code >= 500 or code == 429)
    return isinstance(exc, OSError)  # s3fs maps unknown (5xx) S3 errors to OSError(EIO)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Run ``fn``, retrying transient storage errors with exponential backoff.

    Args:
        fn: the storage operation.
        what: what it does and where, for the message (``"writing s3://b/x/shards/..."``).
        attempts: tries in all.
        base_delay: seconds before the first retry; doubled each time.

    Raises:
        OSError: a permanent error at once, or a transient one after the last attempt, naming
            ``what`` and the cause.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - storage backends raise many unrelated types
            if not is_transient(exc) and not isinstance(exc, OSError):
                raise
            if not is_transient(exc) or attempt == attempts - 1:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise OSError(f"{what} failed{tries}: {type(exc).__name__}: {exc}") from exc
            time.sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")


def put_file(fs: Any, path: str, data: bytes) -> None:
    """Write a whole file, creating its folder only when the write says it is missing (object
    stores have no folders: one request per file instead of two)."""
    try:
        fs.pipe_file(path, data)
    except FileNotFoundError:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
