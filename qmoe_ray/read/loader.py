"""Loading compressed checkpoints: read, verify, decode, and run.

``load(url)`` reads the checkpoint's manifest once, checked as hostile input before a shard is
read (``qmoe_ray.format.manifest.read_manifest``: sizes, nesting, types, names, every declared
shape against the model config; no manifest: not a checkpoint). Then it *streams* the shards,
verified (``qmoe_ray.format.shards.iter_shards``: read-ahead, safetensors headers through the
project's one parser, every tensor's SHA-256 before any byte is decoded), and opens each expert
matrix as soon as its pieces have arrived (``qmoe_ray.read.weights.encoded_matrix``).

The experts then take one of two forms (``mode``):

- ``"decode"``: decoded once into dense bf16 weights (CuPy kernels on a GPU, the numpy/numba
  decoder on a CPU);
- ``"resident"``: kept encoded (``EncodedWeight``); ``x @ w.T`` decodes on the fly: through the
  fused decode+product kernel on a GPU, by decoding per call on a CPU.

``EncodedWeight`` honours ``x @ w.T`` (via ``__rmatmul__``), so the families' expert code
(``ExpertSpec.forward``) runs unchanged on dense and encoded experts: no hook in
``qmoe_ray.models.base`` is needed.

The result runs through the project's own block code (``qmoe_ray.models``): logits for token ids
and greedy generation for decoder-only families. Every problem with a checkpoint is a
``qmoe_ray.errors.CheckpointError`` naming the file, key or tensor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from qmoe_ray import codec
from qmoe_ray.errors import CheckpointError
from qmoe_ray.format.manifest import read_manifest
from qmoe_ray.format.matrices import stored_names
from qmoe_ray.format.shards import Timings, iter_shards
from qmoe_ray.format.trimmed import bind_stored, manifest_family
from qmoe_ray.models import LayerSpec, run_forward
from qmoe_ray.read.weights import DEVICES, Bf16Product, EncodedWeight, check_device, encoded_matrix
from qmoe_ray.storage.fs import redact

__all__ = ["DEVICES", "MODES", "COMPUTE", "LoadedWeights", "CompressedModel", "load", "source_of"]

MODES = ("decode", "resident")
COMPUTE = ("float32", "bf16")  # decode mode's expert products


class LoadedWeights:
    """A ``WeightSource`` over a loaded checkpoint: dense tensors (stored dtype) and experts
    (dense bf16 or ``EncodedWeight``), handed out as float32 on the model's device; a name it
    lacks raises ``CheckpointError`` (the model needs a tensor the checkpoint does not hold)."""

    def __init__(self, dense: Mapping[str, torch.Tensor], experts: Mapping[str, Any],
                 dtype: torch.dtype = torch.float32):
        self._dense = dense
        self._experts = experts
        self._dtype = dtype

    def __call__(self, name: str) -> torch.Tensor:
        t = self._dense.get(name)
        if t is None:
            t = self._experts.get(name)
            if t is None:
                raise CheckpointError(f"tensor {name!r}, which the model reads, is not in the "
                                      f"checkpoint ({len(self._dense) + len(self._experts)} "
                                      "tensors); the checkpoint is incomplete")
            if isinstance(t, EncodedWeight):
                t = t.dense()
        return t.to(self._dtype)

    def __contains__(self, name: str) -> bool:
        return name in self._dense or name in self._experts

    @property
    def names(self) -> list[str]:
        """Every tensor name (dense and experts)."""
        return list(self._dense) + list(self._experts)


class CompressedModel:
    """A loaded compressed checkpoint, runnable through the project's block code.

    Attributes:
        manifest: the checkpoint's manifest; config: the source model's config.
        family: the model family adapter.
        device, mode, compute: as passed to ``load``.
        dense: non-expert tensors (as stored, bf16) by name.
        experts: expert matrices by canonical name: bf16 tensors (decode) or ``EncodedWeight``.
        weights: ``dense`` and ``experts`` in one dict.
        W: a ``WeightSource`` over both (float32).
        timings: seconds spent reading, waiting, verifying and decoding, and the wall time.
    """

    def __init__(self, manifest: dict[str, Any], dense: dict[str, torch.Tensor],
                 experts: dict[str, Any], timings: dict[str, float],
                 device: str = "cpu", mode: str = "decode", compute: str = "float32"):
        self.manifest = manifest
        self.config = manifest["config"]
        self.family = manifest_family(manifest)  # a trimmed checkpoint's: its TrimmedFamily
        self.device = device
        self.mode = mode
        self.compute = compute
        self.dense = dense
        self.experts = experts
        self.weights = {**dense, **experts}
        self.W = LoadedWeights(dense, experts)
        bind_stored(self.family, self.W)
        self.timings = timings

    def experts_for(self, layer: LayerSpec):
        """``expert id -> {role: weight}`` for one MoE layer (float32 tensors in decode mode,
        ``Bf16Product`` with ``compute="bf16"``, ``EncodedWeight`` in resident mode; all work
        with ``x @ w.T``)."""
        fam = self.family
        bf16 = self.compute == "bf16"
        biases = (fam.expert_biases(layer, self.W, range(layer.num_experts))
                  if fam.expert_spec.bias_roles else {})  # carried dense, unquantized

        def get(e: int) -> dict[str, Any]:
            out: dict[str, Any] = {b: v[e] for b, v in biases.items()}
            for r, n in fam.expert_names(layer, e).items():
                w = self.experts[n]
                if isinstance(w, EncodedWeight):
                    out[r] = w
                else:
                    out[r] = Bf16Product(w) if bf16 else w.float()
            return out

        return get

    def _inputs(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.ndim == 2 else inputs[None]
            inputs = {"input_ids": ids.long(),
                      "attention_mask": torch.ones_like(ids, dtype=torch.long)}
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def logits(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """float32 logits ``[B, S, vocab]`` for token ids (a tensor or the family's inputs)."""
        inputs = self._inputs(inputs)
        with torch.device(self.device):  # tensors the block code creates land on our device
            return run_forward(self.family, self.W, inputs, experts_for=self.experts_for)

    @torch.no_grad()
    def loss(self, inputs: Mapping[str, torch.Tensor]) -> tuple[float, int]:
        """``(mean token cross-entropy, predicted tokens)`` as transformers counts them."""
        inputs = self._inputs(inputs)
        ce, n = self.family.loss_terms(self.logits(inputs), inputs)
        return float(ce) / max(int(n), 1), int(n)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16) -> torch.Tensor:
        """Greedy continuation for decoder-only families (recomputes the prefix each step)."""
        if self.family.model_type == "switch_transformers":
            raise ValueError("generate() supports decoder-only families; for Switch use logits()")
        ids = (input_ids if input_ids.ndim == 2 else input_ids[None]).to(self.device)
        for _ in range(max_new_tokens):
            nxt = self.logits(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


def load(url: str, device: str = "cpu", mode: str = "decode", workers: int = 4,
         progress: bool = False, compute: str = "float32", **storage_options: Any
         ) -> CompressedModel:
    """Load a compressed checkpoint, streaming and verifying its shards.

    Args:
        url: the checkpoint folder (any fsspec URL).
        device: ``"cpu"`` (numpy decoder) or ``"cuda"`` (CuPy kernels; needs the GPU extra).
        mode: ``"decode"``: experts decoded once into dense bf16 weights; ``"resident"``: experts
            kept encoded and decoded inside each product (fused kernel on a GPU).
        workers: concurrent range reads.
        progress: show a progress bar (bytes read, verified and decoded) on stderr.
        compute: decode mode's expert products: ``"float32"`` (the weights widened per
            product, the job's arithmetic; the default) or ``"bf16"`` (bf16 activations times
            the bf16 weights, as a bf16 serving stack runs them: the fair baseline for resident
            mode's latency on a GPU).
        **storage_options: fsspec options (credentials, endpoint).

    Returns:
        A ``CompressedModel``; its ``timings`` split the load into read, wait, verify, decode.

    Raises:
        CheckpointError: whatever is wrong with the checkpoint (malformed, inconsistent with its
            config, corrupted, not decodable), naming the file, key or tensor; every declared
            shape is checked against the config before anything is allocated or decoded.
        ValueError: an unknown device, mode or compute.
        RuntimeError: ``device="cuda"`` without a GPU or without CuPy (says how to install it).
        FileNotFoundError: no manifest or a missing shard; PermissionError: access denied.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if compute not in COMPUTE:
        raise ValueError(f"compute={compute!r}: expected one of {COMPUTE}")
    check_device(device)
    t_start = time.perf_counter()
    manifest = read_manifest(url, **storage_options)  # checked: check_manifest
    quantized = manifest["quantized"]
    tables = manifest.get("tables", {})
    need = {n: stored_names(n, e) for n, e in quantized.items()}  # each matrix's pieces
    stored = {k for keys in need.values() for k in keys} | {f"{t}.freqs" for t in tables}
    refs: dict[str, int] = {}
    for keys in need.values():
        for k in keys:
            refs[k] = refs.get(k, 0) + 1
    t = Timings()
    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, Any] = {}
    held: dict[str, torch.Tensor] = {}  # stored pieces of matrices not yet complete
    table_cache: dict[str, codec.Table] = {}
    todo = dict(quantized)
    label = "loading" if progress else False
    for _, part in iter_shards(url, manifest, workers=workers, timings=t, progress=label,
                               checked=True, **storage_options):
        t0 = time.perf_counter()
        for name, tensor in part.items():
            if name in stored:
                held[name] = tensor
            else:
                dense[name] = tensor.clone().to(device)  # own the memory, not the shard buffer
        for name in [n for n in todo if all(k in held for k in need[n])]:
            w = encoded_matrix(name, todo.pop(name), held, tables, table_cache, device)
            experts[name] = w if mode == "resident" else w.dense()
            for k in need[name]:  # free pieces no pending matrix needs (tables are shared)
                refs[k] -= 1
                if refs[k] == 0:
                    held.pop(k)
        t.decode += time.perf_counter() - t0
    if todo:
        raise CheckpointError(f"{redact(url)}: {len(todo)} quantized matrices without their "
                              f"stored tensors (first: {sorted(todo)[0]!r})")
    if device == "cuda":
        torch.cuda.synchronize()
    t.wall = time.perf_counter() - t_start
    return CompressedModel(manifest, dense, experts, t.as_dict(), device=device, mode=mode,
                           compute=compute)


def source_of(url: str, **storage_options: Any) -> str | None:
    """The source model a compressed checkpoint's manifest names (redacted; None if none).
    Only shown to the user, never fetched (see ``qmoe_ray.read.evaluate.compare_eval``)."""
    source = read_manifest(url, **storage_options).get("source")
    return redact(source) if source else None
