"""Scale, measured: ``python jobs/benchmark.py scale``.

So far only the manifest part of issue 18: a c2048-sized manifest (``_bigmanifest``: a real job's
manifest, the embedded tiny SwitchTransformers compressed, with its experts cloned to
``--experts`` per layer on its 8 MoE layers) written, then ``read_manifest`` (size limit, parse,
full validation: what every reader does first) timed in a fresh process, with that process's
peak RSS. The real-shaped job runs (``realshape``) are not here yet.
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

_PROBE = ("import json,resource,sys,time\n"
          "from qmoe_ray.format.manifest import read_manifest\n"
          "t=time.perf_counter(); read_manifest(sys.argv[1]); s=time.perf_counter()-t\n"
          "print(json.dumps({'seconds': s, 'peak_rss_mb': "
          "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))\n")


def add_arguments(parser) -> None:
    parser.add_argument("--experts", type=int, nargs="+", default=[2048],
                        help="experts per layer of the grown manifests (7680: 122,880 matrices)")


def run(args) -> BenchResult:
    from qmoe_ray.bench._bigmanifest import write_grown

    tmp = Path(tempfile.mkdtemp(prefix="qmoe-scale-"))
    rows: list[dict[str, Any]] = []
    try:
        subprocess.run([sys.executable, "-m", "qmoe_ray", "compress", "--source",
                        "embedded-switch", "--output", str(tmp / "sw"), "--num-samples", "16",
                        "--seq-len", "64", "--eval-samples", "0", "--overwrite"],
                       check=True, capture_output=True)
        for e in args.experts:
            info = write_grown(tmp / "sw", tmp / f"m{e}", e)
            out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp / f"m{e}")], check=True,
                                 capture_output=True, text=True).stdout
            rows.append({"experts_per_layer": e, **info, **json.loads(out.splitlines()[-1])})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["Manifest of a grown Switch job (8 MoE layers), `read_manifest` in a fresh process "
             "(target: < 2 s and driver < 1 GB for a c2048-sized one):", "",
             "| expert matrices | manifest | read_manifest | peak RSS |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['matrices']:,} | {r['bytes'] / 1e6:.1f} MB | {r['seconds']:.2f} s | "
                     f"{r['peak_rss_mb']:.0f} MB |")
    return BenchResult({"manifests": rows}, "\n".join(lines),
                       notes=["one run per size on the shared 2-core machine (noisy)"])
