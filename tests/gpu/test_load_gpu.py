"""GPU loading: CuPy decode at load equals the numpy decode bit for bit; resident (fused
decode+product) logits equal decode-mode logits within bf16 tolerance. Needs a CUDA device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from load_helpers import compressed_checkpoint  # noqa: E402

from qmoe_ray.read.loader import load  # noqa: E402
from qmoe_ray.read.weights import EncodedWeight  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["embedded", "synthetic"])
def ckpt(request, tmp_path_factory) -> Path:
    """The embedded model compressed by the job (needs Ray), and a synthetic Mixtral-shaped
    checkpoint written without Ray or GPTQ (runs on a GPU image that has no Ray)."""
    try:
        import cupy
    except Exception:  # noqa: BLE001
        pytest.skip("cupy not importable")
    if not cupy.cuda.is_available() or not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if request.param == "synthetic":
        from qmoe_ray.bench.load import synthetic_checkpoint

        out = tmp_path_factory.mktemp("synthetic")
        synthetic_checkpoint(out, hidden=256, ff=512, layers=2, experts=4, vocab=512)
        return out
    pytest.importorskip("ray", reason="the embedded checkpoint is made by the Ray job")
    return compressed_checkpoint(tmp_path_factory)


def test_gpu_decode_equals_numpy_decode_bit_for_bit(ckpt):
    cpu = load(str(ckpt), device="cpu")
    gpu = load(str(ckpt), device="cuda")
    assert gpu.experts.keys() == cpu.experts.keys()
    for name, w in cpu.experts.items():
        g = gpu.experts[name]
        assert g.is_cuda and g.dtype == torch.bfloat16
        assert torch.equal(g.cpu().view(torch.int16), w.view(torch.int16)), name


def test_resident_logits_match_decode_logits(ckpt):
    dec = load(str(ckpt), device="cuda")
    res = load(str(ckpt), device="cuda", mode="resident")
    assert all(isinstance(w, EncodedWeight) and w._dev is not None for w in res.experts.values())
    ids = torch.randint(3, dec.config["vocab_size"], (2, 12), generator=torch.Generator()
                        .manual_seed(0))
    a, b = dec.logits(ids), res.logits(ids)
    assert a.is_cuda and torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=2e-2, atol=5e-2)  # bf16 activations in the kernel
    cpu = load(str(ckpt)).logits(ids)
    torch.testing.assert_close(a.cpu(), cpu, rtol=1e-4, atol=1e-4)
