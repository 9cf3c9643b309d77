"""``qmoe-ray export URL OUT_DIR``: a plain Hugging Face bf16 checkpoint of a compressed model.

For serving stacks that expect an HF folder: ``config.json`` (the source config, dtype bf16), the
tokenizer files the job copied, ``model-0000k-of-0000n.safetensors`` shards and
``model.safetensors.index.json``. transformers loads it with its own class for
``config["model_type"]``. ``format="compressed-tensors"`` keeps the experts quantized instead
(``qmoe_ray.read.export_ct``: the tensors, the exactness check, the ``quantization_config``).

Why it streams: the decompressed model is ~10-20x larger than the compressed one, so it is never
held whole. Each compressed shard (one transformer block) is read, verified, decoded and written
as one output shard before the next is decoded (``qmoe_ray.format.shards.iter_shards`` fetches ahead).

Expert tensor names: the compressed checkpoint stores experts under our canonical per-expert
names; the export writes the names transformers' ``save_pretrained`` writes for the family, found
from where the source kept its router (kept verbatim among the dense tensors):

- Mixtral with the router under ``block_sparse_moe``: per-expert ``experts.E.w1/w2/w3``;
- families whose save layout is per-expert ``mlp.experts.E.{gate,up,down}_proj`` (Qwen-MoE,
  OLMoE): those names;
- a decoder family whose router sits under another module than its save layout's (a checkpoint
  written in transformers' internal fused layout): fused ``experts.gate_up_proj`` ``[E, 2F, D]``
  and ``experts.down_proj`` ``[E, D, F]`` under that module;
- gpt-oss: always fused, as transformers has it: ``experts.gate_up_proj`` ``[E, D, 2F]`` (gate
  the even columns) and ``experts.down_proj`` ``[E, F, D]``; the experts' biases are dense
  tensors of the checkpoint and are written as they are;
- SwitchTransformers: ``experts.expert_E.{wi,wo}.weight`` (our canonical names are its names).

``layout="per-expert"`` / ``"fused"`` overrides the choice for decoder families.

Why it trusts nothing it reads: a checkpoint in a bucket may have been written by anyone, who can
recompute every hash. So, before any byte reaches the output:

- every expert the config's family has must be a quantized matrix of the manifest, and every
  quantized matrix an expert of the family, each stored whole in one shard (an incomplete
  checkpoint is refused, naming the expert, never exported with a hole);
- a copied file (``copied_files``: tokenizer files) must have a plain name of an allowed kind that
  cannot collide with the export's own output, and match its manifest SHA-256 and size; it is
  read without following links (a local symlink is refused) and only if it is a regular file
  under ``COPIED_MAX_BYTES``.

Why it stages: the export is written to a hidden folder next to the destination
(``.NAME.export-XXXX.tmp``, or that prefix on an object store) and moved into place only when
everything is written and verified; any failure removes it, so a failed export leaves nothing at
the destination (and ``overwrite`` keeps the old export until the new one is complete).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from typing import Any

import torch
from fsspec import AbstractFileSystem

from qmoe_ray.errors import CheckpointError, InputError
from qmoe_ray.format.manifest import MANIFEST, read_manifest
from qmoe_ray.format.matrices import stored_names
from qmoe_ray.format.shards import Timings, iter_shards, serialize_shard
from qmoe_ray.models.trim import untrimmed
from qmoe_ray.read import export_ct
from qmoe_ray.read.export_files import (
    INDEX,
    check_destination,
    copied_files,
    move_into_place,
    read_copied,
    remove,
    staging_dir,
)
from qmoe_ray.read.export_trim import trim_export
from qmoe_ray.read.weights import decode_matrix, encoded_matrix
from qmoe_ray.storage.fs import check_relname, fs_errors, redact, url_to_fs

LAYOUTS = ("auto", "per-expert", "fused")
FORMATS = ("hf", "compressed-tensors", "gguf")


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
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    family = stored_family(manifest)  # a trimmed checkpoint's: its kept experts
    names = set(manifest["tensors"])
    moe = [lay for lay in family.layers() if lay.moe]
    out: dict[str, tuple[str, int | None, str | None]] = {}
    modules = family.moe_modules
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
    if family.fused_layout == "interleaved":  # gpt-oss: transformers has no per-expert layout
        if layout == "per-expert":
            raise ValueError(f"layout='per-expert' is not available for {family.model_type} "
                             "(transformers reads its experts fused only); use auto")
        kind = "fused"
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


def stored_family(manifest: Mapping[str, Any]) -> Any:
    """The family of the model a (checked) manifest holds, bound to its names (a trimmed
    checkpoint's ``TrimmedFamily``: ``qmoe_ray.format.trimmed``)."""
    from qmoe_ray.format.trimmed import bind_stored, manifest_family

    family = manifest_family(manifest)
    return bind_stored(family, set(manifest["tensors"]) | set(manifest["quantized"]))


def _fuse(parts: dict[str, dict[tuple[int, str], torch.Tensor]], how: str = "rows"
          ) -> dict[str, torch.Tensor]:
    """Stack per-expert matrices into transformers' fused 3-D tensors (``how``: the family's
    ``fused_layout``)."""
    out = {}
    for target, mats in parts.items():
        experts = sorted({e for e, _ in mats})
        if experts != list(range(len(experts))):
            raise ValueError(f"{target}: experts {experts} are not 0..{len(experts) - 1}")
        if how == "interleaved":  # gpt-oss: x @ W, gate the even columns of gate_up_proj
            out[target] = torch.stack([
                torch.stack((mats[(e, "gate")], mats[(e, "up")]), dim=1).flatten(0, 1).T
                if target.endswith("gate_up_proj") else mats[(e, "down")].T
                for e in experts]).contiguous()
        elif target.endswith("gate_up_proj"):
            out[target] = torch.stack([torch.cat([mats[(e, "gate")], mats[(e, "up")]])
                                       for e in experts])
        else:
            out[target] = torch.stack([mats[(e, "down")] for e in experts])
    return out


def check_experts(manifest: Mapping[str, Any], where: str = "manifest") -> dict[str, str]:
    """Check that each quantized matrix is stored whole in one shard (that the manifest holds
    exactly the family's experts is ``qmoe_ray.format.expected.check_against_config``'s, run by
    ``read_manifest`` before this).

    Args:
        manifest: a manifest ``qmoe_ray.format.manifest.read_manifest`` returned (checked).
        where: the manifest's location, for messages.

    Returns:
        Each quantized matrix's shard (``name -> file``).

    Raises:
        CheckpointError: a matrix's stored tensors (codes, parameters, code table) span several
            shards.
    """
    quantized = manifest["quantized"]
    tensors = manifest["tensors"]
    file_of: dict[str, str] = {}
    for n, entry in quantized.items():
        files = sorted({tensors[k]["file"] for k in stored_names(n, entry)})
        if len(files) != 1:
            raise CheckpointError(
                f"{where}: expert matrix {n!r} has its stored tensors in {len(files)} shards "
                f"({files}); each is stored whole in one shard: the manifest is damaged")
        file_of[n] = files[0]
    return file_of


def export(url: str, out_dir: str, layout: str = "auto", overwrite: bool = False,
           storage_options: Mapping[str, Any] | None = None,
           output_options: Mapping[str, Any] | None = None, workers: int = 4,
           progress: bool = False, copy_files: bool = True, format: str = "hf",
           symmetric: bool = False, gguf_type: str = "bf16",
           gguf_expert_type: str = "tq2_0") -> dict[str, Any]:
    """Write a plain HF bf16 checkpoint of the decompressed model, or (``format=
    "compressed-tensors"``) one whose experts stay quantized (``qmoe_ray.read.export_ct``).

    Args:
        url: the compressed checkpoint (any fsspec URL).
        out_dir: the output folder (any fsspec URL); written in a staging folder next to it and
            moved there when complete.
        layout: expert tensor layout (see ``expert_layout``).
        overwrite: replace an earlier export in ``out_dir``.
        storage_options, output_options: fsspec options for ``url`` and ``out_dir``.
        workers: concurrent range reads.
        progress: show a progress bar on stderr.
        copy_files: copy the checkpoint's ``copied_files`` (tokenizer files), each checked
            against its hash; False writes only the weights, index and config.
        format: ``"hf"`` (bf16 experts) or ``"compressed-tensors"`` (``pack-quantized``
            experts under their per-expert names; ``layout="fused"`` is refused).
        symmetric: compressed-tensors only: no zero points, codes in one more bit (for
            loaders that read no zero points: transformers 5.25 drops them for MoE experts).
        gguf_type, gguf_expert_type: ``format="gguf"`` (one file at ``out_dir``, see
            ``qmoe_ray.read.export_gguf``): the dense weights' type (bf16, f16, q8_0) and the
            experts' (tq2_0, tq1_0).

    Returns:
        ``{"files", "copied", "tensors", "bytes", "layout", "format", "mtp_tensors", "seconds",
        "timings"}``
        (``mtp_tensors``: tensors of multi-token-prediction layers, exported under their names).

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False, or holds something
            other than an earlier export (see ``qmoe_ray.read.export_files.check_destination``).
        CheckpointError: the checkpoint is damaged, incomplete (a missing expert) or has a
            refused or altered copied file (see ``check_experts``, ``copied_files``).
        InputError: ``format="compressed-tensors"`` for a grid it cannot hold exactly (see
            ``qmoe_ray.read.export_ct``), or with ``layout="fused"``.
        ValueError / FileNotFoundError / PermissionError: see ``qmoe_ray.read.loader.load``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: expected one of {FORMATS}")
    if format == "gguf":
        if symmetric or layout != "auto" or not copy_files:
            raise InputError("--format gguf writes one file with merged experts and the "
                             "tokenizer: --symmetric, --layout and --no-copied-files do not apply")
        from qmoe_ray.read.export_gguf import export_gguf

        return export_gguf(url, out_dir, overwrite, storage_options, output_options, workers,
                           progress, gguf_expert_type, gguf_type)
    ct = format == "compressed-tensors"
    if symmetric and not ct:
        raise InputError("symmetric=True (--symmetric) is for format='compressed-tensors' "
                         "(--format compressed-tensors) only")
    if ct and layout == "fused":
        raise InputError("the compressed-tensors export writes per-expert Linear modules (its "
                         "quantized weights are per module): use layout='auto' or 'per-expert'")
    t0 = time.perf_counter()
    so, oo = dict(storage_options or {}), dict(output_options or {})
    ofs, oroot = url_to_fs(out_dir, **oo)
    oroot = oroot.rstrip("/")
    exists = check_destination(ofs, oroot, out_dir, overwrite, oo)
    where = f"{redact(url)}/{MANIFEST}"
    manifest = read_manifest(url, **so)  # checked once: check_manifest
    family = stored_family(manifest)
    inner = untrimmed(family)  # a trimmed model's own family (its layout, its HF config)
    tx = trim_export(family, manifest["config"])  # a trimmed model: refused, or renamed
    if tx is not None and ct:
        raise InputError("export --format compressed-tensors of a trimmed checkpoint is not "
                         "supported yet; use --format hf")
    if ct and export_ct.family_reason(inner) is not None:
        raise InputError(f"--format compressed-tensors is refused for {inner.model_type}: "
                         f"{export_ct.family_reason(inner)}, so transformers could not load its "
                         "quantized experts; use --format hf (bf16 experts, in the layout "
                         "transformers reads)")
    if ct:
        layout = "per-expert"
    try:
        kind, names = expert_layout(manifest, layout)
        file_of = check_experts(manifest, where)
        copied = copied_files(manifest, where) if copy_files else {}
    except KeyError as exc:
        raise CheckpointError(exc.args[0] if exc.args else f"{where}: damaged ({exc!r})") from None
    staging = staging_dir(oroot, out_dir)
    try:
        with fs_errors(out_dir, "write", oo):
            ofs.makedirs(staging, exist_ok=False)
        src_fs, src_root = url_to_fs(url, **so)
        for rel, entry in copied.items():  # verified before anything else is written
            data = read_copied(src_fs, src_root, url, rel, entry, so)
            with fs_errors(out_dir, "write", oo):
                ofs.pipe_file(f"{staging}/{rel}", data)
        weight_map, total, timings, ct_info = _write_weights(
            url, manifest, names, file_of, ofs, staging, out_dir, so, oo, workers, progress,
            ct and (symmetric and "symmetric" or "asymmetric"), tx, inner.fused_layout)
        base = manifest["config"] if tx is None else tx.config
        config = inner.export_config(base)  # e.g. kimi_k2 as deepseek_v3
        config["dtype"] = "bfloat16"
        config.pop("torch_dtype", None)
        if ct:
            config["quantization_config"] = export_ct.quantization_config(
                export_ct.grid_args(ct_info["schemes"], symmetric), ct_info["experts"],
            ct_info["dense"])
        index_doc = {"metadata": {"total_size": total, "format": "pt"},
                     "weight_map": dict(sorted(weight_map.items()))}
        with fs_errors(out_dir, "write", oo):
            ofs.pipe_file(f"{staging}/config.json", (json.dumps(config, indent=2) + "\n").encode())
            ofs.pipe_file(f"{staging}/{INDEX}", (json.dumps(index_doc, indent=2) + "\n").encode())
        written = sorted(set(weight_map.values())) + sorted(copied) + ["config.json", INDEX]
        with fs_errors(out_dir, "write", oo):
            move_into_place(ofs, staging, oroot, written, exists)
    except BaseException:
        remove(ofs, staging)
        raise
    timings.wall = time.perf_counter() - t0
    mtp = family.mtp_names(list(weight_map))
    return {"files": sorted(set(weight_map.values())), "copied": sorted(copied),
            "tensors": len(weight_map), "bytes": total, "layout": kind, "format": format,
            "mtp_tensors": len(mtp),
            "seconds": time.perf_counter() - t0, "timings": timings.as_dict()}


def _write_weights(url: str, manifest: Mapping[str, Any],
                   names: Mapping[str, tuple[str, int | None, str | None]],
                   file_of: Mapping[str, str], ofs: AbstractFileSystem, staging: str,
                   out_dir: str, so: Mapping[str, Any], oo: Mapping[str, Any], workers: int,
                   progress: bool, ct: str = "", tx: Any = None, fused_layout: str = "rows"
                   ) -> tuple[dict[str, str], int, Any, dict[str, Any]]:
    """Decode each verified shard into one output shard under ``staging`` (``ct``: experts as
    compressed-tensors tensors, ``qmoe_ray.read.export_ct.ct_tensors``; ``"symmetric"`` or
    ``"asymmetric"``; ``tx``: a trimmed model's ``export_trim.TrimExport``, renaming blocks
    and cutting router rows).

    Returns:
        ``(weight_map, total bytes, timings, ct_info)``, ``ct_info`` the grids, expert modules
        and dense 2-D weights met (for the ``quantization_config``).

    Raises:
        CheckpointError: a shard fails verification (a missing tensor, a checksum) or decoding.
    """
    quantized = manifest["quantized"]
    tables = manifest.get("tables", {})
    stored = {k for n, e in quantized.items() for k in stored_names(n, e)}
    stored |= {f"{t}.freqs" for t in tables}
    files = manifest["files"]
    weight_map: dict[str, str] = {}
    total = 0
    timings = Timings()
    ct_info: dict[str, Any] = {"schemes": set(), "experts": [], "dense": []}
    shards = iter_shards(url, manifest, workers=workers, timings=timings,
                         progress="exporting" if progress else False, checked=True, **so)
    try:
        for i, (rel, part) in enumerate(shards):
            out: dict[str, torch.Tensor] = {}
            fused: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
            for name, t in part.items():
                if name not in stored:
                    out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
                    if t.dim() == 2 and name.endswith(".weight"):
                        ct_info["dense"].append(name)
            cache: dict[str, Any] = {}
            t_dec = time.perf_counter()
            for name, entry in quantized.items():
                if file_of[name] != rel:
                    continue
                enc = encoded_matrix(name, entry, part, tables, cache)
                target, e, role = names[name]
                if ct:
                    module = target.removesuffix(".weight")
                    for k, v in export_ct.ct_tensors(module, enc.scheme, enc.codes(),
                                                     enc.params, ct == "symmetric").items():
                        out[f"{module}.{k}"] = v
                    ct_info["schemes"].add((enc.scheme.name, enc.scheme.group_size))
                    ct_info["experts"].append(module)
                    continue
                w = decode_matrix(enc).contiguous()
                if e is None:
                    out[target] = w
                else:
                    fused.setdefault(target, {})[(e, role)] = w
            out.update(_fuse(fused, fused_layout))
            if tx is not None:
                out = {tx.name(n): tx.tensor(n, t) for n, t in out.items()}
            timings.decode += time.perf_counter() - t_dec
            if not out:
                continue
            fname = check_relname(f"model-{i + 1:05d}-of-{len(files):05d}.safetensors")
            data, index = serialize_shard(out)
            with fs_errors(out_dir, "write", oo):
                ofs.pipe_file(f"{staging}/{fname}", data)
            for n in index:
                weight_map[n] = fname
            total += sum(v["nbytes"] for v in index.values())
    except (CheckpointError, InputError):
        raise
    except (KeyError, ValueError) as exc:  # the loader's plain errors: a bad checkpoint
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"{redact(url)}: {msg}") from None
    return weight_map, total, timings, ct_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``qmoe-ray export`` options."""
    from qmoe_ray.cli import add_storage_options

    parser.add_argument("url", help="compressed checkpoint folder or URL")
    parser.add_argument("out_dir", help="output folder or URL for the HF checkpoint")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: every weight bf16 (default); compressed-tensors: the experts "
                        "as pack-quantized int weights (transformers, vLLM), the rest bf16; "
                        "gguf: one llama.cpp file, ternary-sym256 experts as TQ2_0/TQ1_0")
    parser.add_argument("--gguf-type", choices=("bf16", "f16", "q8_0"), default="bf16",
                        help="gguf: type of the dense 2-D weights (norms, biases, routers stay "
                        "f32; default bf16, lossless)")
    parser.add_argument("--gguf-expert-type", choices=("tq2_0", "tq1_0"), default="tq2_0",
                        help="gguf: the experts' ternary type (both exact; TQ1_0 is smaller, "
                        "TQ2_0 faster)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="expert tensor layout (default: what transformers saves)")
    parser.add_argument("--symmetric", action="store_true",
                        help="compressed-tensors: no zero points, codes in one more bit (for "
                        "loaders that drop zero points, e.g. transformers 5.25's MoE experts)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    parser.add_argument("--no-copied-files", action="store_true",
                        help="write only the weights, index and config, not the tokenizer files "
                        "the job copied (for a checkpoint whose copied files have no hashes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_storage_options(parser, "URL and OUT_DIR")


def main(args: argparse.Namespace) -> int:
    """Run ``qmoe-ray export``; returns the exit status (bad input: raised, and shown as one
    line with exit status 2 by ``qmoe_ray.cli.run``)."""
    from qmoe_ray.cli import storage_options

    res = export(args.url, args.out_dir, args.layout, args.overwrite,
                 storage_options(args), storage_options(args),
                 progress=not args.quiet, copy_files=not args.no_copied_files,
                 format=args.format, symmetric=args.symmetric, gguf_type=args.gguf_type,
                 gguf_expert_type=args.gguf_expert_type)
    kind = "bf16" if res["format"] == "hf" else res["format"]
    if res["format"] == "gguf":
        print(f"wrote {res['tensors']} tensors ({res['bytes'] / 2**20:.1f} MiB gguf: "
              f"{res['layout']}) to {args.out_dir} in {res['seconds']:.1f} s")
        if res["mtp_tensors"]:
            import sys

            print(f"note: {res['mtp_tensors']} tensors of the multi-token-prediction layers "
                  "were left out (llama.cpp's converter leaves them out too)", file=sys.stderr)
        return 0
    print(f"wrote {res['tensors']} tensors ({res['bytes'] / 2**20:.1f} MiB {kind}, "
          f"{res['layout']} experts) in {len(res['files'])} files to {args.out_dir} in "
          f"{res['seconds']:.1f} s")
    if res["mtp_tensors"]:
        import sys

        print(f"note: {res['mtp_tensors']} tensors of the multi-token-prediction layers were "
              "exported under their own names, as the job carried them (bf16, unquantized); "
              "transformers skips them on load, other servers may use them for speculative "
              "decoding. Compress with --drop-mtp to leave them out.", file=sys.stderr)
    return 0
