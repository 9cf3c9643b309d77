"""Quantization workers: one expert group in, encoded experts and their outputs out.

``QuantWorker`` is a plain class (testable without Ray); the driver runs it inside Ray actors with
``num_gpus``/``num_cpus`` resources. Each call reads the group's weights lazily from the source
(range reads: only this group's tensors), concatenates the group's tokens from every store (store
order = sample order, so the result does not depend on how samples were sharded), runs the joint
quantization of ``qmoe_ray.job.group``, encodes the matrices in the sub-1-bit format (encoding here
rather than in the writer spreads the CPU work over all workers and shrinks what is shipped), and
splits the experts' outputs back per store.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from qmoe_ray.errors import InputError
from qmoe_ray.format.matrices import pack_matrix, shared_table, table_tensors
from qmoe_ray.job.group import ExpertTokens, QuantOptions, quantize_group
from qmoe_ray.models import LayerSpec, get_family
from qmoe_ray.models.trim import trim as trim_family
from qmoe_ray.quant.alloc import BudgetTooSmall
from qmoe_ray.storage.checkpoint import SourceIndex, open_source


@dataclass
class EncodedGroup:
    """What the writer needs from a group: tensors to store and their manifest entries.

    The tensors travel as safetensors bytes (``blob``), not as pickled torch objects.
    """

    layer: int
    group: int
    blob: bytes
    entries: dict[str, dict[str, Any]]
    stats: list[dict[str, Any]]
    tables: dict[str, dict[str, str]]
    timings: dict[str, float]
    allocation: dict[str, Any] | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The group's tensors, parsed from ``blob``."""
        return st_load(self.blob)


class QuantWorker:
    """Quantizes expert groups of one source model (see module doc).

    Args:
        source: model URL or path.
        storage_options: fsspec options for the source.
        opts: scheme and GPTQ settings.
        threads: torch threads (fixed, so results do not depend on the machine's core count).
        device: ``"cpu"`` or ``"cuda"`` for the quantization math.
    """

    def __init__(
        self,
        source: str,
        storage_options: Mapping[str, Any] | None,
        opts: QuantOptions,
        threads: int = 1,
        device: str = "cpu",
        index: SourceIndex | None = None,
        trim: Any = None,
    ):
        torch.set_num_threads(max(1, int(threads)))
        self.ckpt = open_source(source, storage_options, index)
        self.family = get_family(self.ckpt.config, self.ckpt)  # layout bound from its names
        self.family = trim_family(self.family, trim)  # the trimmed model (a TrimPlan)
        self.opts = opts
        self.device = device

    def run(
        self,
        layer: LayerSpec,
        group: int,
        experts: Sequence[int],
        parts: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
        cap: int | None,
        target_bits: float | None = None,
    ) -> tuple[EncodedGroup, list[list[np.ndarray]]]:
        """Quantize one group.

        Args:
            layer: the MoE layer.
            group: the group's index within the layer.
            experts: expert ids of the group.
            parts: per store, per expert ``(x [T, d], hmask [T])``.
            cap: most Hessian tokens per expert.
            target_bits: under a size budget, this group's bits per expert parameter (the
                job's budget plus what earlier layers left; None: the job's).

        Returns:
            ``(encoded, outputs)`` with ``outputs[s][i]`` the output of expert ``experts[i]`` for
            store ``s``'s tokens.
        """
        tokens = []
        for i in range(len(experts)):
            xs = [p[i][0] for p in parts]
            hs = [p[i][1] for p in parts]
            tokens.append(ExpertTokens(np.concatenate(xs), np.concatenate(hs)))
        t_read = time.perf_counter()
        weights = self.family.read_experts(layer, self.ckpt, experts)
        t0 = time.perf_counter()
        names = [self.family.expert_names(layer, e) for e in experts]
        packed: dict[str, Any] = {}

        def measure(results: Any, choices: Any) -> int:
            packed["last"] = _pack_mixed(layer, group, experts, names, results, choices,
                                         self.opts.segment_symbols)
            return 8 * sum(t.numel() * t.element_size() for t in packed["last"][0].values())

        try:
            res = quantize_group(self.family.expert_spec, weights, tokens, self.opts, cap,
                                 experts, device=self.device, target_bits=target_bits,
                                 measure=measure)
        except BudgetTooSmall as exc:
            lo = math.ceil(exc.minimum * 1000) / 1000
            raise InputError(
                f"--target-bits {self.opts.target_bits:g}: below what the cheapest candidate "
                f"settings reach on layer {layer.name} (experts {experts[0]}-{experts[-1]}): "
                f"the minimum is {exc.minimum:.3f} bits per expert parameter; give "
                f"--target-bits {lo:g} or more") from None
        t1 = time.perf_counter()
        if res.choices is not None:
            tensors, entries, tables = packed["last"]
            return self._finish(layer, group, experts, parts, res, tensors, entries, tables,
                                t_read, t0, t1)
        tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, dict[str, Any]] = {}
        tables: dict[str, dict[str, str]] = {}
        shared: dict[str, tuple[Any, str | None]] = {}
        for role, qr in res.results.items():
            table = shared_table(qr.scheme, qr.codes)
            name = f"{layer.name}.qmoe_table.group{group}.{role}" if table is not None else None
            if table is not None:
                t, tables[name] = table_tensors(name, table)
                tensors.update(t)
            shared[role] = (table, name)
        for i, e in enumerate(experts):
            names = self.family.expert_names(layer, e)
            for role, qr in res.results.items():
                params = {k: v[i] for k, v in qr.params.items()}
                t, entry = pack_matrix(names[role], qr.scheme, qr.codes[i], params, *shared[role],
                                       segment_symbols=self.opts.segment_symbols)
                entry.update(layer=layer.index, expert=int(e), role=role)
                if qr.pruned is not None:
                    entry["sparsity"] = float(qr.pruned[i])
                tensors.update(t)
                entries[names[role]] = entry
        return self._finish(layer, group, experts, parts, res, tensors, entries, tables, t_read,
                            t0, t1)

    def _finish(self, layer: LayerSpec, group: int, experts: Sequence[int], parts: Any,
                res: Any, tensors: dict[str, torch.Tensor], entries: dict[str, dict[str, Any]],
                tables: dict[str, dict[str, str]], t_read: float, t0: float,
                t1: float) -> tuple[EncodedGroup, list[list[np.ndarray]]]:
        outputs: list[list[np.ndarray]] = []
        sizes = [[len(p[i][0]) for i in range(len(experts))] for p in parts]
        starts = [0] * len(experts)
        for s in range(len(parts)):
            per = []
            for i in range(len(experts)):
                n = sizes[s][i]
                per.append(res.outputs[i][starts[i] : starts[i] + n])
                starts[i] += n
            outputs.append(per)
        blob = st_save(tensors)
        timings = {
            "read": t0 - t_read,
            **res.timings,
            "encode": time.perf_counter() - t1,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        return EncodedGroup(layer.index, group, blob, entries, res.stats, tables, timings,
                            res.allocation), outputs


def _pack_mixed(layer: LayerSpec, group: int, experts: Sequence[int],
                names: Sequence[Mapping[str, str]], results: Mapping[str, Sequence[Any]],
                choices: Mapping[str, Sequence[str]], segment_symbols: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]],
                                               dict[str, dict[str, str]]]:
    """The tensors, manifest entries and tables of a group whose matrices have their own
    schemes (a size budget): one shared table per role and entropy-coded scheme; each entry
    records its candidate setting (``setting``: ``ternary@0.2``, ``int3``)."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    tables: dict[str, dict[str, str]] = {}
    for role, per in results.items():
        shared: dict[str, tuple[Any, str | None]] = {}
        for scheme in sorted({q.scheme.name for q in per}):
            qs = [q for q in per if q.scheme.name == scheme]
            table = shared_table(qs[0].scheme, torch.cat([q.codes for q in qs]))
            name = (f"{layer.name}.qmoe_table.group{group}.{role}.{scheme}"
                    if table is not None else None)
            if table is not None:
                t, tables[name] = table_tensors(name, table)
                tensors.update(t)
            shared[scheme] = (table, name)
        for i, e in enumerate(experts):
            q = per[i]
            params = {k: v[0] for k, v in q.params.items()}
            t, entry = pack_matrix(names[i][role], q.scheme, q.codes[0], params,
                                   *shared[q.scheme.name], segment_symbols=segment_symbols)
            entry.update(layer=layer.index, expert=int(e), role=role, setting=choices[role][i])
            tensors.update(t)
            entries[names[i][role]] = entry
    return tensors, entries, tables
