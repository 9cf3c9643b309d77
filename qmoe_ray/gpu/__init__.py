"""GPU decoding of the sub-1-bit format (CuPy; imported lazily, so no GPU is needed to import).

``decode_ternary``/``decode_int2`` give the same codes as ``qmoe_ray.codec``; ``dequantize_*``
give bf16 weights (the load-time path); ``matvec_*`` multiply bf16 activations by the encoded
matrix without materialising it (the compressed-resident path). Without cupy or a device every
call raises ``RuntimeError`` saying to ``pip install 'qmoe-ray[gpu]'``.
"""

from qmoe_ray.gpu.kernels import (
    DeviceEncoded,
    available,
    decode_codes,
    decode_int2,
    decode_ternary,
    dequantize_int2,
    dequantize_ternary,
    kernel_source,
    launch_geometry,
    matvec_int2,
    matvec_ternary,
    upload,
)

__all__ = [
    "DeviceEncoded",
    "available",
    "decode_codes",
    "decode_int2",
    "decode_ternary",
    "dequantize_int2",
    "dequantize_ternary",
    "kernel_source",
    "launch_geometry",
    "matvec_int2",
    "matvec_ternary",
    "upload",
]
