"""Weight encodings as data, plus the plain-numpy reference coders.

The numpy functions here are the oracle: the numba kernels in decode.py must
produce bit-identical output, and the writer uses `pack_indices` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from escepe_rt._fbs.Encoding import Encoding


@dataclass(frozen=True)
class EncodingInfo:
    code: int
    name: str
    min_bits: int  # allowed `bits` field range
    max_bits: int
    uses_codebook: bool

    def nbytes(self, count: int, bits: int) -> int | None:
        """Exact buffer length for `count` elements; None for variable-length (entropy) codes."""
        if self.code == Encoding.RAW_F32:
            return 4 * count
        if self.code == Encoding.RAW_F16:
            return 2 * count
        if self.code == Encoding.PACKED_INDICES:
            return (count * bits + 7) // 8
        return None


ENCODINGS: dict[int, EncodingInfo] = {
    Encoding.RAW_F32: EncodingInfo(Encoding.RAW_F32, "raw_f32", 0, 0, False),
    Encoding.PACKED_INDICES: EncodingInfo(Encoding.PACKED_INDICES, "packed", 1, 8, True),
    Encoding.RANS_INDICES: EncodingInfo(Encoding.RANS_INDICES, "rans", 0, 0, True),
    Encoding.RAW_F16: EncodingInfo(Encoding.RAW_F16, "raw_f16", 0, 0, False),
    Encoding.RANS_INTERLEAVED: EncodingInfo(
        Encoding.RANS_INTERLEAVED, "rans_interleaved", 0, 0, True
    ),
}
# Entropy-coded encodings: variable length, self-describing header (checked at load).
RANS_ENCODINGS = (Encoding.RANS_INDICES, Encoding.RANS_INTERLEAVED)
# Raw (codebook-free) encodings: numpy dtype of their little-endian values.
RAW_DTYPES = {Encoding.RAW_F32: "<f4", Encoding.RAW_F16: "<f2"}


def index_bits(num_clusters: int) -> int:
    """Bits per index for a codebook of `num_clusters` entries: ceil(log2 k), at least 1."""
    if num_clusters < 1:
        raise ValueError(f"a codebook needs at least 1 entry, got {num_clusters}")
    return max(1, int(num_clusters - 1).bit_length())


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer indices (< 2**bits) LSB-first into a little-endian bit stream (uint8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    idx = np.ascontiguousarray(indices, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= (1 << bits)):
        raise ValueError(f"indices must be in [0, {1 << bits}) for {bits} bits")
    stream = ((idx[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()  # (n*bits,)
    return np.packbits(stream, bitorder="little")


def unpack_indices_reference(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_indices: (count,) uint8 indices."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    stream = stream[: count * bits].reshape(count, bits).astype(np.uint16)
    return (stream << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)


def decode_reference(
    encoding: int, data: np.ndarray, bits: int, count: int, codebook: np.ndarray | None
) -> np.ndarray:
    """Reference decoder for one tensor: (count,) float32."""
    if encoding in RAW_DTYPES:
        raw = np.asarray(data, dtype=np.uint8).tobytes()
        return np.frombuffer(raw, dtype=RAW_DTYPES[encoding], count=count).astype(np.float32)
    if encoding == Encoding.PACKED_INDICES:
        return np.asarray(codebook, dtype=np.float32)[unpack_indices_reference(data, bits, count)]
    if encoding == Encoding.RANS_INDICES:
        from escepe_rt import rans

        return np.asarray(codebook, dtype=np.float32)[rans.decode_reference(data)]
    if encoding == Encoding.RANS_INTERLEAVED:
        from escepe_rt import rans_interleaved

        return np.asarray(codebook, dtype=np.float32)[rans_interleaved.decode_reference(data)]
    raise ValueError(f"unknown encoding {encoding}")
