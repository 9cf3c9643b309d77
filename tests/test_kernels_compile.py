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


def _nvrtc() -> str | None:
    """libnvrtc: NVIDIA's wheel (the test extra), a CUDA toolkit, or the loader's path."""
    import ctypes.util
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for pattern in ("cu*/lib/libnvrtc.so*", "cuda_nvrtc/lib/libnvrtc.so*"):
            found = sorted(p for p in Path(base).glob(pattern) if "builtins" not in p.name)
            if found:
                return str(found[-1])
    for root in sorted(Path("/usr/local").glob("cuda*"), reverse=True):
        found = sorted(p for p in (root / "lib64").glob("libnvrtc.so*"))
        if found:
            return str(found[-1])
    return ctypes.util.find_library("nvrtc")


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_compile_with_nvrtc_as_cupy_does(arch):
    """CuPy compiles the source at run time with NVRTC, which (unlike nvcc) includes no CUDA
    headers: the source must compile on its own with the wrapper's options, and its entry
    points must be exactly the kernels the wrapper launches (unmangled)."""
    import ctypes
    import re

    from qmoe_ray.gpu.kernels import KERNEL_NAMES, NVRTC_OPTIONS

    path = _nvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    src = gpu.kernel_source().encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"qmoe_codec.cu", 0, None, None) == 0
    try:
        opts = [o.encode() for o in (*NVRTC_OPTIONS, f"--gpu-architecture={arch}")]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode(errors="replace")[-4000:]
        assert lib.nvrtcGetPTXSize(prog, ctypes.byref(size)) == 0
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(prog, ptx) == 0
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.value.decode()))
    assert entries == set(KERNEL_NAMES)
