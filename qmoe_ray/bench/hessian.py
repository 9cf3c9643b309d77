"""Hessian sums in float32 or float64 (``--hessian-dtype``): ``python jobs/benchmark.py hessian``.

What float64 sums buy, and what they cost, measured three ways:

- stream: a real-shaped expert input (``--model``'s widths: Qwen3-30B-A3B's 2048 by default)
  with ``--tokens`` tokens (131,072 = 256 x 512) fed in batches of ``--batch`` (512), LLM-like
  activations (a shared component, a few outlier channels, a non-zero mean). The Hessian with
  float32 products summed in float32, and summed in float64 (the job before the option), each
  against a float64 reference (float64 products and sums): the largest relative error of ``H``
  (over ``max |H|``) and of its diagonal, then GPTQ (ternary, the job's defaults) of a
  real-shaped matrix (``N(0, initializer_range)``, as ``realshape`` draws it) on each ``H``: the
  proxy loss on the reference ``H`` and how many codes differ. The job itself forms an expert's
  Hessian with one product of all its tokens, also measured (``one product``);
- memory: peak RSS over the process's base, in a fresh process each, of forming a group's
  Hessians (``qmoe_ray.quant.hessian``) and of GPTQ on them, per dtype;
- job: the embedded Mixtral, ternary and int2 GPTQ, with each dtype: held-out loss, proxy
  losses, and how many stored tensors differ (their SHA-256 in the manifest).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from qmoe_ray.bench import BenchResult

_PROBE = r"""
import json, re, sys, torch
from qmoe_ray.quant import gptq, hessian
def mb(key):
    s = open('/proc/self/status').read()
    return int(re.search(key + r':\s+(\d+)', s).group(1)) / 1024
def reset():
    open('/proc/self/clear_refs', 'w').write('5')
E, C, R, T, dt = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
xs = [torch.randn(T, C, generator=g) for _ in range(E)]
W = torch.randn(E, R, C, generator=g) * 0.02
base = mb('VmRSS'); reset()
H, n = hessian(xs, dtype=getattr(torch, dt))
form = mb('VmHWM') - base
base2 = mb('VmRSS'); reset()
gptq(W, H, 'ternary', actorder=True, tokens=n)
print(json.dumps({"form_mb": form, "gptq_mb": mb('VmHWM') - base2, "H_mb": H.numel() * 4 / 2**20}))
"""


def add_arguments(parser) -> None:
    """Options of the ``hessian`` benchmark."""
    parser.add_argument("--model", default="qwen3-30b-a3b",
                        help="released config whose expert input width is streamed")
    parser.add_argument("--tokens", type=int, default=131072, help="tokens through the input")
    parser.add_argument("--batch", type=int, default=512, help="tokens per streamed batch")
    parser.add_argument("--memory-shapes", default="2x4096,8x2048",
                        help="EXPERTSxCOLS of the memory probes (comma-separated)")
    parser.add_argument("--samples", type=int, default=256, help="job: calibration samples")
    parser.add_argument("--eval-samples", type=int, default=64, help="job: held-out samples")
    parser.add_argument("--skip-job", action="store_true", help="skip the embedded-model jobs")
    parser.add_argument("--baseline-tree", default=None,
                        help="a checkout of older code (its qmoe_ray/ inside): the memory "
                             "probes run on it too, as the 'before' rows")
    parser.add_argument("--baseline-label", default="before",
                        help="what the baseline tree is (a commit), for the table")


def _activations(T: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """LLM-like inputs: a shared component, 4 outlier channels x20, a mean of 0.3."""
    X = torch.randn(T, cols, generator=g)
    X += 0.5 * X[:, :1] + 0.3
    X[:, torch.randperm(cols, generator=g)[:4]] *= 20.0
    return X


def _stream(args) -> dict[str, Any]:
    """The streamed Hessians against the float64 reference, and GPTQ on each."""
    from qmoe_ray.bench.realshape import released_config
    from qmoe_ray.quant import HessianAccumulator, gptq, hessian, parse_scheme

    cfg = released_config(args.model)
    cols = int(cfg["hidden_size"])
    rows = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    g = torch.Generator().manual_seed(0)
    acc = {k: HessianAccumulator(1, cols, dtype=dt) for k, dt in
           (("float32", torch.float32), ("float64", torch.float64), ("ref", torch.float64))}
    chunks = []
    for a in range(0, args.tokens, args.batch):
        X = _activations(min(args.batch, args.tokens - a), cols, g)
        acc["float32"].add(0, X)
        acc["float64"].add(0, X)
        acc["ref"].add(0, X.double())  # float64 products
        chunks.append(X)
    ref = acc["ref"].sums[0] / acc["ref"].counts[0]
    Hs = {k: acc[k].result()[0] for k in ("float32", "float64")}
    whole = torch.cat(chunks)
    del chunks
    one = {k: hessian(whole, dtype=getattr(torch, k))[0] for k in ("float32", "float64")}
    del whole
    Hs["one product, float32"], Hs["one product, float64"] = one["float32"], one["float64"]
    scale = ref.abs().max()
    W = torch.randn(rows, cols, generator=g) * float(cfg.get("initializer_range", 0.02))
    scheme = parse_scheme("ternary")
    base = gptq(W, ref.float(), scheme, actorder=True)

    def loss_on_ref(q: Any) -> float:
        D = (W - q.dequantize().reshape(W.shape)).double()
        return float(((D @ ref) * D).sum())

    ref_loss = loss_on_ref(base)
    out: dict[str, Any] = {"cols": cols, "rows": rows, "tokens": args.tokens,
                           "batch": args.batch, "model": args.model, "ref_loss": ref_loss,
                           "rows_by_kind": {}}
    for k, H in Hs.items():
        r = gptq(W, H[0], scheme, actorder=True)
        loss = loss_on_ref(r)
        out["rows_by_kind"][k] = {
            "max_rel_err": float((H[0].double() - ref).abs().max() / scale),
            "max_rel_err_diag": float(((H[0].diagonal().double() - ref.diagonal()).abs()
                                       / ref.diagonal()).max()),
            "loss_on_ref": loss,
            "loss_vs_ref_gptq": loss / ref_loss - 1,
            "codes_differ_from_ref_gptq": int((r.codes != base.codes).sum()),
            "codes": r.codes.numel(),
        }
    same = torch.equal(Hs["one product, float32"], Hs["one product, float64"])
    out["one_product_bit_identical"] = same
    out["stream_f32_vs_f64_codes_differ"] = int(
        (gptq(W, Hs["float32"][0], scheme, actorder=True).codes
         != gptq(W, Hs["float64"][0], scheme, actorder=True).codes).sum())
    return out


def _memory(args) -> list[dict[str, Any]]:
    import os

    trees = [("this code", None)]
    if args.baseline_tree:
        trees.insert(0, (args.baseline_label, str(Path(args.baseline_tree).resolve())))
    rows = []
    for shape in args.memory_shapes.split(","):
        E, C = (int(v) for v in shape.lower().split("x"))
        for label, tree in trees:
            env = dict(os.environ)
            if tree:
                env["PYTHONPATH"] = tree
            for dt in ("float64", "float32"):
                res = subprocess.run([sys.executable, "-c", _PROBE, str(E), str(C), "256",
                                      "2048", dt], capture_output=True, text=True, check=True,
                                     env=env)
                rows.append({"experts": E, "cols": C, "dtype": dt, "code": label,
                             **json.loads(res.stdout.splitlines()[-1])})
    return rows


def _jobs(args) -> dict[str, Any]:
    from qmoe_ray.bench.job import _baseline_loss
    from qmoe_ray.data import embedded_model_path
    from qmoe_ray.format.manifest import read_manifest
    from qmoe_ray.job.cluster import ray_init, shutdown
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression

    tmp = Path(tempfile.mkdtemp(prefix="qmoe-bench-hessian-"))
    base = dict(source="embedded", data="embedded", num_samples=args.samples,
                eval_samples=args.eval_samples, overwrite=True)
    out: dict[str, Any] = {}
    try:
        out["baseline_loss"] = _baseline_loss(str(embedded_model_path()), "embedded",
                                              args.eval_samples, CompressConfig.seq_len)
        ray_init(CompressConfig())
        for scheme in ("ternary", "int2"):
            runs = {}
            for dt in ("float64", "float32"):
                dst = tmp / f"{scheme}-{dt}"
                rep = run_compression(CompressConfig(**base, output=str(dst), scheme=scheme,
                                                     hessian_dtype=dt), progress=False)
                m = read_manifest(str(dst))
                stats = [s for st in (m["experts"].values() if isinstance(m["experts"], dict)
                                      else [m["experts"]]) for s in st]
                runs[dt] = {"loss": rep["heldout_loss"],
                            "proxy": [v for s in stats for v in s["proxy_loss"].values()],
                            "sha": {n: e["sha256"] for n, e in m["tensors"].items()}}
            a, b = runs["float64"], runs["float32"]
            out[scheme] = {
                "loss_float64": a["loss"], "loss_float32": b["loss"],
                "proxy_max_rel_diff": max(abs(x - y) / max(abs(x), 1e-30)
                                          for x, y in zip(a["proxy"], b["proxy"], strict=True)),
                "tensors": len(a["sha"]),
                "tensors_differ": sum(a["sha"][n] != b["sha"].get(n) for n in a["sha"])}
    finally:
        shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run(args) -> BenchResult:
    figures: dict[str, Any] = {"stream": _stream(args), "memory": _memory(args)}
    if not args.skip_job:
        figures["job"] = _jobs(args)
    return BenchResult(figures, _markdown(figures))


def _markdown(f: dict[str, Any]) -> str:
    s = f["stream"]
    lines = [f"Streamed Hessian of one real-shaped expert input ({s['model']}: {s['cols']} "
             f"columns, {s['tokens']:,} tokens in batches of {s['batch']}, LLM-like "
             "activations), against a float64 reference (float64 products and sums); GPTQ "
             f"(ternary, act-order) of a {s['rows']}x{s['cols']} matrix on each, its proxy loss "
             f"taken on the reference Hessian (reference GPTQ: {s['ref_loss']:.6g}):", "",
             "| Hessian | max rel. error of H | of diag H | GPTQ loss / reference GPTQ's - 1 | codes "
             "differing |", "|---|---|---|---|---|"]
    for k, r in s["rows_by_kind"].items():
        lines.append(f"| {k} | {r['max_rel_err']:.2e} | {r['max_rel_err_diag']:.2e} | "
                     f"{r['loss_vs_ref_gptq']:+.2e} | {r['codes_differ_from_ref_gptq']:,}"
                     f" of {r['codes']:,} |")
    lines += ["", f"Streamed float32 vs float64 sums: {s['stream_f32_vs_f64_codes_differ']:,} "
              "codes differ. One product of all the tokens (what the job does): float32 and "
              "float64 sums give bit-identical Hessians: "
              f"**{'yes' if s['one_product_bit_identical'] else 'no'}**.", "",
              "Memory (peak RSS over the process's base, fresh process each; 2048 tokens per "
              "expert, GPTQ of 256 rows):", "",
              "| code | group | sums | H (float32) | forming H | GPTQ on H |",
              "|---|---|---|---|---|---|"]
    for r in f["memory"]:
        lines.append(f"| {r['code']} | {r['experts']} x {r['cols']}^2 | {r['dtype']} | "
                     f"{r['H_mb']:.0f} MB | "
                     f"{r['form_mb']:.0f} MB ({r['form_mb'] / r['H_mb']:.2f}x) | "
                     f"{r['gptq_mb']:.0f} MB ({r['gptq_mb'] / r['H_mb']:.2f}x) |")
    j = f.get("job")
    if j:
        lines += ["", f"Embedded Mixtral jobs (uncompressed held-out loss {j['baseline_loss']:.4f})"
                  ":", "", "| scheme | held-out, float64 sums | float32 sums | proxy losses: "
                  "max rel. diff | stored tensors differing |", "|---|---|---|---|---|"]
        for scheme in ("ternary", "int2"):
            r = j[scheme]
            lines.append(f"| {scheme} | {r['loss_float64']:.6f} | {r['loss_float32']:.6f} | "
                         f"{r['proxy_max_rel_diff']:.2e} | {r['tensors_differ']} of "
                         f"{r['tensors']} |")
    return "\n".join(lines)
