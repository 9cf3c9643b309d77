"""Benchmarks: each submodule measures one part and returns figures plus a markdown section.

A benchmark module defines ``add_arguments(parser)`` and ``run(args) -> BenchResult``.
``jobs/benchmark.py NAME`` runs it, prints the figures and replaces the section
``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` of ``BENCHMARKS.md`` with the new one, stamped
with the date and the machine. Benchmarks compare ratios measured in one run and quote medians,
because shared machines are noisy.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BenchResult:
    """Figures (for machines) and a markdown body (for people) of one benchmark run."""

    figures: dict[str, Any]
    markdown: str
    notes: list[str] = field(default_factory=list)
    #: when set, ``record`` replaces only the part ``<!-- bench:NAME:PART -->`` of the section
    #: (a run that measured one part of a benchmark keeps the section's other rows)
    part: str | None = None


def machine_description() -> str:
    """A one-line description of this machine: CPU model, cores, memory, and GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - a description must never fail
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}"


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def record(name: str, result: BenchResult, path: str | Path = "BENCHMARKS.md") -> None:
    """Replace (or append) the section of benchmark ``name`` in ``path`` (only its part
    ``result.part`` when that is set: ``record_part``)."""
    path = Path(path)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if result.part is not None:
        return record_part(name, result, path, stamp)
    body = (
        f"<!-- bench:{name} -->\n## {name}\n\n"
        f"Measured {stamp} on: {machine_description()}.\n\n"
        f"{result.markdown.strip()}\n"
    )
    if result.notes:
        body += "\n" + "\n".join(f"- {n}" for n in result.notes) + "\n"
    body += f"<!-- /bench:{name} -->\n"
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nWritten by `python jobs/benchmark.py NAME`.\n"
    )
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _m: body, text)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


def record_part(name: str, result: BenchResult, path: Path, stamp: str) -> None:
    """Replace the block ``<!-- bench:NAME:PART -->`` ... ``<!-- /bench:NAME:PART -->`` of
    ``path`` (inserted at the end of the section ``name``, or a new section, when missing),
    stamped with its own date and machine."""
    tag = f"{name}:{result.part}"
    body = (f"<!-- bench:{tag} -->\n_Measured {stamp} on: {machine_description()}._\n\n"
            f"{result.markdown.strip()}\n")
    if result.notes:
        body += "\n" + "\n".join(f"- {n}" for n in result.notes) + "\n"
    body += f"<!-- /bench:{tag} -->\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    part = re.compile(rf"<!-- bench:{re.escape(tag)} -->.*?<!-- /bench:{re.escape(tag)} -->\n",
                      re.S)
    end = f"<!-- /bench:{name} -->\n"
    if part.search(text):
        text = part.sub(lambda _m: body, text)
    elif end in text:
        text = text.replace(end, f"\n{body}{end}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n<!-- bench:{name} -->\n## {name}\n\n{body}{end}"
    path.write_text(text)
