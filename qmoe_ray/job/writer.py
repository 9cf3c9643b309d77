"""The writer (reducer): encoded expert groups + dense tensors -> safetensors shards at the output.

One shard per block (``shards/layer-NNNNN.safetensors``): the block's dense tensors, converted to
their stored dtype (bf16; routers keep their source precision), and its encoded experts. Writing a
layer's shard only when the layer is complete means a shard on storage is always whole, which is
what resume builds on. Tensors are serialized with sorted keys, so the same inputs give the same
bytes. ``shards/other.safetensors`` holds what belongs to no block (embeddings, final norms, head).

Plain class; the driver runs it in a Ray actor next to the output.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from qmoe_ray.format import shards as mf  # serialize_shard: the format's shard writer
from qmoe_ray.job.progress import put_file, with_retries
from qmoe_ray.job.workers import EncodedGroup
from qmoe_ray.models import LayerSpec, get_family
from qmoe_ray.storage.checkpoint import SourceIndex, open_source
from qmoe_ray.storage.fs import url_to_fs

__all__ = ["OTHER_SHARD", "CheckpointWriter", "layer_shard_name", "with_retries"]

def layer_shard_name(layer: LayerSpec) -> str:
    """The relative path of ``layer``'s shard."""
    return f"shards/layer-{layer.index:05d}.safetensors"


OTHER_SHARD = "shards/other.safetensors"


class CheckpointWriter:
    """Collects a layer's encoded groups and writes shards and JSON files to the output."""

    def __init__(
        self,
        output: str,
        output_options: Mapping[str, Any] | None,
        source: str,
        source_options: Mapping[str, Any] | None,
        index: SourceIndex | None = None,
        drop_mtp: bool = False,
    ):
        self.fs, self.root = url_to_fs(output, **dict(output_options or {}))
        self.output = output
        self.ckpt = open_source(source, source_options, index)
        self.family = get_family(self.ckpt.config, self.ckpt)  # layout bound from its names
        self.layers = self.family.layers()
        expert_src: set[str] = set()
        for layer in self.layers:
            if layer.moe:
                expert_src.update(self.family.source_expert_names(layer))
        self.expert_src = expert_src
        # the multi-token-prediction layers' tensors (outside every block): left out on request
        self.dropped = set(self.family.mtp_names(self.ckpt.names)) if drop_mtp else set()
        self._groups: dict[int, dict[int, EncodedGroup]] = {}
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor

    def ping(self) -> str:
        """This writer's incarnation (a new one after a restart lost the groups it held)."""
        return self.incarnation

    def discard_layer(self, index: int) -> None:
        """Drop the groups held for layer ``index`` (the layer is being redone)."""
        self._groups.pop(index, None)

    def remove(self, relname: str) -> None:
        """Delete a file or folder under the output if present (transient errors retried)."""
        path = self._path(relname)

        def rm() -> None:
            self.fs.invalidate_cache()
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

        with_retries(rm, f"deleting {self.output.rstrip('/')}/{relname}")

    def _path(self, relname: str) -> str:
        return f"{self.root.rstrip('/')}/{relname}"

    def put_bytes(self, relname: str, data: bytes) -> None:
        """Write a whole file (retrying transient errors)."""
        path = self._path(relname)
        with_retries(lambda: put_file(self.fs, path, data),
                     f"writing {self.output.rstrip('/')}/{relname}")

    def dense_names(self, layer: LayerSpec | None) -> list[str]:
        """Source tensors stored densely in ``layer``'s shard (None: in the 'other' shard)."""
        prefixes = [l.name + "." for l in self.layers]
        names = [n for n in self.ckpt.names if n not in self.expert_src and n not in self.dropped]
        if layer is None:
            return [n for n in names if not any(n.startswith(p) for p in prefixes)]
        return [n for n in names if n.startswith(layer.name + ".")]

    def _dense_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            t = self.ckpt.read(n)
            out[n] = t.to(self.family.stored_dtype(n, t.dtype))
        return out

    def add_group(self, enc: EncodedGroup) -> None:
        """Hold a group's encoded experts until its layer is written."""
        self._groups.setdefault(enc.layer, {})[enc.group] = enc

    def finish_layer(self, layer: LayerSpec, expected_groups: int) -> dict[str, Any]:
        """Write ``layer``'s shard.

        Returns:
            ``{"file", "tensors": {name: index entry}, "quantized": {name: entry}, "stats"}``.
        """
        groups = self._groups.pop(layer.index, {})
        if len(groups) != expected_groups:
            raise RuntimeError(
                f"layer {layer.name}: writer got {len(groups)} expert groups, expected "
                f"{expected_groups}"
            )
        tensors = self._dense_tensors(self.dense_names(layer))
        quantized: dict[str, dict[str, Any]] = {}
        tables: dict[str, dict[str, str]] = {}
        timings: dict[str, float] = {}
        stats: list[dict[str, Any]] = []
        for g in sorted(groups):
            tensors.update(groups[g].tensors)
            quantized.update(groups[g].entries)
            tables.update(groups[g].tables)
            stats.extend(groups[g].stats)
            for k, v in groups[g].timings.items():
                timings[k] = max(timings.get(k, 0.0), v) if k.startswith("peak_") else timings.get(k, 0.0) + v
        out = self._write(layer_shard_name(layer), tensors, quantized, stats)
        out["tables"] = tables
        out["worker_timings"] = timings
        allocs = [groups[g].allocation for g in sorted(groups) if groups[g].allocation]
        if allocs:  # a size budget: each group's budget, estimate and coded bits
            out["allocation"] = allocs
        return out

    def write_other(self) -> dict[str, Any]:
        """Write the shard of tensors that belong to no block."""
        return self._write(OTHER_SHARD, self._dense_tensors(self.dense_names(None)), {}, [])

    def _write(self, relname: str, tensors: dict[str, torch.Tensor],
               quantized: dict[str, dict[str, Any]], stats: list[dict[str, Any]]) -> dict[str, Any]:
        data, index = mf.serialize_shard(tensors)
        self.put_bytes(relname, data)
        for entry in index.values():
            entry["file"] = relname
        return {"file": relname, "bytes": len(data), "tensors": index, "quantized": quantized,
                "stats": stats, "tables": {}}

    def copy_source_file(self, relname: str) -> dict[str, Any] | None:
        """Copy a small source file (config.json, tokenizer.json) if the source has it (a
        quantized source's config.json is written as the decoded model's).

        Returns:
            ``{"sha256", "bytes"}`` of the bytes written (its manifest ``copied_files`` entry,
            which ``qmoe-ray export`` checks before copying the file on), or None when the
            source has no such file.
        """
        import hashlib

        if not self.ckpt.has_file(relname):
            return None
        if relname == "config.json" and self.ckpt.config != self.ckpt.raw_config:
            # a quantized source: the output holds the decoded model, so its config has no
            # quantization block (the manifest's config; loaders check that both agree)
            data = (json.dumps(self.ckpt.config, indent=2, sort_keys=True) + "\n").encode()
        else:
            with self.ckpt.open_file(relname) as f:
                data = f.read()
        self.put_bytes(relname, data)
        return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
