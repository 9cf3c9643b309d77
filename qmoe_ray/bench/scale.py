"""Scale, measured: ``python jobs/benchmark.py scale``.

The manifest part: a c2048-sized manifest (``_bigmanifest``: a real job's
manifest, the embedded tiny SwitchTransformers compressed, with its experts cloned to
``--experts`` per layer on its 8 MoE layers) written, then ``read_manifest`` (size limit, parse,
full validation: what every reader does first) timed in a fresh process, with that process's
peak RSS.

The job part (``--jobs``): real compression jobs (real Ray, local disk, ``_scalejob``: each in
its own process, the driver's RSS its own) over real-shaped checkpoints (``realshape``: the
released matrix shapes, fewer layers and experts), with per-stage seconds, every actor kind's
peak RSS, the object store's use and spilled bytes, and the output's bytes. The first run
(``FIT``) fits the cost model's constants (``qmoe_ray.job.costmodel``); the model then predicts
the other runs, which it did not see, and the ratios measured / predicted are reported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from qmoe_ray.bench import BenchResult
from qmoe_ray.errors import InputError

# peak RSS as VmHWM of the probe's own memory: ru_maxrss would carry the parent's peak over exec
_PROBE = ("import json,re,sys,time\n"
          "from qmoe_ray.format.manifest import read_manifest\n"
          "t=time.perf_counter(); read_manifest(sys.argv[1]); s=time.perf_counter()-t\n"
          "hwm=re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
          "print(json.dumps({'seconds': s, 'peak_rss_mb': int(hwm)/1024}))\n")


#: the job runs: name -> (released config, layers, experts per layer, samples, seq_len, group)
JOBS: dict[str, tuple[str, int, int, int, int, int]] = {
    "qwen3-1L-16E": ("qwen3-30b-a3b", 1, 16, 32, 512, 8),
    "qwen3-2L-16E": ("qwen3-30b-a3b", 2, 16, 32, 512, 8),
    "qwen3-1L-32E": ("qwen3-30b-a3b", 1, 32, 32, 512, 8),
    "mixtral-1L-1E": ("mixtral-8x7b", 1, 1, 8, 512, 1),
    # a slice of one DeepSeek-V3 MoE layer (issue 14): 16 of its 256 experts (top-8 of 16),
    # hidden 7168, expert width 2048, MLA attention and the shared expert at true shapes
    "deepseek-v3-1L-16E": ("deepseek-v3", 1, 16, 32, 512, 8),
    # the issue's realistic calibration size: 256 x 512 tokens (8x the others')
    "qwen3-1L-16E-c256": ("qwen3-30b-a3b", 1, 16, 256, 512, 8),
}
FIT = "qwen3-1L-16E"


def add_arguments(parser) -> None:
    parser.add_argument("--experts", type=int, nargs="+", default=[2048],
                        help="experts per layer of the grown manifests (7680: 122,880 matrices)")
    parser.add_argument("--jobs", nargs="*", default=None, choices=list(JOBS),
                        help=f"real-shaped job runs (default all; {FIT} fits the cost model); "
                             "with --reuse, the ones its file lacks are run and added")
    parser.add_argument("--no-manifest", action="store_true", help="skip the manifest part")
    parser.add_argument("--manifest-only", action="store_true",
                        help="only the manifest part (no job runs); BENCHMARKS.md keeps the "
                             "section's job rows and gets only its manifest table replaced")
    parser.add_argument("--reads", type=int, default=5,
                        help="fresh-process reads per manifest (the median is reported)")
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 3],
                        help="manifest layouts to time (1: entry objects, before version 3; "
                             "3: columns, what the job writes)")
    parser.add_argument("--write-constants", action="store_true",
                        help="write the fitted cost-model constants to "
                             "qmoe_ray/job/cost_constants.json (what `qmoe-ray plan` uses)")
    parser.add_argument("--raw", default=None,
                        help="write every run's raw figures to this JSON file")
    parser.add_argument("--reuse", default=None,
                        help="take the job runs' raw figures from this JSON file (--raw of an "
                             "earlier run) instead of running them")


def run_jobs(names, workdir: Path) -> dict[str, dict[str, Any]]:
    """Each job run of ``names`` (``JOBS``): its checkpoint written, the job run in a fresh
    process (``_scalejob``), the checkpoints removed after; returns the figures by name."""
    from qmoe_ray.bench.realshape import released_config, shrink_config, write_realshape

    out = {}
    for name in names:
        model, layers, experts, samples, seq, group = JOBS[name]
        src, dst = workdir / f"{name}-src", workdir / f"{name}-out"
        cfg = shrink_config(released_config(model), layers=layers, experts=experts)
        info = write_realshape(str(src), cfg, tokens=max(1 << 18, 2 * samples * seq))
        spec = {"source": str(src), "output": str(dst), "data": str(src / "tokens.npy"),
                "num_samples": samples, "seq_len": seq, "eval_samples": 0, "group_size": group,
                "batch_size": 8, "overwrite": True}
        (workdir / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "qmoe_ray.bench._scalejob",
                               str(workdir / "spec.json")], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"scale job {name} failed:\n{proc.stderr[-4000:]}")
        out[name] = {"model": model, "layers": layers, "experts": experts, "samples": samples,
                     "seq_len": seq, "group_size": group, "source_bytes": info["bytes"],
                     "config": cfg, **json.loads(proc.stdout.splitlines()[-1])}
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    return out


def run(args) -> BenchResult:
    if args.manifest_only:
        if args.no_manifest:
            raise InputError("--manifest-only and --no-manifest exclude each other")
        tmp = Path(tempfile.mkdtemp(prefix="qmoe-scale-"))
        try:
            result = _manifest(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result.part = "manifest"
        return result
    reused = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    wanted = args.jobs if args.jobs is not None else [] if args.reuse else list(JOBS)
    to_run = [n for n in wanted if n not in reused]
    names = list(reused) + to_run
    if names and FIT not in names:  # before any job runs: the tables need the fit run
        raise InputError(f"--jobs {' '.join(names)}: the cost model is fitted on {FIT}, which "
                         "is not among them; add it, or --reuse a --raw file that holds it")
    tmp = Path(tempfile.mkdtemp(prefix="qmoe-scale-"))
    try:
        jobs = {**reused, **(run_jobs(to_run, tmp) if to_run else {})}
        if args.raw:
            Path(args.raw).write_text(json.dumps(jobs, indent=1))
        manifest = None if args.no_manifest else _manifest(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parts, figures, notes = [], {"jobs": jobs}, []
    if jobs:
        from qmoe_ray.bench import _scaletables

        md, extra, more = _scaletables.tables(jobs, FIT)
        if args.write_constants:
            path = Path(__file__).resolve().parent.parent / "job" / "cost_constants.json"
            path.write_text(json.dumps(extra["constants"], indent=1) + "\n")
        parts.append(md)
        figures.update(extra)
        notes += more
    if manifest is not None:  # in its part's markers: a --manifest-only run replaces just it
        body = manifest.markdown + "".join(f"\n- {n}" for n in manifest.notes)
        parts.append(f"<!-- bench:scale:manifest -->\n{body}\n<!-- /bench:scale:manifest -->")
        figures.update(manifest.figures)
    return BenchResult(figures, "\n\n".join(parts), notes=notes)


def _manifest(args, tmp: Path) -> BenchResult:
    import statistics

    from qmoe_ray.bench._bigmanifest import write_grown

    rows: list[dict[str, Any]] = []
    try:
        subprocess.run([sys.executable, "-m", "qmoe_ray", "compress", "--source",
                        "embedded-switch", "--output", str(tmp / "sw"), "--num-samples", "16",
                        "--seq-len", "64", "--eval-samples", "0", "--overwrite"],
                       check=True, capture_output=True)
        for e in args.experts:
            for v in args.versions:
                info = write_grown(tmp / "sw", tmp / f"m{e}", e, version=v)
                runs = [json.loads(subprocess.run(
                    [sys.executable, "-c", _PROBE, str(tmp / f"m{e}")], check=True,
                    capture_output=True, text=True).stdout.splitlines()[-1])
                    for _ in range(max(1, args.reads))]
                rows.append({"experts_per_layer": e, **info, "reads": len(runs),
                             "seconds_all": [r["seconds"] for r in runs],
                             "seconds": statistics.median(r["seconds"] for r in runs),
                             "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)})
                shutil.rmtree(tmp / f"m{e}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp / "sw", ignore_errors=True)
    lines = ["Manifest of a grown Switch job (8 MoE layers), `read_manifest` (size limit, parse, "
             "every check) in a fresh process, median of several reads (target: < 2 s and "
             "driver < 1 GB for a c2048-sized one; 122,880 matrices is switch-c-2048's count):",
             "", "| expert matrices | layout (format version) | manifest | read_manifest "
             "(median) | min..max | peak RSS |", "|---|---|---|---|---|---|"]
    names = {1: "entry objects (1)", 3: "columns (3)"}
    for r in rows:
        lines.append(f"| {r['matrices']:,} | {names.get(r['format_version'], r['format_version'])}"
                     f" | {r['bytes'] / 1e6:.1f} MB | {r['seconds']:.2f} s | "
                     f"{min(r['seconds_all']):.2f}..{max(r['seconds_all']):.2f} s | "
                     f"{r['peak_rss_mb']:.0f} MB |")
    return BenchResult({"manifests": rows}, "\n".join(lines),
                       notes=[f"{args.reads} fresh-process reads per manifest on the shared "
                              "2-core machine (other jobs running: noisy); peak RSS is the "
                              "reading process's VmHWM, median"])
