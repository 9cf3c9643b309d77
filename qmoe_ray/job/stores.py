"""Activation stores: a shard of the calibration (and held-out) samples and their residual stream.

A store owns whole batches of samples (contiguous in sample order, so the token order seen by the
quantizers is the same whatever the number of stores) and walks them through the model one layer
at a time, as the driver asks:

- ``dense_block``: a non-MoE block over every batch;
- ``pre_moe``: attention etc. up to the MoE input, then the router. The MoE inputs of all real
  tokens are gathered into one contiguous ``[tokens, d_model]`` buffer (QMoE's list buffer; the
  per-sample offsets are ``batch * seq + position``), and the token->expert assignments are
  bucketed per expert with one stable sort, so ``expert_tokens`` is a slice per expert;
- ``add_outputs``: the quantized experts' outputs for this store's tokens, per expert group;
- ``post_moe``: adds the gate-weighted outputs in a fixed (group, expert) order, so the sums and
  hence the output bytes do not depend on which worker finished first, then finishes the block.

- ``save_state`` / ``restore``: the stream after a finished layer goes to the output location
  (``qmoe_ray.job.progress``, one file per batch), and comes back from there when a job resumes
  or when this store was restarted after losing its node: batches are numbered globally, so any
  number of stores can restore any checkpoint.

This class knows nothing about Ray: ``qmoe_ray.job.actors`` wraps it in an actor whose
``keep`` puts the batches' state into Ray's object store (which spills to disk when full).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qmoe_ray.job.progress import Progress
from qmoe_ray.models import LayerSpec, get_family
from qmoe_ray.models.base import State
from qmoe_ray.models.trim import trim as trim_family
from qmoe_ray.storage.checkpoint import SourceIndex, open_source

Holder = Callable[[State], Any]


class CachedWeights:
    """A ``WeightSource`` over a checkpoint that caches what one layer reads, rounding dense
    tensors to the dtype the output checkpoint stores them in (the family's ``stored_dtype``),
    so the calibration sees exactly the weights that will be shipped."""

    def __init__(self, ckpt: Any, stored_dtype: Callable[[str, torch.dtype], torch.dtype]):
        self._ckpt = ckpt
        self._cache: dict[str, torch.Tensor] = {}
        self._stored = stored_dtype

    def __call__(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            raw = self._ckpt.read(name)
            t = raw.to(self._stored(name, raw.dtype)).float()
            self._cache[name] = t
        return t

    def __contains__(self, name: str) -> bool:
        return name in self._ckpt

    def clear(self) -> None:
        self._cache.clear()


class ActivationStore:
    """The samples of one store and their state between layers (see module doc).

    Args:
        source: model URL or path.
        storage_options: fsspec options for the source.
        inputs: this shard's samples, ``{name: [n, ...]}`` as made by ``qmoe_ray.data``.
        calib: bool ``[n]``: True for calibration samples, False for held-out ones (they pass
            through the compressed layers for the loss but never enter a Hessian).
        batch_size: samples per forward batch.
        keep, fetch: how a batch's state is held between calls (identity by default; the Ray
            actor uses ``ray.put`` / ``ray.get``).
        first_batch: global index of this shard's first batch (names its activation files).
        output, output_options: where activation checkpoints go (None: ``save_state`` and
            ``restore`` of a finished layer are unavailable).
    """

    def __init__(
        self,
        source: str,
        storage_options: Mapping[str, Any] | None,
        inputs: Mapping[str, np.ndarray],
        calib: np.ndarray,
        batch_size: int,
        keep: Holder | None = None,
        fetch: Callable[[Any], State] | None = None,
        first_batch: int = 0,
        output: str | None = None,
        output_options: Mapping[str, Any] | None = None,
        index: SourceIndex | None = None,
        trim: Any = None,
    ):
        torch.manual_seed(0)
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor
        self.first_batch = first_batch
        self.progress = Progress(output, output_options) if output else None
        self.ckpt = open_source(source, storage_options, index)
        self.family = get_family(self.ckpt.config, self.ckpt)  # layout bound from its names
        self.family = trim_family(self.family, trim)  # the trimmed model (a TrimPlan)
        self.W = CachedWeights(self.ckpt, self.family.stored_dtype)
        self._keep = keep or (lambda s: s)
        self._fetch = fetch or (lambda s: s)
        self.calib = [torch.from_numpy(np.array(calib[s: s + batch_size], dtype=bool))
                      for s in range(0, len(calib), batch_size)]
        self.inputs = {k: np.asarray(v) for k, v in inputs.items()}
        self.batch_size = batch_size
        self.batches: list[Any] = []
        self._prev = _previous_layers(self.family.layers())
        self.at: int | None = None  # the last layer applied to the stream (None: the embedding)
        self._moe: dict[str, Any] | None = None
        self._outputs: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        self.restore(None)

    def ping(self) -> str:
        """This store's incarnation (a new one after a restart lost its state)."""
        return self.incarnation

    def restore(self, after_layer: int | None) -> None:
        """Reset the stream to the input of the layer after ``after_layer`` (None: the embedding
        of the samples), dropping any half-done MoE layer.

        Raises:
            FileNotFoundError: the activation checkpoint of ``after_layer`` is missing.
        """
        self._moe = None
        self._outputs = {}
        n = len(self.calib)
        if after_layer is not None:
            if self.progress is None:
                raise RuntimeError("restore of a finished layer needs the store's output location")
            self.batches = [self._keep(self.progress.load_state(after_layer, self.first_batch + i))
                            for i in range(n)]
            self.at = after_layer
            return
        self.at = None
        self.batches = []
        with torch.no_grad():
            for i in range(n):
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                batch = {k: torch.from_numpy(np.array(v[sl])) for k, v in self.inputs.items()}
                self.batches.append(self._keep(self.family.embed(self.W, batch)))
        self.W.clear()

    def _expect(self, at: int | None, what: str) -> None:
        """Refuse a call made for a stream this store does not hold: a store that Ray restarted
        (its stream back at the embedding) must fail the call, never compute on the wrong
        activations; the driver then restores every store and redoes the layer."""
        if self.at != at:
            raise StaleStoreError(
                f"{what}: the store's stream is after layer {self.at}, the call needs it after "
                f"layer {at} (the store was restarted: its state is being restored)")

    def save_state(self, layer_index: int) -> int:
        """Checkpoint every batch's stream after layer ``layer_index`` to the output location.

        Returns:
            Bytes written.
        """
        self._expect(layer_index, "save_state")
        if self.progress is None:
            raise RuntimeError("save_state needs the store's output location")
        total = 0
        for i, ref in enumerate(self.batches):
            state = self._fetch(ref)
            self.progress.save_state(layer_index, self.first_batch + i, state)
            total += sum(t.numel() * t.element_size() for t in state.values())
        return total

    # -- dense blocks ------------------------------------------------------------------------
    def dense_block(self, layer: LayerSpec) -> None:
        """Run a non-MoE block over every batch."""
        self._expect(self._prev[layer.index], f"dense_block({layer.name})")
        with torch.no_grad():
            for i, ref in enumerate(self.batches):
                self.batches[i] = self._keep(self.family.dense_block(layer, self.W, self._fetch(ref)))
        self.at = layer.index
        self.W.clear()

    # -- MoE blocks --------------------------------------------------------------------------
    def pre_moe(self, layer: LayerSpec) -> dict[str, np.ndarray]:
        """Up to the router; gathers and buckets this store's tokens per expert.

        Returns:
            ``{"routed": int64 [E], "hessian": int64 [E], "seconds": {"dense": s, "routing":
            s}}``: tokens routed to each expert, how many of them may enter Hessians, and this
            store's seconds in the block up to the router (weights read included) and in the
            router plus the bucketing.
        """
        self._expect(self._prev[layer.index], f"pre_moe({layer.name})")
        fam = self.family
        xs, idxs, gates, hmasks, where = [], [], [], [], []
        clock = time.perf_counter
        dense = routing = 0.0
        with torch.no_grad():
            for i, ref in enumerate(self.batches):
                t0 = clock()
                state, x = fam.pre_moe(layer, self.W, self._fetch(ref))
                t1 = clock()
                idx, gate = fam.route(layer, self.W, x, state)
                dense, routing = dense + t1 - t0, routing + clock() - t1
                tmask = fam.token_mask(layer, state).bool()
                hmask = fam.hessian_mask(layer, state).bool() & tmask & self.calib[i][:, None]
                pos = torch.nonzero(tmask.reshape(-1)).squeeze(1)
                xs.append(x.reshape(-1, x.shape[-1])[pos])
                idxs.append(idx.reshape(-1, idx.shape[-1])[pos])
                gates.append(gate.reshape(-1, gate.shape[-1])[pos].float())
                hmasks.append(hmask.reshape(-1)[pos])
                where.append(pos)
                self.batches[i] = self._keep(state)
        t2 = clock()
        x_all = torch.cat(xs).float().numpy()
        idx_all = torch.cat(idxs).numpy()
        gate_all = torch.cat(gates).numpy()
        hmask_all = torch.cat(hmasks).numpy()
        k = idx_all.shape[1]
        flat = idx_all.reshape(-1)
        order = np.argsort(flat, kind="stable")  # one sort buckets every (token, slot) pair
        E = layer.num_experts
        bounds = np.searchsorted(flat[order], np.arange(E + 1))
        self._moe = {
            "layer": layer.index,
            "x": x_all,
            "gate": gate_all,
            "hmask": hmask_all,
            "order": order,
            "bounds": bounds,
            "k": k,
            "where": where,
        }
        self._outputs = {}
        routed = np.diff(bounds).astype(np.int64)
        tok = order // k
        hess = np.array(
            [int(hmask_all[tok[bounds[e]: bounds[e + 1]]].sum()) for e in range(E)], dtype=np.int64
        )
        self.W.clear()
        routing += clock() - t2
        return {"routed": routed, "hessian": hess,
                "seconds": {"dense": dense, "routing": routing}}

    def _slots(self, e: int) -> np.ndarray:
        m = self._moe
        return m["order"][m["bounds"][e]: m["bounds"][e + 1]]

    def expert_tokens(self, experts: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(x [T_e, d], hmask [T_e])]`` for each expert, tokens in sample order."""
        m = self._require_moe()
        out = []
        for e in experts:
            tok = self._slots(e) // m["k"]
            out.append((m["x"][tok], m["hmask"][tok]))
        return out

    def add_outputs(self, group: int, experts: Sequence[int], outputs: Sequence[np.ndarray]) -> None:
        """Record the (ungated) outputs of a group's quantized experts for this store's tokens."""
        m = self._require_moe()
        for e, y in zip(experts, outputs, strict=True):
            n = len(self._slots(e))
            if y.shape != (n, m["x"].shape[1]):
                raise ValueError(f"outputs of expert {e}: shape {y.shape}, expected {(n, m['x'].shape[1])}")
        self._outputs[group] = (list(experts), list(outputs))

    def post_moe(self, layer: LayerSpec, expected_groups: int) -> None:
        """Sum the gate-weighted expert outputs (fixed order) and finish the block."""
        m = self._require_moe()
        if m["layer"] != layer.index:
            raise StaleStoreError(f"post_moe({layer.name}): the store holds layer {m['layer']}")
        if len(self._outputs) != expected_groups:
            raise RuntimeError(
                f"layer {layer.name}: store has outputs of {len(self._outputs)} expert groups, "
                f"expected {expected_groups}"
            )
        k = m["k"]
        y = np.zeros_like(m["x"])
        gate_flat = m["gate"].reshape(-1)
        for g in sorted(self._outputs):
            experts, outs = self._outputs[g]
            for e, out in zip(experts, outs, strict=True):
                slots = self._slots(e)
                # a token appears at most once per expert, so fancy-index += is exact
                y[slots // k] += out * gate_flat[slots][:, None]
        y_t = torch.from_numpy(y)
        start = 0
        with torch.no_grad():
            for i, ref in enumerate(self.batches):
                state = self._fetch(ref)
                pos = m["where"][i]
                B, S = state_shape(self.family, layer, state)
                d = y.shape[1]
                full = torch.zeros(B * S, d)
                full[pos] = y_t[start: start + len(pos)]
                start += len(pos)
                self.batches[i] = self._keep(self.family.post_moe(layer, self.W, state, full.reshape(B, S, d)))
        self.at = layer.index
        self._moe = None
        self._outputs = {}
        self.W.clear()

    def _require_moe(self) -> dict[str, Any]:
        if self._moe is None:
            raise StaleStoreError("pre_moe must run before expert_tokens/add_outputs/post_moe")
        return self._moe

    # -- the end -----------------------------------------------------------------------------
    def loss(self) -> dict[str, float]:
        """Cross-entropy over the held-out samples after the last layer.

        Returns:
            ``{"ce_sum": float, "tokens": int}`` (held-out samples only).
        """
        self._expect(self.family.layers()[-1].index, "loss")
        ce, count = 0.0, 0
        with torch.no_grad():
            for i, ref in enumerate(self.batches):
                held = ~self.calib[i]
                if not held.any():
                    continue
                state = self._fetch(ref)
                logits = self.family.logits(self.W, state)[held]
                sl = slice(i * self.batch_size, i * self.batch_size + len(self.calib[i]))
                inputs = {k: torch.from_numpy(v[sl][held.numpy()]) for k, v in self.inputs.items()}
                s, c = self.family.loss_terms(logits, inputs)
                ce += float(s)
                count += int(c)
        self.W.clear()
        return {"ce_sum": ce, "tokens": count}


class StaleStoreError(RuntimeError):
    """A call reached a store whose stream is not the one the call is for (a restarted store)."""


def _previous_layers(layers: Sequence[LayerSpec]) -> dict[int, int | None]:
    """Each layer's index -> the index of the layer before it (None for the first)."""
    out: dict[int, int | None] = {}
    prev = None
    for layer in layers:
        out[layer.index] = prev
        prev = layer.index
    return out


def state_shape(family: Any, layer: LayerSpec, state: State) -> tuple[int, int]:
    """``(batch, seq)`` of the stream that feeds ``layer``'s MoE (the token mask's shape)."""
    B, S = family.token_mask(layer, state).shape
    return int(B), int(S)
