"""Trim plan files: read (size-capped, checked) and write, on any fsspec URL.

Apart from ``analyze`` (which writes them) and ``evaluate`` (which applies them) so that neither
imports the other; the plan itself is ``qmoe_ray.models.trim_plan``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def read_plan(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The ``TrimPlan`` in the JSON file at ``url`` (at most 4 MiB are read).

    Raises:
        FileNotFoundError / PermissionError: the file cannot be read.
        InputError: not a valid plan (``TrimPlan.from_json``).
    """
    from qmoe_ray.models.trim_plan import MAX_PLAN_BYTES, TrimPlan
    from qmoe_ray.storage.fs import fs_errors, read_small, redact, url_to_fs

    opts = dict(storage_options or {})
    fs, path = url_to_fs(url, **opts)
    with fs_errors(url, "read", opts):
        raw = read_small(fs, path, MAX_PLAN_BYTES, redact(url), url=url, storage_options=opts,
                         what="a trim plan may have")
    return TrimPlan.from_json(raw, f"trim plan {redact(url)}")


def write_plan(plan: Any, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``plan`` (a ``TrimPlan``) as JSON to ``url`` (a path or fsspec URL)."""
    from qmoe_ray.storage.fs import fs_errors, url_to_fs

    opts = dict(storage_options or {})
    fs, path = url_to_fs(url, **opts)
    with fs_errors(url, "write", opts):
        fs.pipe_file(path, plan.to_json().encode())
