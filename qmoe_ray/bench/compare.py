"""This checkout against another one, on the same job and the same load, in one run:
``python jobs/benchmark.py compare --baseline DIR``.

For a change that must not slow anything (a refactor), the figure is the median over pairs of the
ratio this / baseline: runs alternate (baseline, this, baseline, this, ...) so the noise of a
shared machine falls on both runs of a pair. Each run is a fresh process with ``PYTHONPATH`` set to its tree
and a working directory outside both, through interfaces every version has: the ``compress``
command on the embedded model (its wall time, Ray start-up included, and the job's own seconds
from ``report.json``) and ``qmoe_ray.load`` of the checkpoint it wrote (decode mode, CPU). The
two checkpoints must be byte-identical (a refactor keeps the output): compared file by file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qmoe_ray.bench import BenchResult, machine_description

_LOAD = (
    "import json, sys, time\n"
    "t = time.perf_counter()\n"
    "import qmoe_ray\n"
    "m = qmoe_ray.load(sys.argv[1], device='cpu')\n"
    "print(json.dumps({'load_s': time.perf_counter() - t}))\n"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", required=True,
                        help="a checkout of the version to compare against (e.g. a git worktree)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tree (alternated)")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples of the job")


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint except the report (it holds wall times)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("report"):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one(tree: Path, work: Path, samples: int) -> tuple[dict[str, float], dict[str, str]]:
    """One compress + one load with ``tree``'s package."""
    out = work / "out"
    cmd = [sys.executable, "-m", "qmoe_ray", "compress", "--source", "embedded", "--output",
           str(out), "--overwrite", "--num-samples", str(samples), "--quiet"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=_env(tree), check=True, capture_output=True, timeout=900)
    wall = time.perf_counter() - t
    report = json.loads((out / "report.json").read_text())
    job_s = float(report["seconds"])
    load = subprocess.run([sys.executable, "-c", _LOAD, str(out)], cwd=work, env=_env(tree),
                          check=True, capture_output=True, text=True, timeout=600)
    load_s = json.loads(load.stdout.strip().splitlines()[-1])["load_s"]
    return {"compress_wall_s": wall, "job_s": job_s, "load_s": load_s}, _digest(out)


def run(args: argparse.Namespace) -> BenchResult:
    here = Path(__file__).resolve().parents[2]
    base = Path(args.baseline).resolve()
    if not (base / "qmoe_ray" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {base}: not a qmoe-ray checkout (no qmoe_ray/__init__.py)")
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
    digests: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="qmoe-compare-") as tmp:
        for i in range(args.repeat):
            for label, tree in (("baseline", base), ("this", here)):
                work = Path(tmp) / f"{label}-{i}"
                work.mkdir()
                figures, digest = _one(tree, work, args.samples)
                runs[label].append(figures)
                digests.setdefault(label, digest)
                print(f"{label} run {i + 1}/{args.repeat}: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for label, rs in runs.items()}
    # each pair ran back to back and so shared the machine's load of the moment: the figure is the
    # median of the per-pair ratios (robust to load that drifts over the run, unlike the ratio of
    # the two medians, which is kept beside it)
    ratio = {k: statistics.median(t[k] / b[k] for b, t in zip(runs["baseline"], runs["this"])
                                  if b[k]) for k in med["this"]}
    same = digests["this"] == digests["baseline"]
    figures: dict[str, Any] = {"median": med, "ratio_this_over_baseline": ratio,
                               "identical_output": same, "repeat": args.repeat,
                               "baseline": str(base), "calib_samples": args.samples}
    rows = [f"| {k} | {med['baseline'][k]:.2f} | {med['this'][k]:.2f} | {ratio.get(k, 0):.3f} |"
            for k in med["this"]]
    md = "\n".join([
        f"This checkout vs `{base.name}` ({args.repeat} alternated runs each, medians; embedded "
        f"model, {args.samples} calibration samples, CPU; {machine_description()}).",
        "",
        "| figure | baseline s (median) | this s (median) | ratio (median of pairs) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Checkpoints byte-identical (report aside): {'yes' if same else 'NO'}.",
    ])
    return BenchResult(figures, md)
