"""RANS_INDICES codec: round trips, compression vs entropy, hostile buffers (both decoders)."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escepe_rt import rans
from escepe_rt.errors import FormatError
from escepe_rt.rans import RANS_L, RansError


def _data(n: int, s: int, p0: float | None, seed: int = 0) -> np.ndarray:
    """n indices over s symbols: uniform (p0 None) or symbol 0 with prob p0, rest uniform."""
    rng = np.random.default_rng(seed)
    if s == 1:
        return np.zeros(n, dtype=np.uint8)
    if p0 is None:
        return rng.integers(0, s, n).astype(np.uint8)
    p = np.full(s, (1 - p0) / (s - 1))
    p[0] = p0
    return rng.choice(s, n, p=p).astype(np.uint8)


def _u8(buf) -> np.ndarray:
    return np.frombuffer(bytes(buf), dtype=np.uint8)


def _raw_buffer(idx: np.ndarray, freq: np.ndarray, prob_bits: int = 12) -> bytes:
    """A buffer encoded with a given (not data-derived) frequency table."""
    s = freq.shape[0]
    f32 = freq.astype(np.uint32)
    cum = np.concatenate([[0], np.cumsum(f32)[:-1]]).astype(np.uint32)
    out = np.empty(2 * idx.size, dtype=np.uint8)
    x, pos = rans._encode_kernel(np.ascontiguousarray(idx, np.uint8), f32, cum, prob_bits, out)
    head = struct.pack(f"<HHI{s}H", s, prob_bits, idx.size, *freq.tolist())
    head += b"\0" * (-len(head) % 4)
    return head + struct.pack("<I", int(x)) + out[pos:].tobytes()


def round_trip_checks(codec, buf: bytes, idx: np.ndarray, s: int, prob_bits: int):
    """A codec's encoded buffer decodes back to idx with the reference decoder, the numba
    decoder and the numba decoder gathering codebook values; the header says s / prob_bits /
    N. Returns the header (also used by tests/test_rans_interleaved.py)."""
    b = _u8(buf)
    ref = codec.decode_reference(b)
    assert ref.dtype == np.uint8 and ref.shape == (idx.size,)
    np.testing.assert_array_equal(ref, idx.ravel())
    fast = codec.decode(b)
    assert fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, ref)
    codebook = np.linspace(-1.0, 1.0, s, dtype=np.float32) + np.float32(0.25)
    w = codec.decode(b, codebook)
    assert w.dtype == np.float32 and w.shape == (idx.size,)
    np.testing.assert_array_equal(w, codebook[ref])
    h = codec.parse_header(b)
    assert (h.num_symbols, h.prob_bits, h.count) == (s, prob_bits, idx.size)
    return h


def _check_round_trip(idx: np.ndarray, s: int, prob_bits: int = rans.PROB_BITS) -> bytes:
    buf = rans.encode(idx, s, prob_bits)
    round_trip_checks(rans, buf, idx, s, prob_bits)
    return buf


def _both_raise(buf, match: str | None = None) -> None:
    b = _u8(buf)
    with pytest.raises(RansError, match=match):
        rans.decode_reference(b)
    with pytest.raises(RansError, match=match):
        rans.decode(b)
    with pytest.raises(RansError, match=match):
        rans.decode(b, np.zeros(256, np.float32))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 100_000])
@pytest.mark.parametrize("s", [1, 2, 16, 256])
@pytest.mark.parametrize("p0", [None, 0.99])
def test_round_trip(n, s, p0):
    if s == 1 and p0 is not None:
        pytest.skip("one symbol: no distribution to vary")
    _check_round_trip(_data(n, s, p0, seed=n + s), s)


@pytest.mark.parametrize("prob_bits", [10, 11, 12, 13, 14])
def test_round_trip_prob_bits(prob_bits):
    _check_round_trip(_data(5000, 200, 0.8, seed=prob_bits), 200, prob_bits)


def test_single_symbol_costs_nothing():
    for n in (1, 1000, 100_000):
        buf = _check_round_trip(np.zeros(n, np.uint8), 1)
        assert len(buf) == 16  # 8 + 2 freq bytes, padded to 12, + state; empty stream
        assert struct.unpack_from("<I", buf, 12)[0] == RANS_L


def test_unused_symbols_and_multidim_input():
    idx = _data(3000, 8, 0.7).reshape(10, 300) * 3  # symbols 0, 3, 6, ..., 21 of 32
    buf = _check_round_trip(idx, 32)
    freqs = rans.parse_header(_u8(buf)).freqs
    assert np.all(freqs[np.bincount(idx.ravel(), minlength=32) == 0] == 0)


def test_bytes_and_readonly_input():
    idx = _data(500, 16, 0.9)
    buf = rans.encode(idx, 16)
    for b in (buf, bytearray(buf), memoryview(buf), np.frombuffer(buf, np.uint8)):
        np.testing.assert_array_equal(rans.decode(b), idx)
        np.testing.assert_array_equal(rans.decode_reference(b), idx)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), s=st.integers(1, 256))
def test_round_trip_property(data, s):
    n = data.draw(st.integers(0, 600))
    skew = data.draw(st.sampled_from(["uniform", "zero", "few"]))
    if skew == "uniform":
        elems = st.integers(0, s - 1)
    elif skew == "zero":
        elems = st.one_of(st.just(0), st.just(0), st.just(0), st.integers(0, s - 1))
    else:
        elems = st.sampled_from(sorted({0, s - 1, s // 2}))
    idx = np.array(data.draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.uint8)
    _check_round_trip(idx, s)


def test_valid_streams_with_nonadaptive_table_pass_count_bound():
    """A table that does not match the data (a foreign writer) must not trip the N bound."""
    for f0 in (2048, 3000, 4000, 4090):
        freq = np.array([f0, 4096 - f0], dtype=np.uint16)
        idx = np.zeros(200_000, np.uint8)
        idx[::997] = 1
        buf = _raw_buffer(idx, freq)
        np.testing.assert_array_equal(rans.decode(buf), idx)
        bound = rans.max_count(freq, 12, len(buf) - 16)
        assert bound is None or bound >= idx.size


# ----------------------------------------------------------------------------- compression


def test_size_close_to_entropy():
    idx = _data(100_000, 16, 0.9, seed=7)
    buf = rans.encode(idx, 16)
    h = rans.entropy_bits(idx, 16)
    header = 8 + 2 * 16 + 4
    bits = 8 * len(buf) / idx.size
    assert bits <= h + 0.02 + 8 * header / idx.size, (bits, h)
    assert bits < 0.9  # below 1 bit per index (entropy ~0.86)
    # and the stream alone is within 0.01 bit of the entropy
    assert 8 * (len(buf) - header) / idx.size <= h + 0.01


def test_entropy_bits():
    assert rans.entropy_bits(np.zeros(0, np.uint8), 4) == 0.0
    assert rans.entropy_bits(np.zeros(100, np.uint8), 4) == 0.0
    assert rans.entropy_bits(np.arange(256, dtype=np.uint8), 256) == pytest.approx(8.0)
    assert rans.entropy_bits(np.array([0, 1, 0, 1]), 2) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- quantize_freqs


def _cost(counts, freqs, m):
    used = counts > 0
    return float((counts[used] * np.log2(m / freqs[used].astype(np.float64))).sum())


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(0, 10**6), min_size=1, max_size=256),
    prob_bits=st.integers(10, 14),
)
def test_quantize_freqs_property(counts, prob_bits):
    c = np.array(counts, dtype=np.uint32)
    f = rans.quantize_freqs(c, prob_bits)
    m = 1 << prob_bits
    assert f.dtype == np.uint16 and f.shape == c.shape
    assert int(f.sum(dtype=np.int64)) == m
    if c.sum() == 0:
        return
    assert np.all(f[c > 0] >= 1)
    assert np.all(f[c == 0] == 0)
    # locally optimal: no single unit move between used symbols lowers the coded size
    used = np.flatnonzero(c > 0)
    if used.size >= 2:
        base = _cost(c, f, m)
        rng = np.random.default_rng(len(counts))
        for _ in range(20):
            i, j = rng.choice(used, 2, replace=False)
            if f[j] <= 1:
                continue
            g = f.astype(np.int64)
            g[i] += 1
            g[j] -= 1
            assert _cost(c, g, m) >= base - 1e-6 * max(1.0, base)


def test_quantize_freqs_edge_cases():
    assert rans.quantize_freqs(np.array([5]), 12).tolist() == [4096]
    assert rans.quantize_freqs(np.zeros(3, np.uint32)).sum() == 4096
    f = rans.quantize_freqs(np.array([10**9] + [1] * 255, dtype=np.uint32), 10)
    assert f.sum() == 1024 and f.min() == 1 and f[0] == 1024 - 255
    with pytest.raises(ValueError):
        rans.quantize_freqs(np.ones(4), 9)
    with pytest.raises(ValueError):
        rans.quantize_freqs(np.ones(257))


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        rans.encode(np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError):
        rans.encode(np.array([-1]), 2)
    with pytest.raises(ValueError):
        rans.encode(np.array([0]), 0)
    with pytest.raises(ValueError):
        rans.encode(np.array([0]), 257)
    with pytest.raises(ValueError):
        rans.encode(np.array([0]), 2, prob_bits=15)


# ----------------------------------------------------------------------------- hostile input


def _small_buffer() -> bytes:
    return rans.encode(_data(300, 5, 0.6, seed=3), 5)


def test_error_type():
    assert issubclass(RansError, FormatError) and issubclass(RansError, ValueError)
    with pytest.raises(RansError, match="offset 2"):
        rans.parse_header(_u8(struct.pack("<HHI", 1, 9, 0) + b"\0" * 8))


def test_truncated_at_every_length():
    buf = _small_buffer()
    assert len(buf) > 40
    for n in range(len(buf)):
        _both_raise(buf[:n])


def test_trailing_garbage():
    _both_raise(_small_buffer() + b"\0", match="does not end where it should")


def test_every_flipped_byte_and_bit():
    buf = _small_buffer()
    for pos in range(len(buf)):
        for mask in (0xFF, 0x01, 0x10, 0x80):
            bad = bytearray(buf)
            bad[pos] ^= mask
            b = _u8(bad)
            try:
                ref = rans.decode_reference(b)
            except RansError:
                ref = None
            try:
                fast = rans.decode(b)
            except RansError:
                fast = None
            # both decoders agree, and (for this fixed stream) every corruption is detected
            assert (ref is None) == (fast is None), (pos, mask)
            if ref is not None:
                np.testing.assert_array_equal(ref, fast)
                pytest.fail(f"undetected corruption at byte {pos} mask {mask:#x}")


def _patched(buf: bytes, fmt: str, offset: int, value) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_bad_header_fields():
    buf = _small_buffer()  # S = 5: freq at 8..18, pad 18..20, state at 20
    _both_raise(_patched(buf, "<H", 0, 0), match="num_symbols")
    _both_raise(_patched(buf, "<H", 0, 257), match="num_symbols")
    _both_raise(_patched(buf, "<H", 0, 0xFFFF), match="num_symbols")
    for p in (0, 9, 15, 0xFFFF):
        _both_raise(_patched(buf, "<H", 2, p), match="prob_bits")
    _both_raise(_patched(buf, "<H", 8, struct.unpack_from("<H", buf, 8)[0] + 1), match="sum")
    _both_raise(_patched(buf, "<H", 18, 0x0101), match="padding")
    _both_raise(_patched(buf, "<I", 20, RANS_L - 1), match="state")
    _both_raise(_patched(buf, "<I", 20, RANS_L << 8), match="state")
    _both_raise(_patched(buf, "<I", 20, 0), match="state")
    _both_raise(_patched(buf, "<I", 20, 0xFFFFFFFF), match="state")
    n = struct.unpack_from("<I", buf, 4)[0]
    _both_raise(_patched(buf, "<I", 4, n + 1))
    _both_raise(_patched(buf, "<I", 4, n - 1))
    _both_raise(_patched(buf, "<I", 4, 0))


def test_huge_count_fails_fast():
    buf = _patched(_small_buffer(), "<I", 4, 0xFFFFFFFF)
    t = time.perf_counter()
    _both_raise(buf, match="impossible")
    assert time.perf_counter() - t < 1.0
    # highly skewed table: the bound is looser, but the stream runs out quickly
    buf = rans.encode(_data(1000, 16, 0.99, seed=1), 16)
    bad = _patched(buf, "<I", 4, 2_000_000)
    _both_raise(bad, match="exhausted|impossible")


def test_expected_count_and_codebook_size():
    buf = _small_buffer()
    with pytest.raises(RansError, match="expected"):
        rans.decode(buf, expected_count=301)
    assert rans.decode(buf, expected_count=300).shape == (300,)
    with pytest.raises(RansError, match="codebook"):
        rans.decode(buf, np.zeros(4, np.float32))


def test_too_short_for_freq_table():
    _both_raise(struct.pack("<HHI", 256, 12, 0) + b"\0" * 100)


def damaged(data, encoded: bytes) -> np.ndarray:
    """Hypothesis-drawn damage to an encoded buffer: 1-4 byte edits, maybe a truncation, maybe
    a few trailing bytes (also used by tests/test_rans_interleaved.py)."""
    buf = bytearray(encoded)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    if data.draw(st.booleans()):
        buf += bytes(data.draw(st.lists(st.integers(0, 255), max_size=8)))
    return _u8(buf)


def decoders_agree(codec, b: np.ndarray):
    """codec.decode_reference and codec.decode on b both raise RansError or return the same
    indices. Returns (checked, decode's indices or None); checked is False for a legitimately
    huge N (a one-symbol table), which the caller bounds, not the codec."""
    try:
        h = codec.parse_header(b)
    except RansError:
        h = None
    if h is not None and h.count > 100_000:
        return False, None
    outs = []
    for fn in (codec.decode_reference, codec.decode):
        try:
            outs.append(fn(b))
        except RansError:
            outs.append(None)
    assert (outs[0] is None) == (outs[1] is None)
    if outs[0] is not None:
        np.testing.assert_array_equal(outs[0], outs[1])
    return True, outs[1]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_corruption_never_crashes(data):
    """Random edits: both decoders raise RansError or return the same thing."""
    s = data.draw(st.sampled_from([1, 2, 3, 16, 255]))
    n = data.draw(st.integers(0, 200))
    b = damaged(data, rans.encode(_data(n, s, 0.7, seed=n), s))
    checked, out = decoders_agree(rans, b)
    if not checked:
        return
    try:
        w = rans.decode(b, np.arange(256, dtype=np.float32))
    except RansError:
        w = None
    assert (w is None) == (out is None)
    if w is not None:
        np.testing.assert_array_equal(w, out.astype(np.float32))
