"""Quantized sources: FP8 block-scaled and compressed-tensors int4 checkpoints, decoded at read time.

The FP8 sources are built the way DeepSeek-V3 / Kimi-K2 / the ``-FP8`` releases ship: every linear
weight as float8_e4m3fn with a ``weight_scale_inv`` per block (float32, or power-of-two scales as
float8_e8m0fnu bytes, DeepSeek-V3.1's ``scale_fmt: "ue8m0"``), embeddings, norms and routers
kept in bf16, ``quantization_config.quant_method = "fp8"`` in config.json. Blocks of 16x16 over
the tiny 24x32 / 32x24 matrices leave partial blocks at the bottom and the right edge. The int4
source is Kimi-K2-Thinking's layout: experts as compressed-tensors ``pack-quantized`` int4,
written with the compressed-tensors library's own quantize and pack functions. The weights are
those of a tiny Qwen3-MoE saved by transformers.

Oracles: transformers' FP8 dequantization (``_dequantize_fp8_weight`` in float32) and
compressed-tensors' ``unpack_from_int32`` + ``dequantize``, bit for bit. The whole path: a
quantized source evaluates and compresses exactly like an unquantized checkpoint holding its
decoded weights.
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

import plain_reader  # noqa: E402
from fixtures_s3 import save_tiny, tiny_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from qmoe_ray.errors import CheckpointError  # noqa: E402
from qmoe_ray.storage.checkpoint import (  # noqa: E402
    DTYPES,
    SOURCE_DTYPES,
    open_checkpoint,
    open_from_index,
    parse_header,
    source_index,
)

BLOCK = 16
GROUP = 8
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [BLOCK, BLOCK]}
INT4_CONFIG = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "quantization_status": "compressed", "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "input_activations": None,
        "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": GROUP, "dynamic": False, "actorder": None,
                    "observer": "minmax"}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$"],
}
EXPERT = "model.layers.0.mlp.experts.0.gate_proj"


def _fp8(w: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [..., R, C] as float8_e4m3fn and its ``weight_scale_inv`` per BLOCK x BLOCK block."""
    rows, cols = w.shape[-2:]
    rb, cb = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    pad = torch.zeros(*w.shape[:-2], rb * BLOCK, cb * BLOCK)
    pad[..., :rows, :cols] = w.float()
    blocks = pad.unflatten(-1, (cb, BLOCK)).unflatten(-3, (rb, BLOCK))  # [..., rb, B, cb, B]
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    s = amax / torch.finfo(torch.float8_e4m3fn).max
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    full = s.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :rows, :cols]
    q = (w.float() / full).to(torch.float8_e4m3fn)
    return q, (s.to(torch.float8_e8m0fnu) if ue8m0 else s)


def _int4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``w`` [R, C] as compressed-tensors pack-quantized int4 parts (the library's functions)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    args = QuantizationArgs(**INT4_CONFIG["config_groups"]["group_0"]["weights"])
    g = w.float().unflatten(-1, (-1, GROUP))
    scale = (g.abs().amax(-1) / 7).clamp(min=1e-8).to(torch.bfloat16)
    q = quantize(w.to(torch.bfloat16), scale, None, args, dtype=torch.int8)
    return {"weight_packed": pack_to_int32(q, 4), "weight_scale": scale,
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int32)}


def _write(d: Path, tensors: dict[str, torch.Tensor], config: dict, bf16: Path) -> Path:
    d.mkdir()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer.json").write_text((bf16 / "tokenizer.json").read_text())
    return d


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """``bf16``: a tiny Qwen3-MoE saved by transformers; ``fp8`` / ``fp8_e8m0``: its linear
    weights block-scaled to FP8; ``int4``: its experts packed int4; ``fp8_bare``: the FP8 tensors
    under a plain config; ``tokens``: data."""
    root = tmp_path_factory.mktemp("quantized")
    bf16 = save_tiny(tiny_model("qwen3_moe"), root / "bf16", dtype=torch.bfloat16)
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 32)))
    tensors = load_file(bf16 / "model.safetensors")
    config = json.loads((bf16 / "config.json").read_text())
    out = {"bf16": bf16, "tokens": root / "tokens.npy"}
    for label, ue8m0 in (("fp8", False), ("fp8_e8m0", True)):
        fp8: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if t.dim() == 2 and "embed" not in name and "lm_head" not in name \
                    and not name.endswith("mlp.gate.weight"):  # routers stay bf16, as shipped
                fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = _fp8(t, ue8m0)
            else:
                fp8[name] = t
        qc = {**FP8_CONFIG, **({"scale_fmt": "ue8m0"} if ue8m0 else {})}
        out[label] = _write(root / label, fp8, {**config, "quantization_config": qc}, bf16)
        if not ue8m0:
            out["fp8_bare"] = _write(root / "fp8_bare", fp8, config, bf16)
    int4: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if ".experts." in name:
            for k, v in _int4(t).items():
                int4[name.removesuffix("weight") + k] = v
        else:
            int4[name] = t
    out["int4"] = _write(root / "int4", int4, {**config, "quantization_config": INT4_CONFIG}, bf16)
    return out


def _twin(src: Path, dest: Path) -> Path:
    """An unquantized checkpoint holding ``src``'s decoded weights (float32 where decoded)."""
    ck = open_checkpoint(str(src))
    return _write(dest, ck.read_many(ck.names), ck.config, src.parent / "bf16")


# -- the decoders against their oracles ------------------------------------------------------------
@pytest.mark.parametrize("label", ["fp8", "fp8_e8m0"])
def test_fp8_weights_decode_as_transformers_does(sources, label):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    raw = load_file(sources[label] / "model.safetensors")
    ck = open_checkpoint(str(sources[label]))
    assert not any(n.endswith("weight_scale_inv") for n in ck.names)
    assert "quantization_config" not in ck.config and "quantization_config" in ck.raw_config
    scales = [n for n in raw if n.endswith("weight_scale_inv")]
    assert len(scales) > 20 and all(ck.dtype(n.removesuffix("_scale_inv")) == torch.float32
                                    for n in scales)
    got = ck.read_many([n.removesuffix("_scale_inv") for n in scales])
    for s in scales:
        w = s.removesuffix("_scale_inv")
        want = _dequantize_fp8_weight(raw[w], raw[s], [BLOCK, BLOCK], torch.float32)
        assert torch.equal(got[w], want), w
        assert ck.shape(w) == tuple(raw[w].shape)
    # partial blocks: 24 rows = 16 + 8, and the scales do differ between blocks
    s = raw[EXPERT + ".weight_scale_inv"].float()
    assert s.shape == (2, 2)
    if label == "fp8":
        assert len(set(s.flatten().tolist())) > 1
    else:  # powers of two, stored as their exponent bytes
        assert raw[EXPERT + ".weight_scale_inv"].dtype == torch.float8_e8m0fnu
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    ref = load_file(sources["bf16"] / "model.safetensors")[EXPERT + ".weight"].float()
    torch.testing.assert_close(got[EXPERT + ".weight"], ref, rtol=0.07, atol=2e-3)
    assert ck.read("model.norm.weight").dtype == torch.bfloat16  # plain tensors as stored
    assert ck.source_precision == ("fp8-block16 (e4m3, ue8m0 scales)" if label == "fp8_e8m0"
                                   else "fp8-block16 (e4m3, float32 scales)")


def test_int4_weights_decode_as_compressed_tensors_does(sources):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = QuantizationArgs(**INT4_CONFIG["config_groups"]["group_0"]["weights"])
    raw = load_file(sources["int4"] / "model.safetensors")
    ck = open_checkpoint(str(sources["int4"]))
    packed = [n for n in raw if n.endswith("weight_packed")]
    assert len(packed) == 3 * 6 * 3 and not any("weight_packed" in n for n in ck.names)
    for p in packed:
        base = p.removesuffix("_packed")
        shape = torch.Size(raw[base + "_shape"].tolist())
        q = unpack_from_int32(raw[p], 4, shape)
        want = dequantize(q, raw[base + "_scale"], None, args)
        got = ck.read(base)
        assert got.dtype == torch.bfloat16 and ck.shape(base) == tuple(shape)
        assert torch.equal(got, want), base
    assert ck.source_precision == f"int4-g{GROUP} (compressed-tensors)"


def test_fused_fp8_experts_read_by_rows(tmp_path):
    """A fused [E, R, C] FP8 expert tensor: ``read_slice`` reads some experts' rows of the weight
    and of its scales, and decodes them like the whole."""
    w = torch.randn(5, 40, 24)
    q, s = _fp8(w, ue8m0=False)
    assert s.shape == (5, 3, 2)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": q,
               "model.layers.0.mlp.experts.gate_up_proj_scale_inv": s,
               "model.norm.weight": torch.ones(24, dtype=torch.bfloat16)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_moe", "quantization_config": FP8_CONFIG}))
    ck = open_checkpoint(str(tmp_path))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    whole = ck.read(name)
    assert whole.shape == (5, 40, 24)
    assert torch.equal(ck.read_slice(name, 1, 4), whole[1:4])
    # an actor opening from the driver's index decodes the same
    again = open_from_index(str(tmp_path), source_index(ck))
    assert torch.equal(again.read(name), whole) and again.names == ck.names


# -- the whole path -----------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["fp8", "int4"])
def test_a_quantized_source_evaluates_like_its_decoded_twin(sources, tmp_path, label):
    from qmoe_ray.read.evaluate import evaluate

    twin = _twin(sources[label], tmp_path / "twin")
    a = evaluate(str(sources[label]), str(sources["tokens"]), num_samples=8, batch_size=4)
    b = evaluate(str(twin), str(sources["tokens"]), num_samples=8, batch_size=4)
    c = evaluate(str(sources["bf16"]), str(sources["tokens"]), num_samples=8, batch_size=4)
    assert a["loss"] == b["loss"]
    assert a["loss"] != c["loss"] and abs(a["loss"] - c["loss"]) < 0.05  # quantized, close


@pytest.fixture
def ray_session():
    """Ray for one test: the s3 test below starts its own after setting the fake credentials (a
    runtime left running would start its workers without them)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_compressing_an_fp8_source_equals_compressing_its_decoded_twin(
        sources, tmp_path, ray_session):
    """Same shards byte for byte; the manifest records the source precision and holds the
    decoded model's config; the HF export has no quantization_config."""
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.export import export
    from qmoe_ray.read.inspect import inspect

    twin = _twin(sources["fp8"], tmp_path / "twin")
    outs = {}
    for label, src in (("fp8", sources["fp8"]), ("twin", twin)):
        outs[label] = tmp_path / f"out-{label}"
        run_compression(CompressConfig(
            source=str(src), output=str(outs[label]), data=str(sources["tokens"]),
            num_samples=16, seq_len=32, eval_samples=8, batch_size=8, group_size=6,
            num_workers=1), progress=False)
    for p in sorted((outs["twin"] / "shards").glob("*.safetensors")):
        assert (outs["fp8"] / "shards" / p.name).read_bytes() == p.read_bytes(), p.name
    m = plain_reader.load_manifest(outs["fp8"])
    assert m["source_precision"] == "fp8-block16 (e4m3, float32 scales)"
    assert "quantization_config" not in m["config"]
    assert plain_reader.load_manifest(outs["twin"])["source_precision"] == "bf16+fp32"
    info = inspect(str(outs["fp8"]))
    assert info["model"]["source_precision"] == m["source_precision"]
    export(str(outs["fp8"]), str(tmp_path / "hf"))
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())


# -- what is refused -----------------------------------------------------------------------------------
def _edit(sources: Path, tmp_path: Path, edit_config=None, edit_tensors=None) -> Path:
    d = tmp_path / "m"
    t = load_file(sources / "model.safetensors")
    cfg = json.loads((sources / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    if edit_tensors:
        edit_tensors(t)
    return _write(d, t, cfg, sources.parent / "bf16")


def _qc(**kw):
    return lambda c: c["quantization_config"].update(kw)


@pytest.mark.parametrize("label,edit_config,edit_tensors,match", [
    ("fp8", _qc(quant_method="awq"), None, r"quantization_config.quant_method is 'awq', which is "
                                           r"not decoded; supported: quant_method \"fp8\""),
    ("fp8", _qc(quant_method="modelopt"), None, r"quant_method is 'modelopt'"),
    ("fp8", _qc(activation_scheme="static"), None, r"activation_scheme is 'static'"),
    ("fp8", _qc(weight_block_size=None), None, r"weight_block_size is 'None'.*per-tensor"),
    ("fp8", lambda c: c.update(compression_config={"quant_method": "compressed-tensors"}), None,
     r"quantization_config and compression_config are both set"),
    ("fp8", None, lambda t: t.pop(EXPERT + ".weight_scale_inv"),
     r"FP8 weight '" + EXPERT + r".weight' has no block scale"),
    ("fp8", None, lambda t: t.update({EXPERT + ".weight_scale_inv": torch.ones(1, 2)}),
     r"block scale '" + EXPERT + r".weight_scale_inv' has shape \[1, 2\] .* needs \[2, 2\]"),
    ("fp8", _qc(weight_block_size=[32, 32]), None, r"has shape \[2, 2\] .* in 32x32 blocks"),
    ("int4", None, lambda t: t.update({EXPERT + ".weight_zero_point": torch.zeros(24, 2)}),
     r"weight_zero_point'.*zero point is not decoded"),
    ("int4", None, lambda t: t.pop(EXPERT + ".weight_shape"), r"has no '" + EXPERT),
    ("int4", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        symmetric=False), None, r"weights.symmetric is 'False'"),
    ("int4", lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        num_bits=8), None, r"weights.num_bits is '8'"),
    ("int4", _qc(format="marlin-24"), None, r"format is 'marlin-24'"),
], ids=["awq", "nvfp4", "static", "per-tensor", "two-blocks", "no-scale", "scale-shape",
        "block-size", "zero-point", "no-shape", "asymmetric", "int8", "format"])
def test_what_is_not_decoded_is_refused_at_open(sources, tmp_path, label, edit_config,
                                                edit_tensors, match):
    d = _edit(sources[label], tmp_path, edit_config, edit_tensors)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(str(d))


def test_fp8_tensors_without_a_quantization_config_are_refused(sources):
    """No quantization_config, but float8 tensors: refused on the dtype, naming the tensor."""
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(str(sources["fp8_bare"]))
    msg = str(ei.value)
    assert "model.safetensors: tensor 'model.layers.0.mlp.experts.0.down_proj.weight'" in msg
    assert "has dtype F8_E4M3 (an FP8 checkpoint without a quantization_config" in msg
    assert "supported source dtypes: BF16, F16, F32, F64" in msg


def test_integer_packed_weights_are_refused(tmp_path):
    """A GPTQ-style int32 ``qweight`` would be read as integer values: refused on its dtype."""
    save_file({"model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
               "model.layers.0.mlp.down_proj.qweight": torch.zeros(4, 2, dtype=torch.int32)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.down_proj.qweight' has "
                                              r"dtype I32 \(a quantized or packed encoding"):
        open_checkpoint(str(tmp_path))
    raw = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(1))
    with pytest.raises(CheckpointError, match=r"unsupported dtype 'F4'; supported: BF16, "
                                              r"F16, F32, F64$"):
        open_checkpoint(str(tmp_path))


def test_our_own_shard_dtypes_still_parse():
    """The loader parses our compressed shards with the same parser: codes, tables and scales in
    uint8/int16/uint16/int32/bf16 stay accepted there (only the source reader is restricted)."""
    header, off = {}, 0
    for i, dt in enumerate(("U8", "I16", "U16", "I32", "BF16", "F32", "I64", "F8_E8M0")):
        size = torch.empty((), dtype=DTYPES[dt]).element_size() * 3
        header[f"t{i}"] = {"dtype": dt, "shape": [3], "data_offsets": [off, off + size]}
        off += size
    infos = parse_header(json.dumps(header).encode(), "shards/layer-00000.safetensors")
    assert [str(i.dtype).removeprefix("torch.") for i in infos.values()] == [
        "uint8", "int16", "uint16", "int32", "bfloat16", "float32", "int64", "float8_e8m0fnu"]
    assert set(SOURCE_DTYPES) < set(DTYPES)


def test_oversized_config_json_is_refused_unread(tmp_path):
    """A config.json is parsed before anything else: one over the cap is not read whole."""
    from qmoe_ray.storage.checkpoint import CONFIG_MAX_BYTES

    with open(tmp_path / "config.json", "wb") as f:  # sparse: no disk cost
        f.write(b'{"model_type": "qwen3_moe"}')
        f.truncate(CONFIG_MAX_BYTES + 1)
    with pytest.raises(CheckpointError, match=r"config.json: more than the 16,777,216 bytes a "
                                              r"config.json may have; refused without reading"):
        open_checkpoint(str(tmp_path))


# -- MXFP4 (gpt-oss's experts) ------------------------------------------------------------------------
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def _mxfp4_source(d: Path, **edits) -> tuple[Path, dict[str, torch.Tensor]]:
    """gpt-oss's layout: ``gate_up_proj`` as blocks [E, 2I, H/32, 16] + scales [E, 2I, H/32],
    ``down_proj`` as [E, H, I/32, 16] + [E, H, I/32]; router and biases plain."""
    g = torch.Generator().manual_seed(0)
    e, h, i = 3, 64, 32
    t = {"model.layers.0.mlp.router.weight": torch.randn(e, h, generator=g).bfloat16(),
         "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(e, 2 * i).bfloat16()}
    for name, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
        base = f"model.layers.0.mlp.experts.{name}"
        t[base + "_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g,
                                            dtype=torch.uint8)
        t[base + "_scales"] = torch.randint(118, 130, (e, rows, cols // 32), generator=g,
                                            dtype=torch.uint8)
    for k, v in edits.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    d.mkdir()
    save_file(t, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_oss",
                                               "quantization_config": MXFP4_CONFIG}))
    return d, t


def test_mxfp4_experts_decode_as_transformers_does(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    d, raw = _mxfp4_source(tmp_path / "m")
    ck = open_checkpoint(str(d))
    assert ck.source_precision == "mxfp4 (e2m1, e8m0 scales per 32)"
    assert sorted(n for n in ck.names if ".experts." in n) == [
        "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.gate_up_proj_bias"]
    for name, shape in (("gate_up_proj", (3, 64, 64)), ("down_proj", (3, 32, 64))):
        base = f"model.layers.0.mlp.experts.{name}"
        want = convert_moe_packed_tensors(raw[base + "_blocks"], raw[base + "_scales"],
                                          dtype=torch.bfloat16)
        got = ck.read(base)
        assert got.dtype == torch.bfloat16 and tuple(got.shape) == shape == ck.shape(base)
        assert torch.equal(got, want), name
        assert torch.equal(ck.read_slice(base, 1, 3), want[1:3])
        # exact: the same values in float32 (powers of two times e2m1 values)
        assert torch.equal(convert_moe_packed_tensors(
            raw[base + "_blocks"], raw[base + "_scales"], dtype=torch.float32), got.float())


@pytest.mark.parametrize("edits,match", [
    ({"model.layers.0.mlp.experts.down_proj_scales": None}, r"have no scales"),
    ({"model.layers.0.mlp.experts.down_proj_blocks": None}, r"have no blocks"),
    ({"model.layers.0.mlp.experts.down_proj_scales": torch.zeros(3, 64, 2, dtype=torch.int16)},
     r"scales .* are I16\[3, 64, 2\]"),
    ({"model.layers.0.mlp.experts.down_proj_blocks": torch.zeros(3, 64, 2, 8, dtype=torch.uint8)},
     r"blocks .* are U8\[3, 64, 2, 8\]"),
])
def test_bad_mxfp4_tensors_are_refused(tmp_path, edits, match):
    d, _ = _mxfp4_source(tmp_path / "m", **edits)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(str(d))


def test_a_nan_mxfp4_scale_is_refused_at_read(tmp_path):
    scales = torch.full((3, 64, 1), 127, dtype=torch.uint8)
    scales[1, 2, 0] = 255
    d, _ = _mxfp4_source(tmp_path / "m", **{"model.layers.0.mlp.experts.down_proj_scales": scales})
    ck = open_checkpoint(str(d))
    with pytest.raises(CheckpointError, match=r"0xFF \(NaN in E8M0\)"):
        ck.read("model.layers.0.mlp.experts.down_proj")


@pytest.mark.ray
def test_fp8_deepseek_v3_on_s3_compresses_evaluates_and_exports(tmp_path, moto_endpoint,
                                                                s3_credentials, capsys):
    """DeepSeek-V3.1 as it ships (every linear weight FP8 with ue8m0 block scales, routers and
    correction biases unquantized), source and output on moto's s3, through the CLI: compress,
    inspect (the source precision), eval (the FP8 source's loss is its dequantized model's),
    export (transformers loads it as a bf16 DeepseekV3ForCausalLM, our logits)."""
    import transformers as tf
    from fixtures_s3 import make_bucket, upload_dir
    from sigmoid_fixtures import tiny_sigmoid_model

    from qmoe_ray.cli import main
    from qmoe_ray.read.loader import load

    bf16 = save_tiny(tiny_sigmoid_model("deepseek_v3", seed=3), tmp_path / "bf16",
                     dtype=torch.bfloat16)
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
    fp8: dict[str, torch.Tensor] = {}
    for name, t in load_file(bf16 / "model.safetensors").items():
        if t.dim() == 2 and "embed" not in name and "lm_head" not in name \
                and not name.endswith("mlp.gate.weight"):  # attention, experts, shared, dense
            fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = _fp8(t, True)
        else:
            fp8[name] = t
    assert any("kv_a_proj_with_mqa.weight_scale_inv" in n for n in fp8)
    config = json.loads((bf16 / "config.json").read_text())
    src = _write(tmp_path / "src", fp8, {**config, "quantization_config": {
        **FP8_CONFIG, "scale_fmt": "ue8m0"}}, bf16)
    fs = make_bucket(moto_endpoint, "qmoe-fp8")
    upload_dir(fs, src, "qmoe-fp8/src")
    opt = ["--storage-option", f"endpoint_url={moto_endpoint}"]
    data = str(tmp_path / "tokens.npy")
    assert main(["compress", "--source", "s3://qmoe-fp8/src", "--output", "s3://qmoe-fp8/out",
                 "--data", data, "--num-samples", "24", "--seq-len", "16", "--eval-samples",
                 "4", "--group-size", "8", "--quiet", *opt]) == 0
    manifest = plain_reader.parse_manifest(fs.cat_file("qmoe-fp8/out/manifest.json"))
    assert manifest["source_precision"] == "fp8-block16 (e4m3, ue8m0 scales)"
    assert len(manifest["quantized"]) == 2 * 16 * 3
    assert not any(n.endswith("scale_inv") for n in manifest["tensors"])
    assert "quantization_config" not in json.loads(fs.cat_file("qmoe-fp8/out/config.json"))
    capsys.readouterr()
    assert main(["inspect", "s3://qmoe-fp8/out", "--no-verify", *opt]) == 0
    assert "(fp8-block16 (e4m3, ue8m0 scales))" in capsys.readouterr().out
    losses = {}
    for label, url in (("source", str(src)), ("twin", str(_twin(src, tmp_path / "twin"))),
                       ("ours", "s3://qmoe-fp8/out")):
        assert main(["eval", url, "--data", data, "--samples", "8", "--json", "--quiet",
                     *opt]) == 0
        losses[label] = json.loads(capsys.readouterr().out)["loss"]
    assert losses["source"] == losses["twin"] and np.isfinite(losses["ours"])
    assert main(["export", "s3://qmoe-fp8/out", str(tmp_path / "hf"), "--quiet", *opt]) == 0
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 97, (2, 10)))
    ours = load("s3://qmoe-fp8/out", endpoint_url=moto_endpoint)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.logits(ids), rtol=1e-4, atol=1e-4)


def test_mxfp4_encode_round_trips_through_transformers_decoder():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from qmoe_ray.storage.quantized import FP4_VALUES, mxfp4_encode

    g = torch.Generator().manual_seed(3)
    scales = torch.randint(120, 130, (2, 48, 2), generator=g)
    codes = torch.randint(0, 16, (2, 48, 64), generator=g)
    # exactly representable values: encoding them is lossless
    exact = torch.tensor(FP4_VALUES)[codes] * torch.exp2(scales.float() - 127).repeat_interleave(
        32, -1)
    exact[..., 0::32] = 6.0 * torch.exp2(scales[..., :].float() - 127)  # the scale is tight
    w = exact.transpose(-2, -1)  # logical [E, C, R]
    blocks, sc = mxfp4_encode(w)
    got = convert_moe_packed_tensors(blocks, sc, dtype=torch.float32)
    assert torch.equal(got, w)
    noisy = torch.randn(2, 64, 40, generator=g)
    blocks, sc = mxfp4_encode(noisy)
    err = (convert_moe_packed_tensors(blocks, sc, dtype=torch.float32) - noisy).abs()
    # at most half the widest e2m1 step (2) at a block scale below amax / 3
    assert 0 < float(err.max()) <= float(noisy.abs().max()) / 3
    with pytest.raises(ValueError, match="not a multiple of 32"):
        mxfp4_encode(torch.zeros(1, 40, 8))
