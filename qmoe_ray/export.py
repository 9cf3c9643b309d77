"""``qmoe-ray export URL OUT_DIR``: a plain Hugging Face bf16 checkpoint of a compressed model.

For serving stacks that expect an HF folder: ``config.json`` (the source config, dtype bf16), the
tokenizer files the job copied, ``model-0000k-of-0000n.safetensors`` shards and
``model.safetensors.index.json``. transformers loads it with its own class for
``config["model_type"]``.

Why it streams: the decompressed model is ~10-20x larger than the compressed one, so it is never
held whole. Each compressed shard (one transformer block) is read, verified, decoded and written
as one output shard before the next is decoded (``qmoe_ray.loader.iter_shards`` fetches ahead).

Expert tensor names: the compressed checkpoint stores experts under our canonical per-expert
names; the export writes the names transformers' ``save_pretrained`` writes for the family, found
from where the source kept its router (kept verbatim among the dense tensors):

- Mixtral with the router under ``block_sparse_moe``: per-expert ``experts.E.w1/w2/w3``;
- families whose save layout is per-expert ``mlp.experts.E.{gate,up,down}_proj`` (Qwen-MoE,
  OLMoE): those names;
- a decoder family whose router sits under another module than its save layout's (a checkpoint
  written in transformers' internal fused layout): fused ``experts.gate_up_proj`` ``[E, 2F, D]``
  and ``experts.down_proj`` ``[E, D, F]`` under that module;
- SwitchTransformers: ``experts.expert_E.{wi,wo}.weight`` (our canonical names are its names).

``layout="per-expert"`` / ``"fused"`` overrides the choice for decoder families.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

from qmoe_ray.storage import manifest as mf
from qmoe_ray.storage.fs import check_relname, fs_errors, join, url_to_fs

LAYOUTS = ("auto", "per-expert", "fused")
INDEX = "model.safetensors.index.json"


def expert_layout(manifest: Mapping[str, Any], layout: str = "auto"
                  ) -> tuple[str, dict[str, tuple[str, int | None, str | None]]]:
    """How each canonical expert matrix is named in the exported checkpoint.

    Args:
        manifest: the compressed checkpoint's manifest.
        layout: ``"auto"`` (see the module docstring), ``"per-expert"`` or ``"fused"``.

    Returns:
        ``(kind, mapping)`` with kind ``"per-expert"`` or ``"fused"`` and ``mapping`` from each
        canonical name to ``(export name, expert index or None, role or None)``; for fused names
        the index and role say where the matrix goes in the 3-D tensor.

    Raises:
        ValueError: an unknown layout, or ``"fused"`` for a family without a fused layout.
    """
    from qmoe_ray.models import get_family

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    family = get_family(manifest["config"])
    names = set(manifest["tensors"])
    moe = [lay for lay in family.layers() if lay.moe]
    out: dict[str, tuple[str, int | None, str | None]] = {}
    modules = getattr(family, "moe_modules", None)
    if modules is None:  # SwitchTransformers: canonical names are transformers' own
        if layout == "fused":
            raise ValueError("layout='fused' is not available for switch_transformers; use auto")
        for lay in moe:
            for e in range(lay.num_experts):
                for n in family.expert_names(lay, e).values():
                    out[n] = (n, None, None)
        return "per-expert", out
    first = moe[0]
    router = next((m for m in modules if f"{first.name}.{m}.gate.weight" in names), modules[0])
    kind = layout
    if layout == "auto":
        kind = "per-expert" if router == modules[0] else "fused"
    roles = family.source_roles
    for lay in moe:
        p = f"{lay.name}.{router}.experts"
        for e in range(lay.num_experts):
            for r, n in family.expert_names(lay, e).items():
                if kind == "per-expert":
                    out[n] = (f"{p}.{e}.{roles[r]}.weight", None, None)
                else:
                    target = f"{p}.down_proj" if r == "down" else f"{p}.gate_up_proj"
                    out[n] = (target, e, r)
    return kind, out


def _fuse(parts: dict[str, dict[tuple[int, str], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-expert matrices into transformers' fused 3-D tensors."""
    out = {}
    for target, mats in parts.items():
        experts = sorted({e for e, _ in mats})
        if experts != list(range(len(experts))):
            raise ValueError(f"{target}: experts {experts} are not 0..{len(experts) - 1}")
        if target.endswith("gate_up_proj"):
            out[target] = torch.stack([torch.cat([mats[(e, "gate")], mats[(e, "up")]])
                                       for e in experts])
        else:
            out[target] = torch.stack([mats[(e, "down")] for e in experts])
    return out


def export(url: str, out_dir: str, layout: str = "auto", overwrite: bool = False,
           storage_options: Mapping[str, Any] | None = None,
           output_options: Mapping[str, Any] | None = None, workers: int = 4,
           progress: bool = False) -> dict[str, Any]:
    """Write a plain HF bf16 checkpoint of the decompressed model.

    Args:
        url: the compressed checkpoint (any fsspec URL).
        out_dir: the output folder (any fsspec URL).
        layout: expert tensor layout (see ``expert_layout``).
        overwrite: replace an existing checkpoint in ``out_dir``.
        storage_options, output_options: fsspec options for ``url`` and ``out_dir``.
        workers: concurrent range reads.
        progress: show a progress bar on stderr.

    Returns:
        ``{"files", "tensors", "bytes", "layout", "seconds"}``.

    Raises:
        FileExistsError: ``out_dir`` already holds a checkpoint and ``overwrite`` is False.
        ValueError / FileNotFoundError / PermissionError: see ``qmoe_ray.loader.load``.
    """
    from qmoe_ray.loader import (
        Timings,
        check_manifest,
        decode_matrix,
        encoded_matrix,
        iter_shards,
        read_manifest,
    )

    t0 = time.perf_counter()
    so, oo = dict(storage_options or {}), dict(output_options or {})
    manifest = read_manifest(url, **so)
    check_manifest(manifest, f"{url}/{mf.MANIFEST}")
    kind, names = expert_layout(manifest, layout)
    ofs, oroot = url_to_fs(out_dir, **oo)
    oroot = oroot.rstrip("/")
    with fs_errors(out_dir, "read", oo):
        exists = ofs.exists(f"{oroot}/{INDEX}") or ofs.exists(f"{oroot}/config.json")
    if exists and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a checkpoint; choose another folder "
                              "or pass overwrite=True (--overwrite)")
    with fs_errors(out_dir, "write", oo):
        ofs.makedirs(oroot, exist_ok=True)
    quantized = manifest["quantized"]
    tables = manifest.get("tables", {})
    stored = {f"{n}.q.{f}" for n, e in quantized.items() for f in e["fields"]}
    stored |= {f"{n}.{p}" for n, e in quantized.items() for p in e["params"]}
    stored |= {f"{t}.freqs" for t in tables}
    files = manifest["files"]
    weight_map: dict[str, str] = {}
    total = 0
    timings = Timings()
    shards = iter_shards(url, manifest, workers=workers, timings=timings,
                         progress="exporting" if progress else False, **so)
    for i, (_, part) in enumerate(shards):
        out: dict[str, torch.Tensor] = {}
        fused: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
        for name, t in part.items():
            if name not in stored:
                out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
        cache: dict[str, Any] = {}
        t_dec = time.perf_counter()
        for name, entry in quantized.items():
            if f"{name}.{entry['params'][0]}" not in part:
                continue
            w = decode_matrix(encoded_matrix(name, entry, part, tables, cache)).contiguous()
            target, e, role = names[name]
            if e is None:
                out[target] = w
            else:
                fused.setdefault(target, {})[(e, role)] = w
        out.update(_fuse(fused))
        timings.decode += time.perf_counter() - t_dec
        if not out:
            continue
        fname = check_relname(f"model-{i + 1:05d}-of-{len(files):05d}.safetensors")
        data, index = mf.serialize_shard(out)
        with fs_errors(out_dir, "write", oo):
            ofs.pipe_file(f"{oroot}/{fname}", data)
        for n in index:
            weight_map[n] = fname
        total += sum(v["nbytes"] for v in index.values())
    config = dict(manifest["config"])
    config["dtype"] = "bfloat16"
    config.pop("torch_dtype", None)
    src_fs, src_root = url_to_fs(url, **so)
    with fs_errors(out_dir, "write", oo):
        for rel in manifest.get("copied_files", []):
            if rel == "config.json":
                continue
            data = src_fs.cat_file(join(src_root, check_relname(rel)))
            ofs.pipe_file(f"{oroot}/{rel}", data)
        ofs.pipe_file(f"{oroot}/config.json", (json.dumps(config, indent=2) + "\n").encode())
        index_doc = {"metadata": {"total_size": total, "format": "pt"},
                     "weight_map": dict(sorted(weight_map.items()))}
        ofs.pipe_file(f"{oroot}/{INDEX}", (json.dumps(index_doc, indent=2) + "\n").encode())
    timings.wall = time.perf_counter() - t0
    return {"files": sorted(set(weight_map.values())), "tensors": len(weight_map),
            "bytes": total, "layout": kind, "seconds": time.perf_counter() - t0,
            "timings": timings.as_dict()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``qmoe-ray export`` options."""
    parser.add_argument("url", help="compressed checkpoint folder or URL")
    parser.add_argument("out_dir", help="output folder or URL for the HF bf16 checkpoint")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="expert tensor layout (default: what transformers saves)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help="fsspec options for URL as JSON")
    parser.add_argument("--output-options", default=None, metavar="JSON",
                        help="fsspec options for OUT_DIR as JSON")


def _json_opts(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    opts = json.loads(text)
    if not isinstance(opts, dict):
        raise ValueError(f"{flag} must be a JSON object")
    return opts


def main(args: argparse.Namespace) -> int:
    """Run ``qmoe-ray export``; returns the exit status (2 on bad input)."""
    try:
        res = export(args.url, args.out_dir, args.layout, args.overwrite,
                     _json_opts(args.storage_options, "--storage-options"),
                     _json_opts(args.output_options, "--output-options"),
                     progress=not args.quiet)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"qmoe-ray export: error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {res['tensors']} tensors ({res['bytes'] / 2**20:.1f} MiB bf16, "
          f"{res['layout']} experts) in {len(res['files'])} files to {args.out_dir} in "
          f"{res['seconds']:.1f} s")
    return 0
