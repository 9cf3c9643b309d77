"""Real-shaped synthetic checkpoints: a released model's true matrix shapes, a few of its layers.

The benchmarks that matter at scale (``scale``) need sources whose matrices are the size of the
real ones (a Mixtral expert is 14336x4096; a Qwen3-30B-A3B expert 768x2048), but this machine can
hold neither the whole model nor its download. ``write_realshape`` takes a released config
(``configs/*.json``: the published ``config.json`` fields of Mixtral-8x7B, Qwen3-30B-A3B,
Qwen3-235B-A22B, DeepSeek-V3, Kimi-K2, switch-base-128, switch-c-2048), cuts it to a chosen
number of layers and routed experts per layer (``shrink_config``), and writes an HF-layout
checkpoint of those layers, one safetensors shard per block plus ``model.safetensors.index.json``,
to a folder or any fsspec URL (``s3://...``). The tensor names and shapes are the family's own
table (``MoEFamily.expected_shapes``, what the job checks a source against), so the job reads it
as it reads the real model.

Weights are drawn per family convention, in bf16: decoder-only families ``N(0,
initializer_range)`` for every matrix (the released inits), Switch/T5 ``N(0, factor /
sqrt(fan_in))``; norms are ones, biases (DeepSeek's ``e_score_correction_bias``) zeros. The
vocabulary is cut too (``vocab``, default 4096): the embeddings are not what is measured, and a
152k x 2048 table would be most of a two-layer file. A ``tokens.npy`` of Zipf-distributed ids is
written next to the weights for calibration. Quantized releases (DeepSeek-V3's FP8) are written
unquantized: the ``quantization_config`` is dropped, so is the multi-token-prediction layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import resources
from typing import Any

import numpy as np
import torch

from qmoe_ray.errors import InputError

#: name -> the released config it stands for (``configs/NAME.json``).
RELEASED = {
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "kimi-k2": "moonshotai/Kimi-K2-Instruct",
    "switch-base-128": "google/switch-base-128",
    "switch-c-2048": "google/switch-c-2048",
}


def released_config(name: str) -> dict[str, Any]:
    """The released ``config.json`` fields of ``name`` (a key of ``RELEASED``).

    Raises:
        InputError: an unknown name (the known ones listed).
    """
    if name not in RELEASED:
        raise InputError(f"no released config {name!r}; known: {', '.join(RELEASED)}")
    path = resources.files("qmoe_ray.bench") / "configs" / f"{name}.json"
    return json.loads(path.read_text())


def shrink_config(config: Mapping[str, Any], layers: int, experts: int | None = None,
                  vocab: int | None = 4096, dense_layers: int = 0) -> dict[str, Any]:
    """``config`` cut to ``layers`` blocks (per stack, for Switch) of ``experts`` routed experts
    (None: the released count), every block a mixture-of-experts one except the first
    ``dense_layers`` (families with dense first blocks), and a ``vocab``-token vocabulary
    (None: the released one). Matrix shapes are left as released.

    Raises:
        InputError: a count out of range, or a family this helper does not know.
    """
    c = dict(config)
    mt = c.get("model_type")
    if layers < 1 or (experts is not None and experts < 1):
        raise InputError(f"layers {layers} / experts {experts}: expected positive integers")
    if vocab is not None:
        c["vocab_size"] = int(vocab)
        for i, key in enumerate(("pad_token_id", "bos_token_id", "eos_token_id")):
            if isinstance(c.get(key), int) and c[key] >= vocab:
                c[key] = i  # the released ids lie past the cut vocabulary
    c.pop("quantization_config", None)
    c["torch_dtype"] = "bfloat16"
    if mt == "switch_transformers":
        for stack, key in (("encoder", "num_layers"), ("decoder", "num_decoder_layers")):
            c[key] = layers
            c[f"{stack}_sparse_step"] = 1
            c[f"num_sparse_{stack}_layers"] = layers
        if experts is not None:
            c["num_experts"] = experts
        if vocab is not None:
            c["vocab_size"] = max(int(vocab), 128)  # room for T5's 100 sentinels
        return c
    c["num_hidden_layers"] = layers
    if mt == "mixtral":
        key = "num_local_experts"
    elif mt in ("qwen2_moe", "qwen3_moe"):
        key = "num_experts"
        c["decoder_sparse_step"] = 1
        c["mlp_only_layers"] = list(range(dense_layers))
        if "max_window_layers" in c:
            c["max_window_layers"] = layers
    elif mt in ("deepseek_v3", "kimi_k2"):
        key = "n_routed_experts"
        c["first_k_dense_replace"] = dense_layers
        c["num_nextn_predict_layers"] = 0
    else:
        raise InputError(f"model_type {mt!r}: real-shaped checkpoints are written for mixtral, "
                         "qwen2_moe, qwen3_moe, deepseek_v3, kimi_k2, switch_transformers")
    if experts is not None:
        c[key] = experts
        k = int(c.get("num_experts_per_tok", 1))
        c["num_experts_per_tok"] = min(k, experts)
        if "n_group" in c:  # groups must divide the experts, of 2 or more, enough for top-k
            g = math.gcd(int(c["n_group"]), experts)
            while g > 1 and experts // g < 2:
                g = math.gcd(g - 1, experts)
            tg = min(int(c.get("topk_group", 1)), g)
            if tg * (experts // g) < c["num_experts_per_tok"]:
                tg = g
            c["n_group"], c["topk_group"] = g, tg
    return c


def _block_of(name: str) -> str:
    """The shard a tensor goes to: its block (``model.layers.3``, ``encoder.block.1``), or
    ``other``."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "block") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return "other"


def _draw(name: str, shape: tuple[int, ...], config: Mapping[str, Any],
          gen: torch.Generator) -> torch.Tensor:
    if len(shape) < 2:
        fill = 0.0 if name.endswith("bias") else 1.0
        return torch.full(shape, fill, dtype=torch.bfloat16)
    if config.get("model_type") == "switch_transformers":
        std = float(config.get("initializer_factor", 1.0)) / math.sqrt(shape[-1])
    else:
        std = float(config.get("initializer_range", 0.02))
    out = torch.empty(shape, dtype=torch.bfloat16)
    for a in range(0, shape[0], 1024):  # in slices: no float32 copy of a whole 3-D tensor
        out[a:a + 1024] = (torch.randn((min(1024, shape[0] - a), *shape[1:]), generator=gen)
                           * std).bfloat16()
    return out


def write_realshape(url: str, config: Mapping[str, Any], *, seed: int = 0,
                    tokens: int = 1 << 18, storage_options: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Write an HF-layout checkpoint of ``config`` (already ``shrink_config``-ed) to ``url``.

    One block at a time (the peak is one block's tensors), each its own shard.

    Returns:
        ``{"bytes": total bytes written, "tensors": count, "files": shard names, "config": the
        config written}``.
    """
    from safetensors.torch import save

    from qmoe_ray.job.estimate import _SourceNames
    from qmoe_ray.models import get_family
    from qmoe_ray.storage.fs import join, url_to_fs

    config = dict(config)
    family = get_family(config).bind(_SourceNames())
    shapes = family.expected_shapes()
    blocks: dict[str, list[str]] = {}
    for name in shapes:
        blocks.setdefault(_block_of(name), []).append(name)
    fs, root = url_to_fs(url, **dict(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    files = []
    for i, names in enumerate(blocks.values()):
        fname = f"model-{i:05d}-of-{len(blocks):05d}.safetensors"
        data = save({n: _draw(n, tuple(shapes[n]), config, gen) for n in names},
                    metadata={"format": "pt"})
        fs.pipe_file(join(root, fname), data)
        total += len(data)
        files.append(fname)
        weight_map.update(dict.fromkeys(names, fname))
        del data
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    fs.pipe_file(join(root, "model.safetensors.index.json"), json.dumps(index).encode())
    fs.pipe_file(join(root, "config.json"), json.dumps(config, indent=1).encode())
    rng = np.random.default_rng(seed)
    vocab = int(config["vocab_size"])
    ids = np.minimum(rng.zipf(1.2, size=tokens) + 3, vocab - 101).astype(np.int32)
    buf = _npy_bytes(ids)
    fs.pipe_file(join(root, "tokens.npy"), buf)
    return {"bytes": total, "tensors": len(shapes), "files": files, "config": config}


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    np.save(b, arr, allow_pickle=False)
    return b.getvalue()
