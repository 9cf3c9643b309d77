"""Trimming (docs/TRIM.md): the scores of ``qmoe-ray analyze`` rank what they should on the
embedded Mixtral and Switch, the trimmed forward equals transformers with the same parts
removed, and bad plans are refused naming what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qmoe_ray.data import embedded_model_path, embedded_switch_path
from qmoe_ray.errors import InputError
from qmoe_ray.models import get_family
from qmoe_ray.models.trim import TrimmedFamily
from qmoe_ray.models.trim_plan import TrimPlan, model_identity, plan_from_scores
from qmoe_ray.read.analyze import analyze, read_plan
from qmoe_ray.read.evaluate import evaluate
from qmoe_ray.storage.checkpoint import open_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HELDOUT = 64  # held-out samples of the embedded Mixtral (128 x 128 tokens in all)


@pytest.fixture(scope="module")
def mixtral():
    """The embedded Mixtral's family, its scores on calibration data and its untrimmed loss."""
    ckpt = open_checkpoint(str(embedded_model_path()))
    fam = get_family(ckpt.config, ckpt.names)
    plan = analyze("embedded", num_samples=128, batch_size=32)
    base = evaluate(num_samples=HELDOUT, batch_size=32)["loss"]
    return fam, plan.scores, base


def _loss(fam, drop_blocks=(), drop_layers=(), keep=None, model="embedded"):
    plan = TrimPlan(model_identity(fam), tuple(drop_blocks), tuple(drop_layers), keep or {})
    return evaluate(model, num_samples=HELDOUT, batch_size=32, trim_plan=plan)["loss"]


def _keep_without(fam, drop: dict[str, set[int]]):
    return {lay.name: tuple(e for e in range(lay.num_experts) if e not in drop[lay.name])
            for lay in fam.layers() if drop.get(lay.name)}


def test_expert_score_ranks_experts_within_each_layer(mixtral):
    """Per layer: dropping the least-routed expert costs less than dropping the most-routed."""
    fam, scores, base = mixtral
    for name, s in scores["experts"].items():
        lo, hi = int(np.argmin(s)), int(np.argmax(s))
        low = _loss(fam, keep=_keep_without(fam, {name: {lo}}))
        high = _loss(fam, keep=_keep_without(fam, {name: {hi}}))
        assert base <= low + 1e-3 and low < high, (name, base, low, high)


def test_global_expert_drop_beats_random_beats_top(mixtral):
    """8 of 32 experts: by score < random (mean of 4 seeds) < the 8 most-routed; the plan's
    global budget is the 8 least-routed across layers."""
    fam, scores, base = mixtral
    plan = plan_from_scores(fam, scores, drop_experts=8)
    ranked = sorted((s, n, e) for n, v in scores["experts"].items() for e, s in enumerate(v))
    assert sum(8 - len(k) for k in plan.keep_experts.values()) == 8
    assert {(n, e) for _, n, e in ranked[:8]} == {
        (n, e) for n, k in plan.keep_experts.items() for e in range(8) if e not in k}
    by_score = _loss(fam, keep=dict(plan.keep_experts))
    top: dict[str, set[int]] = {}
    for _, n, e in ranked[-8:]:
        top.setdefault(n, set()).add(e)
    worst = _loss(fam, keep=_keep_without(fam, top))
    all_ids = [(n, e) for n in scores["experts"] for e in range(8)]
    rand = []
    for seed in range(4):
        pick = np.random.default_rng(seed).permutation(len(all_ids))[:8]
        drop: dict[str, set[int]] = {}
        for i in pick:
            drop.setdefault(all_ids[i][0], set()).add(all_ids[i][1])
        if any(len(v) == 8 for v in drop.values()):
            continue
        rand.append(_loss(fam, keep=_keep_without(fam, drop)))
    print(f"\nheld-out loss: base {base:.4f}, E-8 by score {by_score:.4f}, random "
          f"{np.mean(rand):.4f} ({len(rand)} seeds), top {worst:.4f}")
    assert base < by_score < np.mean(rand) < worst


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_layer_score_ranks_layers_by_their_cost(mixtral):
    """The Layer Drop score (cos of the residual stream around the MoE) against the loss each
    layer's removal costs: rank correlation <= -0.8 (high score: cheap to drop)."""
    fam, scores, base = mixtral
    names = list(scores["layers"])
    cost = [_loss(fam, drop_layers=[n]) - base for n in names]
    rho = _spearman([scores["layers"][n] for n in names], cost)
    print(f"\nLayer Drop: scores {scores['layers']}, costs {cost}, spearman {rho:.3f}")
    assert rho <= -0.8


def test_block_score_two_most_similar_cost_less(mixtral):
    fam, scores, base = mixtral
    ranked = sorted(scores["blocks"], key=lambda n: scores["blocks"][n])
    most = _loss(fam, drop_blocks=ranked[-2:])
    least = _loss(fam, drop_blocks=ranked[:2])
    plan = plan_from_scores(fam, scores, drop_blocks=2)
    assert set(plan.drop_blocks) == set(ranked[-2:])
    print(f"\nBlock Drop 2: most similar {most:.4f}, least similar {least:.4f}")
    assert base < most < least


# -- the trimmed forward against transformers ---------------------------------------------------
transformers = pytest.importorskip("transformers")


def _mixtral_reference(plan: TrimPlan):
    """transformers' Mixtral with the plan's parts removed by hand: an MoE block rebuilt with
    fewer experts (router rows and expert slices kept), a zero MoE (Layer Drop), a deleted
    decoder layer (Block Drop)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    model = transformers.MixtralForCausalLM.from_pretrained(
        str(embedded_model_path()), dtype=torch.float32).eval()

    class Zero(torch.nn.Module):
        def forward(self, h):
            return torch.zeros_like(h)

    for i, layer in enumerate(model.model.layers):
        name = f"model.layers.{i}"
        if name in plan.drop_layers:
            layer.mlp = Zero()
        elif name in plan.keep_experts:
            keep = list(plan.keep_experts[name])
            cfg = transformers.MixtralConfig(**{
                **model.config.to_dict(), "num_local_experts": len(keep),
                "num_experts_per_tok": min(2, len(keep))})
            moe = MixtralSparseMoeBlock(cfg)
            moe.gate.weight.data = layer.mlp.gate.weight.data[keep].clone()
            moe.experts.gate_up_proj.data = layer.mlp.experts.gate_up_proj.data[keep].clone()
            moe.experts.down_proj.data = layer.mlp.experts.down_proj.data[keep].clone()
            layer.mlp = moe
    for i in sorted((int(n.rsplit(".", 1)[1]) for n in plan.drop_blocks), reverse=True):
        del model.model.layers[i]
    model.config.num_hidden_layers = len(model.model.layers)
    return model


def test_mixtral_trimmed_forward_equals_transformers():
    """Expert Drop (7 kept; 1 kept: top-2 becomes top-1), Layer Drop and Block Drop at once,
    then a uniform Expert Drop alone: our walk's logits equal transformers'."""
    from qmoe_ray.models import run_forward

    ckpt = open_checkpoint(str(embedded_model_path()))
    fam = get_family(ckpt.config, ckpt.names)
    ids = torch.from_numpy(np.load(embedded_model_path() / "heldout.npy")[:4, :64].astype(np.int64))
    plans = [
        TrimPlan(model_identity(fam), ("model.layers.2",), ("model.layers.1",),
                 {"model.layers.0": (0, 1, 2, 4, 5, 6, 7), "model.layers.3": (5,)}),
        TrimPlan(model_identity(fam), keep_experts={f"model.layers.{i}": (1, 3, 4, 6)
                                                    for i in range(4)}),
    ]
    for plan in plans:
        tf = TrimmedFamily(fam, plan)
        if "model.layers.3" in plan.keep_experts and len(plan.keep_experts["model.layers.3"]) == 1:
            lay3 = [lay for lay in tf.layers() if lay.name == "model.layers.3"][0]
            assert (lay3.num_experts, lay3.top_k) == (1, 1)
        assert [lay.name for lay in tf.layers()] == [
            f"model.layers.{i}" for i in range(4) if f"model.layers.{i}" not in plan.drop_blocks]
        with torch.no_grad():
            ours = run_forward(tf, ckpt, {"input_ids": ids})
            ref = _mixtral_reference(plan)(ids, use_cache=False).logits
            untrimmed = run_forward(fam, ckpt, {"input_ids": ids})
        assert (untrimmed - ref).abs().max() > 1e-2  # the trim changes the logits
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def _switch_reference(plan: TrimPlan, cfg_dict):
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        str(embedded_switch_path()), dtype=torch.float32).eval()

    class Zero(torch.nn.Module):
        def forward(self, h):
            return torch.zeros_like(h)

    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name)
        for i, block in enumerate(stack.block):
            name = f"{stack_name}.block.{i}"
            ff = block.layer[-1]
            if name in plan.drop_layers:
                ff.mlp = Zero()
            elif name in plan.keep_experts:
                keep = list(plan.keep_experts[name])
                cfg = transformers.SwitchTransformersConfig(**{**cfg_dict,
                                                               "num_experts": len(keep)})
                moe = SwitchTransformersSparseMLP(cfg)
                moe.router.classifier.weight.data = ff.mlp.router.classifier.weight.data[keep]
                for j, e in enumerate(keep):
                    moe.experts[f"expert_{j}"].load_state_dict(
                        ff.mlp.experts[f"expert_{e}"].state_dict())
                ff.mlp = moe.eval()
        drop = [int(n.rsplit(".", 1)[1]) for n in plan.drop_blocks if n.startswith(stack_name)]
        for i in sorted(drop, reverse=True):
            del stack.block[i]
    return model


def test_switch_scores_and_trimmed_forward():
    """Switch: each stack scored on its own stream, block 0 of a stack never droppable (no
    score, refused in a plan); the trimmed forward equals transformers with the same parts
    removed; a Block Drop plan from the scores lowers loss less than dropping the least
    similar blocks."""
    from qmoe_ray.data import load_samples
    from qmoe_ray.models import run_forward

    plan = analyze("embedded-switch", num_samples=32, batch_size=32, drop_blocks=2)
    s = plan.scores
    assert s["blocks"]["encoder.block.0"] is None and s["blocks"]["decoder.block.0"] is None
    assert {n.split(".")[0] for n in s["layers"]} == {"encoder", "decoder"}
    assert not {"encoder.block.0", "decoder.block.0"} & set(plan.drop_blocks)
    ckpt = open_checkpoint(str(embedded_switch_path()))
    fam = get_family(ckpt.config, ckpt.names)
    with pytest.raises(InputError, match="decoder.block.0.*may not be dropped"):
        TrimmedFamily(fam, TrimPlan(model_identity(fam), ("decoder.block.0",)))
    ranked = sorted((v, n) for n, v in s["blocks"].items() if v is not None)

    def loss(p):
        return evaluate("embedded-switch", num_samples=32, batch_size=32, trim_plan=p)["loss"]

    least = TrimPlan(model_identity(fam), tuple(n for _, n in ranked[:2]))
    assert loss(plan) < loss(least)

    mixed = TrimPlan(model_identity(fam), ("encoder.block.2",), ("decoder.block.1",),
                     {"encoder.block.1": (0, 2, 3, 5, 7), "decoder.block.3": (1, 4)})
    arrays = load_samples(str(embedded_switch_path() / "tokens.npy"), ckpt.config, 4, None,
                          split="heldout")
    b = {k: torch.from_numpy(v).long() for k, v in arrays.items()}
    with torch.no_grad():
        ours = run_forward(TrimmedFamily(fam, mixed), ckpt, b)
        ref = _switch_reference(mixed, ckpt.config)(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"],
            decoder_input_ids=b["decoder_input_ids"],
            decoder_attention_mask=b["decoder_attention_mask"], use_cache=False).logits
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


# -- the plan file and bad input ----------------------------------------------------------------
def test_cli_analyze_then_eval(tmp_path, capsys):
    from qmoe_ray.cli import main

    out = tmp_path / "plan.json"
    assert main(["analyze", "--output", str(out), "--samples", "16", "--drop-experts",
                 "1/layer", "--drop-layers", "1", "--quiet"]) == 0
    plan = read_plan(str(out))
    assert len(plan.drop_layers) == 1 and len(plan.keep_experts) == 3
    assert all(len(k) == 7 for k in plan.keep_experts.values())
    capsys.readouterr()
    assert main(["eval", "--samples", "8", "--trim-plan", str(out), "--json", "--quiet"]) == 0
    trimmed = json.loads(capsys.readouterr().out)["loss"]
    assert trimmed != pytest.approx(evaluate(num_samples=8)["loss"], abs=1e-4)
    text = out.read_text()
    assert '"drop_layers": ["model.layers.' in text  # lists on one line: hand-editable


def test_plan_for_another_model_is_refused(mixtral, tmp_path):
    fam, scores, _ = mixtral
    ident = model_identity(fam)
    other = {**ident, "experts": {**ident["experts"], "model.layers.2": 16}}
    with pytest.raises(InputError, match="16 experts in model.layers.2; this model has 8"):
        TrimmedFamily(fam, TrimPlan(other))
    with pytest.raises(InputError, match="blocks 6; this model has 4"):
        TrimmedFamily(fam, TrimPlan({**ident, "blocks": 6}))
    sw = open_checkpoint(str(embedded_switch_path()))
    sw_fam = get_family(sw.config, sw.names)
    (tmp_path / "p.json").write_text(TrimPlan(model_identity(sw_fam)).to_json())
    with pytest.raises(InputError, match="model_type 'switch_transformers'.*mixtral"):
        evaluate(num_samples=2, trim_plan=str(tmp_path / "p.json"))


def test_budgets_that_empty_a_layer_are_refused(mixtral):
    fam, scores, _ = mixtral
    with pytest.raises(InputError, match="8/layer drops every expert of model.layers.0"):
        plan_from_scores(fam, scores, drop_experts="8/layer")
    rare = {**scores, "experts": {**scores["experts"], "model.layers.1": [1e-3] * 8}}
    with pytest.raises(InputError, match="drops every expert of model.layers.1.*Layer Drop"):
        plan_from_scores(fam, rare, drop_experts=9)  # layer 1's 8 all among the 9 least
    with pytest.raises(InputError, match="keeps no expert.*drop_layers"):
        TrimPlan(model_identity(fam), keep_experts={"model.layers.1": ()})
    with pytest.raises(InputError, match="only 4 blocks"):
        plan_from_scores(fam, scores, drop_blocks=5)
    with pytest.raises(InputError, match="N/layer"):
        plan_from_scores(fam, scores, drop_experts="many")


def test_bad_plan_files(mixtral, tmp_path):
    fam, _, _ = mixtral
    good = TrimPlan(model_identity(fam), keep_experts={"model.layers.0": (1, 2)}).to_dict()
    cases = {
        "not json": "{", "no key": "{}",
        "version": json.dumps({**good, "qmoe_ray_trim_plan": 2}),
        "unknown": json.dumps({**good, "drop_experts": 3}),
        "bad id": json.dumps({**good, "keep_experts": {"model.layers.0": [8]}}),
        "both": json.dumps({**good, "drop_blocks": ["model.layers.1"],
                            "drop_layers": ["model.layers.1"]}),
        "no block": json.dumps({**good, "drop_blocks": ["model.layers.9"]}),
    }
    for what, text in cases.items():
        (tmp_path / "p.json").write_text(text)
        with pytest.raises(InputError) as e:
            TrimmedFamily(fam, read_plan(str(tmp_path / "p.json")))
        assert "trim plan" in str(e.value), (what, e.value)


def test_trim_over_an_untrimmed_experts_hook(mixtral):
    """A compressed checkpoint hands its experts by the untrimmed model's ids: a plan applied
    over such a hook gives the loss of the plan applied to the source."""
    from qmoe_ray.models import experts_from

    fam, _, _ = mixtral
    ckpt = open_checkpoint(str(embedded_model_path()))
    plan = TrimPlan(model_identity(fam), ("model.layers.2",), (),
                    {"model.layers.0": (0, 3, 7), "model.layers.3": (1, 2, 4, 5)})
    direct = evaluate(num_samples=8, trim_plan=plan)["loss"]
    hooked = evaluate(num_samples=8, weights=ckpt, config=ckpt.config, trim_plan=plan,
                      experts_for=experts_from(fam, ckpt))["loss"]
    assert hooked == pytest.approx(direct, abs=1e-6)
    assert direct != pytest.approx(evaluate(num_samples=8)["loss"], abs=1e-3)


def test_scores_of_a_trimmed_model(mixtral):
    """The scores run on a trimmed model too: its routing weights are over the kept experts
    (the softmax of their rows: each token's sum to 1), the dropped block is not scored."""
    from qmoe_ray.models.trim import trim_scores
    from qmoe_ray.read.evaluate import load_batches

    fam, _, _ = mixtral
    ckpt = open_checkpoint(str(embedded_model_path()))
    tf = TrimmedFamily(fam, TrimPlan(model_identity(fam), ("model.layers.2",), (),
                                     {"model.layers.0": (0, 3, 7)}))
    batches, _, _ = load_batches("embedded", ckpt.config, 8, None, 8, split="calib")
    s = trim_scores(tf, ckpt, [tf.embed(ckpt, b) for b in batches])
    assert list(s.blocks) == ["model.layers.0", "model.layers.1", "model.layers.3"]
    assert len(s.experts["model.layers.0"]) == 3 and len(s.experts["model.layers.1"]) == 8
    for v in s.experts.values():
        assert sum(v) == pytest.approx(1.0, abs=1e-5)
