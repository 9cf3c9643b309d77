"""Loading compressed checkpoints: read, verify, decode, and run.

``load(url)`` reads ``manifest.json`` (no manifest: not a checkpoint), refuses unknown format
versions, reads every shard named by the manifest (each name checked to stay inside the folder),
concurrently, and verifies each tensor's dtype, shape and SHA-256 before anything is decoded. The
experts are then decoded with the numpy reference decoder into dense weights (``mode="decode"``).
The result runs through the project's own block code (``qmoe_ray.models``): logits for token ids
and greedy generation for decoder-only families.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from qmoe_ray.models import LayerSpec, get_family, run_forward
from qmoe_ray.models.base import DictWeights
from qmoe_ray.storage import manifest as mf
from qmoe_ray.storage.fs import fs_errors, safe_join, url_to_fs
from qmoe_ray.storage.layout import dequantize_matrix

DEVICES = ("cpu", "cuda")
MODES = ("decode",)


def read_manifest(url: str, **storage_options: Any) -> dict[str, Any]:
    """The manifest of the checkpoint at ``url``, version-checked.

    Raises:
        FileNotFoundError: no ``manifest.json`` (an unfinished or foreign folder).
        ValueError: not JSON, another format, or a newer format version.
    """
    fs, root = url_to_fs(url, **storage_options)
    path = f"{root.rstrip('/')}/{mf.MANIFEST}"
    if not fs.exists(path):
        raise FileNotFoundError(
            f"{url} has no {mf.MANIFEST}: not a (finished) qmoe-ray checkpoint. A job that did not "
            "finish leaves no manifest: re-run it to complete the output."
        )
    with fs_errors(url, "read", storage_options):
        raw = fs.cat_file(path)
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{url}/{mf.MANIFEST} is not valid JSON ({exc})") from None
    mf.check_version(manifest, f"{url}/{mf.MANIFEST}")
    return manifest


def read_verified(url: str, manifest: Mapping[str, Any], workers: int = 4,
                  **storage_options: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Read every shard of the manifest and verify every tensor.

    Returns:
        ``(tensors, timings)`` with ``timings`` = seconds spent reading and verifying.

    Raises:
        ValueError: an unsafe file name, a corrupted/truncated shard, a checksum mismatch, or a
            tensor the manifest lists that no shard holds.
        FileNotFoundError: a shard is missing.
    """
    fs, root = url_to_fs(url, **storage_options)
    files = [safe_join(root.rstrip("/"), f) for f in manifest["files"]]
    for entry in manifest["tensors"].values():
        if entry["file"] not in manifest["files"]:
            raise ValueError(f"manifest names file {entry['file']!r} outside its file list")

    def fetch(path: str) -> bytes:
        if not fs.exists(path):
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing: the "
                                    "checkpoint is incomplete; copy it again or re-run the job")
        with fs_errors(url, "read", storage_options):
            return fs.cat_file(path)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        blobs = list(pool.map(fetch, files))
    t1 = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    for rel, blob in zip(manifest["files"], blobs, strict=True):
        tensors.update(mf.deserialize_shard(blob, rel))
    for name, entry in manifest["tensors"].items():
        if name not in tensors:
            raise ValueError(f"tensor {name!r} listed in the manifest is not in {entry['file']}")
        mf.verify(name, tensors[name], entry)
    extra = set(tensors) - set(manifest["tensors"])
    if extra:
        raise ValueError(f"shards hold tensors the manifest does not list: {sorted(extra)[:3]}")
    return tensors, {"read": t1 - t0, "verify": time.perf_counter() - t1}


class CompressedModel:
    """A loaded compressed checkpoint, runnable through the project's block code.

    Attributes:
        manifest: the checkpoint's manifest.
        family: the model family adapter.
        weights: dense tensors (float32) and decoded expert matrices by canonical name.
        timings: seconds spent reading, verifying and decoding.
    """

    def __init__(self, manifest: dict[str, Any], weights: dict[str, torch.Tensor],
                 timings: dict[str, float]):
        self.manifest = manifest
        self.config = manifest["config"]
        self.family = get_family(self.config)
        self.weights = weights
        self.W = DictWeights(weights)
        self.timings = timings
        self._names: dict[int, dict[int, dict[str, str]]] = {}

    def experts_for(self, layer: LayerSpec):
        """``expert id -> {role: weight}`` for one MoE layer."""
        fam = self.family

        def get(e: int) -> dict[str, torch.Tensor]:
            return {r: self.weights[n] for r, n in fam.expert_names(layer, e).items()}

        return get

    @torch.no_grad()
    def logits(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """float32 logits ``[B, S, vocab]`` for token ids (a tensor, or the family's inputs dict)."""
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.ndim == 2 else inputs[None]
            inputs = {"input_ids": ids.long(), "attention_mask": torch.ones_like(ids, dtype=torch.long)}
        return run_forward(self.family, self.W, inputs, experts_for=self.experts_for)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16) -> torch.Tensor:
        """Greedy continuation for decoder-only families (recomputes the prefix each step)."""
        if self.family.model_type == "switch_transformers":
            raise ValueError("generate() supports decoder-only families; for Switch use logits()")
        ids = input_ids if input_ids.ndim == 2 else input_ids[None]
        for _ in range(max_new_tokens):
            nxt = self.logits(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


def load(url: str, device: str = "cpu", mode: str = "decode", **storage_options: Any) -> CompressedModel:
    """Load a compressed checkpoint.

    Args:
        url: the checkpoint folder (any fsspec URL).
        device: ``"cpu"`` (numpy reference decoder).
        mode: ``"decode"``: experts decoded once into dense weights.
        **storage_options: fsspec options (credentials, endpoint).

    Returns:
        A ``CompressedModel``.

    Raises:
        ValueError: an unknown device or mode; a corrupted checkpoint (see ``read_verified``).
        FileNotFoundError: no manifest or a missing shard.
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: expected one of {DEVICES}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if device == "cuda":
        from qmoe_ray import gpu

        if not gpu.available():
            raise RuntimeError("device='cuda' needs a CUDA GPU and CuPy: pip install 'qmoe-ray[gpu]'")
        raise ValueError("device='cuda' loading is not implemented yet; use device='cpu'")
    manifest = read_manifest(url, **storage_options)
    tensors, timings = read_verified(url, manifest, **storage_options)
    t0 = time.perf_counter()
    q = manifest["quantized"]
    tables = manifest.get("tables", {})
    skip = tuple(f"{n}." for n in list(q) + list(tables))
    weights = {n: t.float() for n, t in tensors.items() if not n.startswith(skip)}
    for name, entry in q.items():
        weights[name] = dequantize_matrix(name, entry, tensors, tables)
    timings["decode"] = time.perf_counter() - t0
    return CompressedModel(manifest, weights, timings)
