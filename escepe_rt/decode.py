"""numba kernels that turn a section's stored indices into float32 weights.

Bit layout (schema/escepe.fbs, PACKED_INDICES): index i sits at stream bits
[i*bits, (i+1)*bits), LSB-first. The callers have verified the buffer length
(ceil(count*bits/8)) and that every index < len(codebook), so the kernels do no
bounds checks of their own in the hot loop.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _unpack_gather(packed, bits, count, codebook, out):
    if bits == 8:
        for i in range(count):
            out[i] = codebook[packed[i]]
        return
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        # 1, 2, 4 bits: whole bytes hold 8 // bits indices, never straddling.
        per_byte = 8 // bits
        full = count // per_byte
        for b in range(full):
            byte = packed[b]
            for j in range(per_byte):
                out[b * per_byte + j] = codebook[(byte >> (j * bits)) & mask]
        for i in range(full * per_byte, count):
            out[i] = codebook[(packed[i // per_byte] >> ((i % per_byte) * bits)) & mask]
        return
    # 3, 5, 6, 7 bits: an index may straddle two bytes.
    nbytes = packed.shape[0]
    for i in range(count):
        pos = i * bits
        byte = pos >> 3
        word = np.uint32(packed[byte])
        if byte + 1 < nbytes:
            word |= np.uint32(packed[byte + 1]) << 8
        out[i] = codebook[(word >> (pos & 7)) & mask]


@numba.njit(cache=True, nogil=True)
def _max_index(packed, bits, count):
    mask = (1 << bits) - 1
    nbytes = packed.shape[0]
    best = 0
    for i in range(count):
        pos = i * bits
        byte = pos >> 3
        word = np.uint32(packed[byte])
        if byte + 1 < nbytes:
            word |= np.uint32(packed[byte + 1]) << 8
        v = (word >> (pos & 7)) & mask
        if v > best:
            best = v
    return best


def decode_packed(packed: np.ndarray, bits: int, count: int, codebook: np.ndarray) -> np.ndarray:
    """(count,) float32 = codebook[unpacked indices]."""
    out = np.empty(count, dtype=np.float32)
    _unpack_gather(packed, bits, count, np.ascontiguousarray(codebook, dtype=np.float32), out)
    return out


def max_index(packed: np.ndarray, bits: int, count: int) -> int:
    """Largest index in a packed stream (the verifier checks it against the codebook size)."""
    if count == 0:
        return 0
    return int(_max_index(packed, bits, count))
