"""Expert groups sized to the workers' memory: ``--group-size auto`` with ``--worker-memory GIB``.

A worker quantizes one group of experts at a time; its peak memory for a group of ``g`` experts
is the cost model's ``worker_bytes`` (``qmoe_ray.job.costmodel``: the fitted process base, the
group's weights in their four forms, the larger of the Hessians being formed and the float32
Hessians under GPTQ with its working copies, the group's tokens, hidden activations and
outputs), which grows with ``g``. Per MoE layer (shapes differ between families and, in a
trimmed or hybrid model, between layers), ``auto`` takes the largest ``g`` whose predicted peak
plus ``MARGIN`` fits the budget, and no more than ``ceil(experts / workers)`` (a larger group
would leave a worker without one). Routing is taken to be uniform (every expert gets
``tokens x top_k / experts`` tokens); the margin is for what the model does not see (a skewed
router's heavier groups, the allocator's slack). On the ``scale`` benchmark's runs not used to fit
it the measured worker RSS was 0.78-1.01 x the predicted peak (BENCHMARKS.md, ``scale``); on the
embedded Mixtral the heaviest group of 3 drew up to 1.8x its uniform share of tokens (the report's
``heaviest_group_vs_uniform``), which the token term (a third of a Qwen3 expert's bytes) feels.

The budget (``worker_budget``): ``--worker-memory GIB`` when given; else, on the local cluster
the job starts, this machine's available memory (``psutil``) shared by the workers; on a cluster
it joins, Ray's ``memory`` resource of the smallest node that hosts a worker, shared by the
workers it holds (``cluster.ray_worker_memory``); GPU workers need ``--worker-memory`` (the
GPU's). The chosen sizes are part of the job's record (``job["group_sizes"]``), so a resume
groups every layer as the first run did (``resolve``).

No Ray here (the cluster's figure comes in as a number).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from qmoe_ray.data.samples import text_view
from qmoe_ray.errors import InputError
from qmoe_ray.job import costmodel as cm
from qmoe_ray.models import LayerSpec

#: The predicted peak times ``1 + MARGIN`` must fit the budget.
MARGIN = 0.10
GIB = 2**30
AUTO = "auto"


def hidden_size(config: Mapping[str, Any]) -> int | None:
    """The model width from ``config.json`` (a multimodal wrapper's text config), or None."""
    text = text_view(config)
    for key in ("hidden_size", "d_model"):
        if isinstance(text.get(key), int):
            return int(text[key])
    return None


def expert_matrices(family: Any, layer: LayerSpec,
                    shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """``(rows, cols)`` of each matrix of one routed expert of ``layer``, from the family's
    expected shapes: the per-expert names where the source has them, else (fused 3-D tensors)
    one expert's slice of each tensor, as ``qmoe-ray plan`` counts them."""
    try:
        names = family.expert_names(layer, 0)
    except (KeyError, IndexError, RuntimeError):
        names = {}
    if names and all(n in shapes for n in names.values()):
        return tuple((int(shapes[n][-2]), int(shapes[n][-1])) for n in names.values())
    return source_matrices(family, layer, shapes)


def source_matrices(family: Any, layer: LayerSpec,
                    shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """``(rows, cols)`` of each matrix of one routed expert of ``layer`` counted from the
    source's expert tensors, in shape order: a shape held by ``n`` tensors is ``n / experts``
    matrices of every expert (per-expert tensors), at least one (a fused ``[experts, rows,
    cols]`` tensor is one matrix of every expert)."""
    seen = Counter(tuple(shapes[n]) for n in family.source_expert_names(layer) if n in shapes)
    out: list[tuple[int, int]] = []
    for shape, n in sorted(seen.items()):
        out += [(int(shape[-2]), int(shape[-1]))] * max(n // max(layer.num_experts, 1), 1)
    return tuple(out)


def layer_shape(matrices: Sequence[tuple[int, int]], *, experts: int, top_k: int, hidden: int,
                tokens: int, hessian_dtype: str) -> cm.Shape:
    """The cost model's ``Shape`` of one MoE layer, with what ``worker_bytes`` reads."""
    return cm.Shape(moe_layers=1, dense_blocks=0, experts=experts, top_k=max(top_k, 1),
                    hidden=hidden, matrices=tuple(tuple(m) for m in matrices), block_params=0.0,
                    dense_ffn_params=0.0, source_bytes_per_weight=2.0, output_bytes=0.0,
                    calib_tokens=tokens, all_tokens=tokens, seq_len=1,
                    sum_bytes=8 if hessian_dtype == "float64" else 4)


def need_bytes(s: cm.Shape, group: int, base: float) -> float:
    """What a worker must have for a group of ``group`` experts: the predicted peak + margin."""
    return cm.worker_bytes(s, group, base) * (1 + MARGIN)


def largest_group(s: cm.Shape, budget: float, base: float) -> int:
    """The largest group (1 to the layer's experts) that fits ``budget`` bytes, 0 when not even
    one expert does (``worker_bytes`` grows with the group: a bisection)."""
    if need_bytes(s, 1, base) > budget:
        return 0
    lo, hi = 1, s.experts
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need_bytes(s, mid, base) <= budget else (lo, mid - 1)
    return lo


def _what(s: cm.Shape) -> str:
    return (f"expert matrices {list(s.matrices)}, {s.all_tokens} tokens x top-{s.top_k} over "
            f"{s.experts} experts, {s.sum_bytes * 8}-bit Hessian sums")


def choose(shapes: Mapping[str, cm.Shape], budget: float, base: float, workers: int,
           where: str, samples_flag: str = "--num-samples") -> dict[str, int]:
    """The group size per layer (``{layer name: size}``) for ``budget`` bytes per worker.

    Raises:
        InputError: a layer where one expert does not fit (what it needs and the fix named).
    """
    out = {}
    for name, s in shapes.items():
        g = largest_group(s, budget, base)
        if g == 0:
            need = need_bytes(s, 1, base)
            raise InputError(
                f"layer {name}: one expert needs {need / GIB:.2f} GiB (the predicted worker peak "
                f"{cm.worker_bytes(s, 1, base) / GIB:.2f} GiB + {MARGIN:.0%} margin; {_what(s)}), "
                f"the workers have {budget / GIB:.2f} GiB ({where}); give workers with at least "
                f"{need / GIB:.2f} GiB (--worker-memory {math.ceil(need / GIB * 100) / 100:g}), "
                f"or fewer calibration tokens ({samples_flag}, --seq-len, --eval-samples)")
        out[name] = min(g, math.ceil(s.experts / max(workers, 1)))
    return out


def check_fixed(shapes: Mapping[str, cm.Shape], sizes: Mapping[str, int], budget: float,
                base: float, where: str, resumed: bool = False) -> None:
    """Refuse groups of ``sizes`` (``{layer name: size}``: an explicit ``--group-size``, or the
    sizes a resumed job recorded) that do not fit the budget.

    Raises:
        InputError: naming the layer, what its group needs and the fix.
    """
    for name, s in shapes.items():
        g = min(sizes[name], s.experts)
        need = need_bytes(s, g, base)
        if need <= budget:
            continue
        fits = largest_group(s, budget, base)
        what = (f"layer {name}: a group of {g} experts needs {need / GIB:.2f} GiB per worker "
                f"(+{MARGIN:.0%} margin; {_what(s)}), the workers have {budget / GIB:.2f} GiB "
                f"({where})")
        if resumed:
            raise InputError(f"{what}; the job this run resumes chose groups of {g} for larger "
                             f"workers: give --worker-memory {math.ceil(need / GIB * 100) / 100:g} "
                             "or more to resume it, or pass --overwrite to start over")
        fix = (f"the largest group that fits is {fits} (--group-size {fits}, or --group-size "
               "auto)" if fits else
               f"not even one expert fits (it needs {need_bytes(s, 1, base) / GIB:.2f} GiB): "
               "give workers with more memory")
        raise InputError(f"{what}; {fix}")


def local_budget(workers: int) -> tuple[float, str]:
    """This machine's available memory shared by ``workers`` workers, and its description."""
    import psutil

    avail = float(psutil.virtual_memory().available)
    return avail / max(workers, 1), (f"this machine's available memory, {avail / GIB:.2f} GiB, "
                                     f"over {workers} worker(s); --worker-memory GIB to set it")


def shapes_of(family: Any, layers: Sequence[LayerSpec], config: Mapping[str, Any], tokens: int,
              hessian_dtype: str) -> dict[str, cm.Shape]:
    """The ``Shape`` of every MoE layer of ``layers`` (``{layer name: shape}``)."""
    expected = family.expected_shapes()
    out = {}
    for lay in layers:
        if not lay.moe:
            continue
        mats = expert_matrices(family, lay, expected)
        if not mats:
            raise InputError(f"layer {lay.name}: no expert tensors found to size the groups by; "
                             "give --group-size N")
        hidden = hidden_size(config) or max(c for _, c in mats)
        out[lay.name] = layer_shape(mats, experts=lay.num_experts, top_k=lay.top_k,
                                    hidden=hidden, tokens=tokens, hessian_dtype=hessian_dtype)
    return out


def summary(shapes: Mapping[str, cm.Shape], sizes: Mapping[str, int],
            base: float) -> dict[str, dict[str, Any]]:
    """Per layer: the group size and the predicted worker peak of one of its groups (GiB)."""
    return {n: {"group_size": sizes[n], "experts": s.experts,
                "predicted_worker_gib": round(cm.worker_bytes(s, sizes[n], base) / GIB, 4)}
            for n, s in shapes.items()}
