"""What a GGUF file holds for each family llama.cpp serves: its architecture, metadata keys,
tensor names and vocabulary, as llama.cpp's ``convert_hf_to_gguf.py`` writes them (no I/O; the
writing is ``qmoe_ray.read.export_gguf``).

- Architectures: Mixtral -> ``llama`` (llama.cpp runs Mixtral as Llama with experts, its q/k
  rows permuted from the HF rotate-half order to llama.cpp's interleaved rope pairs),
  Qwen2-MoE -> ``qwen2moe``, Qwen3-MoE -> ``qwen3moe``, OLMoE -> ``olmoe`` (neox rope: no
  permutation), DeepSeek-V3 / Kimi-K2 -> ``deepseek2`` (MLA: ``kv_b_proj`` split into
  ``attn_k_b`` ``[heads, kv_lora_rank, qk_nope]`` (transposed) and ``attn_v_b`` ``[heads,
  v_head_dim, kv_lora_rank]``; the router's correction bias as ``exp_probs_b.bias``; the
  multi-token-prediction layer left out, as the converter does), GLM-4.5 -> ``glm4moe`` (the
  post-attention norm as ``post_attention_norm``), MiniMax-M2 -> ``minimax-m2``. Other families
  are refused, naming the ones supported.
- Tensor names: ``token_embd``, ``output_norm``, ``output`` and per block ``blk.N.attn_q`` ...
  ``ffn_gate_inp`` (the router); the routed experts merged per block into
  ``blk.N.ffn_{gate,up,down}_exps.weight`` ``[experts, out, in]``; Qwen2-MoE's shared expert as
  ``ffn_*_shexp`` and its gate ``ffn_gate_inp_shexp``. ``tests/test_export_gguf.py`` checks them
  against the ``gguf`` package's own HF-to-GGUF name map.
- Vocabulary: a byte-level BPE ``tokenizer.json`` as ``tokenizer.ggml.model = "gpt2"`` with
  tokens, token types (control for special added tokens, user-defined for other added ones,
  unused for ids the vocabulary leaves empty, named ``[PAD<id>]``), merges, the pre-tokenizer
  name llama.cpp knows it by (``gpt-2`` for GPT-2's split regex) and the special token ids.
  Anything else (SentencePiece, WordLevel, an unknown pre-tokenizer split) is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from qmoe_ray.errors import InputError

ARCHS = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
         "deepseek_v3": "deepseek2", "kimi_k2": "deepseek2", "glm4_moe": "glm4moe",
         "minimax_m2": "minimax-m2"}
PERMUTE_QK = {"llama"}  # llama.cpp's llama arch rotates interleaved pairs
EXPERT_ROLES = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
        "output_norm.weight", "lm_head.weight": "output.weight"}
_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj":
    "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
_BIAS = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)(?:\.gate)?"
                   r"\.e_score_correction_bias")
_KV_B = re.compile(r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER, TOKEN_UNUSED = 1, 3, 4, 5


def arch_of(config: Mapping[str, Any]) -> str:
    """The llama.cpp architecture of a checkpoint's config.

    Raises:
        InputError: a family llama.cpp has no architecture for here (naming the supported).
    """
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise InputError(
            f"--format gguf: model_type {str(mt)[:40]!r} has no llama.cpp architecture in this "
            f"export (supported: {', '.join(sorted(ARCHS))}); export it with "
            f"{_other_formats(config)}")
    return ARCHS[mt]


def _other_formats(config: Mapping[str, Any]) -> str:
    """The export formats that hold a family llama.cpp lacks: ``--format hf``, and
    ``--format compressed-tensors`` unless it is refused for the family (fused experts only in
    transformers, as gpt-oss: ``qmoe_ray.read.export_ct.family_reason``)."""
    from qmoe_ray.models import get_family

    try:
        refused = get_family(dict(config)).fused_layout != "rows"
    except ValueError:  # not a whole config (a bare model_type): name both
        refused = False
    return "--format hf" if refused else "--format hf or --format compressed-tensors"


def tensor_name(name: str, arch: str) -> str | None:
    """The GGUF name of dense HF tensor ``name`` (None: not one llama.cpp reads, e.g. rotary
    buffers)."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _BLOCK:
        g = _BLOCK[m.group(2)]
        if arch == "glm4moe" and g == "ffn_norm":  # glm4moe names it after the attention
            g = "post_attention_norm"
        return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return None


def expert_tensor_name(block: int, role: str) -> str:
    """The merged GGUF tensor of block ``block``'s routed experts of ``role``."""
    return f"blk.{block}.{EXPERT_ROLES[role]}.weight"


def dense_tensors(name: str, a: Any, arch: str, config: Mapping[str, Any]
                  ) -> list[tuple[str, Any]] | None:
    """The GGUF tensors ``[(name, numpy array)]`` of dense HF tensor ``name`` (numpy ``a``):
    renamed, q/k rows permuted (llama), ``kv_b_proj`` split (deepseek2); None when llama.cpp has
    no place for it; ``[]`` for a multi-token-prediction layer (left out)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= int(config["num_hidden_layers"]):
        return []
    if (b := _BIAS.fullmatch(name)) is not None:
        return [(f"blk.{b.group(1)}.exp_probs_b.bias", a)]
    if (kv := _KV_B.fullmatch(name)) is not None and arch == "deepseek2":
        heads, nope = int(config["num_attention_heads"]), int(config["qk_nope_head_dim"])
        v = int(config["v_head_dim"])
        w = a.reshape(heads, nope + v, a.shape[-1])
        blk = f"blk.{kv.group(1)}"
        return [(f"{blk}.attn_k_b.weight", w[:, :nope].transpose(0, 2, 1).copy()),
                (f"{blk}.attn_v_b.weight", w[:, nope:].copy())]
    g = tensor_name(name, arch)
    if g is None:
        return None
    role = g.split(".")[-2]
    if arch in PERMUTE_QK and role in ("attn_q", "attn_k"):
        heads = int(config["num_attention_heads"])
        if role == "attn_k":
            heads = int(config.get("num_key_value_heads") or heads)
        a = permute_rows(a, heads)
    return [(g, a)]


def permute_rows(w: Any, n_head: int) -> Any:
    """q/k rows from HF's rotate-half order (per head: all first halves, then all second) to
    llama.cpp's interleaved pairs (numpy ``[heads * head_dim, ...]``)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def metadata(config: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """``{key: value}`` of the architecture keys llama.cpp reads (without ``tokenizer.*`` and
    ``general.*``); ints and floats as convert_hf_to_gguf types them (uint32, float32).

    Raises:
        InputError: a config llama.cpp's architecture cannot express (rope scaling, dense
            blocks among the MoE ones, OLMoE with grouped-query attention).
    """
    c = config
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", None) and not (rtype == "yarn" and arch == "deepseek2"):
        raise InputError(f"--format gguf: rope_type {rtype!r} is not written by this export "
                         "(default rope only); export with --format hf")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    heads = int(c["num_attention_heads"])
    head_dim = c.get("head_dim") or int(c["hidden_size"]) // heads
    mlp_only = c.get("mlp_only_layers") or []
    if mlp_only or int(c.get("decoder_sparse_step", 1) or 1) != 1:
        raise InputError("--format gguf: dense blocks among the MoE ones (mlp_only_layers / "
                         f"decoder_sparse_step) are not in llama.cpp's {arch}; export with "
                         "--format hf")
    kv = int(c.get("num_key_value_heads") or heads)
    if arch == "olmoe" and kv != heads:  # found by running llama.cpp on such an export
        raise InputError(f"--format gguf: OLMoE with grouped-query attention ({kv} key/value "
                         f"heads of {heads}) does not load in llama.cpp, whose olmoe sizes the "
                         "k norm by the hidden size (released OLMoE models have as many "
                         "key/value heads as heads); export with --format hf")
    a = arch
    out: dict[str, Any] = {
        f"{a}.context_length": int(c["max_position_embeddings"]),
        f"{a}.embedding_length": int(c["hidden_size"]),
        f"{a}.block_count": int(c["num_hidden_layers"]),
        f"{a}.feed_forward_length": int(c["intermediate_size"]),
        f"{a}.attention.head_count": heads,
        f"{a}.attention.head_count_kv": kv,
        f"{a}.rope.freq_base": float(theta),
        f"{a}.attention.layer_norm_rms_epsilon": float(c["rms_norm_eps"]),
        f"{a}.expert_count": int(c.get("num_local_experts") or c.get("num_experts")
                                 or c["n_routed_experts"]),
        f"{a}.expert_used_count": int(c["num_experts_per_tok"]),
    }
    if c.get("head_dim"):
        out[f"{a}.attention.key_length"] = out[f"{a}.attention.value_length"] = int(head_dim)
    if a == "llama":
        out[f"{a}.vocab_size"] = int(c["vocab_size"])
        out[f"{a}.rope.dimension_count"] = int(head_dim)
    if a in ("qwen2moe", "qwen3moe"):
        out[f"{a}.expert_feed_forward_length"] = int(c["moe_intermediate_size"])
    if a == "qwen2moe":
        out[f"{a}.expert_shared_feed_forward_length"] = int(c["shared_expert_intermediate_size"])
    if a == "deepseek2":
        out.update(_deepseek2(c, rope, rtype))
    # partial rope (GLM-4.5, MiniMax-M2): the rotated width of a head
    partial = float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    rotary = int(c.get("rotary_dim") or int(head_dim) * partial)
    if a == "glm4moe":
        out.update(_glm4moe(c, rotary))
    if a == "minimax-m2":
        out.update({f"{a}.expert_feed_forward_length": int(c["intermediate_size"]),
                    f"{a}.expert_gating_func": 2,  # sigmoid, with the correction bias
                    f"{a}.rope.dimension_count": rotary})
    return out


def _groups(c: Mapping[str, Any], a: str) -> dict[str, Any]:
    """The expert-group keys of group-limited routing (``n_group`` > 1: DeepSeek-V3, GLM)."""
    if int(c.get("n_group") or 1) <= 1:
        return {}
    return {f"{a}.expert_group_count": int(c["n_group"]),
            f"{a}.expert_group_used_count": int(c["topk_group"])}


def _glm4moe(c: Mapping[str, Any], rotary: int) -> dict[str, Any]:
    """glm4moe's keys: sigmoid routing with a correction bias, shared experts, leading dense
    blocks, partial (neox) rope of ``rotary`` dimensions; the multi-token-prediction layer left
    out (0 nextn layers)."""
    a = "glm4moe"
    return {
        f"{a}.expert_count": int(c["n_routed_experts"]),
        f"{a}.expert_feed_forward_length": int(c["moe_intermediate_size"]),
        f"{a}.expert_shared_count": int(c.get("n_shared_experts") or 0),
        f"{a}.leading_dense_block_count": int(c.get("first_k_dense_replace") or 0),
        f"{a}.expert_weights_scale": float(c.get("routed_scaling_factor") or 1.0),
        f"{a}.expert_weights_norm": bool(c.get("norm_topk_prob")),
        f"{a}.expert_gating_func": 2,  # sigmoid
        f"{a}.rope.dimension_count": rotary,
        f"{a}.nextn_predict_layers": 0,
        f"{a}.vocab_size": int(c["vocab_size"]),
        **_groups(c, a),
    }


def _deepseek2(c: Mapping[str, Any], rope: Mapping[str, Any], rtype: str) -> dict[str, Any]:
    """deepseek2's keys: MLA as MQA (one kv head of ``kv_lora_rank + qk_rope`` keys), sigmoid
    routing with groups, leading dense blocks, yarn."""
    a = "deepseek2"
    kv, rope_d = int(c["kv_lora_rank"]), int(c["qk_rope_head_dim"])
    out: dict[str, Any] = {
        f"{a}.attention.head_count_kv": 1,
        f"{a}.expert_count": int(c["n_routed_experts"]),
        f"{a}.leading_dense_block_count": int(c.get("first_k_dense_replace") or 0),
        f"{a}.vocab_size": int(c["vocab_size"]),
        f"{a}.attention.kv_lora_rank": kv,
        f"{a}.attention.key_length": kv + rope_d,
        f"{a}.attention.value_length": kv,
        f"{a}.attention.key_length_mla": int(c["qk_nope_head_dim"]) + rope_d,
        f"{a}.attention.value_length_mla": int(c["v_head_dim"]),
        f"{a}.expert_feed_forward_length": int(c["moe_intermediate_size"]),
        f"{a}.expert_shared_count": int(c.get("n_shared_experts") or 0),
        f"{a}.expert_weights_scale": float(c.get("routed_scaling_factor") or 1.0),
        f"{a}.rope.dimension_count": rope_d,
        f"{a}.expert_gating_func": 2,  # sigmoid (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE)
    }
    if c.get("q_lora_rank"):
        out[f"{a}.attention.q_lora_rank"] = int(c["q_lora_rank"])
    if c.get("norm_topk_prob"):
        out[f"{a}.expert_weights_norm"] = True
    out.update(_groups(c, a))
    if rtype == "yarn":
        out[f"{a}.rope.scaling.type"] = "yarn"
        out[f"{a}.rope.scaling.factor"] = float(rope["factor"])
        out[f"{a}.rope.scaling.original_context_length"] = int(
            rope["original_max_position_embeddings"])
        if rope.get("mscale_all_dim") is not None:
            out[f"{a}.rope.scaling.yarn_log_multiplier"] = 0.1 * float(rope["mscale_all_dim"])
        for k in ("beta_fast", "beta_slow"):
            if rope.get(k) is not None:
                out[f"{a}.rope.scaling.yarn_{k}"] = float(rope[k])
    return out


def vocabulary(tokenizer_json: bytes, config: Mapping[str, Any],
               extra: Mapping[str, bytes] | None = None) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys of a byte-level BPE ``tokenizer.json`` (see module doc).

    Args:
        tokenizer_json: the file's bytes.
        config: the model config (``vocab_size``, ``bos/eos/pad_token_id``).
        extra: other copied files by name (``tokenizer_config.json`` for ``add_bos_token``).

    Raises:
        InputError: a tokenizer this export cannot write as llama.cpp reads it.
    """
    try:
        tok = json.loads(tokenizer_json)
        model = tok["model"]
    except (ValueError, KeyError, TypeError):
        raise InputError("--format gguf: tokenizer.json is not a tokenizers JSON file with a "
                         "model") from None
    pre = tok.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get(
            "use_regex", True):
        raise InputError(
            f"--format gguf: the tokenizer is {model.get('type')!r} with pre-tokenizer "
            f"{pre.get('type')!r}; this export writes byte-level BPE tokenizers (GPT-2 split) "
            "only: convert this model with llama.cpp's convert_hf_to_gguf.py from the --format "
            "hf export instead")
    n = int(config["vocab_size"])
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in tok.get("added_tokens") or []}
    by_id: dict[int, str] = {i: s for s, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if by_id and max(by_id) >= n:
        raise InputError(f"--format gguf: tokenizer.json has token id {max(by_id)} but the "
                         f"model's vocab_size is {n}")
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TOKEN_CONTROL if added[i].get("special") else TOKEN_USER)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    out: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                           "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                           "tokenizer.ggml.merges": merges}
    for key, cfg_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                         ("padding", "pad_token_id")):
        v = config.get(cfg_key)
        if isinstance(v, int) and 0 <= v < n:
            out[f"tokenizer.ggml.{key}_token_id"] = v
    tc = (extra or {}).get("tokenizer_config.json")
    if tc:
        try:
            add_bos = json.loads(tc).get("add_bos_token")
        except (ValueError, AttributeError):
            add_bos = None
        if isinstance(add_bos, bool):
            out["tokenizer.ggml.add_bos_token"] = add_bos
    return out
