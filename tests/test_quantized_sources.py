"""Quantized sources are refused before any work, until they are decoded.

The FP8 source is built the way Qwen3-*-FP8 / DeepSeek-V3 / Kimi-K2 ship: every linear weight as
float8_e4m3fn with a float32 ``weight_scale_inv`` per 128x128 block, embeddings, norms and routers
kept in bf16, and ``quantization_config.quant_method = "fp8"`` in config.json; the weights are those
of a tiny Qwen3-MoE saved by transformers, written back with safetensors. Read without its scales
such a checkpoint gives wrong weights silently, so ``open_checkpoint`` (and through it
``qmoe-ray compress``) must refuse it, naming the key or the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from fixtures_s3 import save_tiny, tiny_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from qmoe_ray.cli import main  # noqa: E402
from qmoe_ray.errors import CheckpointError  # noqa: E402
from qmoe_ray.storage.checkpoint import DTYPES, SOURCE_DTYPES, open_checkpoint, parse_header  # noqa: E402

BLOCK = 128
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}


def _fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] as float8_e4m3fn and its float32 ``weight_scale_inv`` per 128x128 block
    (``w ~= fp8 * scale_inv`` blockwise), as DeepSeek-V3's ``act_quant``/``weight_dequant`` use."""
    out_f, in_f = w.shape
    rb, cb = math.ceil(out_f / BLOCK), math.ceil(in_f / BLOCK)
    scale = torch.empty(rb, cb, dtype=torch.float32)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    fmax = torch.finfo(torch.float8_e4m3fn).max
    for i in range(rb):
        for j in range(cb):
            blk = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            s = blk.abs().max().clamp(min=1e-12) / fmax
            scale[i, j] = s
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (blk / s).to(q.dtype)
    return q, scale


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """``bf16``: a tiny Qwen3-MoE saved by transformers; ``fp8``: the same weights block-scaled
    to FP8 with its quantization_config; ``fp8_bare``: the FP8 tensors with a plain config."""
    root = tmp_path_factory.mktemp("quantized")
    bf16 = save_tiny(tiny_model("qwen3_moe"), root / "bf16", dtype=torch.bfloat16)
    np.save(bf16 / "tokens.npy", np.random.default_rng(0).integers(3, 97, (64, 32)))
    tensors = load_file(bf16 / "model.safetensors")
    fp8: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        linear = t.dim() == 2 and "embed" not in name and "lm_head" not in name
        if linear and not name.endswith("mlp.gate.weight"):  # routers stay bf16, as shipped
            q, s = _fp8_block(t)
            fp8[name] = q
            fp8[name.removesuffix(".weight") + ".weight_scale_inv"] = s
        else:
            fp8[name] = t
    config = json.loads((bf16 / "config.json").read_text())
    out = {"bf16": bf16}
    for label, cfg in (
        ("fp8", {**config, "quantization_config": FP8_CONFIG}),
        ("fp8_bare", config),
    ):
        d = root / label
        d.mkdir()
        save_file(fp8, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "tokenizer.json").write_text((bf16 / "tokenizer.json").read_text())
        out[label] = d
    return out


def test_the_fp8_source_is_real(sources):
    """Guard the fixture: float8 weights with block scales that decode back to the bf16 weights."""
    t = load_file(sources["fp8"] / "model.safetensors")
    ref = load_file(sources["bf16"] / "model.safetensors")
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    scale = t[name.removesuffix(".weight") + ".weight_scale_inv"]
    assert t[name].dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (1, 1)  # one 128x128 block covers the tiny 24x32 matrix
    deq = t[name].float() * scale[0, 0]
    torch.testing.assert_close(deq, ref[name].float(), rtol=0.07, atol=1e-3)
    assert not torch.equal(t[name].float(), ref[name].float())  # raw values are not the weights


def test_open_checkpoint_refuses_quantization_config(sources):
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(str(sources["fp8"]))
    msg = str(ei.value)
    assert "config.json: quantization_config (quant_method 'fp8') is set" in msg
    assert "not decoded yet" in msg and "BF16/F16/F32/F64" in msg
    open_checkpoint(str(sources["bf16"]))  # the same model unquantized opens


def test_open_checkpoint_refuses_fp8_tensors_without_a_config_key(sources):
    """No quantization_config, but float8 tensors: refused on the dtype, naming the tensor."""
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(str(sources["fp8_bare"]))
    msg = str(ei.value)
    assert "model.safetensors: tensor 'model.layers.0.mlp.experts.0.down_proj.weight'" in msg
    assert "has dtype F8_E4M3" in msg and "weight_scale_inv" in msg
    assert "supported source dtypes: BF16, F16, F32, F64" in msg


@pytest.mark.parametrize(
    "edit,key",
    [
        (
            lambda c: c.update(compression_config={"quant_method": "compressed-tensors"}),
            "compression_config (quant_method 'compressed-tensors')",
        ),
        (
            lambda c: c.update(text_config={"quantization_config": FP8_CONFIG}),
            "text_config.quantization_config (quant_method 'fp8')",
        ),
        (lambda c: c.update(quantization_config={"bits": 4}), "quantization_config is set"),
    ],
    ids=["compression_config", "text_config", "no-method"],
)
def test_every_quantization_key_is_refused(sources, tmp_path, edit, key):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((sources["bf16"] / "model.safetensors").read_bytes())
    cfg = json.loads((sources["bf16"] / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match="config.json: " + key.replace("(", r"\(").replace(")", r"\)")
    ):
        open_checkpoint(str(d))
    cfg.pop("compression_config", None)
    cfg.pop("quantization_config", None)
    cfg["text_config"] = {"quantization_config": None}  # explicitly none: a plain checkpoint
    (d / "config.json").write_text(json.dumps(cfg))
    assert len(open_checkpoint(str(d))) > 0


def test_integer_packed_weights_are_refused(tmp_path):
    """A GPTQ-style int32 ``qweight`` would be read as integer values: refused on its dtype."""
    save_file(
        {
            "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
            "model.layers.0.mlp.down_proj.qweight": torch.zeros(4, 2, dtype=torch.int32),
        },
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.0.mlp.down_proj.qweight' has "
        r"dtype I32 \(a quantized or packed encoding\)",
    ):
        open_checkpoint(str(tmp_path))
    raw = json.dumps({"w": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(2))
    with pytest.raises(
        CheckpointError,
        match=r"unsupported dtype 'F8_E8M0'; supported: BF16, "
        r"F16, F32, F64$",
    ):
        open_checkpoint(str(tmp_path))


def test_our_own_shard_dtypes_still_parse():
    """The loader parses our compressed shards with the same parser: codes, tables and scales in
    uint8/int16/uint16/int32/bf16 stay accepted there (only the source reader is restricted)."""
    header, off = {}, 0
    for i, dt in enumerate(("U8", "I16", "U16", "I32", "BF16", "F32", "I64")):
        size = torch.empty((), dtype=DTYPES[dt]).element_size() * 3
        header[f"t{i}"] = {"dtype": dt, "shape": [3], "data_offsets": [off, off + size]}
        off += size
    infos = parse_header(json.dumps(header).encode(), "shards/layer-00000.safetensors")
    assert [str(i.dtype) for i in infos.values()] == [
        "torch.uint8",
        "torch.int16",
        "torch.uint16",
        "torch.int32",
        "torch.bfloat16",
        "torch.float32",
        "torch.int64",
    ]
    assert set(SOURCE_DTYPES) < set(DTYPES)


def test_compress_cli_refuses_the_fp8_source(sources, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "compress",
            "--source",
            str(sources["fp8"]),
            "--output",
            str(out),
            "--data",
            str(sources["bf16"] / "tokens.npy"),
            "--num-samples",
            "16",
            "--seq-len",
            "32",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("qmoe-ray compress: error: ")
    assert "quantization_config (quant_method 'fp8')" in lines[0]
    assert not out.exists()  # nothing written at the output


def test_oversized_config_json_is_refused_unread(tmp_path):
    """A config.json is parsed before anything else: one over the cap is not read whole."""
    from qmoe_ray.storage.checkpoint import CONFIG_MAX_BYTES

    with open(tmp_path / "config.json", "wb") as f:  # sparse: no disk cost
        f.write(b'{"model_type": "qwen3_moe"}')
        f.truncate(CONFIG_MAX_BYTES + 1)
    with pytest.raises(
        CheckpointError,
        match=r"config.json: more than the 16,777,216 bytes a "
        r"config.json may have; refused without reading",
    ):
        open_checkpoint(str(tmp_path))
