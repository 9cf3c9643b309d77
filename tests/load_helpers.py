"""One compressed checkpoint of the embedded tiny model per test process, shared by the load,
export and inspect tests (the Ray job runs once, ~20-30 s), and corrupted copies of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

_CACHE: dict[str, Path] = {}
SEQ_LEN = 32
EVAL_SAMPLES = 4


def compressed_checkpoint(tmp_path_factory: Any) -> Path:
    """The folder of the embedded model compressed (ternary GPTQ, small calibration set)."""
    if "ckpt" not in _CACHE:
        from qmoe_ray.job.config import CompressConfig
        from qmoe_ray.job.driver import run_compression

        out = tmp_path_factory.mktemp("qmoe_ckpt") / "ckpt"
        cfg = CompressConfig(output=str(out), num_samples=32, seq_len=SEQ_LEN,
                             eval_samples=EVAL_SAMPLES, batch_size=16, group_size=8)
        run_compression(cfg, progress=False)
        _CACHE["ckpt"] = out
    return _CACHE["ckpt"]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint folder (for corrupting)."""
    shutil.copytree(src, dst)
    return dst


def write_manifest(root: Path, m: dict[str, Any]) -> None:
    """Write ``m`` (entry objects, as ``plain_reader.load_manifest`` gives it) to
    ``root/manifest.json`` as the job does: version 3's columns (``mf.manifest_bytes``). A
    manifest whose ``tensors`` or ``quantized`` is not an object of objects (the wrong types
    the hostile tests write) has no columnar form: it is written as version 1, which every
    check reads the same once version 3's columns are expanded."""
    from qmoe_ray.format import manifest as mf

    def objects(v: Any) -> bool:
        return isinstance(v, dict) and all(isinstance(e, dict) for e in v.values())

    if m.get("format_version") == mf.COLUMNS_VERSION and not all(
            objects(m[k]) for k in ("tensors", "quantized") if k in m):
        m = {**m, "format_version": 2 if "trim" in m else 1}
    (root / "manifest.json").write_bytes(mf.manifest_bytes(m))


def edit_manifest(root: Path, fn: Any) -> None:
    """Apply ``fn(manifest) -> None`` to ``root/manifest.json`` in place (``write_manifest``)."""
    import plain_reader

    m = plain_reader.load_manifest(root)
    fn(m)
    write_manifest(root, m)


def data_offset(shard: Path, name: str) -> int:
    """Absolute byte offset of tensor ``name``'s data in a safetensors file."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]
