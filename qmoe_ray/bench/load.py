"""Load-time benchmark: read / verify / decode split for a compressed checkpoint.

``python -m qmoe_ray.bench.load [URL]`` loads an existing checkpoint; without a URL it writes a
synthetic Mixtral-shaped checkpoint (random ternary experts at the paper's P(0)=0.885, a shared
table per layer and role, random bf16 dense weights) of a chosen size to a temporary folder and
loads that. The synthetic writer mirrors the job's layout (``storage.layout`` + ``manifest``)
without Ray or GPTQ, so hundreds of millions of expert weights take seconds to make.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmoe_ray.quant import parse_scheme
from qmoe_ray.storage import manifest as mf
from qmoe_ray.storage.layout import pack_matrix, shared_table, table_tensors


def synthetic_checkpoint(out: Path, hidden: int = 1024, ff: int = 2048, layers: int = 6,
                         experts: int = 8, vocab: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Write a synthetic compressed Mixtral checkpoint to ``out``; returns its manifest."""
    rng = np.random.default_rng(seed)
    scheme = parse_scheme("ternary")
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
           "hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": layers,
           "num_attention_heads": 8, "num_key_value_heads": 8, "num_local_experts": experts,
           "num_experts_per_tok": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 512, "tie_word_embeddings": False}
    (out / "shards").mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": mf.FORMAT_NAME, "format_version": mf.FORMAT_VERSION,
                                "config": cfg, "files": [], "tensors": {}, "quantized": {},
                                "tables": {}, "experts": {}, "source": "synthetic",
                                "options": {"scheme": "ternary", "method": "synthetic"}}

    def bf16(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02).bfloat16()

    def write(rel: str, tensors: dict[str, torch.Tensor]) -> None:
        data, index = mf.serialize_shard(tensors)
        (out / rel).write_bytes(data)
        manifest["files"].append(rel)
        for k, v in index.items():
            manifest["tensors"][k] = {**v, "file": rel}

    shapes = {"gate_proj": (ff, hidden), "up_proj": (ff, hidden), "down_proj": (hidden, ff)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors = {f"{p}.input_layernorm.weight": bf16(hidden),
                   f"{p}.post_attention_layernorm.weight": bf16(hidden),
                   f"{p}.block_sparse_moe.gate.weight": bf16(experts, hidden)}
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}.self_attn.{n}.weight"] = bf16(hidden, hidden)
        for role, (r, c) in shapes.items():
            codes = torch.from_numpy(rng.choice(np.array([-1, 0, 1], np.int8), size=(experts, r, c),
                                                p=[0.0575, 0.885, 0.0575]))
            table = shared_table(scheme, codes)
            tname = f"{p}.qmoe_table.group0.{role}"
            tt, meta = table_tensors(tname, table)
            tensors.update(tt)
            manifest["tables"][tname] = meta
            for e in range(experts):
                name = f"{p}.mlp.experts.{e}.{role}.weight"
                params = {"lo": -torch.rand(r) * 0.05, "hi": torch.rand(r) * 0.05}
                t, entry = pack_matrix(name, scheme, codes[e], params, table, tname)
                tensors.update(t)
                manifest["quantized"][name] = entry
        write(f"shards/layer-{i:05d}.safetensors", tensors)
    write("shards/other.safetensors", {"model.embed_tokens.weight": bf16(vocab, hidden),
                                       "lm_head.weight": bf16(vocab, hidden),
                                       "model.norm.weight": bf16(hidden)})
    (out / mf.MANIFEST).write_bytes(mf.dumps(manifest))
    return manifest


def run(url: str, mode: str = "decode", device: str = "cpu", repeat: int = 2) -> dict[str, Any]:
    """Load ``url`` ``repeat`` times; the best wall time's timings, and throughput figures."""
    from qmoe_ray.loader import load

    best = None
    for _ in range(repeat):
        m = load(url, device=device, mode=mode)
        if best is None or m.timings["wall"] < best["wall"]:
            best = dict(m.timings)
        n = sum(int(np.prod(e["shape"])) for e in m.manifest["quantized"].values())
        del m
    assert best is not None
    best.update(expert_weights=n, mode=mode, device=device,
                decode_mweights_per_s=n / max(best["decode"], 1e-9) / 1e6,
                read_mib_per_s=best["bytes"] / 2**20 / max(best["read"], 1e-9))
    return best


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m qmoe_ray.bench.load [URL] [--mode ...] [--hidden ...]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", nargs="?", default=None)
    ap.add_argument("--mode", choices=("decode", "resident"), default="decode")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ff", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    url = args.url
    tmp = None
    if url is None:
        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        synthetic_checkpoint(Path(tmp.name), args.hidden, args.ff, args.layers, args.experts)
        print(f"synthetic checkpoint written in {time.perf_counter() - t0:.1f} s")
        url = tmp.name
    print(json.dumps(run(url, args.mode, args.device, args.repeat)))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
