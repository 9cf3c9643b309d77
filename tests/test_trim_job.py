"""Trimmed compression (docs/TRIM.md, "Compressing a trimmed model"): ``compress --trim-plan``
and the budget flags through the real Ray job, the version-2 manifest and its readers (load,
eval, inspect, export), the HF export of Block Drop / uniform Expert Drop read back by
transformers, and the refusals (inexpressible exports, another plan on resume, bad plans)."""

from __future__ import annotations

import json

import numpy as np
import plain_reader
import pytest
import torch

from qmoe_ray.data import embedded_model_path
from qmoe_ray.errors import CheckpointError, InputError
from qmoe_ray.job.config import CompressConfig
from qmoe_ray.models import get_family
from qmoe_ray.models.trim import TrimmedFamily
from qmoe_ray.models.trim_plan import TrimPlan, model_identity
from qmoe_ray.storage.checkpoint import open_checkpoint

pytestmark = pytest.mark.usefixtures("module_ray")  # every job here runs in-process

_SMALL = dict(num_samples=32, seq_len=32, eval_samples=8, batch_size=16, group_size=8)
UNIFORM = {f"model.layers.{i}": (0, 1, 3, 4, 6, 7) for i in (0, 1, 3)}  # 6 of 8, top-2


@pytest.fixture(scope="module")
def fam():
    ckpt = open_checkpoint(str(embedded_model_path()))
    return get_family(ckpt.config, ckpt.names)


def _ids() -> torch.Tensor:
    return torch.from_numpy(np.load(embedded_model_path() / "heldout.npy")[:3, :48]
                            .astype(np.int64))


def _compress(tmp, plan: TrimPlan | None, **kw):
    from qmoe_ray.job.driver import run_compression

    opts = dict(_SMALL, **kw)
    if plan is not None:
        (tmp / "plan.json").write_text(plan.to_json())
        opts["trim_plan"] = str(tmp / "plan.json")
    out = tmp / "ckpt"
    return out, run_compression(CompressConfig(output=str(out), **opts), progress=False)


@pytest.fixture(scope="module")
def block_uniform(fam, tmp_path_factory):
    """Block Drop of layer 2 and 6 of 8 experts kept in the others, int4 GPTQ."""
    plan = TrimPlan(model_identity(fam), ("model.layers.2",), (), UNIFORM)
    out, rep = _compress(tmp_path_factory.mktemp("bu"), plan, scheme="int4")
    return plan, out, rep


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Through the CLI with budgets: Layer Drop of 1 MoE layer and the 6 least-routed experts
    of the others (per-layer counts differ), ternary; the job runs the analysis itself."""
    from qmoe_ray.cli import main

    out = tmp_path_factory.mktemp("mx") / "ckpt"
    args = ["compress", "--output", str(out), "--drop-layers", "1", "--drop-experts", "6",
            "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in _SMALL.items()]
    assert main(args) == 0
    m = plain_reader.load_manifest(out)
    rep = json.loads((out / "report.json").read_text())
    return TrimPlan.from_dict(m["trim"]["plan"]), out, rep


def _reference(plan: TrimPlan, loaded) -> torch.nn.Module:
    """transformers' Mixtral holding the checkpoint's weights (dense as stored, the kept
    experts decoded, at their original ids), with the plan's parts removed by hand."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    model = transformers.MixtralForCausalLM.from_pretrained(
        str(embedded_model_path()), dtype=torch.float32).eval()
    sd = model.state_dict()
    for name in sd:  # dense weights as the checkpoint stores them
        if name in loaded.dense:
            sd[name].copy_(loaded.dense[name].float())
    tf = loaded.family
    for lay in tf.layers():
        if not lay.moe:
            continue
        mlp = model.model.layers[lay.index].mlp
        for e, orig in enumerate(tf.original_ids(lay, range(lay.num_experts))):
            w = {r: loaded.experts[n].float() for r, n in tf.expert_names(lay, e).items()}
            mlp.experts.gate_up_proj.data[orig] = torch.cat([w["gate"], w["up"]])
            mlp.experts.down_proj.data[orig] = w["down"]

    class Zero(torch.nn.Module):
        def forward(self, h):
            return torch.zeros_like(h)

    for i, layer in enumerate(model.model.layers):
        name = f"model.layers.{i}"
        if name in plan.drop_layers:
            layer.mlp = Zero()
        elif name in plan.keep_experts:
            keep = list(plan.keep_experts[name])
            cfg = transformers.MixtralConfig(**{**model.config.to_dict(),
                                                "num_local_experts": len(keep),
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


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("which", ["block_uniform", "mixed"])
def test_compress_trim_plan_load_equals_torch_reference(which, request):
    """compress --trim-plan -> load: the manifest records the trim (version 2), holds only the
    kept experts, and the loaded model's logits are transformers' of the same trimmed model."""
    from qmoe_ray.read.loader import load

    plan, out, rep = request.getfixturevalue(which)
    m = plain_reader.load_manifest(out)
    assert m["format_version"] == 3 and m["trim"]["plan"]["drop_blocks"] == list(plan.drop_blocks)
    kept = {k: v["kept"] for k, v in m["trim"]["experts"].items()}
    want = {f"model.layers.{i}": list(plan.keep_experts.get(f"model.layers.{i}", range(8)))
            for i in range(4) if f"model.layers.{i}" not in plan.drop_blocks + plan.drop_layers}
    assert kept == want
    assert len(m["quantized"]) == 3 * sum(len(v) for v in want.values())
    assert not any(n.startswith(tuple(f"{b}." for b in plan.drop_blocks)) for n in m["tensors"])
    assert rep["trim"]["kept_experts"] == want and np.isfinite(rep["heldout_loss"])
    loaded = load(str(out))
    assert isinstance(loaded.family, TrimmedFamily)
    ids = _ids()
    ours = loaded.logits(ids)
    with torch.no_grad():
        ref = _reference(plan, loaded)(ids, use_cache=False).logits
    torch.testing.assert_close(ours, ref, atol=3e-4, rtol=1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_hf_export_of_block_and_uniform_expert_drop(block_uniform, tmp_path):
    """The export of Block Drop + uniform Expert Drop loads in vanilla transformers (3 layers,
    6 experts, routers of 6 rows) with the loaded checkpoint's logits."""
    import transformers

    from qmoe_ray.read.export import export
    from qmoe_ray.read.loader import load

    _, out, _ = block_uniform
    export(str(out), str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_local_experts"]) == (3, 6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                           dtype=torch.float32).eval()
    assert hf.model.layers[2].mlp.gate.weight.shape[0] == 6
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
    torch.testing.assert_close(load(str(out)).logits(ids), ref, atol=3e-4, rtol=1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_trimmed_checkpoint_readers_and_refusals(mixed, tmp_path, capsys, monkeypatch):
    """eval and inspect read a trimmed checkpoint; export refuses a Layer Drop naming it; eval
    --trim-plan on it is refused; a reader of version 1 refuses it cleanly."""
    from qmoe_ray.cli import main
    from qmoe_ray.format import manifest as mf
    from qmoe_ray.read.evaluate import evaluate
    from qmoe_ray.read.export import export

    plan, out, _ = mixed
    res = evaluate(str(out), num_samples=8, batch_size=8)
    assert np.isfinite(res["loss"])
    with pytest.raises(InputError, match="trimmed checkpoint"):
        evaluate(str(out), num_samples=8, trim_plan=plan)
    assert main(["inspect", str(out), "--no-verify"]) == 0
    text = capsys.readouterr().out
    assert f"1 MoE layers dropped {list(plan.drop_layers)}" in text
    name, kept = next(iter(plan.keep_experts.items()))
    assert f"{name}: kept experts {list(kept)}" in text
    assert "Layer-Drops" in text  # hf export: no, with the reason
    with pytest.raises(InputError, match="Layer-Drops"):
        export(str(out), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    monkeypatch.setattr(mf, "FORMAT_VERSION", 2)  # a reader of versions 1..2
    with pytest.raises(CheckpointError, match="format version 3 is not supported"):
        mf.read_manifest(str(out))


@pytest.mark.ray
@pytest.mark.slow
def test_cli_budgets_run_the_analysis_in_the_job(mixed):
    """compress --drop-layers 1 --drop-experts 6: the job scores its calibration samples and
    drops what qmoe-ray analyze drops on the same samples."""
    from qmoe_ray.read.analyze import analyze

    plan, out, _ = mixed
    ref = analyze("embedded", num_samples=_SMALL["num_samples"], seq_len=_SMALL["seq_len"],
                  batch_size=_SMALL["batch_size"], drop_experts=6, drop_layers=1)
    assert plan.budgets == {"drop_experts": 6, "drop_layers": 1, "drop_blocks": 0}
    assert plan.drop_layers == ref.drop_layers and plan.keep_experts == ref.keep_experts
    assert len({len(v) for v in plan.keep_experts.values()} | {8}) > 1  # a real expert drop
    assert "trimmed: 0 blocks dropped [], 1 MoE layers dropped" in (out / "report.md").read_text()


def test_resume_refuses_another_plan_or_pruning(fam, tmp_path):
    """prepare() on an output holding another job's progress refuses a different plan, no
    plan, and a different pruning setting (the message names what differs)."""
    from qmoe_ray.job.plan import prepare

    plan = TrimPlan(model_identity(fam), ("model.layers.2",))
    other = TrimPlan(model_identity(fam), ("model.layers.1",))
    for p, name in ((plan, "a.json"), (other, "b.json")):
        (tmp_path / name).write_text(p.to_json())
    out = str(tmp_path / "ckpt")
    base = dict(_SMALL, output=out)
    first = prepare(CompressConfig(trim_plan=str(tmp_path / "a.json"), **base))
    assert first.trim == plan and [lay.name for lay in first.layers] == [
        "model.layers.0", "model.layers.1", "model.layers.3"]
    first.progress.start(first.job, False)
    again = prepare(CompressConfig(trim_plan=str(tmp_path / "a.json"), **base))
    assert again.resuming
    for kw in (dict(trim_plan=str(tmp_path / "b.json")), {}):  # another plan, no plan
        with pytest.raises(ValueError, match="another trim plan"):
            prepare(CompressConfig(**kw, **base))
    with pytest.raises(ValueError, match="another trim plan"):  # budgets: scored, then compared
        prepare(CompressConfig(drop_blocks=1, **base))
    # a record written before trimming existed (no trim keys) resumes an untrimmed run
    from qmoe_ray.job.progress import check_same_job

    plain = prepare(CompressConfig(**dict(base, output=str(tmp_path / "plain"))))
    old = {k: v for k, v in plain.job.items() if k != "trim"}
    assert "drop_blocks" not in old["options"]
    check_same_job({"format": "qmoe-ray", "format_version": 1, **old}, plain.job, "out")
    with pytest.raises(ValueError, match=r"prune=None \(now 'wanda'\)"):
        prepare(CompressConfig(trim_plan=str(tmp_path / "a.json"), prune="wanda",
                               sparsity=0.5, **base))


def test_bad_trim_options_and_plans(fam, tmp_path):
    from qmoe_ray.job.plan import prepare

    with pytest.raises(InputError, match="trim_plan.*no plan with --drop"):
        CompressConfig(trim_plan="p.json", drop_blocks=1)
    with pytest.raises(InputError, match="drop_experts"):
        CompressConfig(drop_experts="two")
    with pytest.raises(InputError, match="drop_layers"):
        CompressConfig(drop_layers=-1)
    all_moe = TrimPlan(model_identity(fam), (), tuple(f"model.layers.{i}" for i in range(4)))
    ident = dict(model_identity(fam), experts={**model_identity(fam)["experts"],
                                               "model.layers.1": 16})
    for p, msg in ((all_moe, "drops every MoE layer"),
                   (TrimPlan(ident), "16 experts in model.layers.1")):
        (tmp_path / "p.json").write_text(p.to_json())
        with pytest.raises(InputError, match=msg):
            prepare(CompressConfig(output=str(tmp_path / "o"), trim_plan=str(tmp_path / "p.json"),
                                   **_SMALL))
    with pytest.raises(InputError, match="drops every expert of model.layers.0"):
        prepare(CompressConfig(output=str(tmp_path / "o"), drop_experts="8/layer", **_SMALL))


def test_hf_export_refuses_inexpressible_trims(fam):
    """Per-layer expert counts and fewer experts than top-k are refused with the reason."""
    from qmoe_ray.read.export_trim import trim_export

    cases = [({"model.layers.0": (0, 1, 2)}, "different numbers of experts"),
             ({f"model.layers.{i}": (3,) for i in range(4)}, "fewer than top-k 2")]
    for keep, msg in cases:
        tf = TrimmedFamily(fam, TrimPlan(model_identity(fam), keep_experts=keep))
        with pytest.raises(InputError, match=msg):
            trim_export(tf, fam.config)
    tx = trim_export(TrimmedFamily(fam, TrimPlan(model_identity(fam), ("model.layers.2",),
                                                 (), UNIFORM)), fam.config)
    assert tx.config["num_hidden_layers"] == 3 and tx.name("model.layers.3.x") == \
        "model.layers.2.x"


def test_manifest_versions_and_trim_record_checks(fam):
    """Every manifest is written as version 3 (columns), trimmed or not; a trim record is refused
    in version 1, and version 2 needs one."""
    from qmoe_ray.format import manifest as mf
    from qmoe_ray.format.trimmed import read_trim, trim_record

    kw = dict(created_by="t", source="s", source_fingerprint="f", model_type="mixtral",
              expert_layout="per-expert", config=dict(fam.config), options={}, copied_files={},
              tensors={}, quantized={}, tables={}, experts={}, sizes={}, heldout_loss=None)
    assert mf.build_manifest(**kw)["format_version"] == 3
    assert read_trim(mf.build_manifest(**kw)) is None
    tf = TrimmedFamily(fam, TrimPlan(model_identity(fam), ("model.layers.2",)))
    m = mf.build_manifest(**kw, trim=trim_record(tf))
    assert m["format_version"] == 3 and read_trim(m).drop_blocks == ("model.layers.2",)
    assert read_trim({**m, "format_version": 2}).drop_blocks == ("model.layers.2",)
    with pytest.raises(CheckpointError, match="version 1 manifest"):
        read_trim({**m, "format_version": 1})
    with pytest.raises(CheckpointError, match="without a 'trim' record"):
        read_trim({k: v for k, v in m.items() if k != "trim"} | {"format_version": 2})
    with pytest.raises(CheckpointError, match="router mode"):
        read_trim({**m, "trim": {**m["trim"], "router": "zero-experts"}})


@pytest.mark.ray
@pytest.mark.slow
def test_switch_trimmed_job(tmp_path):
    """Switch (encoder and decoder stacks): Block Drop, Layer Drop and Expert Drop through the
    job. The job's held-out loss is the loaded model's, whose logits equal the trimmed forward
    over the checkpoint's experts put back at their original ids."""
    from qmoe_ray.data import embedded_switch_path, load_samples, resolve_data
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.models import run_forward
    from qmoe_ray.models.base import DictWeights
    from qmoe_ray.read.loader import load

    ckpt = open_checkpoint(str(embedded_switch_path()))
    sw = get_family(ckpt.config, ckpt.names)
    moe = {s: [lay.name for lay in sw.layers() if lay.moe and lay.stage == s]
           for s in ("encoder", "decoder")}
    droppable = [lay.name for lay in sw.layers() if sw.block_droppable(lay)]
    block = next(n for n in droppable if n.startswith("decoder") and n not in moe["decoder"][:2])
    plan = TrimPlan(model_identity(sw), (block,), (moe["encoder"][-1],),
                    {moe["encoder"][0]: (0, 2, 3, 5, 6, 7), moe["decoder"][0]: (1, 4)})
    (tmp_path / "plan.json").write_text(plan.to_json())
    cfg = CompressConfig(source="embedded-switch", output=str(tmp_path / "ck"),
                         trim_plan=str(tmp_path / "plan.json"), **_SMALL)
    rep = run_compression(cfg, progress=False)
    loaded = load(str(tmp_path / "ck"))
    held = load_samples(resolve_data("embedded", "embedded-switch"), loaded.config, cfg.eval_samples, cfg.seq_len, seed=cfg.seed,
                        split="heldout", tokenizer_source=str(embedded_switch_path()))
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in held.items()}
    ours = loaded.logits(inputs)
    ce, n = loaded.family.loss_terms(ours, inputs)
    assert float(ce) / n == pytest.approx(rep["heldout_loss"], rel=1e-4)
    tf = loaded.family
    back = {n: ckpt.read(n).float() for n in ckpt.names}  # what the trim leaves unused
    back.update(loaded.dense)
    for lay in tf.layers():
        if lay.moe:
            for e, orig in enumerate(tf.original_ids(lay, range(lay.num_experts))):
                for r, name in tf.expert_names(lay, e).items():
                    back[sw.expert_names(tf.original(lay), orig)[r]] = loaded.experts[name]
    W = DictWeights(back)
    ref = run_forward(TrimmedFamily(get_family(loaded.config, W.names), plan), W, inputs)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    counts = {lay.name: lay.num_experts for lay in tf.layers() if lay.moe}
    assert counts[moe["encoder"][0]] == 6 and counts[moe["decoder"][0]] == 2
    assert moe["encoder"][-1] not in counts and block not in counts
    assert len(loaded.manifest["quantized"]) == 2 * sum(counts.values())
    assert not any(t.startswith(block + ".") for t in loaded.manifest["tensors"])
