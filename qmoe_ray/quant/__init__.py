"""Quantization core: grids, Hessians, round-to-nearest and batched GPTQ (pure torch).

``grids`` defines the explicit grid type (``Scheme``) and rounding onto it, ``hessian`` the
streaming per-expert Hessians, ``gptq`` the batched RTN/GPTQ over a group of experts. Nothing in
this package does I/O, printing or Ray, so that workers, tests and benchmarks call it the same way.
"""

from qmoe_ray.quant.gptq import (
    CHOLESKY_FAILED,
    FEW_TOKENS,
    NO_TOKENS,
    NONFINITE_HESSIAN,
    QuantResult,
    gptq,
    gptq_multi,
    rtn,
)
from qmoe_ray.quant.grids import SCHEMES, Scheme, dequantize, grid_params, parse_scheme, quantize
from qmoe_ray.quant.hessian import HessianAccumulator, hessian

__all__ = [
    "CHOLESKY_FAILED",
    "FEW_TOKENS",
    "NONFINITE_HESSIAN",
    "NO_TOKENS",
    "SCHEMES",
    "HessianAccumulator",
    "QuantResult",
    "Scheme",
    "dequantize",
    "gptq",
    "gptq_multi",
    "grid_params",
    "hessian",
    "parse_scheme",
    "quantize",
    "rtn",
]
