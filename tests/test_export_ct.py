"""``qmoe-ray export --format compressed-tensors``: the experts as ``pack-quantized`` weights
that the compressed-tensors library decompresses to exactly our dequantized weights, and that
transformers loads with our logits; grids the format cannot hold are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from load_helpers import compressed_checkpoint
from safetensors.torch import load_file

from qmoe_ray.errors import InputError
from qmoe_ray.quant import dequantize, parse_scheme
from qmoe_ray.read import export_ct
from qmoe_ray.read.export import export
from qmoe_ray.read.loader import load

pytestmark = pytest.mark.usefixtures("module_ray")  # every job here runs in-process

pytest.importorskip("compressed_tensors")

_CKPTS: dict[str, Path] = {}
# (scheme, quant_group_size, method): the embedded Mixtral's experts have 128 and 192 inputs
CASES = {"int2": ("int2", None, "gptq"), "int3-g64": ("int3", 64, "rtn"),
         "int4-g64": ("int4", 64, "gptq"), "int8": ("int8", None, "rtn")}


def _ckpt(tmp_path_factory, case: str) -> Path:
    if case not in _CKPTS:
        from qmoe_ray.job.config import CompressConfig
        from qmoe_ray.job.driver import run_compression

        scheme, gs, method = CASES.get(case, ("int4", 128, "rtn"))
        out = tmp_path_factory.mktemp(f"ct_{case}") / "ckpt"
        run_compression(CompressConfig(output=str(out), num_samples=32, seq_len=32,
                                       eval_samples=4, batch_size=16, group_size=8,
                                       scheme=scheme, quant_group_size=gs, method=method),
                        progress=False)
        _CKPTS[case] = out
    return _CKPTS[case]


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _ct_scheme(config: dict):
    from compressed_tensors.quantization import QuantizationScheme

    group = config["quantization_config"]["config_groups"]["group_0"]
    return QuantizationScheme(**group)


def _decompress(scheme, tensors: dict[str, torch.Tensor], prefix: str,
                scale_dtype: torch.dtype) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    sd = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    sd["weight_scale"] = sd["weight_scale"].to(scale_dtype)
    return PackedQuantizationCompressor.decompress(sd, scheme)["weight"]


@pytest.mark.ray
# int8 has no symmetric export (its codes would need 9 bits): the refusal test covers it
@pytest.mark.parametrize("case, symmetric", [(c, s) for c in CASES for s in (False, True)
                                             if not (s and c == "int8")])
def test_compressed_tensors_decompresses_to_our_weights(tmp_path_factory, tmp_path, case,
                                                        symmetric):
    torch.set_num_threads(1)
    ckpt = _ckpt(tmp_path_factory, case)
    out = tmp_path / "ct"
    res = export(str(ckpt), str(out), format="compressed-tensors", symmetric=symmetric)
    assert res["format"] == "compressed-tensors" and res["layout"] == "per-expert"
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    scheme_name, gs, _ = CASES[case]
    bits = int(scheme_name[3:])
    w = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert w["num_bits"] == bits + symmetric and w["symmetric"] == symmetric
    assert w["strategy"] == ("group" if gs else "channel") and w["group_size"] == gs
    assert "lm_head" in qc["ignore"]
    assert "model.layers.0.block_sparse_moe.gate" in qc["ignore"]
    scheme = _ct_scheme(config)
    tensors = _shards(out)
    ours = load(str(ckpt), mode="resident")
    dense = load(str(ckpt))
    from compressed_tensors.utils.match import match_name

    for canon, enc in ours.experts.items():
        e, role = canon.split(".experts.")[1].split(".")[:2]
        hf_role = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[role]
        module = canon.split(".mlp.")[0] + f".block_sparse_moe.experts.{e}.{hf_role}"
        assert any(match_name(module, t) for t in scheme.targets)
        assert (f"{module}.weight_zero_point" in tensors) != symmetric
        assert tensors[f"{module}.weight_packed"].dtype == torch.int32
        # float32: bit for bit against our float32 dequantization (bf16 scales widened)
        got = _decompress(scheme, tensors, f"{module}.", torch.float32)
        want = dequantize(enc.scheme, torch.from_numpy(enc.codes())[None],
                          {k: v.float()[None] for k, v in enc.params.items()})[0]
        assert got.dtype == torch.float32
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), canon
        # bf16 scales as stored: compressed-tensors' bf16 arithmetic gives our loader's weights
        got16 = _decompress(scheme, tensors, f"{module}.", torch.bfloat16)
        assert torch.equal(got16.view(torch.int16), dense.experts[canon].view(torch.int16))
    # compressed: the experts' bytes are a fraction of the bf16 export's
    expert_bytes = sum(v.numel() * v.element_size() for k, v in tensors.items()
                       if ".experts." in k)
    assert expert_bytes < 0.6 * sum(int(np.prod(e.shape)) * 2
                                    for e in ours.experts.values())


@pytest.mark.ray
@pytest.mark.parametrize("case", ["int2", "int4-g64"])
def test_transformers_loads_the_export_with_our_logits(tmp_path_factory, tmp_path, case):
    """transformers (with compressed-tensors) decompresses the export; 5.25 drops the zero points
    of fused MoE experts, so the symmetric export is the one it loads."""
    import transformers as tf

    torch.set_num_threads(1)
    ckpt = _ckpt(tmp_path_factory, case)
    out = tmp_path / "ct"
    export(str(ckpt), str(out), format="compressed-tensors", symmetric=True)
    model = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = load(str(ckpt))
    sd = model.state_dict()
    gu = sd["model.layers.0.mlp.experts.gate_up_proj"]
    g = ours.experts["model.layers.0.mlp.experts.0.gate_proj.weight"]
    assert gu.dtype == torch.bfloat16  # the decompressed experts keep the scales' dtype
    assert torch.equal(gu[0, : g.shape[0]], g)  # decompressed bit for bit
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, ours.config["vocab_size"],
                                                             size=(2, 10)))
    want = ours.logits(ids)
    with torch.no_grad():
        as_loaded = model(ids).logits  # its expert products in bf16, ours in float32
        for p in model.parameters():
            p.data = p.data.float()
        widened = model(ids).logits
    torch.testing.assert_close(as_loaded, want, rtol=2e-2, atol=5e-2)
    # same bf16 weights, float32 arithmetic on both sides: only summation order differs
    torch.testing.assert_close(widened, want, rtol=1e-4, atol=1e-4)


def test_ternary_rows_map_to_two_bit_exactly_when_evenly_spaced():
    """A ternary row {lo, 0, hi} is a 2-bit asymmetric grid with one unused level exactly when
    hi == -lo, hi == -2 lo, lo == -2 hi or a side is 0; compressed-tensors' own decompression
    of what ct_tensors writes then equals our dequantization bit for bit."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = parse_scheme("ternary")
    lo = torch.tensor([-0.5, -0.25, -1.0, 0.0, -0.75, 0.0], dtype=torch.bfloat16)
    hi = torch.tensor([0.5, 0.5, 0.5, 0.375, 0.0, 0.0], dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(6, 40)).astype(np.int8)
    codes[3][codes[3] < 0] = 0  # the quantizer gives no -1 where lo == 0
    codes[4][codes[4] > 0] = 0
    params = {"lo": lo, "hi": hi}
    for symmetric in (False, True):
        t = export_ct.ct_tensors("m", scheme, codes, params, symmetric=symmetric)
        args = export_ct.grid_args({("ternary", None)}, symmetric)
        ct = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
        t["weight_scale"] = t["weight_scale"].float()
        got = PackedQuantizationCompressor.decompress(t, ct)["weight"]
        want = dequantize(scheme, torch.from_numpy(codes), params)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    bad = {"lo": torch.tensor([-0.3], dtype=torch.bfloat16),
           "hi": torch.tensor([0.5], dtype=torch.bfloat16)}
    with pytest.raises(InputError, match="1 of 1 ternary rows .* not evenly spaced"):
        export_ct.ct_tensors("m", scheme, codes[:1], bad)


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_int32_is_compressed_tensors_layout(bits, n):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    u = np.random.default_rng(bits * 1000 + n).integers(0, 1 << bits, size=(3, n))
    signed = torch.from_numpy(u - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(torch.from_numpy(export_ct.pack_int32(u.astype(np.uint8), bits)),
                       pack_to_int32(signed, bits))


@pytest.mark.ray
def test_refuses_grids_compressed_tensors_cannot_hold(tmp_path_factory, tmp_path):
    """QMoE ternary rows (lo, hi: min and max of the row) are not evenly spaced; groups of 128
    over the 192 inputs of down_proj leave a partial group; int8 has no 9-bit symmetric form.
    Each is refused with its reason, and nothing is left at the destination."""
    torch.set_num_threads(1)
    ternary = compressed_checkpoint(tmp_path_factory)
    with pytest.raises(InputError, match="ternary rows .* not evenly spaced.*--scheme int2"):
        export(str(ternary), str(tmp_path / "t"), format="compressed-tensors")
    assert not (tmp_path / "t").exists() and list(tmp_path.iterdir()) == []
    partial = _ckpt(tmp_path_factory, "int4-g128")
    with pytest.raises(InputError, match="192 input columns are not a multiple of "
                       "quant_group_size 128"):
        export(str(partial), str(tmp_path / "p"), format="compressed-tensors")
    with pytest.raises(InputError, match="9-bit codes"):
        export(str(_ckpt(tmp_path_factory, "int8")), str(tmp_path / "s"),
               format="compressed-tensors", symmetric=True)
    with pytest.raises(InputError, match="per-expert"):
        export(str(partial), str(tmp_path / "f"), format="compressed-tensors", layout="fused")
    with pytest.raises(InputError, match="--symmetric"):
        export(str(partial), str(tmp_path / "h"), symmetric=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
def test_cli_export_compressed_tensors(tmp_path_factory, tmp_path, capsys):
    from qmoe_ray.cli import main

    ckpt = _ckpt(tmp_path_factory, "int2")
    assert main(["export", str(ckpt), str(tmp_path / "ct"), "--format", "compressed-tensors",
                 "--quiet"]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    ternary = compressed_checkpoint(tmp_path_factory)
    assert main(["export", str(ternary), str(tmp_path / "t"), "--format",
                 "compressed-tensors", "--quiet"]) == 2
    assert "not evenly spaced" in capsys.readouterr().err


@pytest.mark.ray
def test_inspect_says_which_formats_are_lossless(tmp_path_factory):
    from qmoe_ray.read.inspect import format_text, inspect

    ternary = inspect(str(compressed_checkpoint(tmp_path_factory)))["export_formats"]
    assert ternary["hf"] is None
    assert "ternary rows are not an evenly spaced 2-bit grid" in ternary["compressed-tensors"]
    unchecked = inspect(str(compressed_checkpoint(tmp_path_factory)), verify=False)
    assert unchecked["export_formats"]["compressed-tensors"] == "ternary rows: not checked"
    int8 = inspect(str(_ckpt(tmp_path_factory, "int8")))
    assert "--scheme ternary-sym256" in int8["export_formats"].pop("gguf")
    assert int8["export_formats"] == {"hf": None, "compressed-tensors": None,
                                      "compressed-tensors --symmetric":
                                      "int8 has no symmetric form (9-bit codes)"}
    assert "  compressed-tensors: yes" in format_text(int8)
    partial = inspect(str(_ckpt(tmp_path_factory, "int4-g128")), verify=False)
    assert "[192] are not multiples of quant_group_size 128" in \
        partial["export_formats"]["compressed-tensors"]


# The hybrid families (Gated DeltaNet + gated attention), each on its own grid: experts of 16
# rows (moe_intermediate_size 16: transformers' grouped_mm wants 16-byte strides of bf16 rows)
HYBRIDS = {"qwen3_next": ("int4", 16), "qwen3_5_moe": ("int2", None)}
_HYBRID: dict[str, tuple[Path, Path]] = {}


def _hybrid(tmp_path_factory, model_type: str) -> tuple[Path, Path]:
    """``(source, checkpoint)``: a tiny random bf16 model of the family (Qwen3.5 as the Hub
    ships it: the multimodal wrapper, fused ``gate_up_proj`` experts, a vision tower) compressed
    on its ``HYBRIDS`` grid."""
    if model_type not in _HYBRID:
        from fixtures_s3 import save_tiny
        from hybrid_fixtures import tiny_hybrid

        from qmoe_ray.job.config import CompressConfig
        from qmoe_ray.job.driver import run_compression

        root = tmp_path_factory.mktemp(f"ct_{model_type}")
        kw = {"save_original_format": False} if model_type == "qwen3_5_moe" else {}
        src = save_tiny(tiny_hybrid(model_type, seed=3, moe_intermediate_size=16), root / "src",
                        dtype=torch.bfloat16, **kw)
        np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
        scheme, gs = HYBRIDS[model_type]
        run_compression(CompressConfig(source=str(src), data=str(src / "tokens.npy"),
                                       output=str(root / "ckpt"), num_samples=24, seq_len=16,
                                       eval_samples=4, batch_size=12, group_size=8,
                                       scheme=scheme, quant_group_size=gs), progress=False)
        _HYBRID[model_type] = (src, root / "ckpt")
    return _HYBRID[model_type]


def _not_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: v for n, v in tensors.items() if ".mlp.experts." not in n}


@pytest.mark.ray
@pytest.mark.parametrize("model_type, symmetric", [(m, s) for m in HYBRIDS for s in (False, True)])
def test_hybrid_export_decompresses_to_our_weights(tmp_path_factory, tmp_path, model_type,
                                                   symmetric):
    """Qwen3-Next and Qwen3.5-MoE: every routed expert under transformers' per-expert name (the
    ``model.language_model.`` prefix of Qwen3.5; its fused source experts written per expert,
    which transformers merges while loading), decompressed by compressed-tensors to exactly our
    weights; every other tensor (Gated DeltaNet, shared experts, the vision tower) the source's
    bf16 bit for bit, its Linear modules in ``ignore``."""
    from compressed_tensors.utils.match import match_name

    torch.set_num_threads(1)
    src, ckpt = _hybrid(tmp_path_factory, model_type)
    out = tmp_path / "ct"
    assert export(str(ckpt), str(out), format="compressed-tensors",
                  symmetric=symmetric)["layout"] == "per-expert"
    config = json.loads((out / "config.json").read_text())
    scheme_name, gs = HYBRIDS[model_type]
    w = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert w["num_bits"] == int(scheme_name[3:]) + symmetric and w["symmetric"] == symmetric
    assert w["strategy"] == ("group" if gs else "channel") and w["group_size"] == gs
    scheme = _ct_scheme(config)
    ignore = set(config["quantization_config"]["ignore"])
    tensors = _shards(out)
    ours, dense = load(str(ckpt), mode="resident"), load(str(ckpt))
    prefix = "model.language_model.layers." if model_type == "qwen3_5_moe" else "model.layers."
    assert len(ours.experts) == (4 if model_type == "qwen3_5_moe" else 3) * 8 * 3
    for canon, enc in ours.experts.items():
        module = canon.removesuffix(".weight")  # transformers' per-expert name
        assert module.startswith(prefix) and ".mlp.experts." in module
        assert any(match_name(module, t) for t in scheme.targets) and module not in ignore
        assert (f"{module}.weight_zero_point" in tensors) != symmetric
        got = _decompress(scheme, tensors, f"{module}.", torch.float32)
        want = dequantize(enc.scheme, torch.from_numpy(enc.codes())[None],
                          {k: v.float()[None] for k, v in enc.params.items()})[0]
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), canon
        got16 = _decompress(scheme, tensors, f"{module}.", torch.bfloat16)
        assert torch.equal(got16.view(torch.int16), dense.experts[canon].view(torch.int16))
    source, exported = _not_experts(_shards(src)), _not_experts(tensors)
    assert set(exported) == set(source)
    assert all(torch.equal(exported[n], v) for n, v in source.items())
    p = prefix + "0."
    assert {p + "linear_attn.out_proj", p + "mlp.shared_expert.gate_proj", "lm_head"} <= ignore
    visual = {n for n in source if n.startswith("model.visual.")}
    assert bool(visual) == (model_type == "qwen3_5_moe")
    assert {n.removesuffix(".weight") for n in visual if source[n].dim() == 2} <= ignore
    assert not any(match_name(m, t) for m in ignore for t in scheme.targets)


@pytest.mark.ray
@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_transformers_loads_hybrid_export_with_our_logits(tmp_path_factory, tmp_path,
                                                          model_type):
    """transformers merges the per-expert compressed-tensors experts into its fused
    ``gate_up_proj`` / ``down_proj`` bit for bit, loads every other tensor (the vision tower
    included) as the source has it, and gives our logits: within the hybrid families' float32
    tolerance once its bf16 experts are widened; as loaded (bf16 expert products), the median
    logit within the bf16 tolerance of the Mixtral case (these tiny random hybrids amplify bf16
    rounding: some logits move by ~1)."""
    import transformers as tf

    torch.set_num_threads(1)
    src, ckpt = _hybrid(tmp_path_factory, model_type)
    out = tmp_path / "ct"
    export(str(ckpt), str(out), format="compressed-tensors", symmetric=True)
    cls = (tf.Qwen3_5MoeForConditionalGeneration if model_type == "qwen3_5_moe"
           else tf.Qwen3NextForCausalLM)
    model = cls.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = load(str(ckpt))
    sd = model.state_dict()
    for lay in ours.family.layers():
        if not lay.moe:
            continue
        gu, down = sd[f"{lay.name}.mlp.experts.gate_up_proj"], sd[f"{lay.name}.mlp.experts.down_proj"]
        assert gu.dtype == down.dtype == torch.bfloat16  # the scales' dtype
        for e in range(lay.num_experts):
            x = {r: ours.experts[f"{lay.name}.mlp.experts.{e}.{r}_proj.weight"]
                 for r in ("gate", "up", "down")}
            assert torch.equal(gu[e], torch.cat([x["gate"], x["up"]]))
            assert torch.equal(down[e], x["down"])
    source = _not_experts(_shards(src))
    assert all(torch.equal(sd[n], v.float()) for n, v in source.items())  # vision tower too
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 97, (2, 10)))
    want = ours.logits(ids)
    with torch.no_grad():
        as_loaded = model(input_ids=ids).logits
        for p in model.parameters():
            p.data = p.data.float()
        widened = model(input_ids=ids).logits
    torch.testing.assert_close(widened, want, rtol=1e-4, atol=1e-3)  # test_hybrid_families'
    # bf16 expert products: a median logit moves by 0.007 (qwen3_next) / 0.024 (qwen3_5_moe), the
    # most sensitive ones by ~1 (rounding only the experts' inputs to bf16 moves them by 0.5)
    assert (as_loaded - want).abs().median() < 5e-2


@pytest.mark.ray
def test_gpt_oss_export_is_refused_naming_the_format_that_works(tmp_path_factory, tmp_path):
    """gpt-oss (MXFP4 source, expert biases, gate/up interleaved ``[E, D, 2F]``): transformers has
    no per-expert modules and no conversion into its fused experts, so compressed-tensors' per-module
    weights could not be loaded: refused by name, nothing written, ``inspect`` says so; the
    format named instead (``--format hf``) writes the fused interleaved experts and the biases."""
    from gpt_oss_fixtures import save_mxfp4, tiny_gpt_oss

    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.inspect import inspect

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ct_gpt_oss")
    mx, _ = save_mxfp4(tiny_gpt_oss(4, intermediate_size=32), root)
    np.save(mx / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
    ckpt = root / "ckpt"
    run_compression(CompressConfig(source=str(mx), data=str(mx / "tokens.npy"), output=str(ckpt),
                                   num_samples=24, seq_len=16, eval_samples=4, batch_size=12,
                                   group_size=3, scheme="int4", method="rtn"), progress=False)
    for symmetric in (False, True):
        with pytest.raises(InputError, match="compressed-tensors is refused for gpt_oss: "
                           "transformers' gpt_oss has no per-expert Linear modules.*--format hf"):
            export(str(ckpt), str(tmp_path / "ct"), format="compressed-tensors",
                   symmetric=symmetric)
    assert list(tmp_path.iterdir()) == []
    formats = inspect(str(ckpt), verify=False)["export_formats"]
    assert formats["hf"] is None
    assert "gpt_oss has no per-expert Linear modules" in formats["compressed-tensors"]
    assert formats["compressed-tensors --symmetric"] == formats["compressed-tensors"]
    assert formats["gguf"].endswith("no llama.cpp architecture in this export (supported: "
                                    "deepseek_v3, glm4_moe, kimi_k2, minimax_m2, mixtral, olmoe, "
                                    "qwen2_moe, qwen3_moe); export it with --format hf")
    export(str(ckpt), str(tmp_path / "hf"))
    hf, source = _shards(tmp_path / "hf"), load_file(str(mx / "model.safetensors"))
    for b in range(3):
        p = f"model.layers.{b}.mlp.experts."
        assert hf[p + "gate_up_proj"].shape == (6, 32, 64) and hf[p + "down_proj"].shape == (6, 32, 32)
        for bias in ("gate_up_proj_bias", "down_proj_bias"):
            assert torch.equal(hf[p + bias], source[p + bias])
