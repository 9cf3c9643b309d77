"""gpt-oss (``gpt_oss``) against transformers' ``GptOssForCausalLM`` on tiny random checkpoints
it saved itself (sliding and full layers, sinks, all biases non-zero, YaRN, active SwiGLU clamps):
blocks, routing, logits, loss, ``evaluate``; an MXFP4 source (hand-packed experts) against its
dequantized twin; bad MXFP4 blocks; the whole job (compress -> load -> eval -> export, which
transformers loads), on s3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import plain_reader
from fixtures_s3 import layer_outputs, save_tiny  # noqa: E402
from gpt_oss_fixtures import mxfp4_pack, save_mxfp4, tiny_gpt_oss  # noqa: E402
from sigmoid_fixtures import inputs_for  # noqa: E402

from qmoe_ray.errors import CheckpointError  # noqa: E402
from qmoe_ray.models import DictWeights, get_family, run_forward, walk_layers  # noqa: E402
from qmoe_ray.storage.checkpoint import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 1e-4


class Case:
    def __init__(self, folder, seed: int = 0, **overrides):
        self.model = tiny_gpt_oss(seed, **overrides)
        self.folder = save_tiny(self.model, folder)
        self.ckpt = open_checkpoint(str(self.folder))
        self.family = get_family(self.ckpt.config, self.ckpt)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return Case(tmp_path_factory.mktemp("oss"), seed=2)


def test_blocks_routes_and_logits_match_transformers(case):
    inputs = inputs_for(s=11)  # longer than the sliding window (4)
    ref_logits, ref_blocks = layer_outputs(case.model, inputs)
    fam, W = case.family, case.ckpt
    assert fam.spec.windows == (4, None, 4) and fam.expert_layout == "fused"
    blocks, routes = [], {}
    (state,) = walk_layers(
        fam, W, [fam.embed(W, inputs)],
        on_route=lambda lay, _, x, idx, gate: routes.__setitem__(lay.block, (x, idx, gate)),
        after_layer=lambda lay, states: blocks.append(states[0]["hidden"]))
    for i, (ours, ref) in enumerate(zip(blocks, ref_blocks, strict=True)):
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4, msg=f"block {i}")
    torch.testing.assert_close(fam.logits(W, state), ref_logits, atol=ATOL, rtol=1e-4)
    assert ref_logits.abs().max() > 1.0
    for block, (x, idx, gate) in routes.items():
        with torch.no_grad():
            _, w_ref, i_ref = case.model.model.layers[block].mlp.router(x.reshape(-1, 32))
        assert torch.equal(idx.reshape(-1, 2), i_ref)
        torch.testing.assert_close(gate.reshape(-1, 2), w_ref)


def test_loss_and_evaluate_match_transformers(case, tmp_path):
    from qmoe_ray.read.evaluate import evaluate

    inputs = inputs_for(seed=1, s=10)
    total, count = case.family.loss_terms(run_forward(case.family, case.ckpt, inputs), inputs)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = case.model(**inputs, labels=labels).loss
    torch.testing.assert_close(total / count, ref, atol=ATOL, rtol=1e-4)
    rows = np.random.default_rng(0).integers(3, 97, size=(6, 12)).astype(np.int64)
    np.save(tmp_path / "rows.npy", rows)
    ours = evaluate(str(case.folder), str(tmp_path / "rows.npy"), batch_size=4)["loss"]
    x = torch.from_numpy(rows)
    with torch.no_grad():
        want = float(case.model(x, labels=x).loss)
    assert abs(ours - want) <= 5e-4 * want, (ours, want)


def test_shapes_are_the_checkpoint(case):
    shapes = case.family.expected_shapes()
    assert set(shapes) == set(case.ckpt.names)
    assert all(tuple(case.ckpt.shape(n)) == s for n, s in shapes.items())


@pytest.mark.parametrize("zeroed", ["sinks", "router.bias", "gate_up_proj_bias",
                                    "down_proj_bias", "q_proj.bias"])
def test_every_bias_and_the_sinks_are_observable(case, zeroed):
    ck, inputs = case.ckpt, inputs_for(seed=2)
    tensors = {n: ck(n) for n in ck.names}
    hit = [n for n in tensors if n.endswith(zeroed)]
    assert hit
    for n in hit:
        tensors[n] = torch.zeros_like(tensors[n])
    diff = run_forward(case.family, DictWeights(tensors), inputs) - run_forward(case.family, ck,
                                                                                inputs)
    assert diff.abs().max() > 1e-3


def test_the_clamps_act(case):
    """The tiny config's SwiGLU limit (0.8) clamps some gate and up pre-activations (else the
    clamped variant would be untested)."""
    fam, ck = case.family, case.ckpt
    lay = fam.layers()[0]
    w = {r: t[0] for r, t in fam.read_experts(lay, ck, [0]).items()}
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert ((x @ w["gate"].T + w["gate_bias"]) > 0.8).any()
    assert ((x @ w["up"].T + w["up_bias"]).abs() > 0.8).any()


def test_mxfp4_source_reads_as_its_dequantized_twin(tmp_path):
    model = tiny_gpt_oss(3, intermediate_size=32)
    mx, twin = save_mxfp4(model, tmp_path)
    a, b = open_checkpoint(str(mx)), open_checkpoint(str(twin))
    assert a.source_precision.startswith("mxfp4") and sorted(a.names) == sorted(b.names)
    fam_a, fam_b = get_family(a.config, a), get_family(b.config, b)
    fam_a.check_weights(a.names, a.shape)
    inputs = inputs_for(seed=4)
    torch.testing.assert_close(run_forward(fam_a, a, inputs), run_forward(fam_b, b, inputs),
                               atol=0, rtol=0)
    # the packing is faithful enough for a loss baseline: close to the bf16 model's logits
    ref = run_forward(fam_b, b, inputs)
    assert ref.abs().max() > 1.0


def test_mxfp4_blocks_that_do_not_match_the_shape_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    mx, _ = save_mxfp4(tiny_gpt_oss(3, intermediate_size=32), tmp_path)
    t = load_file(mx / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj"
    # 2 blocks of 32 per row where intermediate_size=32 implies 1
    t[name + "_blocks"], t[name + "_scales"] = mxfp4_pack(torch.randn(6, 64, 32))
    save_file(t, mx / "model.safetensors")
    ck = open_checkpoint(str(mx))
    with pytest.raises(ValueError, match=r"down_proj_blocks \[experts, 32, blocks, 16\] .* "
                                         r"block count x 32 must equal 32"):
        get_family(ck.config, ck).check_weights(ck.names, ck.shape)


def test_bad_layer_types_are_refused():
    from qmoe_ray.models.gpt_oss import GptOss

    cfg = json.loads(json.dumps(tiny_gpt_oss(0).config.to_dict()))
    with pytest.raises(CheckpointError, match=r"layer_types.* 3 entries"):
        GptOss({**cfg, "layer_types": ["sliding_attention", "chunked_attention",
                                        "full_attention"]})


def _compress(main, src, out, *extra):
    assert main(["compress", "--source", src, "--output", out, "--data", f"{src}/tokens.npy",
                 "--num-samples", "24", "--seq-len", "16", "--eval-samples", "4",
                 "--group-size", "3", "--quiet", *extra]) == 0


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_gpt_oss_s3_compress_eval_export_round_trip(tmp_path, moto_endpoint, s3_credentials,
                                                    capsys):
    """The whole job on a tiny gpt-oss (bf16 source), source and output on moto's s3, through
    the CLI: compress, eval, export; transformers loads the export (its fused, interleaved
    experts and the carried biases) and gives our loaded model's logits."""
    import transformers as tf
    from fixtures_s3 import make_bucket, upload_dir

    from qmoe_ray.cli import main
    from qmoe_ray.read.loader import load

    src = save_tiny(tiny_gpt_oss(5), tmp_path / "src", dtype=torch.bfloat16)
    np.save(src / "tokens.npy", np.random.default_rng(0).integers(3, 97, (48, 16)))
    fs = make_bucket(moto_endpoint, "qmoe-oss")
    upload_dir(fs, src, "qmoe-oss/src")
    opt = ["--storage-option", f"endpoint_url={moto_endpoint}"]
    _compress(main, "s3://qmoe-oss/src", "s3://qmoe-oss/out", *opt)
    manifest = plain_reader.parse_manifest(fs.cat_file("qmoe-oss/out/manifest.json"))
    assert len(manifest["quantized"]) == 3 * 6 * 3  # 3 blocks x 6 experts x 3 matrices
    bias = "model.layers.2.mlp.experts.gate_up_proj_bias"
    assert manifest["tensors"][bias]["shape"] == [6, 48] and bias not in manifest["quantized"]
    ours = load("s3://qmoe-oss/out", endpoint_url=moto_endpoint)
    capsys.readouterr()
    assert main(["eval", "s3://qmoe-oss/out", "--data", str(src / "tokens.npy"), "--samples",
                 "8", "--json", "--quiet", *opt]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert np.isfinite(loss) and 0 < loss < 10
    assert main(["export", "s3://qmoe-oss/out", str(tmp_path / "hf"), "--quiet", *opt]) == 0
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "GptOssForCausalLM"
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 97, (2, 10)))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.logits(ids), rtol=1e-4, atol=1e-4)
    # resident mode (experts kept encoded, decoded inside each product) adds the same biases
    resident = load("s3://qmoe-oss/out", mode="resident", endpoint_url=moto_endpoint)
    torch.testing.assert_close(resident.logits(ids), ours.logits(ids), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["inspect", "s3://qmoe-oss/out", "--json", *opt]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["model_type"] == "gpt_oss"
    assert info["model"]["source_precision"] == "bf16"
    assert "has no per-expert Linear modules" in json.dumps(info)  # no compressed-tensors export
    assert main(["export", "s3://qmoe-oss/out", str(tmp_path / "ct"), "--format",
                 "compressed-tensors", "--quiet", *opt]) == 2
    assert "use --format hf" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_mxfp4_gpt_oss_compresses_against_its_dequantized_model(tmp_path, capsys):
    """A gpt-oss whose experts ship as MXFP4: the job reads them decoded; the report gives the
    compression against the MXFP4 bytes (4.25 bits per expert parameter) as well as bf16, and
    ``eval --compare`` measures the loss against the MXFP4-dequantized model (the twin's)."""
    from qmoe_ray.cli import main
    from qmoe_ray.read.evaluate import evaluate

    mx, twin = save_mxfp4(tiny_gpt_oss(6, intermediate_size=32), tmp_path)
    tokens = np.random.default_rng(0).integers(3, 97, (48, 16))
    np.save(mx / "tokens.npy", tokens)
    np.save(tmp_path / "heldout.npy", tokens[-8:])
    _compress(main, str(mx), str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["source_precision"] == "mxfp4 (e2m1, e8m0 scales per 32)"
    src, sizes = report["source_sizes"], report["sizes"]
    assert src["expert_bits_per_param"] == pytest.approx(4.25)
    assert src["expert_ratio"] == pytest.approx(4.25 / sizes["expert_bits_per_param"])
    assert src["expert_ratio"] > 1.2 and sizes["expert_ratio_vs_bf16"] > src["expert_ratio"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "vs the source as stored (mxfp4" in md and "x vs bf16" in md
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--compare", str(mx), "--data",
                 str(tmp_path / "heldout.npy"), "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    want = evaluate(str(twin), str(tmp_path / "heldout.npy"))["loss"]
    assert res["original"]["loss"] == pytest.approx(want, rel=1e-6)
    # a random model's loss sits near log(vocab): the ternary one's differs, by either sign
    assert 1e-4 < abs(res["loss_delta"]) < 0.5
    assert res["loss_delta"] == pytest.approx(res["compressed"]["loss"] - want, abs=1e-6)


def test_expert_drop_on_gpt_oss_keeps_each_experts_biases(case, tmp_path, capsys):
    """``analyze`` scores gpt-oss's experts (its router's softmax) and ``eval --trim-plan`` runs
    the trimmed model: each kept expert keeps its own biases (a kept expert's output, read
    through the trimmed numbering, is the untrimmed one's)."""
    from qmoe_ray.cli import main
    from qmoe_ray.models.trim import TrimmedFamily
    from qmoe_ray.read.analyze import read_plan

    rows = np.random.default_rng(2).integers(3, 97, size=(8, 12)).astype(np.int64)
    np.save(tmp_path / "rows.npy", rows)
    plan_file = tmp_path / "plan.json"
    assert main(["analyze", str(case.folder), "--data", str(tmp_path / "rows.npy"), "--output",
                 str(plan_file), "--drop-experts", "2/layer", "--samples", "8", "--split", "all",
                 "--quiet"]) == 0
    plan = read_plan(str(plan_file))
    assert all(len(k) == 4 for k in plan.keep_experts.values())
    capsys.readouterr()
    assert main(["eval", str(case.folder), "--data", str(tmp_path / "rows.npy"),
                 "--samples", "8", "--split", "all", "--trim-plan", str(plan_file), "--json",
                 "--quiet"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["loss"])
    trimmed = TrimmedFamily(case.family, plan)
    lay = trimmed.layers()[0]
    kept = trimmed.original_ids(lay, [3])[0]
    got = trimmed.read_experts(lay, case.ckpt, [3])
    want = case.family.read_experts(case.family.layers()[0], case.ckpt, [kept])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_quantize_group_adds_the_biases_and_quantizes_only_the_matrices(case):
    """The worker's group quantization on gpt-oss experts: the biases enter the hidden
    activation (the down matrix's Hessian) and the outputs, unquantized; without them the call
    is refused, naming them."""
    from qmoe_ray.job.group import ExpertTokens, QuantOptions, quantize_group
    from qmoe_ray.quant import dequantize, parse_scheme

    fam, ck = case.family, case.ckpt
    lay = fam.layers()[1]
    w = fam.read_experts(lay, ck, [0, 4])
    g = np.random.default_rng(0)
    toks = [ExpertTokens(g.standard_normal((40, 32)).astype(np.float32), np.ones(40, bool))
            for _ in range(2)]
    res = quantize_group(fam.expert_spec, w, toks, QuantOptions(parse_scheme("int8")))
    assert set(res.results) == {"gate", "up", "down"}
    for i in range(2):
        deq = {r: dequantize(q.scheme, q.codes[i], {k: v[i] for k, v in q.params.items()})
               for r, q in res.results.items()}
        ours = fam.expert_spec.forward({**deq, **{b: w[b][i] for b in
                                                  ("gate_bias", "up_bias", "down_bias")}},
                                       torch.from_numpy(toks[i].x))
        torch.testing.assert_close(torch.from_numpy(res.outputs[i]), ours, atol=1e-5, rtol=1e-5)
        exact = fam.expert_spec.forward({k: v[i] for k, v in w.items()},
                                        torch.from_numpy(toks[i].x))
        # int8: close to the float expert, biases included (without them it is far)
        assert (ours - exact).abs().max() < 0.05 < (ours - exact + w["down_bias"][i]).abs().max()
    with pytest.raises(ValueError, match=r"weights lack roles \['gate_bias', 'up_bias', "
                                         r"'down_bias'\]"):
        quantize_group(fam.expert_spec, {r: w[r] for r in ("gate", "up", "down")}, toks,
                       QuantOptions(parse_scheme("int8")))
