"""SwitchTransformers family vs transformers (the oracle) on tiny random checkpoints.

Each checkpoint is written by transformers' own ``save_pretrained`` and read back with
``safetensors.torch.load_file`` into ``DictWeights`` (no dependency on the checkpoint reader).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from qmoe_ray.errors import CheckpointError  # noqa: E402
from qmoe_ray.models import DictWeights, get_family, run_forward, walk_layers  # noqa: E402
from qmoe_ray.models.switch import SwitchTransformers, relative_position_bucket  # noqa: E402

VOCAB = 128
B, S_ENC, S_DEC = 3, 16, 8


def _config(**over):
    kw = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_heads=4,
        num_experts=4,
        expert_capacity=64,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    kw.update(over)
    return transformers.SwitchTransformersConfig(**kw)


def _save(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **over) -> Path:
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(_config(**over)).eval()
    if over.get("router_bias"):
        with torch.no_grad():  # the default init leaves the bias at zero; make it matter
            for name, p in model.named_parameters():
                if name.endswith("router.classifier.bias"):
                    p.normal_(0, 1.0)
    model.to(dtype).save_pretrained(path)
    return path


class Tiny:
    """A saved checkpoint, transformers' model loaded from it, and our family + weights."""

    def __init__(self, path: Path):
        self.path = path
        self.hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32
        ).eval()
        self.config = json.loads((path / "config.json").read_text())
        self.family = get_family(self.config)
        self.tensors = load_file(str(path / "model.safetensors"))
        self.W = DictWeights(self.tensors)

    def hf_out(self, inputs, **kw):
        with torch.no_grad():
            return self.hf(**inputs, **kw)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    """Large expert capacity: no token is dropped."""
    return Tiny(_save(tmp_path_factory.mktemp("switch_big_cap")))


@pytest.fixture(scope="session")
def tiny_drop(tmp_path_factory) -> Tiny:
    """Expert capacity 2: some tokens of every sequence are dropped."""
    return Tiny(_save(tmp_path_factory.mktemp("switch_cap2"), expert_capacity=2))


def _inputs(seed: int = 0, pad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, S_ENC), generator=g)
    labels = torch.randint(2, VOCAB, (B, S_DEC), generator=g)
    enc_len = torch.tensor([S_ENC, S_ENC - 5, S_ENC - 9]) if pad else torch.full((B,), S_ENC)
    dec_len = torch.tensor([S_DEC, S_DEC - 3, S_DEC - 5]) if pad else torch.full((B,), S_DEC)
    mask = (torch.arange(S_ENC)[None] < enc_len[:, None]).long()
    dmask = (torch.arange(S_DEC)[None] < dec_len[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = labels.masked_fill(dmask == 0, -100)
    dec = SwitchTransformers(_config().to_dict()).shift_right(labels)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": dec,
        "decoder_attention_mask": dmask,
        "labels": labels,
    }


def _walk(family, W, inputs, experts_for=None):
    """``run_forward`` unrolled, recording the stream after every block and every routing."""
    after, routes = {}, {}

    def record(layer, states):
        (state,) = states
        for k, t in state.items():
            assert t.shape[0] == B, f"state[{k!r}] lost the batch-leading layout at {layer.name}"
        after[layer.name] = state["hidden"].clone()

    (state,) = walk_layers(
        family, W, [family.embed(W, inputs)], experts_for,
        on_route=lambda layer, _, x, idx, gate: routes.__setitem__(layer.name, (idx, gate)),
        after_layer=record,
    )
    return state, after, routes


# -- layout -----------------------------------------------------------------------------------
def test_layers_follow_transformers_sparse_rule():
    cfg = _config(
        num_layers=4, num_decoder_layers=6, num_sparse_encoder_layers=2, num_sparse_decoder_layers=3
    )
    hf = transformers.SwitchTransformersForConditionalGeneration(cfg)
    fam = SwitchTransformers(cfg.to_dict())
    layers = fam.layers()
    assert [L.name for L in layers] == [f"encoder.block.{i}" for i in range(4)] + [
        f"decoder.block.{i}" for i in range(6)
    ]
    assert [L.index for L in layers] == list(range(10))
    expect = [b.is_sparse for b in hf.encoder.block] + [b.is_sparse for b in hf.decoder.block]
    assert [L.moe for L in layers] == expect
    assert any(expect) and not all(expect)
    for L in layers:
        assert (L.num_experts, L.top_k) == ((4, 1) if L.moe else (0, 0))
    hf_names = set(hf.state_dict())
    for L in layers:
        if L.moe:
            assert fam.router_name(L) in hf_names
            for e in range(4):
                assert set(fam.expert_names(L, e).values()) <= hf_names


def test_get_family_and_dense_names(tiny):
    assert isinstance(tiny.family, SwitchTransformers)
    dense = tiny.family.dense_names(list(tiny.tensors))
    assert (
        "shared.weight" in dense and "encoder.block.1.layer.1.mlp.router.classifier.weight" in dense
    )
    assert not any(".experts." in n for n in dense)
    assert len(tiny.tensors) - len(dense) == 2 * 2 * 4  # 2 sparse blocks x 4 experts x (wi, wo)


# -- numerics vs transformers -----------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "tiny_drop"])
def test_logits_and_loss_match_transformers(which, request):
    m: Tiny = request.getfixturevalue(which)
    inputs = _inputs(seed=1)
    ref = m.hf_out(inputs)
    ours = run_forward(m.family, m.W, inputs)
    assert ours.dtype == torch.float32 and ours.shape == (B, S_DEC, VOCAB)
    torch.testing.assert_close(ours, ref.logits, atol=1e-4, rtol=1e-4)
    total, count = m.family.loss_terms(ours, inputs)
    assert count == B * S_DEC
    torch.testing.assert_close(total / count, ref.loss, atol=1e-5, rtol=1e-5)

    _, _, routes = _walk(m.family, m.W, inputs)
    dropped = sum(int((idx == -1).sum()) for idx, _ in routes.values())
    if which == "tiny_drop":
        assert dropped > 0
        for idx, _ in routes.values():  # never more than capacity tokens per expert per sequence
            for e in range(4):
                assert int((idx[..., 0] == e).sum(dim=1).max()) <= 2
    else:
        assert dropped == 0


def test_per_block_hidden_states_match(tiny_drop):
    m = tiny_drop
    inputs = _inputs(seed=2)
    hf_blocks = {}
    hooks = []
    for stack in ("encoder", "decoder"):
        for i, blk in enumerate(getattr(m.hf, stack).block):

            def hook(mod, args, out, key=f"{stack}.block.{i}"):
                hf_blocks[key] = out[0].detach().clone()

            hooks.append(blk.register_forward_hook(hook))
    try:
        ref = m.hf_out(inputs, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    state, after, _ = _walk(m.family, m.W, inputs)
    assert set(after) == set(hf_blocks)
    for name, h in after.items():
        torch.testing.assert_close(h, hf_blocks[name], atol=1e-5, rtol=1e-5, msg=name)
    # output_hidden_states: entry i is block i's input; the last one is the final-normed stream.
    torch.testing.assert_close(after["encoder.block.0"], ref.encoder_hidden_states[1])
    torch.testing.assert_close(state["encoder_output"], ref.encoder_last_hidden_state)
    torch.testing.assert_close(after["decoder.block.0"], ref.decoder_hidden_states[1])


def test_padding_masks(tiny_drop):
    m = tiny_drop
    inputs = _inputs(seed=3, pad=True)
    ref = m.hf_out(inputs)
    ours = run_forward(m.family, m.W, inputs)
    real = inputs["decoder_attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref.logits[real], atol=1e-4, rtol=1e-4)
    total, count = m.family.loss_terms(ours, inputs)
    assert count == int(real.sum())
    torch.testing.assert_close(total / count, ref.loss, atol=1e-5, rtol=1e-5)
    # Padding must matter: the same ids without masks give other logits on real positions.
    unmasked = {k: v for k, v in inputs.items() if "mask" not in k}
    assert not torch.allclose(run_forward(m.family, m.W, unmasked)[real], ours[real], atol=1e-3)

    state = m.family.embed(m.W, inputs)
    enc, dec = m.family.layers()[1], m.family.layers()[3]
    assert torch.equal(m.family.token_mask(enc, state), inputs["attention_mask"].bool())
    assert torch.equal(m.family.token_mask(dec, state), real)


def test_bf16_saved_checkpoint(tmp_path):
    m = Tiny(_save(tmp_path / "bf16", dtype=torch.bfloat16, seed=5, expert_capacity=3))
    assert all(t.dtype == torch.bfloat16 for t in m.tensors.values())
    inputs = _inputs(seed=4)
    ref = m.hf_out(inputs)  # transformers upcasts the bf16 weights to float32, as DictWeights does
    ours = run_forward(m.family, m.W, inputs)
    torch.testing.assert_close(ours, ref.logits, atol=1e-4, rtol=1e-4)


def test_gelu_untied_router_bias_variant(tmp_path):
    m = Tiny(
        _save(
            tmp_path / "var",
            seed=6,
            dense_act_fn="gelu_new",
            tie_word_embeddings=False,
            router_bias=True,
            num_layers=3,
            num_sparse_encoder_layers=3,
        )
    )
    assert "lm_head.weight" in m.tensors
    assert any(n.endswith("router.classifier.bias") for n in m.tensors)
    assert m.family.expert_spec.hidden.act == "gelu_new"
    assert [L.moe for L in m.family.layers()[:3]] == [True, True, True]  # sparse step 1
    inputs = _inputs(seed=5)
    ref = m.hf_out(inputs)
    ours = run_forward(m.family, m.W, inputs)
    torch.testing.assert_close(ours, ref.logits, atol=1e-4, rtol=1e-4)


def test_decoder_consumes_compressed_encoder(tiny):
    """Experts swapped through ``experts_for`` (as a compressed checkpoint would) in the encoder
    only: the decoder's output must follow, exactly as transformers with those weights."""
    m = tiny
    inputs = _inputs(seed=6)
    fam, W = m.family, m.W
    enc_moe = next(L for L in fam.layers() if L.moe and L.stage == "encoder")
    g = torch.Generator().manual_seed(0)
    new = {
        e: {
            r: t[0] + 0.3 * torch.randn(t[0].shape, generator=g)
            for r, t in fam.read_experts(enc_moe, W, [e]).items()
        }
        for e in range(4)
    }

    def experts_for(layer):
        if layer.name == enc_moe.name:
            return new.__getitem__
        return lambda e, L=layer: {r: t[0] for r, t in fam.read_experts(L, W, [e]).items()}

    ours = run_forward(fam, W, inputs, experts_for=experts_for)
    assert not torch.allclose(ours, run_forward(fam, W, inputs), atol=1e-3)
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        m.path, dtype=torch.float32
    ).eval()
    experts = hf.encoder.block[enc_moe.block].layer[1].mlp.experts
    with torch.no_grad():
        for e in range(4):
            for r in ("wi", "wo"):
                getattr(experts[f"expert_{e}"], r).weight.copy_(new[e][r])
        ref = hf(**inputs).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# -- pieces -----------------------------------------------------------------------------------
def test_route_capacity_per_sequence(tiny):
    fam = SwitchTransformers({**tiny.config, "expert_capacity": 3})
    layer = next(L for L in fam.layers() if L.moe)
    w = torch.zeros(4, 32)
    w[2, 0] = 5.0
    W = DictWeights({fam.router_name(layer): w})
    x = torch.zeros(2, 7, 32)
    x[..., 0] = 1.0  # every token prefers expert 2
    x[1, 1, 0] = -1.0  # ... except one token of sequence 1
    idx, gate = fam.route(layer, W, x, {})
    assert idx.shape == (2, 7, 1) and idx.dtype == torch.int64 and gate.dtype == torch.float32
    assert idx[0, :, 0].tolist() == [2, 2, 2, -1, -1, -1, -1]
    assert idx[1, :, 0].tolist()[:5] == [2, 0, 2, 2, -1]  # priority counts per expert
    p = torch.softmax(torch.tensor([0.0, 0.0, 5.0, 0.0]), 0)
    torch.testing.assert_close(gate[0, 0, 0], p.max())


def test_hessian_mask_drops_sentinels_and_padding():
    fam = SwitchTransformers(_config(vocab_size=32128).to_dict())
    assert fam.first_sentinel_id == 32000
    ids = torch.tensor([[5, 32000, 32099, 7, 0], [11, 12, 1, 31999, 0]])
    dec = torch.tensor([[0, 32001, 9], [0, 8, 0]])
    state = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]).bool(),
        "decoder_input_ids": dec,
        "decoder_attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]).bool(),
    }
    enc, dec_layer = fam.layers()[1], fam.layers()[3]
    assert fam.hessian_mask(enc, state).tolist() == [
        [True, False, False, True, False],
        [True, True, True, True, False],
    ]
    assert fam.hessian_mask(dec_layer, state).tolist() == [
        [False, False, True],
        [False, True, False],
    ]
    small = SwitchTransformers(_config().to_dict())
    assert small.first_sentinel_id == VOCAB - 100
    custom = SwitchTransformers(_config().to_dict(), first_sentinel_id=120)
    assert custom.first_sentinel_id == 120


def test_relative_position_bucket_matches_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersAttention,
    )

    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for bidi in (True, False):
        for nb, md in ((8, 16), (32, 128)):
            ref = SwitchTransformersAttention._relative_position_bucket(rel, bidi, nb, md)
            assert torch.equal(relative_position_bucket(rel, bidi, nb, md), ref)


def test_fused_expert_layout(tiny):
    fam = tiny.family
    layer = next(L for L in fam.layers() if L.moe and L.stage == "decoder")
    per = fam.read_experts(layer, tiny.W, [3, 1])
    assert per["wi"].shape == (2, 64, 32) and per["wo"].shape == (2, 32, 64)
    torch.testing.assert_close(per["wi"][0], tiny.tensors[fam.expert_names(layer, 3)["wi"]])
    fused = {n: t for n, t in tiny.tensors.items() if n not in fam.source_expert_names(layer)}
    for r in ("wi", "wo"):
        stacked = torch.stack([tiny.tensors[fam.expert_names(layer, e)[r]] for e in range(4)])
        fused[f"decoder.block.1.layer.2.mlp.experts.{r}"] = stacked
    got = fam.read_experts(layer, DictWeights(fused), [3, 1])
    for r in ("wi", "wo"):
        torch.testing.assert_close(got[r], per[r])
    assert fam.source_expert_names(layer, available=list(fused)) == [
        "decoder.block.1.layer.2.mlp.experts.wi",
        "decoder.block.1.layer.2.mlp.experts.wo",
    ]
    torch.testing.assert_close(
        run_forward(fam, DictWeights(fused), _inputs(seed=7)),
        run_forward(fam, tiny.W, _inputs(seed=7)),
    )


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["num_experts", "expert_capacity", "d_model"])
def test_config_without_required_field(tiny, field):
    cfg = {k: v for k, v in tiny.config.items() if k != field}
    with pytest.raises(ValueError, match=field):
        get_family(cfg)


def test_sparse_step_resolution_and_bad_fields(tiny):
    # A saved step wins over a disagreeing num_sparse_* count, as in transformers.
    cfg = {**tiny.config, "num_layers": 4, "num_decoder_layers": 4, "encoder_sparse_step": 1}
    hf = transformers.SwitchTransformersForConditionalGeneration(
        transformers.SwitchTransformersConfig.from_dict(cfg)
    )
    expect = [b.is_sparse for b in hf.encoder.block] + [b.is_sparse for b in hf.decoder.block]
    assert (
        [L.moe for L in SwitchTransformers(cfg).layers()]
        == expect
        == [True] * 4 + [False, True, False, True]
    )
    derived = {k: v for k, v in cfg.items() if not k.endswith("_sparse_step")}
    assert [L.moe for L in SwitchTransformers(derived).layers()][:4] == [False, True, False, False]
    bare = {k: v for k, v in derived.items() if k != "num_sparse_encoder_layers"}
    with pytest.raises(ValueError, match="encoder_sparse_step"):
        SwitchTransformers(bare)
    with pytest.raises(ValueError, match="dense_act_fn"):
        SwitchTransformers({**tiny.config, "dense_act_fn": "gated-gelu"})
    with pytest.raises(ValueError, match="positive integer"):
        SwitchTransformers({**tiny.config, "num_experts": 0})


def test_expert_layout_is_bound_from_names(tiny, tmp_path):
    """Per-expert as transformers writes it (5.x holds Switch experts per expert, so
    ``save_original_format=False`` writes the same names), fused, mixed, or refused."""
    fam = tiny.family
    with pytest.raises(RuntimeError, match="not bound"):
        _ = fam.expert_layout
    assert get_family(tiny.config, list(tiny.tensors)).expert_layout == "per-expert"
    model = transformers.SwitchTransformersForConditionalGeneration(_config()).eval()
    model.save_pretrained(tmp_path / "new", save_original_format=False)
    assert set(load_file(str(tmp_path / "new" / "model.safetensors"))) == set(tiny.tensors)
    moe = [L for L in fam.layers() if L.moe]
    per = {n for L in moe for e in range(fam.num_experts) for n in fam.expert_names(L, e).values()}
    fused = {n: t for n, t in tiny.tensors.items() if n not in per}
    for L in moe:
        for r, name in fam._fused_names(L).items():
            experts = range(fam.num_experts)
            fused[name] = torch.stack([tiny.tensors[fam.expert_names(L, e)[r]] for e in experts])
    assert get_family(tiny.config, fused).expert_layout == "fused"
    mixed = {n: t for n, t in fused.items() if not n.startswith("decoder.")}
    mixed.update({n: t for n, t in tiny.tensors.items() if n.startswith("decoder.")})
    assert get_family(tiny.config, mixed).expert_layout == "mixed"
    no_encoder_experts = {n: t for n, t in mixed.items() if not n.startswith("encoder.block.1.")}
    with pytest.raises(KeyError, match=r"no expert weights of encoder\.block\.1 found"):
        get_family(tiny.config, no_encoder_experts)


@pytest.mark.parametrize(
    "key,value,says",
    [
        ("num_layers", 10**9, "'num_layers' is 1000000000: expected an integer in 1..1024"),
        ("d_model", -8, "'d_model' must be a positive integer, got -8"),
        ("d_model", 32.5, "'d_model' must be a positive integer, got 32.5"),
        ("num_experts", 10**9, "'num_experts' is 1000000000: expected an integer in 1..16384"),
        ("num_decoder_layers", 1.5, "'num_decoder_layers' is 1.5, not an integer"),
        ("vocab_size", 2**23, "'vocab_size' is 8388608: expected an integer in 1..4194304"),
        ("encoder_sparse_step", "2", "'encoder_sparse_step' is '2', not an integer"),
        ("layer_norm_epsilon", float("inf"), "'layer_norm_epsilon' is inf, not a finite"),
    ],
)
def test_absurd_config_sizes_are_refused_naming_the_key(tiny, key, value, says):
    with pytest.raises(CheckpointError) as ei:
        get_family({**tiny.config, key: value})
    assert says in str(ei.value)


def test_total_routed_experts_are_bounded(tiny):
    cfg = {**tiny.config, "num_experts": 16384, "num_layers": 512, "num_decoder_layers": 512,
           "encoder_sparse_step": 1, "decoder_sparse_step": 1}
    with pytest.raises(CheckpointError, match="routed experts, above qmoe-ray's bound"):
        get_family(cfg)
    c2048 = {**tiny.config, "num_experts": 2048, "num_layers": 15, "num_decoder_layers": 15,
             "encoder_sparse_step": 1, "decoder_sparse_step": 1}
    assert sum(L.moe for L in get_family(c2048).layers()) == 30  # switch-c-2048's shape


def test_shape_disagreeing_with_config(tiny):
    fam = SwitchTransformers({**tiny.config, "d_ff": 48})
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.1\.mlp\.wi\.weight.*d_ff=48"):
        run_forward(fam, tiny.W, _inputs())
    moe = next(L for L in fam.layers() if L.moe)
    with pytest.raises(ValueError, match=r"expert_0\.wi\.weight.*\(64, 32\).*config\.json"):
        fam.read_experts(moe, tiny.W, [0])
    fam_v = SwitchTransformers({**tiny.config, "vocab_size": 100})
    with pytest.raises(ValueError, match="shared.weight"):
        fam_v.embed(
            tiny.W,
            {
                "input_ids": torch.zeros(1, 3, dtype=torch.long),
                "decoder_input_ids": torch.zeros(1, 2, dtype=torch.long),
            },
        )


def test_bad_inputs(tiny):
    fam, W = tiny.family, tiny.W
    ids = torch.randint(2, VOCAB, (2, 5))
    with pytest.raises(KeyError, match="decoder_input_ids"):
        fam.embed(W, {"input_ids": ids})
    with pytest.raises(KeyError, match="input_ids"):
        fam.embed(W, {"decoder_input_ids": ids})
    with pytest.raises(ValueError, match="outside"):
        fam.embed(W, {"input_ids": ids + VOCAB, "decoder_input_ids": ids})
    with pytest.raises(ValueError, match="attention_mask"):
        fam.embed(
            W, {"input_ids": ids, "decoder_input_ids": ids, "attention_mask": torch.ones(2, 4)}
        )
    with pytest.raises(ValueError, match="expert 4 out of range"):
        fam.read_experts(fam.layers()[1], W, [4])
    with pytest.raises(ValueError, match="dense block"):
        fam.router_name(fam.layers()[0])
    with pytest.raises(KeyError, match="labels"):
        fam.loss_terms(torch.zeros(2, 5, VOCAB), {"input_ids": ids})


def test_labels_only_inputs_shift_right(tiny):
    inputs = _inputs(seed=8)
    only_labels = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    ref = tiny.hf_out({"input_ids": inputs["input_ids"], "labels": inputs["labels"]})
    torch.testing.assert_close(
        run_forward(tiny.family, tiny.W, only_labels), ref.logits, atol=1e-4, rtol=1e-4
    )


# -- the weights check (expected_shapes / check_weights), read from the index ----------------------
class _Reads(DictWeights):
    """A ``DictWeights`` recording every tensor the forward fetches."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.read: set[str] = set()

    def __call__(self, name):
        self.read.add(name)
        return super().__call__(name)


def _fused(fam, tensors):
    out = dict(tensors)
    for L in (L for L in fam.layers() if L.moe):
        for r, name in fam._fused_names(L).items():
            out[name] = torch.stack([out.pop(fam.expert_names(L, e)[r])
                                     for e in range(fam.num_experts)])
    return out


@pytest.mark.parametrize("variant", ["tied", "untied-bias-gelu", "fused"])
def test_expected_shapes_are_what_the_forward_reads(variant, tiny, tmp_path):
    """``expected_shapes`` lists exactly the tensors the forward reads, with their shapes, for
    tied and untied embeddings, router biases and the fused expert layout; ``check_weights``
    accepts the checkpoint from its index."""
    if variant == "untied-bias-gelu":
        m = Tiny(_save(tmp_path / "var", seed=6, dense_act_fn="gelu_new",
                       tie_word_embeddings=False, router_bias=True))
        tensors, config = m.tensors, m.config
    else:
        tensors, config = tiny.tensors, tiny.config
    if variant == "fused":
        tensors = _fused(get_family(config), tensors)
    fam = get_family(config, list(tensors))
    W = _Reads(tensors)
    run_forward(fam, W, _inputs(seed=2))
    want = fam.expected_shapes()
    assert set(want) == W.read
    assert all(tuple(tensors[n].shape) == s for n, s in want.items())
    fam.check_weights(list(tensors), lambda n: tuple(tensors[n].shape))


def test_check_weights_names_a_missing_or_misshaped_tensor(tiny):
    names, shape = list(tiny.tensors), lambda n: tuple(tiny.tensors[n].shape)
    fam = get_family(tiny.config)
    gone = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    with pytest.raises(KeyError, match=re.escape(repr(gone)) + ".*not in the checkpoint"):
        fam.check_weights([n for n in names if n != gone], shape)
    router = fam.router_name(next(L for L in fam.layers() if L.moe))
    with pytest.raises(KeyError, match=re.escape(repr(router))):
        fam.check_weights([n for n in names if n != router], shape)
    wide = get_family({**tiny.config, "d_ff": 48})
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.1\.mlp\.wi\.weight' has shape "
                                         r"\[64, 32\] but config.json implies \[48, 32\].*d_ff=48"):
        wide.check_weights(names, shape)
    with pytest.raises(ValueError, match="'decoder.final_layer_norm.weight' has shape"):
        fam.check_weights(names, lambda n: (33,) if n == "decoder.final_layer_norm.weight"
                          else shape(n))


@pytest.mark.parametrize("fault", ["missing", "misshaped"])
def test_compress_refuses_an_incomplete_switch_source(fault, tiny, tmp_path, capsys):
    """The job checks a Switch source's index before any work: one line naming the tensor,
    exit 2, nothing written."""
    from safetensors.torch import save_file

    from qmoe_ray.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny.config))
    name = "encoder.block.1.layer.0.SelfAttention.o.weight"
    tensors = dict(tiny.tensors)
    if fault == "missing":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(32, 16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    rc = main(["compress", "--source", str(src), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"tensor {name!r}" in err and "Traceback" not in err
    assert ("not in the checkpoint" if fault == "missing" else "[32, 16]") in err
    assert not out.exists()
