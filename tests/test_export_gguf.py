"""``qmoe-ray export --format gguf``: a tiny Mixtral compressed with ``--scheme ternary-sym256``
exported as one GGUF file: the gguf package's reader and numpy dequantization give our expert
weights bit for bit, its metadata keys and tensor names are llama.cpp's (the gguf package's own
HF-to-GGUF name map is the oracle), and what GGUF cannot hold is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from fixtures_s3 import save_tiny, tiny_model  # noqa: E402

from qmoe_ray.data import embedded_model_path  # noqa: E402
from qmoe_ray.errors import InputError  # noqa: E402
from qmoe_ray.quant import dequantize  # noqa: E402
from qmoe_ray.read import gguf_arch  # noqa: E402
from qmoe_ray.read.export import export  # noqa: E402
from qmoe_ray.read.loader import load  # noqa: E402

pytestmark = pytest.mark.usefixtures("module_ray")  # every job here runs in-process

_CACHE: dict[str, Path] = {}
DIMS = dict(hidden_size=256, intermediate_size=256, vocab_size=2048, num_hidden_layers=2,
            num_local_experts=4)


def _source(tmp_path_factory) -> Path:
    if "src" not in _CACHE:
        model = tiny_model("mixtral", seed=5, **DIMS)
        src = save_tiny(model, tmp_path_factory.mktemp("gguf_src") / "src", dtype=torch.bfloat16)
        shutil.copy(embedded_model_path() / "tokenizer.json", src / "tokenizer.json")
        np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 2048, (24, 16)))
        _CACHE["src"] = src
    return _CACHE["src"]


def _ckpt(tmp_path_factory, scheme: str = "ternary-sym256") -> Path:
    if scheme not in _CACHE:
        from qmoe_ray.job.config import CompressConfig
        from qmoe_ray.job.driver import run_compression

        src = _source(tmp_path_factory)
        out = tmp_path_factory.mktemp(f"gguf_{scheme}") / "ckpt"
        run_compression(CompressConfig(source=str(src), output=str(out),
                                       data=str(src / "tokens.npy"), num_samples=16, seq_len=16,
                                       eval_samples=4, batch_size=8, group_size=4,
                                       scheme=scheme, method="gptq"), progress=False)
        _CACHE[scheme] = out
    return _CACHE[scheme]


@pytest.mark.ray
@pytest.mark.parametrize("expert_type", ["tq2_0", "tq1_0"])
def test_gguf_experts_dequantize_to_our_weights(tmp_path_factory, tmp_path, expert_type):
    torch.set_num_threads(1)
    ckpt = _ckpt(tmp_path_factory)
    out = tmp_path / "model.gguf"
    res = export(str(ckpt), str(out), format="gguf", gguf_expert_type=expert_type)
    assert res["format"] == "gguf" and out.stat().st_size == res["bytes"]
    r = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in r.tensors}
    ours = load(str(ckpt), mode="resident")
    dense = load(str(ckpt))
    qtype = gguf.GGMLQuantizationType[expert_type.upper()]
    hf = {"gate": "w1", "up": "w3", "down": "w2"}
    for block in range(2):
        for role in ("gate", "up", "down"):
            t = tensors[f"blk.{block}.ffn_{role}_exps.weight"]
            assert t.tensor_type == qtype
            got = gguf.quants.dequantize(t.data, qtype)
            assert got.shape == (4, 256, 256)
            for e in range(4):
                canon = f"model.layers.{block}.mlp.experts.{e}.{role}_proj.weight"
                enc = ours.experts[canon]
                want = dequantize(enc.scheme, torch.from_numpy(enc.codes())[None],
                                  {k: v.float()[None] for k, v in enc.params.items()})[0]
                assert np.array_equal(got[e].view(np.int32), want.numpy().view(np.int32))
                # the loader's bf16 weights are the same values (the scales are bf16 too)
                assert torch.equal(torch.from_numpy(got[e]).to(torch.bfloat16),
                                   dense.experts[canon])
                assert hf[role]  # names as the HF Mixtral module calls them (gguf map below)
    # ternary blocks: TQ2_0 2.06 bits per expert weight, TQ1_0 1.69 bits
    bits = 8 * res["expert_bytes"] / (2 * 3 * 4 * 256 * 256)
    assert bits == pytest.approx({"tq2_0": 66 * 8 / 256, "tq1_0": 54 * 8 / 256}[expert_type])


@pytest.mark.ray
def test_gguf_metadata_and_names_are_llama_cpps(tmp_path_factory, tmp_path):
    ckpt = _ckpt(tmp_path_factory)
    out = tmp_path / "m.gguf"
    export(str(ckpt), str(out), format="gguf", gguf_type="f16")
    r = gguf.GGUFReader(str(out))

    def val(key):
        f = r.fields[key]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            return [f.parts[i].tobytes().decode() if f.types[-1] == gguf.GGUFValueType.STRING
                    else f.parts[i][0] for i in f.data]
        v = f.parts[f.data[0]]
        return v.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]

    K, a = gguf.Keys, "llama"
    cfg = json.loads((_source(tmp_path_factory) / "config.json").read_text())
    assert val(K.General.ARCHITECTURE) == a
    assert val(K.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_TQ2_0
    want = {K.LLM.BLOCK_COUNT: 2, K.LLM.EMBEDDING_LENGTH: 256, K.LLM.FEED_FORWARD_LENGTH: 256,
            K.LLM.EXPERT_COUNT: 4, K.LLM.EXPERT_USED_COUNT: 2, K.LLM.VOCAB_SIZE: 2048,
            K.LLM.CONTEXT_LENGTH: cfg["max_position_embeddings"],
            K.Attention.HEAD_COUNT: 4, K.Attention.HEAD_COUNT_KV: 2,
            K.Rope.DIMENSION_COUNT: 64}
    for key, v in want.items():
        assert val(key.format(arch=a)) == v, key
    assert val(K.Rope.FREQ_BASE.format(arch=a)) == pytest.approx(cfg["rope_theta"]
                                                                 if "rope_theta" in cfg else
                                                                 cfg["rope_parameters"]
                                                                 ["rope_theta"])
    tok = json.loads((embedded_model_path() / "tokenizer.json").read_text())
    tokens = val(K.Tokenizer.LIST)
    assert val(K.Tokenizer.MODEL) == "gpt2" and len(tokens) == 2048
    assert all(tokens[i] == s for s, i in tok["model"]["vocab"].items())
    assert val(K.Tokenizer.TOKEN_TYPE)[1] == gguf.TokenType.CONTROL  # <s>, special
    assert len(val(K.Tokenizer.MERGES)) == len(tok["model"]["merges"])
    assert val(K.Tokenizer.BOS_ID) == 1 and val(K.Tokenizer.EOS_ID) == 2
    # every tensor name is the one the gguf package's map gives the HF name (merged experts as
    # convert_hf_to_gguf names them before mapping), and llama.cpp's llama tensors are all there
    names = {t.name: t for t in r.tensors}
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    from safetensors.torch import load_file

    src = load_file(_source(tmp_path_factory) / "model.safetensors")
    expected = set()
    for hf_name in src:
        if ".experts." in hf_name:
            parts = hf_name.split(".")
            hf_name = ".".join(parts[:5] + parts[6:])  # experts.E.w1 -> experts.w1
        g = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert g is not None, hf_name
        expected.add(g)
    assert set(names) == expected
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # q/k rows in llama.cpp's interleaved rope order: the HF rows permuted per head
    q = src["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    got = np.asarray(names["blk.0.attn_q.weight"].data).astype(np.float32)
    assert np.array_equal(got, gguf_arch.permute_rows(q, 4).astype(np.float16).astype(np.float32))
    assert not np.array_equal(got, q.astype(np.float16).astype(np.float32))


@pytest.mark.ray
def test_gguf_refuses_what_it_cannot_hold(tmp_path_factory, tmp_path):
    from qmoe_ray.read.inspect import inspect

    ckpt = _ckpt(tmp_path_factory)
    assert inspect(str(ckpt))["export_formats"]["gguf"] is None
    out = tmp_path / "m.gguf"
    out.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="exists"):
        export(str(ckpt), str(out), format="gguf")
    assert out.read_bytes() == b"x"
    export(str(ckpt), str(out), format="gguf", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    # QMoE's per-row ternary grid (the shared embedded checkpoint): name the scheme to use
    from load_helpers import compressed_checkpoint

    tern = compressed_checkpoint(tmp_path_factory)
    why = inspect(str(tern), verify=False)["export_formats"]["gguf"]
    assert "--scheme ternary-sym256" in why
    with pytest.raises(InputError, match="--scheme ternary-sym256"):
        export(str(tern), str(tmp_path / "t.gguf"), format="gguf")
    assert not (tmp_path / "t.gguf").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_gguf_refuses_families_and_configs_llama_cpp_lacks():
    with pytest.raises(InputError, match="no llama.cpp architecture.*mixtral"):
        gguf_arch.arch_of({"model_type": "switch_transformers"})
    base = dict(max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                intermediate_size=24, num_attention_heads=4, rms_norm_eps=1e-6,
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                shared_expert_intermediate_size=8)
    with pytest.raises(InputError, match="mlp_only_layers"):
        gguf_arch.metadata({**base, "mlp_only_layers": [1]}, "qwen2moe")
    with pytest.raises(InputError, match="yarn"):
        gguf_arch.metadata({**base, "rope_scaling": {"rope_type": "yarn"}}, "qwen3moe")
    with pytest.raises(InputError, match="OLMoE with grouped-query attention"):
        gguf_arch.metadata({**base, "num_key_value_heads": 2}, "olmoe")
    assert gguf_arch.metadata({**base, "num_key_value_heads": 4}, "olmoe")
    m = gguf_arch.metadata(base, "qwen2moe")
    assert m["qwen2moe.expert_feed_forward_length"] == 8
    assert m["qwen2moe.expert_shared_feed_forward_length"] == 8
    with pytest.raises(InputError, match="WordLevel"):
        gguf_arch.vocabulary(b'{"model": {"type": "WordLevel"}}', {"vocab_size": 4})


@pytest.mark.parametrize("model_type, arch", [("qwen2_moe", gguf.MODEL_ARCH.QWEN2MOE),
                                              ("qwen3_moe", gguf.MODEL_ARCH.QWEN3MOE),
                                              ("olmoe", gguf.MODEL_ARCH.OLMOE)])
def test_dense_names_match_the_gguf_map(model_type, arch):
    """Every dense tensor transformers saves for the family gets the name the gguf package's
    map gives it (the routed experts are merged by the export; checked above for Mixtral)."""
    model = tiny_model(model_type, seed=1, **({"mlp_only_layers": []}
                                              if model_type == "qwen2_moe" else {}))
    tmap = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    a = gguf.MODEL_ARCH_NAMES[arch]
    assert gguf_arch.ARCHS[model_type] == a
    for name in model.state_dict():
        if ".experts." in name:
            continue
        want = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_arch.tensor_name(name, a) == want, name


def _tiny_deepseek():
    """A tiny DeepSeek-V3 whose expert widths are multiples of 256 (TQ2_0 blocks)."""
    from sigmoid_fixtures import tiny_sigmoid_model

    return tiny_sigmoid_model("deepseek_v3", seed=2, hidden_size=256, moe_intermediate_size=256,
                              intermediate_size=64, vocab_size=2048, n_routed_experts=8,
                              num_hidden_layers=2)


def _tiny_glm(model_type: str = "glm4_moe"):
    """A tiny GLM-4.5 (a dense first block, a shared expert, sigmoid routing with groups and a
    correction bias, q/k norms, attention biases, half-rotary rope) or MiniMax-M2 (sigmoid
    routing with a correction bias, q/k norms over all heads, half-rotary rope), widths
    multiples of 256."""
    from sigmoid_fixtures import tiny_sigmoid_model

    glm = dict(moe_intermediate_size=256, n_routed_experts=8) if model_type == "glm4_moe" else {}
    return tiny_sigmoid_model(model_type, seed=5, hidden_size=256, intermediate_size=256,
                              vocab_size=2048, num_hidden_layers=2, **glm)


@pytest.mark.parametrize("model_type, arch", [("glm4_moe", gguf.MODEL_ARCH.GLM4_MOE),
                                              ("minimax_m2", gguf.MODEL_ARCH.MINIMAXM2)])
def test_sigmoid_families_names_are_llama_cpps(model_type, arch):
    """GLM-4.5 as llama.cpp's glm4moe (the post-attention norm is ``post_attention_norm``
    there) and MiniMax-M2 as minimax-m2: every dense tensor gets the gguf package's name, the
    routers' correction bias ``exp_probs_b.bias`` as the converter renames it."""
    model = _tiny_glm(model_type)
    a = gguf.MODEL_ARCH_NAMES[arch]
    tmap = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    assert gguf_arch.arch_of({"model_type": model_type}) == a
    for name, p in model.state_dict().items():
        if ".experts." in name and "shared" not in name:
            continue
        [(got, _)] = gguf_arch.dense_tensors(name, p.float().numpy(), a, model.config.to_dict())
        if name.endswith("e_score_correction_bias"):
            assert got == f"blk.{name.split('.')[2]}.exp_probs_b.bias", name
            continue
        assert got == tmap.get_name(name, try_suffixes=(".weight", ".bias")), name
    m = gguf_arch.metadata(model.config.to_dict(), a)
    assert m[f"{a}.rope.dimension_count"] == model.config.head_dim // 2  # partial rotary 0.5
    assert m[f"{a}.expert_gating_func"] == 2


def test_glm_keys_are_llama_cpps():
    """glm4moe's routing keys (shared experts, dense first blocks, groups, no nextn layers)."""
    model = _tiny_glm()
    c = model.config.to_dict()
    m = gguf_arch.metadata(c, "glm4moe")
    assert m["glm4moe.rope.dimension_count"] == c["head_dim"] // 2  # partial_rotary_factor 0.5
    assert m["glm4moe.expert_gating_func"] == 2 and m["glm4moe.nextn_predict_layers"] == 0
    assert m["glm4moe.expert_shared_count"] == c["n_shared_experts"]
    assert m["glm4moe.leading_dense_block_count"] == c["first_k_dense_replace"]
    assert m["glm4moe.expert_group_count"] == c["n_group"]


def _compressed(model, tmp_path: Path, method: str) -> Path:
    """``model`` saved (bf16, the embedded tokenizer, random token ids) and compressed with
    ``--scheme ternary-sym256``; returns the checkpoint."""
    from qmoe_ray.job.config import CompressConfig
    from qmoe_ray.job.driver import run_compression

    src = save_tiny(model, tmp_path / "src", dtype=torch.bfloat16)
    shutil.copy(embedded_model_path() / "tokenizer.json", src / "tokenizer.json")
    np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 2048, (24, 16)))
    ck = tmp_path / "ck"
    run_compression(CompressConfig(source=str(src), output=str(ck), data=str(src / "tokens.npy"),
                                   num_samples=16, seq_len=16, eval_samples=2, batch_size=8,
                                   group_size=8, scheme="ternary-sym256", method=method),
                    progress=False)
    return ck


@pytest.mark.ray
@pytest.mark.slow
def test_deepseek_v3_exports_as_deepseek2(tmp_path):
    """A tiny DeepSeek-V3 (MLA, a dense first block, shared experts, sigmoid routing with
    groups and correction biases, yarn rope): names against the gguf package's deepseek2 map
    (``kv_b_proj`` split as the converter splits it), the MLA keys, exact experts."""
    model = _tiny_deepseek()
    ck = _compressed(model, tmp_path, "rtn")
    out = tmp_path / "ds.gguf"
    export(str(ck), str(out), format="gguf")
    r = gguf.GGUFReader(str(out))
    names = {t.name: t for t in r.tensors}
    c = model.config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, 2)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "src" / "model.safetensors")
    expected = set()
    for hf_name in sd:
        if ".experts." in hf_name and "shared" not in hf_name:
            parts = hf_name.split(".")
            hf_name = ".".join(parts[:5] + parts[6:])
        hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
        for n in ([hf_name.replace("kv_b_proj", "k_b_proj"), hf_name.replace("kv_b_proj",
                   "v_b_proj")] if "kv_b_proj" in hf_name else [hf_name]):
            g = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
            assert g is not None, n
            expected.add(g)
    assert set(names) == expected
    kb = np.asarray(names["blk.1.attn_k_b.weight"].data).view(np.uint16)  # BF16 bytes
    kv_b = sd["model.layers.1.self_attn.kv_b_proj.weight"].float().numpy().reshape(
        c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
    assert kb.shape == (c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim)
    assert np.array_equal(kb,
                          torch.from_numpy(kv_b[:, :c.qk_nope_head_dim].transpose(0, 2, 1).copy())
                          .to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    fields = r.fields

    def val(key):
        f = fields[key.format(arch="deepseek2")]
        v = f.parts[f.data[0]]
        return v.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]

    K = gguf.Keys
    assert val(K.General.ARCHITECTURE) == "deepseek2"
    assert val(K.Attention.HEAD_COUNT_KV) == 1
    assert val(K.Attention.KV_LORA_RANK) == c.kv_lora_rank
    assert val(K.Attention.Q_LORA_RANK) == c.q_lora_rank
    assert val(K.Attention.KEY_LENGTH) == c.kv_lora_rank + c.qk_rope_head_dim
    assert val(K.Attention.KEY_LENGTH_MLA) == c.qk_nope_head_dim + c.qk_rope_head_dim
    assert val(K.Attention.VALUE_LENGTH_MLA) == c.v_head_dim
    assert val(K.LLM.LEADING_DENSE_BLOCK_COUNT) == 1
    assert val(K.LLM.EXPERT_COUNT) == 8 and val(K.LLM.EXPERT_SHARED_COUNT) == 2
    assert val(K.LLM.EXPERT_GATING_FUNC) == gguf.ExpertGatingFuncType.SIGMOID
    assert val(K.LLM.EXPERT_GROUP_COUNT) == 4 and val(K.LLM.EXPERT_GROUP_USED_COUNT) == 2
    assert val(K.LLM.EXPERT_WEIGHTS_SCALE) == pytest.approx(2.5)
    assert val(K.Rope.DIMENSION_COUNT) == c.qk_rope_head_dim
    assert val(K.Rope.SCALING_TYPE) == "yarn" and val(K.Rope.SCALING_FACTOR) == 4.0
    assert val(K.Rope.SCALING_YARN_LOG_MUL) == pytest.approx(0.1)
    ours = load(str(ck), mode="resident")
    got = gguf.quants.dequantize(names["blk.1.ffn_down_exps.weight"].data,
                                 gguf.GGMLQuantizationType.TQ2_0)
    for e in range(8):
        enc = ours.experts[f"model.layers.1.mlp.experts.{e}.down_proj.weight"]
        want = dequantize(enc.scheme, torch.from_numpy(enc.codes())[None],
                          {k: v.float()[None] for k, v in enc.params.items()})[0]
        assert np.array_equal(got[e].view(np.int32), want.numpy().view(np.int32))


def _llama_cpp_agrees(ckpt: Path, out: Path, vocab: int, **kw) -> tuple[float, float]:
    """Export ``ckpt`` to ``out`` (GGUF), run it in llama.cpp (llama-cpp-python; the test is
    skipped without it) on 24 tokens and return (correlation of its logits with ours, top-1
    agreement); asserts llama.cpp sees the vocabulary."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python, "
        "which builds llama.cpp: minutes)")
    export(str(ckpt), str(out), format="gguf", **kw)
    ids = [int(t) for t in np.random.default_rng(1).integers(3, vocab, size=24)]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=2)
    try:
        assert llm.n_vocab() == vocab
        llm.eval(ids)
        theirs = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()
    ours = load(str(ckpt)).logits(torch.tensor([ids])).double().numpy()[0]
    corr = float(np.corrcoef(theirs.ravel(), ours.ravel())[0, 1])
    return corr, float((theirs.argmax(-1) == ours.argmax(-1)).mean())


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("expert_type", ["tq2_0", "tq1_0"])
def test_llama_cpp_runs_the_export_with_our_logits(tmp_path_factory, tmp_path, expert_type):
    """llama.cpp itself loads the Mixtral export and gives our logits: its ternary kernels
    multiply by 8-bit-quantized activations, so close, not equal."""
    corr, top1 = _llama_cpp_agrees(_ckpt(tmp_path_factory), tmp_path / "model.gguf",
                                   DIMS["vocab_size"], gguf_expert_type=expert_type)
    print(f"llama.cpp mixtral {expert_type}: logits corr {corr:.4f}, top-1 {top1:.3f}")
    assert corr > 0.98 and top1 >= 0.75, (corr, top1)


_FAMILY_DIMS = {
    "qwen2_moe": dict(moe_intermediate_size=256, shared_expert_intermediate_size=256,
                      intermediate_size=256, mlp_only_layers=[]),
    "qwen3_moe": dict(moe_intermediate_size=256, intermediate_size=256),
    "olmoe": dict(intermediate_size=256, num_key_value_heads=4),  # llama.cpp's olmoe: no GQA
}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3",
                                        "glm4_moe", "minimax_m2"])
def test_llama_cpp_runs_each_familys_export(tmp_path, model_type):
    """The other families llama.cpp runs: the export of a tiny compressed model loads in
    llama.cpp under its architecture and gives our logits."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if model_type == "deepseek_v3":
        model = _tiny_deepseek()
    elif model_type in ("glm4_moe", "minimax_m2"):
        model = _tiny_glm(model_type)
    else:
        model = tiny_model(model_type, seed=5, hidden_size=256, vocab_size=2048,
                           num_hidden_layers=2, **_FAMILY_DIMS[model_type])
    ck = _compressed(model, tmp_path, "gptq")
    corr, top1 = _llama_cpp_agrees(ck, tmp_path / "m.gguf", 2048)
    print(f"llama.cpp {model_type}: logits corr {corr:.4f}, top-1 {top1:.3f}")
    assert corr > 0.98 and top1 >= 0.75, (corr, top1)
