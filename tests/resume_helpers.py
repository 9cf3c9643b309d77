"""Helpers shared by the resume, fault and cluster tests: a tiny Mixtral, job configs, and a
byte-for-byte view of an output folder (the report files carry wall times and are left out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from fixtures_s3 import save_tiny, tiny_model

from qmoe_ray.job.config import CompressConfig

REPORTS = {"report.json", "report.md", "report.png"}


def make_tiny_mixtral(path: Path, layers: int = 2) -> Path:
    """A tiny Mixtral saved by transformers in bf16, with ``tokens.npy`` calibration ids."""
    save_tiny(tiny_model("mixtral", num_hidden_layers=layers, num_local_experts=6), path,
              dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    np.save(path / "tokens.npy", rng.integers(3, 97, size=(96, 32)).astype(np.int64))
    return path


def job_options(model: Path | str, out: Path | str, data: str | None = None, **kw: Any) -> dict:
    """The options of the test job (a dict, so it can also become CLI flags)."""
    base = dict(source=str(model), output=str(out),
                data=data or f"{model}/tokens.npy", num_samples=48, seq_len=32,
                eval_samples=8, batch_size=8, group_size=2)
    base.update(kw)
    return base


def job_cfg(model: Path | str, out: Path | str, **kw: Any) -> CompressConfig:
    """``job_options`` as a ``CompressConfig``."""
    return CompressConfig(**job_options(model, out, **kw))


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the reports, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in REPORTS}


def assert_same_bytes(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """The two folders hold the same files with the same bytes (and a manifest)."""
    assert "manifest.json" in a
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"files differ: {differ}"


def stop_head(proc: Any, temp: str) -> None:
    """Stop a Ray head a test started with ``ray start --head --block`` (in its own session) and
    remove its temp dir: SIGTERM stops the node's processes, then anything left in the session."""
    import os
    import shutil
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shutil.rmtree(temp, ignore_errors=True)
