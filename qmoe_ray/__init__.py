"""qmoe-ray: QMoE-style sub-1-bit compression of Mixture-of-Experts models, distributed on Ray.

``qmoe_ray.load(url, device="cpu"|"cuda", mode="decode"|"resident")`` loads a compressed
checkpoint (see ``qmoe_ray.read.loader``); ``qmoe_ray.quant`` holds the quantization numerics.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "CompressedModel", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: ``import qmoe_ray`` stays free of torch
    if name in ("load", "CompressedModel"):
        from qmoe_ray.read import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'qmoe_ray' has no attribute {name!r}")
