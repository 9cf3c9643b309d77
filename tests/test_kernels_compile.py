"""Every CUDA source compiles with nvcc for sm_80 and sm_90 (no GPU needed); host-side checks."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from qmoe_ray import gpu


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in sorted(Path("/usr/local").glob("cuda*"), reverse=True):
        if (root / "bin" / "nvcc").exists():
            return str(root / "bin" / "nvcc")
    return None


SOURCES = sorted(
    p.name for p in resources.files("qmoe_ray.kernels").iterdir() if p.name.endswith(".cu")
)


def test_kernel_sources_are_shipped():
    assert "qmoe_codec.cu" in SOURCES
    assert "qmoe_decode_codes" in gpu.kernel_source()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", SOURCES)
def test_cuda_source_compiles(tmp_path, name, arch):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = resources.files("qmoe_ray.kernels").joinpath(name)
    out = tmp_path / f"{name}.{arch}.cubin"
    proc = subprocess.run(
        [nvcc, f"-arch={arch}", "-cubin", "-Werror", "all-warnings", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF"
    for kernel in ("qmoe_decode_codes", "qmoe_decode_ternary_bf16", "qmoe_matvec_int2_b16"):
        assert kernel.encode() in data


@pytest.mark.parametrize(
    "nseg,sms,expect",
    [(1, 132, (1, 32)), (1560, 132, (49, 32)), (100_000, 132, (782, 128)), (5000, 132, (79, 64))],
)
def test_launch_geometry_covers_every_segment(nseg, sms, expect):
    grid, block = gpu.launch_geometry(nseg, sms)
    assert (grid, block) == expect
    assert grid * block >= nseg and block % 32 == 0
    with pytest.raises(ValueError):
        gpu.launch_geometry(0, 132)


def test_gpu_calls_raise_clearly_without_a_device():
    if gpu.available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=r"pip install 'qmoe-ray\[gpu\]'"):
        gpu.decode_ternary(None)


def test_kernel_source_from_an_uninstalled_checkout(monkeypatch):
    """Run from source (PYTHONPATH, no install: the GPU image), the kernels come from kernels/."""
    from qmoe_ray.gpu import kernels as K

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(K.resources, "files", missing)
    text = K.kernel_source()
    assert text == (Path(__file__).resolve().parents[1] / "kernels" / "qmoe_codec.cu").read_text()
    assert "qmoe_decode_codes" in text
