"""GGUF's 4-bit blocks (Q4_0, Q4_1, Q4_K) as `Int4Weight` codes, scales and offsets, kept as stored.

Each type holds codes q in [0, 15] with w = q * scale + offset per run of 32 input values: Q4_0 has
scale d and offset -8d, Q4_1 d and m (all float16, so float16 holds them exactly), Q4_K d * sc and
-dmin * m (6-bit sub-scales of float16 super-block scales: exact in float32, not in float16).
Dequantizing the result gives gguf's own dequantized floats to the bit.
"""

from __future__ import annotations

import numpy as np

from jaxserve.ops.quant import Int4Weight, pack_int4


def scale_dtypes() -> dict:
    """4-bit GGUF type -> the scale dtype that holds its scales and offsets exactly."""
    from gguf import GGMLQuantizationType as Q

    return {Q.Q4_0: np.float16, Q.Q4_1: np.float16, Q.Q4_K: np.float32}


def _halves(b: np.ndarray) -> np.ndarray:
    """[..., 2] little-endian float16 bytes -> [..., 1] float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def block_codes(data: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GGUF tensor's raw bytes [rows, row_bytes] -> codes [rows, in] uint8, and scale and offset
    [rows, in / 32] float32, in the tensor's own (PyTorch, [out, in]) row order."""
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = data.shape[0]
    blocks = np.asarray(data, np.uint8).reshape(rows, -1, type_size)  # [rows, nb, type_size]
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # 256 values: d, dmin, 12 bytes of 6-bit (sc, m) x 8, 128 bytes of codes
        d, dmin = _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4])  # [rows, nb, 1]
        sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))  # [rows * nb, 8]
        scale = d * sc.reshape(rows, -1, 8).astype(np.float32)
        offset = -(dmin * m.reshape(rows, -1, 8).astype(np.float32))
        qs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)  # 4 runs of 64 values: low nibbles the first 32, high the next
    else:  # 32 values: d (and m for Q4_1), then 16 bytes: low nibbles values 0-15, high nibbles 16-31
        scale = _halves(blocks[..., 0:2])
        offset = _halves(blocks[..., 2:4]) if qtype == gguf.GGMLQuantizationType.Q4_1 else -8 * scale
        qs = blocks[..., -16:].reshape(rows, -1, 1, 1, 16)
    codes = (qs >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0xF  # [rows, nb, runs, 2, n]
    return codes.reshape(rows, -1), scale.reshape(rows, -1), offset.reshape(rows, -1)


def to_int4(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, scale_dtype) -> Int4Weight:
    """`block_codes`' [out, ...] arrays as a host `Int4Weight` of our [in, out] layout."""
    return pack_int4(codes.T, scale.T, offset.T, scale_dtype)
