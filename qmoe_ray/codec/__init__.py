"""The sub-1-bit format: rANS-coded ternary / 2-bit code matrices, and plain bit packing.

Pure numpy (no I/O, no Ray). The format is specified in ``docs/FORMAT.md``; in short: weights are
grouped into symbols, symbols are rANS-coded in fixed-length segments that decode independently,
and the frequency table comes from the statistics of the encoded data and travels with it under a
content hash and a format version.
"""

from qmoe_ray.codec.encoded import (
    DEFAULT_SEGMENT_SYMBOLS,
    EncodedInt2,
    EncodedTernary,
    decode_int2,
    decode_int2_lut,
    decode_rows,
    decode_ternary,
    decode_ternary_lut,
    encode_int2,
    encode_ternary,
    expansion_table,
    symbol_counts,
)
from qmoe_ray.codec.packbits import PackedCodes, pack_bits, unpack_bits
from qmoe_ray.codec.table import FORMAT_NAME, FORMAT_VERSION, Table, build_table, check_format

__all__ = [
    "DEFAULT_SEGMENT_SYMBOLS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "EncodedInt2",
    "EncodedTernary",
    "PackedCodes",
    "Table",
    "build_table",
    "check_format",
    "decode_int2",
    "decode_int2_lut",
    "decode_rows",
    "decode_ternary",
    "decode_ternary_lut",
    "encode_int2",
    "encode_ternary",
    "expansion_table",
    "pack_bits",
    "symbol_counts",
    "unpack_bits",
]
