"""Shared fixtures and the rules every test run follows (loopback only, no usage stats)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import qmoe_ray  # noqa: F401 - bound before the repository root leaves sys.path

# The repository root must not stay on sys.path (``python -m pytest`` and PYTHONPATH=. put it
# there): its kernels/ folder (our CUDA sources, a package so that they ship as qmoe_ray.kernels)
# would shadow the ``kernels`` distribution that transformers >= 5 imports. qmoe_ray is imported
# first, so a checkout run from source keeps its own package.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.modules.pop("kernels", None)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Keep every Ray node of the tests on 127.0.0.1 (Ray resolves a loopback node address to the
# machine's external one unless this is off; read when ray is first imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): tiny matmuls
    gain nothing from threads, and on a shared 2-core box idle-spinning intra-op threads made such
    modules several times slower. Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpu_available() -> bool:
    """True when cupy imports and sees a CUDA device."""
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - any import/driver failure means no usable GPU
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and cupy (pip install '.[gpu]')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
pytest_plugins = ["fixtures_s3"]


@pytest.fixture(scope="module")
def module_ray():
    """One in-process Ray for every job of a module (``pytestmark``), started as a job starts it
    (``qmoe_ray.job.cluster.ray_init``: local, on 127.0.0.1, sized to the machine). A job does not
    stop a Ray it did not start, so the module pays Ray's start once, not once per job (about 5 s
    each on 2 cores). Only for modules whose jobs all run in this process and need nothing of
    the environment a test sets later (Ray's workers keep the environment they started with:
    the moto credentials of the S3 tests would not reach them)."""
    from qmoe_ray.job.cluster import ray_init, shutdown
    from qmoe_ray.job.config import CompressConfig

    ray_init(CompressConfig())
    yield
    shutdown()
