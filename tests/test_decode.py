"""The numba weight decoder against the numpy reference coders in escepe_rt.encodings.

Bit-exact: decoded float32 values are compared as uint32 bit patterns, so -0.0,
NaN payloads and denormals in a codebook must survive the gather unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from escepe_rt._fbs.Encoding import Encoding
from escepe_rt.decode import decode_packed, max_index
from escepe_rt.encodings import (
    ENCODINGS,
    decode_reference,
    index_bits,
    pack_indices,
    unpack_indices_reference,
)

WIDTHS = range(1, 9)
# 0 and lengths around byte and word boundaries, odd lengths, and a long one.
LENGTHS = [0, 1, 2, 3, 7, 8, 9, 15, 17, 63, 64, 65, 1000, 4099]


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def random_codebook(rng: np.random.Generator, k: int) -> np.ndarray:
    """k distinct float32 values, including awkward bit patterns when there is room."""
    book = rng.normal(0.0, 1.0, k).astype(np.float32)
    specials = np.array([-0.0, 1e-42, np.finfo(np.float32).max, -np.inf], dtype=np.float32)
    n = min(k // 2, len(specials))
    book[:n] = specials[:n]
    return book


@pytest.mark.parametrize("count", LENGTHS)
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("full", [True, False], ids=["k=2**bits", "k<2**bits"])
def test_decode_packed_matches_reference(bits, count, full):
    rng = np.random.default_rng(1000 * bits + count + full)
    k = 1 << bits if full else max(1, (1 << bits) - 1 - int(rng.integers(0, (1 << bits) // 2)))
    if count:
        indices = rng.integers(0, k, count)
        indices[rng.integers(0, count)] = k - 1  # the top index always occurs
    else:
        indices = np.zeros(0, np.int64)
    book = random_codebook(rng, k)
    packed = pack_indices(indices, bits)
    assert packed.dtype == np.uint8
    assert len(packed) == ENCODINGS[Encoding.PACKED_INDICES].nbytes(count, bits)
    assert len(packed) == (count * bits + 7) // 8

    unpacked = unpack_indices_reference(packed, bits, count)
    assert np.array_equal(unpacked, indices)
    got = decode_packed(packed, bits, count, book)
    want = decode_reference(Encoding.PACKED_INDICES, packed, bits, count, book)
    assert_same_bits(got, want)
    assert_same_bits(got, book[indices])
    assert max_index(packed, bits, count) == (int(indices.max()) if count else 0)


@pytest.mark.parametrize("bits", WIDTHS)
def test_decode_packed_reads_no_byte_past_the_stream(bits):
    """Trailing bytes after ceil(count*bits/8) must not change the result."""
    rng = np.random.default_rng(bits)
    for count in (1, 5, 13, 64, 99):
        indices = rng.integers(0, 1 << bits, count)
        book = random_codebook(rng, 1 << bits)
        packed = pack_indices(indices, bits)
        padded = np.concatenate([packed, np.full(3, 0xFF, np.uint8)])
        assert_same_bits(decode_packed(padded, bits, count, book), book[indices])
        assert max_index(padded, bits, count) == int(indices.max())


@pytest.mark.parametrize("bits", WIDTHS)
def test_decode_packed_accepts_a_view_of_a_larger_buffer(bits):
    """The runtime decodes zero-copy views at an offset into the mmap."""
    rng = np.random.default_rng(50 + bits)
    count = 257
    indices = rng.integers(0, 1 << bits, count)
    packed = pack_indices(indices, bits)
    big = np.concatenate([np.full(64, 0xAA, np.uint8), packed, np.full(64, 0x55, np.uint8)])
    view = np.frombuffer(big.tobytes(), dtype=np.uint8, count=len(packed), offset=64)
    book = random_codebook(rng, 1 << bits)
    assert_same_bits(decode_packed(view, bits, count, book), book[indices])


def test_codebook_dtype_is_normalised_to_float32():
    indices = np.array([0, 1, 2, 3, 2, 1, 0])
    packed = pack_indices(indices, 2)
    book64 = np.array([0.1, -0.2, 0.3, -0.4], dtype=np.float64)
    got = decode_packed(packed, 2, len(indices), book64)
    assert_same_bits(got, book64.astype(np.float32)[indices])


@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_unpack_round_trip_exact_layout(bits):
    """LSB-first stream layout from the schema: index i at stream bits [i*bits, (i+1)*bits)."""
    rng = np.random.default_rng(7 + bits)
    count = 37
    indices = rng.integers(0, 1 << bits, count)
    packed = pack_indices(indices, bits)
    stream = 0
    for i, v in enumerate(indices):
        stream |= int(v) << (i * bits)
    want = stream.to_bytes((count * bits + 7) // 8, "little")
    assert packed.tobytes() == want
    assert np.array_equal(unpack_indices_reference(packed, bits, count), indices)


def test_pack_indices_known_bytes():
    assert pack_indices(np.array([1, 0, 1, 1]), 1).tobytes() == bytes([0b1101])
    assert pack_indices(np.array([3, 0, 2, 1]), 2).tobytes() == bytes([0b01100011])
    # 3 bits: 5 | 6 << 3 | 7 << 6 = 0x1F5 -> bytes f5 01
    assert pack_indices(np.array([5, 6, 7]), 3).tobytes() == bytes([0xF5, 0x01])
    assert pack_indices(np.array([0xAB, 0x01]), 8).tobytes() == bytes([0xAB, 0x01])
    assert pack_indices(np.zeros(0, np.int64), 5).tobytes() == b""


def test_pack_indices_accepts_any_integer_dtype_and_shape():
    indices = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) % 32
    packed = pack_indices(indices, 5)
    assert np.array_equal(unpack_indices_reference(packed, 5, 24), indices.ravel())


@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_indices_rejects_out_of_range(bits):
    with pytest.raises(ValueError, match="indices must be in"):
        pack_indices(np.array([0, 1 << bits]), bits)
    with pytest.raises(ValueError, match="indices must be in"):
        pack_indices(np.array([0, -1]), bits)


@pytest.mark.parametrize("bits", [0, 9, -1, 16])
def test_pack_indices_rejects_bad_width(bits):
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        pack_indices(np.array([0]), bits)


@pytest.mark.parametrize("bits", WIDTHS)
def test_max_index_is_the_true_max(bits):
    rng = np.random.default_rng(99 + bits)
    for count in (1, 2, 3, 9, 100, 1001):
        top = int(rng.integers(0, 1 << bits))
        indices = rng.integers(0, top + 1, count)
        indices[-1] = top  # the maximum in the last (possibly partial) byte
        assert max_index(pack_indices(indices, bits), bits, count) == top
        indices[-1] = 0
        assert max_index(pack_indices(indices, bits), bits, count) == int(indices.max())
    assert max_index(np.zeros(0, np.uint8), bits, 0) == 0


@pytest.mark.parametrize("bits", WIDTHS)
def test_max_index_ignores_padding_bits_of_the_last_byte(bits):
    """Bits after the last index are not an index: they must not count."""
    count = 1 if bits < 8 else 2
    indices = np.zeros(count, np.int64)
    packed = pack_indices(indices, bits)
    packed[-1] |= np.uint8((0xFF << ((count * bits) % 8 or 8)) & 0xFF)
    assert max_index(packed, bits, count) == 0


def test_decode_reference_raw_f32():
    values = np.array([1.5, -0.0, np.inf, 1e-40], dtype="<f4")
    got = decode_reference(Encoding.RAW_F32, np.frombuffer(values.tobytes(), np.uint8), 0, 4, None)
    assert_same_bits(got.astype(np.float32), values.astype(np.float32))
    with pytest.raises(ValueError, match="unknown encoding"):
        decode_reference(99, np.zeros(4, np.uint8), 0, 1, None)


@pytest.mark.parametrize("k", range(1, 257))
def test_index_bits_is_ceil_log2_at_least_1(k):
    want = max(1, math.ceil(math.log2(k)))
    assert index_bits(k) == want
    assert k <= 1 << index_bits(k)


def test_index_bits_rejects_empty_codebook():
    with pytest.raises(ValueError):
        index_bits(0)


@st.composite
def packed_streams(draw):
    bits = draw(st.integers(1, 8))
    indices = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    return bits, indices


@settings(max_examples=300, deadline=None)
@given(packed_streams())
def test_property_round_trip(case):
    bits, indices = case
    idx = np.array(indices, dtype=np.int64)
    count = len(idx)
    packed = pack_indices(idx, bits)
    assert len(packed) == (count * bits + 7) // 8
    assert np.array_equal(unpack_indices_reference(packed, bits, count), idx)
    book = np.arange(1 << bits, dtype=np.float32) * np.float32(-0.5)
    assert_same_bits(decode_packed(packed, bits, count, book), book[idx])
    assert max_index(packed, bits, count) == (max(indices) if indices else 0)
