"""``qmoe-ray export URL OUT.gguf --format gguf``: one GGUF file that llama.cpp loads, the routed
experts in its ternary types, losslessly.

- Experts: a ``ternary-sym256`` checkpoint's codes are GGUF ternary blocks as they stand: a
  TQ2_0 block (66 bytes: 64 bytes of 2-bit codes ``q + 1``, then the f16 scale) or a TQ1_0 block
  (54 bytes: base-3 packed, then the f16 scale) holds 256 consecutive input weights of a row as
  ``d * {-1, 0, 1}``, exactly our grid, whose scales are f16 values (``qmoe_ray.quant.grids.
  round_scale_sym``). Each block's matrices are merged into ``blk.N.ffn_{gate,up,down}_exps``
  ``[experts, out, in]``. Before anything is written every merged tensor is dequantized back
  with the ``gguf`` package's own numpy dequantization and compared with our float32 weights bit
  for bit (``check_exact``); a mismatch is refused, never written.
- Refused, naming the ``--scheme`` to compress with: QMoE's per-row ternary grid ``{lo, 0, hi}``
  (not symmetric, not per 256 weights: no GGUF type holds it) and the asymmetric int grids
  (every GGUF integer type, Q4_0/Q8_0 and the k-quants, stores a symmetric block or a block
  minimum in f16 with its own block sizes; our min-max scale/zero pairs are not those values),
  input dimensions that are not multiples of 256 (a GGUF row is whole blocks), a family
  llama.cpp has no architecture for here, an output that exists (without ``overwrite``).
- The rest: ``dense_type`` ``bf16`` (default: our dense tensors are bf16, so lossless), ``f16``
  or ``q8_0`` for 2-D weights (a row that is not whole Q8_0 blocks stays f16), as
  convert_hf_to_gguf does; norms, biases and routers float32. Architecture, metadata and
  vocabulary: ``qmoe_ray.read.gguf_arch``.

The file is written next to the destination (``.NAME.export-XXXX.tmp``) and renamed into place
when complete (on an object store: written locally, then uploaded); the ``gguf`` writer spools
tensor data to a temporary file as shards are converted, so memory holds one block at a time.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qmoe_ray.errors import CheckpointError, InputError
from qmoe_ray.format.manifest import MANIFEST, read_manifest
from qmoe_ray.format.matrices import stored_names
from qmoe_ray.format.shards import Timings, iter_shards
from qmoe_ray.quant import dequantize
from qmoe_ray.read import gguf_arch
from qmoe_ray.read.export_files import copied_files, read_copied
from qmoe_ray.read.weights import encoded_matrix
from qmoe_ray.storage.fs import fs_errors, redact, url_to_fs

EXPERT_TYPES = ("tq2_0", "tq1_0")
DENSE_TYPES = ("bf16", "f16", "q8_0")
BLOCK = 256
SYM = "ternary-sym256"
INSTALL = "pip install 'qmoe-ray[gguf]' (the gguf package)"


def gguf_reason(manifest: Mapping[str, Any]) -> str | None:
    """``None`` when the checkpoint exports to GGUF losslessly, else why not (manifest only)."""
    try:
        gguf_arch.arch_of(manifest["config"])
    except InputError as exc:
        return str(exc).removeprefix("--format gguf: ")
    schemes = sorted({e["scheme"] for e in manifest["quantized"].values()})
    if schemes != [SYM]:
        return (f"experts on the {'/'.join(schemes)} grid, which no GGUF type holds exactly "
                f"(TQ2_0/TQ1_0 hold --scheme {SYM}: compress with it)")
    partial = sorted({e["shape"][1] for e in manifest["quantized"].values()
                      if e["shape"][1] % BLOCK})
    if partial:
        return (f"expert input dimensions {partial} are not multiples of {BLOCK} (a GGUF "
                "ternary row is whole 256-weight blocks)")
    return None


def check_exact(name: str, qtype: Any, blocks: np.ndarray, want: np.ndarray) -> None:
    """Refuse unless the gguf package dequantizes ``blocks`` to ``want`` (float32) bit for bit."""
    from gguf import quants

    got = quants.dequantize(blocks, qtype)
    if got.shape != want.shape or not np.array_equal(got.view(np.int32), want.view(np.int32)):
        bad = int((got.view(np.int32) != want.view(np.int32)).sum()) if got.shape == want.shape \
            else "all"
        raise InputError(f"{name}: {bad} weights would change in GGUF {qtype.name}; refused "
                         "(nothing written)")


def _expert_tensor(name: str, mats: list[Any], qtype: Any) -> np.ndarray:
    from gguf import quants

    want = []
    for enc in mats:
        s = enc.scheme
        if s.name != SYM:
            raise InputError(f"{enc.name}: a {s.name} matrix; GGUF's ternary types hold --scheme "
                             f"{SYM} only: compress with it")
        codes = torch.from_numpy(enc.codes())
        if int(codes.max()) > 2 or not bool((enc.params["zero"] == 1).all()):
            raise CheckpointError(f"{enc.name}: codes or zero points outside the {SYM} grid "
                                  "(code 3, a zero point other than 1): the checkpoint is damaged")
        p = {k: v.float()[None] for k, v in enc.params.items()}
        want.append(dequantize(s, codes[None], p)[0].numpy())
    w = np.stack(want)
    if w.shape[-1] % BLOCK:
        raise InputError(f"{name}: {w.shape[-1]} input columns are not whole GGUF blocks of "
                         f"{BLOCK}")
    blocks = quants.quantize(w, qtype)
    check_exact(name, qtype, blocks, w)
    return blocks


def _dense_array(gname: str, a: np.ndarray, dense_type: str) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = np.ascontiguousarray(a)
    if a.ndim == 1 or "ffn_gate_inp" in gname:
        return a.astype(np.float32), Q.F32
    if dense_type == "bf16":
        b = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16)
        return b.numpy().view(np.uint16), Q.BF16
    if dense_type == "q8_0" and a.shape[-1] % 32 == 0:
        return quants.quantize(a, Q.Q8_0), Q.Q8_0
    return a.astype(np.float16), Q.F16


def export_gguf(url: str, out: str, overwrite: bool = False,
                storage_options: Mapping[str, Any] | None = None,
                output_options: Mapping[str, Any] | None = None, workers: int = 4,
                progress: bool = False, expert_type: str = "tq2_0",
                dense_type: str = "bf16") -> dict[str, Any]:
    """Write the compressed checkpoint at ``url`` as one GGUF file ``out`` (see module doc).

    Returns:
        ``{"files", "tensors", "bytes", "expert_bytes", "format", "layout", "arch",
        "mtp_tensors", "seconds", "timings"}`` (``mtp_tensors``: tensors of
        multi-token-prediction layers left out, as convert_hf_to_gguf leaves them out).

    Raises:
        InputError: a checkpoint GGUF cannot hold exactly (its ``--scheme``, its dimensions),
            a family without a llama.cpp architecture, no usable tokenizer, a bad option.
        FileExistsError: ``out`` exists and ``overwrite`` is False, or is a folder.
        CheckpointError / ValueError / FileNotFoundError: see ``qmoe_ray.read.export.export``.
    """
    if expert_type not in EXPERT_TYPES:
        raise InputError(f"--gguf-expert-type {expert_type!r}: expected one of {EXPERT_TYPES}")
    if dense_type not in DENSE_TYPES:
        raise InputError(f"--gguf-type {dense_type!r}: expected one of {DENSE_TYPES}")
    try:
        import gguf
    except ImportError:
        raise InputError(f"--format gguf needs the gguf package: {INSTALL}") from None
    t0 = time.perf_counter()
    so, oo = dict(storage_options or {}), dict(output_options or {})
    ofs, oroot = url_to_fs(out, **oo)
    oroot = oroot.rstrip("/")
    with fs_errors(out, "read", oo):
        exists = ofs.exists(oroot)
        is_dir = exists and ofs.isdir(oroot)
    if is_dir:
        raise FileExistsError(f"{redact(out)} is a folder; --format gguf writes one file "
                              "(e.g. model.gguf)")
    if exists and not overwrite:
        raise FileExistsError(f"{redact(out)} exists; choose another path or pass "
                              "--overwrite to replace it")
    where = f"{redact(url)}/{MANIFEST}"
    manifest = read_manifest(url, **so)
    config = manifest["config"]
    arch = gguf_arch.arch_of(config)
    reason = gguf_reason(manifest)
    if reason:
        raise InputError(f"--format gguf: {redact(url)}: {reason}")
    meta = gguf_arch.metadata(config, arch)
    copied = copied_files(manifest, where)
    if "tokenizer.json" not in copied:
        raise InputError(f"--format gguf: {redact(url)} has no tokenizer.json (llama.cpp needs "
                         "the vocabulary in the file); compress from a source that has one")
    src_fs, src_root = url_to_fs(url, **so)
    files = {n: read_copied(src_fs, src_root, url, n, copied[n], so)
             for n in ("tokenizer.json", "tokenizer_config.json") if n in copied}
    vocab = gguf_arch.vocabulary(files["tokenizer.json"], config, files)

    local = type(ofs).__name__ == "LocalFileSystem"
    parent = os.path.dirname(oroot) if local else tempfile.gettempdir()
    if local:
        os.makedirs(parent or ".", exist_ok=True)
    tmp = os.path.join(parent or ".", f".{os.path.basename(oroot)}.export-{uuid.uuid4().hex[:8]}"
                       ".tmp")
    qtype = gguf.GGMLQuantizationType[expert_type.upper()]
    try:
        w = gguf.GGUFWriter(tmp, arch, use_temp_file=True)
        w.add_type("model")
        w.add_name(str(config.get("_name_or_path") or config["model_type"])[:200])
        w.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{expert_type.upper()}"]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for k, v in {**meta, **vocab}.items():
            _add_kv(w, gguf, k, v)
        n, total, expert_bytes, mtp, timings = _write_tensors(w, gguf, url, manifest, arch, config,
                                                         qtype, dense_type, so, workers,
                                                         progress)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size = os.path.getsize(tmp)
        with fs_errors(out, "write", oo):
            if local:
                os.replace(tmp, oroot)
            else:
                ofs.put_file(tmp, oroot)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    timings.wall = time.perf_counter() - t0
    return {"files": [os.path.basename(oroot)], "copied": [], "tensors": n, "bytes": size,
            "tensor_bytes": total, "expert_bytes": expert_bytes, "format": "gguf",
            "layout": f"{arch}, experts {expert_type.upper()}, rest {dense_type.upper()}",
            "arch": arch, "mtp_tensors": mtp, "mtp_dropped": True, "seconds": time.perf_counter() - t0,
            "timings": timings.as_dict()}


def _add_kv(w: Any, gguf: Any, key: str, v: Any) -> None:
    T = gguf.GGUFValueType
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    elif v and isinstance(v[0], int):
        w.add_key_value(key, list(v), T.ARRAY, sub_type=T.INT32)
    else:
        w.add_array(key, list(v))


def _write_tensors(w: Any, gguf: Any, url: str, manifest: Mapping[str, Any], arch: str,
                   config: Mapping[str, Any], qtype: Any, dense_type: str,
                   so: Mapping[str, Any], workers: int, progress: bool
                   ) -> tuple[int, int, int, int, Timings]:
    from qmoe_ray.models import get_family

    family = get_family(config)
    quantized = manifest["quantized"]
    tables = manifest.get("tables", {})
    stored = {k for nm, e in quantized.items() for k in stored_names(nm, e)}
    stored |= {f"{t}.freqs" for t in tables}
    moe = [lay for lay in family.layers()
           if lay.moe and lay.block < int(config["num_hidden_layers"])]
    timings = Timings()
    n = total = expert_bytes = mtp = 0
    pending = {lay.block: lay for lay in moe}
    shards = iter_shards(url, manifest, workers=workers, timings=timings,
                         progress="exporting" if progress else False, checked=True, **so)
    try:
        for _, part in shards:
            for name in sorted(part):
                if name in stored:
                    continue
                outs = gguf_arch.dense_tensors(name, part[name].float().numpy(), arch, config)
                if outs is None:
                    raise InputError(f"--format gguf: tensor {name!r} has no place in llama.cpp's "
                                     f"{arch}; export with --format hf")
                mtp += not outs
                for gname, a in outs:
                    arr, ty = _dense_array(gname, a, dense_type)
                    w.add_tensor(gname, arr, raw_dtype=ty)
                    n, total = n + 1, total + arr.nbytes
            cache: dict[str, Any] = {}
            t_dec = time.perf_counter()
            for block, lay in list(pending.items()):
                names = [family.expert_names(lay, e) for e in range(lay.num_experts)]
                if not all(f"{nm[r]}.scale" in part for nm in names for r in nm):
                    continue
                for role in gguf_arch.EXPERT_ROLES:
                    mats = [encoded_matrix(nm[role], quantized[nm[role]], part, tables, cache)
                            for nm in names]
                    gname = gguf_arch.expert_tensor_name(block, role)
                    blocks = _expert_tensor(gname, mats, qtype)
                    w.add_tensor(gname, blocks, raw_dtype=qtype)
                    n, total, expert_bytes = n + 1, total + blocks.nbytes, \
                        expert_bytes + blocks.nbytes
                del pending[block]
            timings.decode += time.perf_counter() - t_dec
    except (CheckpointError, InputError):
        raise
    except (KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"{redact(url)}: {msg}") from None
    if pending:
        raise CheckpointError(f"{redact(url)}: the experts of blocks {sorted(pending)} are not "
                              "each stored whole in one shard")
    return n, total, expert_bytes, mtp, timings
