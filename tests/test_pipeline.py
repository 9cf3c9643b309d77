"""The compression job: group quantization and the worker without Ray, then the Ray job end to end
(local in-process cluster on 127.0.0.1), its output checkpoint, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plain_reader
import pytest
import torch
from fixtures_s3 import save_tiny, tiny_model

from qmoe_ray.job.config import CompressConfig
from qmoe_ray.job.group import ExpertTokens, QuantOptions, quantize_group, select_hessian_tokens
from qmoe_ray.quant import parse_scheme


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> Path:
    """A tiny Mixtral saved by transformers (bf16, as checkpoints ship), plus token data."""
    path = tmp_path_factory.mktemp("mixtral")
    save_tiny(
        tiny_model("mixtral", num_hidden_layers=2, num_local_experts=6), path, dtype=torch.bfloat16
    )
    rng = np.random.default_rng(0)
    np.save(path / "tokens.npy", rng.integers(3, 97, size=(96, 32)).astype(np.int64))
    return path


def _cfg(model: Path, out: Path, **kw) -> CompressConfig:
    base = dict(
        source=str(model),
        output=str(out),
        data=str(model / "tokens.npy"),
        num_samples=48,
        seq_len=32,
        eval_samples=8,
        batch_size=16,
        group_size=4,
    )
    base.update(kw)
    return CompressConfig(**base)


# -- without Ray -----------------------------------------------------------------------------------
def test_select_hessian_tokens_caps_evenly_and_skips_heldout():
    hmask = np.ones(100, dtype=bool)
    hmask[::2] = False
    sel = select_hessian_tokens(hmask, 10)
    assert len(sel) == 10 and hmask[sel].all()
    assert sel[0] == 1 and sel[-1] == 99  # spread over the whole range, not the first 10
    assert len(select_hessian_tokens(hmask, None)) == 50


def test_quantize_group_ternary_sequential_and_fallback():
    from qmoe_ray.models.base import ExpertSpec, swiglu_hidden

    spec = ExpertSpec(("gate", "up"), ("down",), swiglu_hidden)
    g = torch.Generator().manual_seed(0)
    G, d, ff = 3, 16, 24
    W = {
        "gate": torch.randn(G, ff, d, generator=g),
        "up": torch.randn(G, ff, d, generator=g),
        "down": torch.randn(G, d, ff, generator=g),
    }
    toks = [
        ExpertTokens(torch.randn(n, d, generator=g).numpy(), np.ones(n, dtype=bool))
        for n in (40, 0, 25)
    ]
    opts = QuantOptions(parse_scheme("ternary"))
    res = quantize_group(spec, W, toks, opts, cap=30, experts=[7, 8, 9])
    assert [o.shape for o in res.outputs] == [(40, d), (0, d), (25, d)]
    assert res.hessian_tokens == [30, 0, 25]
    assert set(res.results) == {"gate", "up", "down"}
    for r in res.results.values():
        assert set(np.unique(r.codes.numpy())) <= {-1, 0, 1}
    # the expert without tokens fell back to RTN, flagged for every matrix; the others did not
    assert res.stats[1]["fallback"] and set(res.stats[1]["fallback"]) == {"gate", "up", "down"}
    assert not res.stats[0]["fallback"] and not res.stats[2]["fallback"]
    # outputs are the quantized expert applied to the tokens
    deq = {r: res.results[r].dequantize()[0] for r in spec.roles}
    ref = spec.forward(deq, torch.from_numpy(toks[0].x))
    assert torch.allclose(torch.from_numpy(res.outputs[0]), ref, atol=1e-5)


def test_gptq_group_beats_rtn_on_outputs():
    """On correlated activations the GPTQ-quantized expert's outputs are closer to the original's."""
    from qmoe_ray.models.base import ExpertSpec, swiglu_hidden

    spec = ExpertSpec(("gate", "up"), ("down",), swiglu_hidden)
    g = torch.Generator().manual_seed(1)
    d, ff = 32, 48
    W = {
        "gate": torch.randn(1, ff, d, generator=g) / d**0.5,
        "up": torch.randn(1, ff, d, generator=g) / d**0.5,
        "down": torch.randn(1, d, ff, generator=g) / ff**0.5,
    }
    mix = torch.randn(d, d, generator=g)
    x = torch.randn(400, d, generator=g) @ mix
    x[:, :3] *= 8  # outlier channels
    toks = [ExpertTokens(x.numpy(), np.ones(len(x), dtype=bool))]
    ref = spec.forward({r: w[0] for r, w in W.items()}, x)
    errs = {}
    for method in ("rtn", "gptq"):
        res = quantize_group(spec, W, toks, QuantOptions(parse_scheme("ternary"), method=method))
        errs[method] = float(((torch.from_numpy(res.outputs[0]) - ref) ** 2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_group_worker_without_ray(tiny_mixtral):
    from qmoe_ray.format.matrices import unpack_matrix
    from qmoe_ray.job.workers import QuantWorker

    worker = QuantWorker(str(tiny_mixtral), {}, QuantOptions(parse_scheme("ternary")))
    layer = [l for l in worker.family.layers() if l.moe][0]
    rng = np.random.default_rng(0)
    d = worker.ckpt.config["hidden_size"]
    store_a = [(rng.normal(size=(n, d)).astype(np.float32), np.ones(n, bool)) for n in (10, 0, 7)]
    store_b = [(rng.normal(size=(n, d)).astype(np.float32), np.ones(n, bool)) for n in (5, 0, 3)]
    enc, outputs = worker.run(layer, 0, [0, 1, 2], [store_a, store_b], cap=None)
    assert [o.shape[0] for o in outputs[0]] == [10, 0, 7]
    assert [o.shape[0] for o in outputs[1]] == [5, 0, 3]
    assert len(enc.entries) == 3 * 3  # 3 experts x gate/up/down
    assert enc.stats[1]["fallback"]  # expert 1 got no tokens
    name = worker.family.expert_names(layer, 2)["down"]
    scheme, codes, params = unpack_matrix(name, enc.entries[name], enc.tensors, enc.tables)
    assert enc.entries[name]["table"] in enc.tables  # one shared table per group and role
    assert scheme.name == "ternary" and codes.shape == tuple(enc.entries[name]["shape"])
    assert set(np.unique(codes)) <= {-1, 0, 1}


def test_group_worker_segment_symbols_change_the_layout_not_the_codes(tiny_mixtral):
    from qmoe_ray.format.matrices import unpack_matrix
    from qmoe_ray.job.workers import QuantWorker

    rng = np.random.default_rng(1)
    runs = []
    for seg in (4096, 7):
        worker = QuantWorker(str(tiny_mixtral), {},
                             QuantOptions(parse_scheme("ternary"), segment_symbols=seg))
        layer = [l for l in worker.family.layers() if l.moe][0]
        d = worker.ckpt.config["hidden_size"]
        if not runs:
            store = [(rng.normal(size=(n, d)).astype(np.float32), np.ones(n, bool))
                     for n in (40, 30)]
        runs.append(worker.run(layer, 0, [0, 1], [store], cap=None)[0])
    name = worker.family.expert_names(layer, 1)["gate"]
    a, b = (r.entries[name] for r in runs)
    assert a["codec"]["segment_symbols"] == "4096" and b["codec"]["segment_symbols"] == "7"
    assert b["code_bytes"] > a["code_bytes"]  # more segments: more state words
    ca = unpack_matrix(name, a, runs[0].tensors, runs[0].tables)[1]
    cb = unpack_matrix(name, b, runs[1].tensors, runs[1].tables)[1]
    np.testing.assert_array_equal(ca, cb)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="scheme"):
        CompressConfig(scheme="int5")
    with pytest.raises(ValueError, match="group_size"):
        CompressConfig(group_size=0)
    for bad in (0, 70000, 2.5, True):
        with pytest.raises(ValueError, match=r"segment_symbols=.*1\.\.65533"):
            CompressConfig(segment_symbols=bad)
    with pytest.raises(ValueError, match="unknown config key 'grup_size'"):
        CompressConfig.from_mapping({"grup_size": 4})
    assert CompressConfig.from_mapping({"group-size": 4}).group_size == 4


# -- with Ray --------------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    skip = {"report.json", "report.md", "report.png"}  # these carry wall times
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@pytest.mark.ray
def test_job_end_to_end_local(tiny_mixtral, tmp_path):
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.loader import load

    out1 = tmp_path / "w1"
    rep = run_compression(_cfg(tiny_mixtral, out1, num_workers=1), progress=False)
    out2 = tmp_path / "w2"
    run_compression(_cfg(tiny_mixtral, out2, num_workers=2, num_stores=2), progress=False)
    # the same job on 1 worker/1 store and 2 workers/2 stores writes identical bytes
    f1, f2 = _files(out1), _files(out2)
    assert f1.keys() == f2.keys() and "manifest.json" in f1
    assert all(f1[k] == f2[k] for k in f1), [k for k in f1 if f1[k] != f2[k]]

    manifest = plain_reader.load_manifest(out1)
    assert manifest["format_version"] == 3 and manifest["options"]["scheme"] == "ternary"
    assert len(manifest["source_fingerprint"]) == 64  # the source's identity travels with it
    assert len(manifest["quantized"]) == 2 * 6 * 3  # 2 layers x 6 experts x 3 matrices
    assert (out1 / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bits/param" in (out1 / "report.md").read_text()
    s = rep["sizes"]
    # tiny 24x32 experts: per-row bf16 scales and per-matrix tables dominate, but still < bf16
    assert 0 < s["expert_bits_per_param"] < 16 and s["ratio_vs_bf16"] > 1

    # it loads back, every checksum verifies, and the loss the job reported is the loaded model's
    model = load(str(out1))
    from qmoe_ray.data import load_samples

    held = load_samples(str(tiny_mixtral / "tokens.npy"), model.config, 8, 32, split="heldout")
    inputs = {k: torch.from_numpy(v) for k, v in held.items()}
    logits = model.logits(inputs)
    ce, n = model.family.loss_terms(logits, inputs)
    assert float(ce) / n == pytest.approx(rep["heldout_loss"], rel=1e-4)


@pytest.mark.ray
def test_job_bad_input_before_work(tiny_mixtral, tmp_path):
    from qmoe_ray.job.driver import run_compression

    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_compression(_cfg(tiny_mixtral, tmp_path / "done"), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="cannot write to output"):
        run_compression(_cfg(tiny_mixtral, blocker / "sub"), progress=False)
    with pytest.raises(ValueError, match="calibration tokens"):
        run_compression(
            _cfg(tiny_mixtral, tmp_path / "o", num_samples=2, seq_len=16), progress=False
        )
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "model.safetensors").write_bytes((tiny_mixtral / "model.safetensors").read_bytes())
    cfg = json.loads((tiny_mixtral / "config.json").read_text())
    cfg["model_type"] = "llama"
    (dense / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported model types"):
        run_compression(_cfg(tiny_mixtral, tmp_path / "o2", source=str(dense)), progress=False)
    # a config.json that does not match the weights is named before any layer runs
    (dense / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral",
                                                   "intermediate_size": 40}))
    with pytest.raises(ValueError, match="config.json implies"):
        run_compression(_cfg(tiny_mixtral, tmp_path / "o3", source=str(dense)), progress=False)
    assert not (tmp_path / "o3" / "progress").exists()


@pytest.mark.ray
@pytest.mark.s3
def test_cli_s3_source_and_output(tiny_mixtral, moto_endpoint, s3_credentials, tmp_path, capsys):
    from fixtures_s3 import make_bucket, upload_dir

    from qmoe_ray.cli import main
    from qmoe_ray.read.loader import load

    fs = make_bucket(moto_endpoint, "qmoe-test")
    upload_dir(fs, tiny_mixtral, "qmoe-test/src")
    rc = main(
        [
            "compress",
            "--source",
            "s3://qmoe-test/src",
            "--output",
            "s3://qmoe-test/out",
            "--data",
            "s3://qmoe-test/src/tokens.npy",
            "--num-samples",
            "32",
            "--seq-len",
            "32",
            "--eval-samples",
            "8",
            "--group-size",
            "3",
            "--quiet",
            "--source-option",
            f"endpoint_url={moto_endpoint}",
            "--output-option",
            f"endpoint_url={moto_endpoint}",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "s3://qmoe-test/out/report.md" in printed
    assert s3_credentials["AWS_SECRET_ACCESS_KEY"] not in printed
    assert fs.exists("qmoe-test/out/manifest.json")
    model = load("s3://qmoe-test/out", endpoint_url=moto_endpoint)
    assert len(model.manifest["quantized"]) == 2 * 6 * 3
    text = fs.cat_file("qmoe-test/out/manifest.json").decode()
    assert s3_credentials["AWS_SECRET_ACCESS_KEY"] not in text


@pytest.mark.ray
@pytest.mark.s3
def test_embedded_model_s3_to_s3_meets_loss_target(moto_endpoint, s3_credentials, tmp_path,
                                                   capsys):
    """The trained embedded model, source and output on moto's s3, through the CLI: the output
    verifies on load, and ternary GPTQ raises the held-out loss by at most a quarter of what
    ternary RTN does (the issue's target; measured ~0.16 with these sample counts)."""
    from fixtures_s3 import make_bucket, upload_dir

    from qmoe_ray.cli import main
    from qmoe_ray.data import embedded_model_path
    from qmoe_ray.job.driver import run_compression
    from qmoe_ray.read.evaluate import evaluate
    from qmoe_ray.read.loader import load

    src = embedded_model_path()
    fs = make_bucket(moto_endpoint, "qmoe-embedded")
    upload_dir(fs, src, "qmoe-embedded/src")
    opts = ["--num-samples", "64", "--eval-samples", "32", "--seq-len", "128"]
    rc = main(["compress", "--source", "s3://qmoe-embedded/src", "--output",
               "s3://qmoe-embedded/out", "--data", "embedded", "--quiet", *opts,
               "--source-option", f"endpoint_url={moto_endpoint}",
               "--output-option", f"endpoint_url={moto_endpoint}"])
    assert rc == 0 and "s3://qmoe-embedded/out/report.md" in capsys.readouterr().out
    model = load("s3://qmoe-embedded/out", endpoint_url=moto_endpoint)  # every checksum verified
    gptq_loss = model.manifest["heldout_loss"]
    rtn = run_compression(CompressConfig(source="embedded", output=str(tmp_path / "rtn"),
                                         method="rtn", num_samples=64, eval_samples=32,
                                         seq_len=128), progress=False)
    # the original model on the same held-out samples (the public eval path, seed 0)
    base = evaluate(str(src), "embedded", num_samples=32, seq_len=128, split="heldout")["loss"]
    gptq_rise, rtn_rise = gptq_loss - base, rtn["heldout_loss"] - base
    assert 0 < rtn_rise and gptq_rise <= 0.25 * rtn_rise, (base, gptq_loss, rtn["heldout_loss"])
