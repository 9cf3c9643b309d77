"""Decoder-only MoE families against transformers (the oracle) on tiny random checkpoints.

Each family's tiny model is saved with transformers' own ``save_pretrained`` and read back through
``open_checkpoint``; our layer walk must reproduce transformers' per-block outputs, router choices,
logits and loss within fp32 tolerance, for both the per-expert and the fused (3-D) expert layouts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from fixtures_s3 import layer_outputs, save_tiny, tiny_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from qmoe_ray.errors import CheckpointError  # noqa: E402
from qmoe_ray.models import (  # noqa: E402
    SUPPORTED,
    DictWeights,
    get_family,
    run_forward,
    walk_layers,
)
from qmoe_ray.models.decoder_moe import DecoderMoE, Mixtral  # noqa: E402
from qmoe_ray.storage.checkpoint import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
ATOL = 1e-4


def _inputs(seed: int = 0, b: int = 3, s: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[1, 6:] = 0  # right padding
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


class Case:
    def __init__(self, model_type: str, folder: Path, **overrides):
        self.model_type = model_type
        self.model = tiny_model(model_type, seed=FAMILIES.index(model_type), **overrides)
        self.folder = save_tiny(self.model, folder)
        self.ckpt = open_checkpoint(str(self.folder))
        self.family = get_family(self.ckpt.config, self.ckpt)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp(request.param))


_reference = layer_outputs


def _walk(family, W, inputs):
    """Our walk, recording each block's output and each MoE layer's routing."""
    blocks, routes = [], {}

    def all_experts(layer):  # one read of the layer's experts
        ex = family.read_experts(layer, W, range(layer.num_experts))
        return lambda e: {r: t[e] for r, t in ex.items()}

    (state,) = walk_layers(
        family, W, [family.embed(W, inputs)], all_experts,
        on_route=lambda layer, _, x, idx, gate: routes.__setitem__(layer.block, (x, idx, gate)),
        after_layer=lambda layer, states: blocks.append(states[0]["hidden"]),
    )
    return family.logits(W, state), blocks, routes


# -- matches transformers -------------------------------------------------------------------------
def test_blocks_routes_and_logits_match_transformers(case):
    inputs = _inputs()
    ref_logits, ref_blocks = _reference(case.model, inputs)
    logits, blocks, routes = _walk(case.family, case.ckpt, inputs)
    assert len(blocks) == len(ref_blocks) == case.model.config.num_hidden_layers
    for i, (ours, ref) in enumerate(zip(blocks, ref_blocks, strict=True)):
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4, msg=f"block {i}")
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=1e-4)
    assert ref_logits.abs().max() > 1.0  # the tiny model is not trivially flat
    # router: same experts and weights as the transformers router on the same MoE input
    for block, (x, idx, gate) in routes.items():
        with torch.no_grad():
            _, w_ref, i_ref = case.model.model.layers[block].mlp.gate(x.reshape(-1, x.shape[-1]))
        i_ref, w_ref = i_ref.reshape(idx.shape), w_ref.reshape(gate.shape)
        assert torch.equal(idx.sort(-1).values, i_ref.sort(-1).values)
        torch.testing.assert_close(gate.sort(-1).values, w_ref.float().sort(-1).values)
    # the plain reference path gives the same logits
    torch.testing.assert_close(run_forward(case.family, case.ckpt, inputs), logits)


def test_loss_terms_match_transformers_loss(case):
    inputs = _inputs(seed=1)
    logits = run_forward(case.family, case.ckpt, inputs)
    total, count = case.family.loss_terms(logits, inputs)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = case.model(**inputs, labels=labels).loss
    assert count == int(inputs["attention_mask"][:, 1:].sum())
    torch.testing.assert_close(total / count, ref, atol=ATOL, rtol=1e-4)
    assert torch.equal(
        case.family.token_mask(case.family.layers()[0], case.family.embed(case.ckpt, inputs)),
        inputs["attention_mask"].bool(),
    )


def test_bf16_checkpoint(case, tmp_path):
    folder = save_tiny(case.model, tmp_path, dtype=torch.bfloat16)
    ck = open_checkpoint(str(folder))
    assert ck.dtype("model.embed_tokens.weight") == torch.bfloat16
    inputs = _inputs(seed=2)
    ours = run_forward(get_family(ck.config), ck, inputs)
    cls = type(case.model)
    up = cls.from_pretrained(folder, dtype=torch.float32).eval()  # the bf16 weights, run in fp32
    with torch.no_grad():
        torch.testing.assert_close(ours, up(**inputs).logits, atol=ATOL, rtol=1e-4)
        bf = cls.from_pretrained(folder, dtype=torch.bfloat16).eval()
        ref_bf16 = bf(**inputs).logits.float()
    # bf16 arithmetic in transformers flips a few routing decisions: compare in aggregate
    assert (ours - ref_bf16).norm() < 0.15 * ref_bf16.norm()


def _fuse(folder: Path, out: Path, family: DecoderMoE, rename_to_mlp: bool) -> Path:
    """Rewrite a per-expert checkpoint with 3-D ``experts.gate_up_proj`` / ``experts.down_proj``."""
    t = load_file(folder / "model.safetensors")
    out.mkdir()
    # the MoE module's name in the source's tensor names (Mixtral: block_sparse_moe, others: mlp)
    mod = "block_sparse_moe" if any(".block_sparse_moe." in n for n in t) else "mlp"
    roles = family.source_roles
    new = {}
    for layer in family.layers():
        if not layer.moe:
            continue
        p = f"{layer.name}.{mod}.experts"
        E = layer.num_experts
        g = [t.pop(f"{p}.{e}.{roles['gate']}.weight") for e in range(E)]
        u = [t.pop(f"{p}.{e}.{roles['up']}.weight") for e in range(E)]
        d = [t.pop(f"{p}.{e}.{roles['down']}.weight") for e in range(E)]
        new[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([a, b]) for a, b in zip(g, u, strict=True)]
        )
        new[f"{p}.down_proj"] = torch.stack(d)
    new.update(t)
    if rename_to_mlp:
        new = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in new.items()}
    save_file({k: v.contiguous() for k, v in new.items()}, out / "model.safetensors")
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


def test_fused_expert_layout(case, tmp_path):
    fused = open_checkpoint(str(_fuse(case.folder, tmp_path / "f", case.family, True)))
    fam = get_family(fused.config)
    fam.check_weights(fused.names, fused.shape)
    moe = next(lay for lay in fam.layers() if lay.moe)
    assert fam.source_expert_names(moe) == [
        f"{moe.name}.mlp.experts.gate_up_proj",
        f"{moe.name}.mlp.experts.down_proj",
    ]
    assert not any("experts" in n for n in fam.dense_names(fused.names))
    a = fam.read_experts(moe, fused, [4, 1])
    b = case.family.read_experts(moe, case.ckpt, [4, 1])
    assert set(a) == {"gate", "up", "down"}
    assert all(torch.equal(a[r], b[r]) for r in a)
    inputs = _inputs(seed=3)
    torch.testing.assert_close(
        run_forward(fam, fused, inputs), run_forward(case.family, case.ckpt, inputs)
    )


def test_canonical_expert_names_reload(case):
    """A decompressed output: experts under ``expert_names``, everything else as in the source.
    The same family object serves the source and then the output (layout re-detected)."""
    fam, ck = case.family, case.ckpt
    out = {n: ck(n) for n in fam.dense_names(ck.names)}
    for layer in fam.layers():
        if layer.moe:
            w = fam.read_experts(layer, ck, range(layer.num_experts))
            for e in range(layer.num_experts):
                out.update({n: w[r][e] for r, n in fam.expert_names(layer, e).items()})
    inputs = _inputs(seed=7)
    want = run_forward(fam, ck, inputs)
    got = run_forward(fam, DictWeights(out), inputs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(run_forward(fam, ck, inputs), want)  # and back to the source


def test_names_and_layers(case):
    fam, ck = case.family, case.ckpt
    cfg = case.model.config
    assert [lay.moe for lay in fam.layers()] == [
        type(m.mlp).__name__.endswith("SparseMoeBlock") for m in case.model.model.layers
    ]
    moe = next(lay for lay in fam.layers() if lay.moe)
    assert fam.router_name(moe) in ck and moe.top_k == cfg.num_experts_per_tok
    expert_src = set(fam.source_expert_names(moe))
    assert expert_src <= set(ck.names) and len(expert_src) == 3 * moe.num_experts
    dense = fam.dense_names(ck.names)
    assert not set(dense) & expert_src and fam.router_name(moe) in dense
    names = fam.expert_names(moe, 2)
    assert names == {r: f"{moe.name}.mlp.experts.2.{r}_proj.weight" for r in ("gate", "up", "down")}
    w = fam.read_experts(moe, ck, [2])
    assert w["gate"].shape == (1, fam.spec.moe_ff, cfg.hidden_size)
    assert w["down"].shape == (1, cfg.hidden_size, fam.spec.moe_ff)


# -- per-family details ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("mixtral", {"sliding_window": 3}),
        ("olmoe", {"tie_word_embeddings": True, "norm_topk_prob": True}),
        ("qwen2_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [], "qkv_bias": False}),
    ],
)
def test_variants_match_transformers(model_type, overrides, tmp_path):
    c = Case(model_type, tmp_path, **overrides)
    inputs = _inputs(seed=4)
    ref, _ = _reference(c.model, inputs)
    real = inputs["attention_mask"].bool()  # a window can leave a padded query no key at all
    out = run_forward(c.family, c.ckpt, inputs)
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=1e-4)
    assert torch.isfinite(out).all()
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in c.ckpt


def test_router_renormalisation_is_observable(tmp_path):
    """Guard against a vacuous oracle: flipping the top-k renormalisation changes the logits."""
    c = Case("qwen3_moe", tmp_path)
    inputs = _inputs(seed=5)
    flipped = get_family({**c.ckpt.config, "norm_topk_prob": not c.family.spec.norm_topk})
    diff = run_forward(flipped, c.ckpt, inputs) - run_forward(c.family, c.ckpt, inputs)
    assert diff.abs().max() > 1e-2
    assert Mixtral({**c.ckpt.config, "num_local_experts": 4, "intermediate_size": 8}).spec.norm_topk


# -- bad input ------------------------------------------------------------------------------------
def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError) as ei:
        get_family({"model_type": "llama"})
    assert all(t in str(ei.value) for t in SUPPORTED)


@pytest.mark.parametrize("missing", ["num_experts_per_tok", "num_local_experts", "hidden_size"])
def test_config_without_expert_fields(case, missing):
    cfg = dict(case.ckpt.config)
    for k in (missing, "num_experts") if missing == "num_local_experts" else (missing,):
        cfg.pop(k, None)
    with pytest.raises(ValueError, match=missing):
        get_family(cfg)


def test_shape_disagrees_with_config(case):
    key = (
        "moe_intermediate_size"
        if "moe_intermediate_size" in case.ckpt.config
        else ("intermediate_size")
    )
    cfg = {**case.ckpt.config, key: case.ckpt.config[key] + 8}
    fam = get_family(cfg)
    with pytest.raises(ValueError, match=r"experts\.0\..*config.json implies"):
        fam.check_weights(case.ckpt.names, case.ckpt.shape)
    moe = next(lay for lay in fam.layers() if lay.moe)
    with pytest.raises(ValueError, match="config.json implies"):
        fam.read_experts(moe, case.ckpt, [0])
    more = get_family({**case.ckpt.config, "num_hidden_layers": 5})
    with pytest.raises(KeyError, match="model.layers.3"):
        more.check_weights(case.ckpt.names, case.ckpt.shape)


def test_bad_config_values_and_inputs(case):
    cfg = case.ckpt.config
    with pytest.raises(ValueError, match="rope"):
        get_family({**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="hidden_act"):
        get_family({**cfg, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        get_family({**cfg, "num_experts_per_tok": 99})
    with pytest.raises(ValueError, match="input_ids outside"):
        case.family.embed(case.ckpt, {"input_ids": torch.tensor([[1, 500]])})
    with pytest.raises(KeyError, match="input_ids"):
        case.family.embed(case.ckpt, {"ids": torch.tensor([[1]])})
    with pytest.raises(ValueError, match="do not exist"):
        case.family.read_experts(case.family.layers()[0], case.ckpt, [99])


@pytest.mark.parametrize(
    "key,value,says",
    [
        ("num_hidden_layers", 10**9, "'num_hidden_layers' is 1000000000: expected an integer in "
                                     "1..1024"),
        ("hidden_size", -32, "'hidden_size' is -32: expected an integer in 1..65536"),
        ("hidden_size", 32.5, "'hidden_size' is 32.5, not an integer"),
        ("hidden_size", 32.0, "'hidden_size' is 32.0, not an integer"),
        ("hidden_size", "32", "'hidden_size' is '32', not an integer"),
        ("vocab_size", True, "'vocab_size' is True, not an integer"),
        ("vocab_size", 2**40, "'vocab_size' is 1099511627776: expected an integer in 1..4194304"),
        ("num_key_value_heads", 10**6, "'num_key_value_heads' is 1000000"),
        ("head_dim", [64], "'head_dim' is [64], not an integer"),
        ("rms_norm_eps", float("nan"), "'rms_norm_eps' is nan, not a finite positive number"),
        ("rope_theta", -1.0, "'rope_theta' is -1.0, not a finite positive number"),
    ],
)
def test_absurd_config_sizes_are_refused_naming_the_key(case, key, value, says):
    """Sizes are bounded when the family parses the config (source or manifest), before any
    list of layers or tensor names is built."""
    cfg = {**case.ckpt.config, key: value}
    if key == "rope_theta":
        cfg.pop("rope_parameters", None)
    with pytest.raises(CheckpointError, match=re.escape(says)):
        get_family(cfg)


def test_absurd_expert_counts_are_refused(case):
    key = next(k for k in ("num_local_experts", "num_experts") if k in case.ckpt.config)
    with pytest.raises(CheckpointError, match=rf"'{key}' is 1000000000: .*1\.\.16384"):
        get_family({**case.ckpt.config, key: 10**9})
    # within the per-layer bound, but 1000 layers x 16384 experts is not a model
    huge = {**case.ckpt.config, key: 16384, "num_hidden_layers": 1000, "mlp_only_layers": []}
    with pytest.raises(CheckpointError, match=r"routed experts, above qmoe-ray's bound of 262144"):
        get_family(huge)
    big_but_real = {**case.ckpt.config, key: 256, "num_experts_per_tok": 8,
                    "num_hidden_layers": 61, "mlp_only_layers": []}
    assert sum(lay.moe for lay in get_family(big_but_real).layers()) >= 30  # DeepSeek-V3 sized


def test_legacy_config_keys(case):
    """Older hub configs: top-level rope_theta, no rope_parameters, no qkv_bias / layer_types."""
    cfg = {k: v for k, v in case.ckpt.config.items() if k not in ("rope_parameters", "layer_types")}
    theta = case.ckpt.config["rope_parameters"]["rope_theta"]
    fam = get_family({**cfg, "rope_theta": theta})
    assert fam.spec.rope_theta == theta
    inputs = _inputs(seed=6, s=5)
    torch.testing.assert_close(
        run_forward(fam, case.ckpt, inputs), run_forward(case.family, case.ckpt, inputs)
    )
    assert json.loads((case.folder / "config.json").read_text())["model_type"] == case.model_type


def test_hessian_mask_drops_pad_bos_eos(case):
    cfg = case.family.config
    special = {cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    assert special, "tiny configs carry bos/eos ids"
    inputs = _inputs(seed=2)
    ids = inputs["input_ids"].clone()
    ids[:, 0] = min(special)  # a BOS-like token at the start of every row
    ids[0, 4] = max(special)
    inputs["input_ids"] = ids
    layer = case.family.layers()[0]
    state = case.family.embed(case.ckpt, inputs)
    expect = inputs["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(special)))
    assert torch.equal(case.family.hessian_mask(layer, state), expect)
    assert not expect[:, 0].any() and expect.any()
