"""A c2048-sized manifest for the ``scale`` benchmark: a real job's manifest with its experts cloned.

``grow_manifest`` takes the manifest a real job wrote (the embedded tiny SwitchTransformers) and
clones every expert's entries (the quantized matrix, its stored tensors, its statistics, the code
tables of its group) to ``experts`` per layer, widening the routers to match, so the result is what
the job would write for that many experts: the same keys, the same entry sizes (the matrices keep
the tiny model's shapes, which changes a few digits per entry, not the number of entries). With
7680 experts on the tiny model's 8 MoE layers it holds 122,880 expert matrices, switch-c-2048's
count (30 MoE layers x 2048 experts x 2); with 2048, 32,768. Only the manifest and config.json are
written: the shards are not, so it serves ``read_manifest`` (every reader's first step: the size
limit, the parse and the whole validation) and nothing that reads tensors. It is written as the
job writes it (``manifest_bytes``: format version 3's columns), or in the entry objects of
version 1 (``version=1``: the layout before version 3, for the comparison).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

_EXPERT = re.compile(r"^(.*\.experts\.expert_)(\d+)(\..*)$")
_TABLE = re.compile(r"^(.*\.qmoe_table\.group)(\d+)(\..*)$")


def grow_manifest(m: dict[str, Any], experts: int, group_size: int) -> dict[str, Any]:
    """``m`` (a Switch job's manifest) with ``experts`` experts per MoE layer (see the module)."""
    base = int(m["config"]["num_experts"])
    out = copy.deepcopy({k: v for k, v in m.items() if k not in ("quantized", "tensors",
                                                                 "tables", "experts")})
    out["config"]["num_experts"] = experts
    quantized: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    for name, t in m["tensors"].items():
        hit = _EXPERT.match(name)
        tab = _TABLE.match(name)
        if hit:
            pre, e, post = hit.groups()
            for k in range(int(e), experts, base):
                tensors[f"{pre}{k}{post}"] = t
        elif tab:
            pre, _g, post = tab.groups()
            for g in range(-(-experts // group_size)):
                tensors[f"{pre}{g}{post}"] = t
        elif name.endswith("router.classifier.weight"):
            tensors[name] = {**t, "shape": [experts, t["shape"][1]],
                             "nbytes": t["nbytes"] // base * experts}
        else:
            tensors[name] = t
    for tname, meta in m["tables"].items():
        pre, _g, post = _TABLE.match(tname).groups()
        for g in range(-(-experts // group_size)):
            tables[f"{pre}{g}{post}"] = meta
    for name, q in m["quantized"].items():
        pre, e, post = _EXPERT.match(name).groups()
        tpre, _g, tpost = _TABLE.match(q["table"]).groups()
        for k in range(int(e), experts, base):
            quantized[f"{pre}{k}{post}"] = {**q, "expert": k,
                                            "table": f"{tpre}{k // group_size}{tpost}"}
    out["quantized"], out["tensors"], out["tables"] = quantized, tensors, tables
    out["experts"] = {f: [{**rec[k % base], "expert": k} for k in range(experts)]
                      for f, rec in m["experts"].items()}
    return out


def write_grown(src: Path, dst: Path, experts: int, group_size: int = 16,
                version: int | None = None) -> dict[str, Any]:
    """Write ``grow_manifest`` of ``src``'s manifest (and its config) to ``dst``, as format
    ``version`` (None: the newest, what the job writes; 1: entry objects, for a comparison);
    returns ``{"matrices", "bytes", "format_version"}``."""
    from qmoe_ray.format import manifest as mf

    src_m = mf.stored_to_logical(json.loads((src / mf.MANIFEST).read_text()), str(src))
    m = grow_manifest(src_m, experts, group_size)
    m["format_version"] = version or mf.FORMAT_VERSION
    dst.mkdir(parents=True, exist_ok=True)
    raw = mf.manifest_bytes(m)
    (dst / mf.MANIFEST).write_bytes(raw)
    (dst / "config.json").write_text(json.dumps(m["config"], indent=1))
    return {"matrices": len(m["quantized"]), "bytes": len(raw),
            "format_version": m["format_version"]}
