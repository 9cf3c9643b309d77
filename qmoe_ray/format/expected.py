"""What a model config implies a compressed checkpoint holds, checked against its manifest.

A manifest's ``config`` names a model family (``qmoe_ray.models``); the family says which
tensors the model reads and with which shapes, and which expert matrices it routes to. So every
shape a manifest declares is checked against the config before anything is allocated or decoded
(``check_against_config``, run by ``qmoe_ray.format.manifest.check_manifest``), and the config
bounds the manifest's size before it is read (``implied_counts``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qmoe_ray.data.samples import text_view
from qmoe_ray.errors import CheckpointError
from qmoe_ray.format.matrices import stored_names
from qmoe_ray.format.trimmed import bind_stored, manifest_family, stored_shapes
from qmoe_ray.models import get_family


def family_of(config: Mapping[str, Any], where: str) -> Any:
    """The family of a config that passed ``manifest.check_config``, its errors as
    ``CheckpointError``."""
    try:
        return get_family(config)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError,
            AttributeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(f"{where}: config: {msg}") from None


def implied_counts(config: Mapping[str, Any], where: str) -> tuple[int, int]:
    """``(expert matrices, layers)`` of the model a config describes (for
    ``manifest.implied_tensors``)."""
    family = family_of(config, where)
    layers = family.layers()
    roles = len(family.expert_spec.roles)
    return sum(lay.num_experts * roles for lay in layers if lay.moe), len(layers)


def _declared_shapes(family: Any, names: set[str], where: str) -> dict[str, tuple[int, ...]]:
    """The shapes the family says tensors must have: every tensor its forward reads
    (``expected_shapes``; a trimmed model's: ``trimmed.stored_shapes``), once the expert layout
    is bound from the names (never guessed)."""
    try:
        bind_stored(family, names)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc.args[0] if exc.args else exc}") from None
    return stored_shapes(family)


def check_against_config(manifest: Mapping[str, Any], where: str = "manifest") -> None:
    """Check every declared shape against the model config (a manifest that passed the schema).

    - the quantized matrices are exactly the family's routed experts (counted from the config
      before any name is listed), each with the shape the config implies for its role;
    - every other tensor the family declares (``expected_shapes``: attention, norms, routers,
      embeddings, head) is stored with its shape; a tensor the family does not declare has at
      most 4 dimensions and no more elements than the largest declared one.

    Raises:
        CheckpointError: naming the tensor, its declared shape and the shape the config implies.
    """
    config = manifest["config"]
    family = manifest_family(manifest, where)  # trimmed by the manifest's trim record, if any
    quantized, tensors = manifest["quantized"], manifest["tensors"]
    pieces = {t for n, e in quantized.items() for t in stored_names(n, e)}
    pieces |= {f"{t}.freqs" for t in manifest.get("tables", {})}
    dense = {n: e for n, e in tensors.items() if n not in pieces}
    both = sorted(set(dense) & set(quantized))
    if both:
        raise CheckpointError(f"{where}: {both[0]!r} is both a stored tensor and a quantized "
                              "matrix")
    moe = [lay for lay in family.layers() if lay.moe]
    roles = family.expert_spec.roles
    expected = sum(lay.num_experts for lay in moe) * len(roles)
    model = f"the {family.model_type} config" + (" and trim record" if "trim" in manifest else "")
    if expected != len(quantized):
        def names():
            for lay in moe:
                for e in range(lay.num_experts):
                    yield from ((lay, e, r, n) for r, n in family.expert_names(lay, e).items())

        detail = ""
        if expected > len(quantized):  # the first missing one is among the first len + 1
            lay, e, r, n = next(x for x in names() if x[3] not in quantized)
            detail = f": expert {e} of {lay.name} ({r}, {n!r}) is missing"
        else:
            extra = sorted(set(quantized) - {x[3] for x in names()})
            detail = f": {extra[0]!r} is no expert of it"
        raise CheckpointError(f"{where}: {model} implies {expected} expert matrices, the "
                              f"manifest has {len(quantized)}{detail}; the manifest does not "
                              "match its config")
    shapes = _declared_shapes(family, set(dense) | set(quantized), where)
    hint = ("; the manifest does not match its config (a checkpoint declares only the shapes "
            "its config implies)")
    for name, entry in quantized.items():
        want = shapes.get(name)
        if want is None:
            raise CheckpointError(f"{where}: quantized matrix {name!r} is no expert of {model}"
                                  f"{hint}")
        if tuple(entry["shape"]) != want:
            raise CheckpointError(f"{where}: quantized matrix {name!r} is declared "
                                  f"{list(entry['shape'])}, {model} implies {list(want)}{hint}")
    for name, want in shapes.items():
        if name in quantized:
            continue
        if name not in dense:
            raise CheckpointError(f"{where}: tensor {name!r}, which {model} implies, is not in "
                                  "the manifest; the checkpoint is incomplete")
        if tuple(dense[name]["shape"]) != want:
            raise CheckpointError(f"{where}: tensor {name!r} is declared "
                                  f"{list(dense[name]['shape'])}, {model} implies "
                                  f"{list(want)}{hint}")
    text = text_view(config)  # a multimodal wrapper's sizes are its text_config's
    d = text.get("hidden_size") or text.get("d_model") or 0
    bound = max([math.prod(s) for s in shapes.values()] + [(text.get("vocab_size") or 0) * d])
    for name, e in dense.items():  # 5-D: a vision tower's Conv3d patch embedding, carried
        if name not in shapes and (len(e["shape"]) > 5 or math.prod(e["shape"]) > bound):
            raise CheckpointError(f"{where}: tensor {name!r} is declared {list(e['shape'])}, "
                                  f"larger than any tensor of {model} ({bound:,} elements)"
                                  f"{hint}")
