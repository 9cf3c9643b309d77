"""Reading a source's experts: peak memory against the shard: ``jobs/benchmark.py sourceread``.

A worker reads one expert group of one layer at a time (``MoEFamily.read_experts`` through
``Checkpoint.read_many``: the group's byte ranges of the shard, adjacent ones coalesced, one
``cat_ranges``). Whether that ever holds a whole shard is measured, not argued: a real-shaped
one-layer checkpoint (``realshape``; Qwen3-30B-A3B, all 128 experts of 768x2048 in one shard,
~1.2 GB bf16 by default) is written to local disk and to S3 (a moto server on 127.0.0.1), and a
fresh process reads the layer's experts group by group, as the workers do, and the whole layer
in one call: its peak RSS over its base (``VmHWM`` after ``clear_refs``) against the shard's
size, the group's bf16 bytes and the float32 weights ``read_experts`` returns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from qmoe_ray.bench import BenchResult

_PROBE = r"""
import json, re, sys
from qmoe_ray.models import get_family
from qmoe_ray.storage.checkpoint import open_source
def mb(key):
    return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1)) / 1024
url, group, opts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
ckpt = open_source(url, opts)
fam = get_family(ckpt.config, ckpt)
layer = [l for l in fam.layers() if l.moe][0]
E = layer.num_experts
base = mb('VmRSS'); open('/proc/self/clear_refs', 'w').write('5')
f32 = 0
for a in range(0, E, group):
    w = fam.read_experts(layer, ckpt, list(range(a, min(a + group, E))))
    f32 = max(f32, sum(t.numel() * t.element_size() for t in w.values()))
    del w
print(json.dumps({"peak_mb": mb('VmHWM') - base, "float32_mb": f32 / 2**20, "experts": E}))
"""


def add_arguments(parser) -> None:
    """Options of the ``sourceread`` benchmark."""
    parser.add_argument("--model", default="qwen3-30b-a3b", help="released config to shape")
    parser.add_argument("--experts", type=int, default=None,
                        help="routed experts of the layer (default: the released count)")
    parser.add_argument("--groups", default="16,128", help="group sizes read (comma-separated)")
    parser.add_argument("--skip-s3", action="store_true", help="local disk only")


def _probe(url: str, group: int, opts: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-c", _PROBE, url, str(group), json.dumps(opts)],
                         capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"sourceread probe of {url} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.splitlines()[-1])


def run(args) -> BenchResult:
    from qmoe_ray.bench.realshape import released_config, shrink_config, write_realshape

    cfg = shrink_config(released_config(args.model), layers=1, experts=args.experts)
    groups = [int(g) for g in args.groups.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="qmoe-bench-sourceread-"))
    rows: list[dict[str, Any]] = []
    try:
        info = write_realshape(str(tmp / "src"), cfg, tokens=1024)
        shard = max((tmp / "src").glob("*.safetensors"), key=lambda p: p.stat().st_size)
        shard_mb = shard.stat().st_size / 2**20
        env = dict(os.environ)
        for g in groups:
            rows.append({"where": "local disk", "group": g, "shard_mb": shard_mb,
                         **_probe(str(tmp / "src"), g, {}, env)})
        shutil.rmtree(tmp / "src", ignore_errors=True)
        if not args.skip_s3:
            rows += _s3(cfg, groups, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {"model": args.model, "bytes": info["bytes"], "rows": rows}
    return BenchResult(figures, _markdown(figures, cfg))


def _s3(cfg: dict[str, Any], groups: list[int], env: dict[str, str]) -> list[dict[str, Any]]:
    import socket

    from moto.server import ThreadedMotoServer

    from qmoe_ray.bench.realshape import write_realshape
    from qmoe_ray.storage.fs import url_to_fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
             "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        opts = {"endpoint_url": f"http://127.0.0.1:{port}", "skip_instance_cache": True}
        fs, _ = url_to_fs("s3://bench", **opts)
        fs.mkdir("bench")
        write_realshape("s3://bench/src", cfg, tokens=1024, storage_options=opts)
        sizes = [fs.size(p) for p in fs.glob("bench/src/*.safetensors")]
        rows = []
        for g in groups:
            rows.append({"where": "s3 (moto, 127.0.0.1)", "group": g,
                         "shard_mb": max(sizes) / 2**20,
                         **_probe("s3://bench/src", g, opts, {**env, **creds})})
        return rows
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _markdown(f: dict[str, Any], cfg: dict[str, Any]) -> str:
    lines = [f"One real-shaped MoE layer of {f['model']} (`realshape`: "
             f"{f['rows'][0]['experts']} experts of {cfg.get('moe_intermediate_size')}x"
             f"{cfg['hidden_size']}, bf16, the layer's experts in one shard), read group by "
             "group by a fresh process as the workers read it (`read_experts`); peak RSS over "
             "the process's base:", "",
             "| where | group | shard | group's bf16 bytes | float32 weights returned | peak "
             "RSS over base |", "|---|---|---|---|---|---|"]
    for r in f["rows"]:
        bf16 = r["float32_mb"] / 2
        lines.append(f"| {r['where']} | {r['group']} | {r['shard_mb']:.0f} MB | {bf16:.0f} MB | "
                     f"{r['float32_mb']:.0f} MB | {r['peak_mb']:.0f} MB "
                     f"({r['peak_mb'] / r['shard_mb']:.2f}x the shard) |")
    return "\n".join(lines)
