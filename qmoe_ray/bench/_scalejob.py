"""One real compression job, measured: run in its own process by the ``scale`` benchmark
(``python -m qmoe_ray.bench._scalejob SPEC.json``), so the driver's peak RSS is this process's.

The job is the real one (``run_compression``: real Ray, actors, local disk). Measured beside it:

- every actor's peak RSS (``VmHWM`` of its process, polled every 0.2 s from the first
  ``layer_start`` until the job returns; the high-water mark only grows, so the last read is the
  peak up to then), per actor kind: stores, workers, the writer;
- the object store (``ray``'s memory summary, polled every second from the first
  ``layer_start``: plasma bytes in use, bytes spilled so far), its maximum, and after each
  layer (the stores' streams alone);
- every actor kind's CPU seconds (``/proc/PID/stat``, the same polls): on a shared machine,
  a worker's CPU seconds over its busy wall time say what share of a core it got;
- the report's timings (driver side: dense, quantize, write; stores: dense forward and routing;
  workers, summed over groups: read, hessian, quantize, forward, encode).

Prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def main(spec_path: str) -> None:
    from qmoe_ray.job.cluster import actor_pids, object_store_mib
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression

    spec = json.loads(Path(spec_path).read_text())
    cfg = CompressConfig(**spec)
    pids: dict[int, str] = {}
    peaks: dict[int, float] = {}
    cpu: dict[int, float] = {}
    store_mb: list[dict[str, float]] = []
    stream_mb: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for pid in list(pids):
                peaks[pid] = max(peaks.get(pid, 0.0), _hwm_mb(pid))
                cpu[pid] = max(cpu.get(pid, 0.0), _cpu_s(pid))
            stop.wait(0.2)

    def poll_store() -> None:
        while not stop.is_set():
            try:
                store_mb.append(object_store_mib())
            except Exception:  # noqa: BLE001 - the cluster is shutting down
                return
            stop.wait(1.0)

    thread = threading.Thread(target=poll, daemon=True)
    store_thread = threading.Thread(target=poll_store, daemon=True)

    def hook(event: str, info: dict[str, Any]) -> None:
        try:
            a = info["actors"]
            if event == "layer_start" and not pids:
                for kind, handles in (("store", a.stores), ("worker", a.workers),
                                      ("writer", [a.writer])):
                    for pid in actor_pids(handles):
                        pids[pid] = kind
                thread.start()
                store_thread.start()
            if event == "layer_done":  # between layers the store holds the streams alone
                stream_mb.append(object_store_mib()["plasma_mb"])
        except Exception as exc:  # noqa: BLE001 - a hook must not raise; say what was lost
            print(f"[scalejob] measurement lost: {exc!r}", file=sys.stderr)

    t0 = time.perf_counter()
    report = run_compression(cfg, progress=False, hook=hook)
    wall = time.perf_counter() - t0
    stop.set()
    by_kind: dict[str, float] = {}
    cpu_kind: dict[str, float] = {}
    for pid, kind in pids.items():
        by_kind[kind] = max(by_kind.get(kind, 0.0), peaks.get(pid, 0.0))
        cpu_kind[kind] = cpu_kind.get(kind, 0.0) + cpu.get(pid, 0.0)
    out_bytes = sum(f.stat().st_size for f in Path(cfg.output).rglob("*") if f.is_file())
    hess_tokens = [s["hessian_tokens"] for st in _expert_stats(cfg.output) for s in st]
    routed = [s["routed_tokens"] for st in _expert_stats(cfg.output) for s in st]
    print(json.dumps({
        "wall_s": wall,
        "timings": report["timings"],
        "worker_timings": report["worker_timings"],
        "layer_seconds": [r["seconds"] for r in report["layers"]],
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (the bench
        # process, grown by writing the checkpoint), so it is not this process's peak
        "driver_rss": "VmHWM",
        "peak_rss_mb": {"driver": _hwm_mb(os.getpid()),
                        **by_kind},
        "cpu_s": cpu_kind,
        "object_store": {"plasma_mb_max": max((s["plasma_mb"] for s in store_mb), default=0.0),
                         "spilled_mb_max": max((s["spilled_mb"] for s in store_mb), default=0.0),
                         "stream_mb": max(stream_mb, default=0.0)},
        "output_bytes": out_bytes,
        "expert_bits_per_param": report["sizes"]["expert_bits_per_param"],
        "hessian_tokens": hess_tokens,
        "routed_tokens": routed,
    }))


def _expert_stats(output: str) -> list[list[dict[str, Any]]]:
    from qmoe_ray.format.manifest import read_manifest

    experts = read_manifest(output).get("experts") or {}
    return list(experts.values()) if isinstance(experts, dict) else [experts]


if __name__ == "__main__":
    main(sys.argv[1])
