"""RANS_INTERLEAVED codec (format 1.3): round trips against the reference decoder and the
original indices, every lane count, lane choice, hostile buffers, and the file-level checks."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rans import (  # the coders' shared test helpers
    _data,
    _patched,
    _u8,
    damaged,
    decoders_agree,
    round_trip_checks,
)

import escepe_rt
from escepe_rt import format as fmt
from escepe_rt import rans
from escepe_rt import rans_interleaved as ri
from escepe_rt._fbs.Encoding import Encoding
from escepe_rt.errors import FormatError
from escepe_rt.rans import RansError
from escepe_rt.rans_interleaved import RANS_L

LANES = [1, 2, 4, 8, 16, 32]


def _check_round_trip(idx: np.ndarray, s: int, prob_bits: int = ri.PROB_BITS, lanes=None):
    buf = ri.encode(idx, s, prob_bits, lanes=lanes)
    h = round_trip_checks(ri, buf, idx, s, prob_bits)
    if lanes is not None:
        assert h.lanes == lanes
    return buf


def _both_raise(buf, match: str | None = None) -> None:
    b = _u8(buf)
    with pytest.raises(RansError, match=match) as e1:
        ri.decode_reference(b)
    with pytest.raises(RansError, match=match) as e2:
        ri.decode(b)
    with pytest.raises(RansError, match=match):
        ri.decode(b, np.zeros(256, np.float32))
    for e in (e1, e2):
        assert e.value.offset is not None and 0 <= e.value.offset <= len(b)
        assert "offset" in str(e.value)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("s,p0", [(1, None), (2, 0.95), (4, 0.93), (16, None), (256, 0.5)])
def test_round_trip_sizes_around_the_lane_count(lanes, s, p0):
    for n in sorted({0, 1, max(lanes - 1, 0), lanes, lanes + 1, 3 * lanes + 1, 1000}):
        _check_round_trip(_data(n, s, p0, seed=n + s + lanes), s, lanes=lanes)


@pytest.mark.parametrize("lanes", [1, 8, 32])
@pytest.mark.parametrize("s,p0", [(4, 0.93), (32, None)])
def test_round_trip_large(lanes, s, p0):
    # the fast unchecked rounds and the checked tail both run; the reference is too slow here
    idx = _data(300_001, s, p0, seed=lanes)
    buf = _u8(ri.encode(idx, s, lanes=lanes))
    np.testing.assert_array_equal(ri.decode(buf), idx)
    cb = np.arange(s, dtype=np.float32) - 1.5
    np.testing.assert_array_equal(ri.decode(buf, cb), cb[idx])


@pytest.mark.parametrize("prob_bits", [10, 11, 12, 13, 14, 15])
def test_round_trip_prob_bits(prob_bits):
    for lanes in (1, 4, 32):
        _check_round_trip(_data(5000, 200, 0.8, seed=prob_bits), 200, prob_bits, lanes)


def test_single_symbol_costs_nothing_but_the_states():
    for n in (1, 1000, 100_000):
        for lanes in LANES:
            buf = _check_round_trip(np.zeros(n, np.uint8), 1, lanes=lanes)
            assert len(buf) == 12 + 4 * lanes  # header, padding, states; empty stream


def test_unused_symbols_multidim_and_buffer_types():
    idx = _data(3000, 8, 0.7).reshape(10, 300) * 3  # symbols 0, 3, ..., 21 of 32
    buf = _check_round_trip(idx, 32, lanes=8)
    freqs = ri.parse_header(_u8(buf)).freqs
    assert np.all(freqs[np.bincount(idx.ravel(), minlength=32) == 0] == 0)
    for b in (buf, bytearray(buf), memoryview(buf), np.frombuffer(buf, np.uint8)):
        np.testing.assert_array_equal(ri.decode(b), idx.ravel())


def test_odd_address_buffer_is_decoded():
    buf = ri.encode(_data(999, 16, 0.5), 16, lanes=4)
    raw = np.frombuffer(b"\0" + buf, np.uint8)[1:]  # the u16 stream sits at an odd address
    np.testing.assert_array_equal(ri.decode(raw), _data(999, 16, 0.5))


def test_known_answer():
    """The exact bytes for a fixed input pin the layout (a change needs a format bump)."""
    idx = (np.arange(1000) * 7919 % 13 % 5).astype(np.uint8)
    buf = ri.encode(idx, 5, lanes=8)
    assert buf[:8] == struct.pack("<HBBI", 5, 12, 8, 1000)
    assert hashlib.sha256(buf).hexdigest() == (
        "b45afa326182db4d126dbae14e8b244fff83cf920d53cb23e9acb2d0bfd27cc8"
    )


def test_old_rans_writer_still_writes_the_v1_2_golden_bytes():
    """Since 1.3 the writer's golden file pins the interleaved coder; the 1.2 file pins the
    byte-wise one: its RANS_INDICES buffers are what rans.encode writes for their indices."""
    from pathlib import Path

    blob = (Path(__file__).parent / "golden" / "tiny_v1.2.escepe").read_bytes()
    spec = fmt.parse(blob)
    seen = 0
    for t in spec.tensors:
        if t.encoding == Encoding.RANS_INDICES:
            data = bytes(fmt.buffer_bytes(blob, spec, t.buffer))
            k = len(spec.codebooks[t.codebook][1])
            assert rans.encode(rans.decode(data), k) == data
            seen += 1
    assert seen == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), s=st.integers(1, 256))
def test_round_trip_property(data, s):
    n = data.draw(st.integers(0, 600))
    lanes = data.draw(st.sampled_from(LANES))
    skew = data.draw(st.sampled_from(["uniform", "zero", "few"]))
    if skew == "uniform":
        elems = st.integers(0, s - 1)
    elif skew == "zero":
        elems = st.one_of(st.just(0), st.just(0), st.just(0), st.integers(0, s - 1))
    else:
        elems = st.sampled_from(sorted({0, s - 1, s // 2}))
    idx = np.array(data.draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.uint8)
    _check_round_trip(idx, s, lanes=lanes)


# ----------------------------------------------------------------------------- lane choice


def test_writer_picks_lanes_by_size():
    small = _data(1728, 4, 0.93, seed=2)  # a small conv at ~0.4 bits/weight: ~90 B
    one = ri.encode(small, 4, lanes=1)
    auto = ri.encode(small, 4)
    limit = len(one) + ri.size_margin(len(one))
    assert len(auto) <= limit
    w = ri.parse_header(_u8(auto)).lanes
    assert w < ri.WRITER_MAX_LANES  # ~3 bytes a lane: 8 lanes do not fit 1 % of ~90 bytes
    for wider in (2 * w, ri.WRITER_MAX_LANES):  # the widest that fits
        assert len(ri.encode(small, 4, lanes=wider)) > limit
    big = _data(200_000, 4, 0.93, seed=3)
    auto = ri.encode(big, 4)
    assert ri.parse_header(_u8(auto)).lanes == ri.WRITER_MAX_LANES
    assert len(auto) <= len(ri.encode(big, 4, lanes=1)) * 1.01
    assert ri.encode(big, 4, max_bytes=10) is None


def test_size_close_to_entropy_and_to_the_byte_coder():
    idx = _data(100_000, 16, 0.9, seed=7)
    h = rans.entropy_bits(idx, 16)
    for lanes in (1, 8, 32):
        buf = ri.encode(idx, 16, lanes=lanes)
        header = 8 + 2 * 16 + 4 * lanes
        assert 8 * (len(buf) - header) / idx.size <= h + 0.01  # the stream alone
        assert len(buf) <= len(rans.encode(idx, 16)) + 4 * lanes


# ----------------------------------------------------------------------------- hostile input


def _small_buffer(lanes: int = 4) -> bytes:
    return ri.encode(_data(301, 5, 0.6, seed=3), 5, lanes=lanes)  # partial last round


def test_error_type_and_offset():
    assert issubclass(RansError, FormatError) and issubclass(RansError, ValueError)
    with pytest.raises(RansError, match="offset 3"):
        ri.parse_header(_u8(struct.pack("<HBBI", 1, 12, 3, 0) + b"\0" * 8))


@pytest.mark.parametrize("lanes", [1, 4, 8, 32])
def test_truncated_at_every_length(lanes):
    buf = _small_buffer(lanes)
    for n in range(len(buf)):
        _both_raise(buf[:n])


def test_trailing_garbage():
    _both_raise(_small_buffer() + b"\0\0", match="does not end where it should")
    _both_raise(_small_buffer() + b"\0", match="whole number")


@pytest.mark.parametrize("lanes", [1, 4, 8, 32])
def test_every_flipped_byte_and_bit(lanes):
    buf = _small_buffer(lanes)
    for pos in range(len(buf)):
        for mask in (0xFF, 0x01, 0x10, 0x80):
            bad = bytearray(buf)
            bad[pos] ^= mask
            b = _u8(bad)
            outs = []
            for fn in (ri.decode_reference, ri.decode):
                try:
                    outs.append(fn(b))
                except RansError as e:
                    assert e.offset is not None
                    outs.append(None)
            assert (outs[0] is None) == (outs[1] is None), (pos, mask)
            if outs[0] is not None:
                pytest.fail(f"undetected corruption at byte {pos} mask {mask:#x}")


def test_bad_header_fields():
    buf = _small_buffer(4)  # S = 5: freq at 8..18, pad 18..20, states at 20..36, stream 36..
    _both_raise(_patched(buf, "<H", 0, 0), match="num_symbols")
    _both_raise(_patched(buf, "<H", 0, 257), match="num_symbols")
    _both_raise(_patched(buf, "<H", 0, 0xFFFF), match="num_symbols")
    for p in (0, 9, 16, 255):
        _both_raise(_patched(buf, "<B", 2, p), match="prob_bits")
    for w in (0, 3, 6, 33, 64, 255):
        _both_raise(_patched(buf, "<B", 3, w), match="lanes")
    _both_raise(_patched(buf, "<H", 8, struct.unpack_from("<H", buf, 8)[0] + 1), match="sum")
    _both_raise(_patched(buf, "<H", 18, 0x0101), match="padding")
    for j in range(4):
        for v in (0, RANS_L - 1):
            with pytest.raises(RansError, match=f"lane {j}") as e:
                ri.decode(_patched(buf, "<I", 20 + 4 * j, v))
            assert e.value.offset == 20 + 4 * j
    _both_raise(_patched(buf, "<I", 20, 0xFFFFFFFF))
    _both_raise(_patched(buf, "<B", 3, 8))  # more lanes: the states eat the stream
    _both_raise(_patched(buf, "<B", 3, 2))
    n = struct.unpack_from("<I", buf, 4)[0]
    for count in (n + 1, n - 1, 0, n + 4, n - 4):
        _both_raise(_patched(buf, "<I", 4, count))


def test_huge_count_fails_fast():
    buf = _patched(_small_buffer(), "<I", 4, 0xFFFFFFFF)
    t = time.perf_counter()
    _both_raise(buf, match="impossible")
    assert time.perf_counter() - t < 1.0
    # highly skewed table: no usable bound, but the stream runs out quickly
    buf = ri.encode(_data(1000, 16, 0.99, seed=1), 16, lanes=8)
    _both_raise(_patched(buf, "<I", 4, 2_000_000), match="exhausted|impossible|end")


@pytest.mark.parametrize("prob_bits", [10, 12, 15])
def test_count_bound_never_rejects_a_valid_stream(prob_bits):
    """Tables that do not match the data (a foreign writer), and the writer's own tables at
    the skew where the bound is tightest: every valid stream passes, one index more may not."""
    m = 1 << prob_bits
    for lanes in (1, 8, 32):
        for f0 in (m // 2, m - m // 16, m - 4):
            freq = np.array([f0, m - f0], dtype=np.uint16)
            idx = np.zeros(20_000, np.uint8)
            idx[::997] = 1
            buf = _raw_buffer(idx, freq, prob_bits, lanes)
            np.testing.assert_array_equal(ri.decode(buf), idx)
            h = ri.parse_header(_u8(buf))
            bound = ri.max_count(h.freqs, prob_bits, lanes, (len(buf) - h.stream_offset) // 2)
            assert bound is None or bound >= idx.size
        idx = np.zeros(20_000, np.uint8)  # all symbol 0 under a half/half table: the tightest
        buf = _raw_buffer(idx, np.array([m // 2, m // 2], np.uint16), prob_bits, lanes)
        np.testing.assert_array_equal(ri.decode(buf), idx)


def _raw_buffer(idx, freq, prob_bits, lanes) -> bytes:
    """A buffer encoded with a given (not data-derived) frequency table."""
    s = freq.shape[0]
    f32 = freq.astype(np.uint32)
    cum = np.concatenate([[0], np.cumsum(f32)[:-1]]).astype(np.uint32)
    states = np.empty(lanes, np.int64)
    out = np.empty(idx.size, np.uint16)
    pos = ri._encode_kernel(idx, f32, cum, prob_bits, lanes, states, out)
    head = struct.pack(f"<HBBI{s}H", s, prob_bits, lanes, idx.size, *freq.tolist())
    head += b"\0" * (-len(head) % 4)
    return head + states.astype("<u4").tobytes() + out[pos:].astype("<u2").tobytes()


def test_expected_count_and_codebook_size():
    buf = _small_buffer()
    with pytest.raises(RansError, match="expected"):
        ri.decode(buf, expected_count=302)
    assert ri.decode(buf, expected_count=301).shape == (301,)
    with pytest.raises(RansError, match="codebook"):
        ri.decode(buf, np.zeros(4, np.float32))


def test_encode_rejects_bad_input():
    for args, kw in (
        ((np.array([0, 1, 2]), 2), {}),
        ((np.array([-1]), 2), {}),
        ((np.array([0]), 0), {}),
        ((np.array([0]), 257), {}),
        ((np.array([0]), 2, 16), {}),
        ((np.array([0]), 2, 9), {}),
        ((np.array([0]), 2), {"lanes": 3}),
        ((np.array([0]), 2), {"lanes": 64}),
        ((np.array([0.5]), 2), {}),
    ):
        with pytest.raises(ValueError):
            ri.encode(*args, **kw)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_corruption_never_crashes(data):
    """Random edits: both decoders raise RansError or return the same thing."""
    s = data.draw(st.sampled_from([1, 2, 3, 16, 255]))
    n = data.draw(st.integers(0, 200))
    lanes = data.draw(st.sampled_from(LANES))
    b = damaged(data, ri.encode(_data(n, s, 0.7, seed=n), s, lanes=lanes))
    decoders_agree(ri, b)


# ----------------------------------------------------------------------------- in a file


def _golden_1_3():
    from pathlib import Path

    blob = (Path(__file__).parent / "golden" / "tiny_v1.3.escepe").read_bytes()
    spec = fmt.parse(blob)
    t = next(i for i, t in enumerate(spec.tensors) if t.encoding == Encoding.RANS_INTERLEAVED)
    return blob, spec, t, spec.buffers[spec.tensors[t].buffer][0]


def _sealed(blob: bytearray) -> bytes:
    pos = fmt.checksum_position(blob)
    blob[pos : pos + 4] = b"\0\0\0\0"
    blob[pos : pos + 4] = zlib.crc32(blob).to_bytes(4, "little")
    return bytes(blob)


def test_golden_file_uses_the_encoding_and_decodes_like_the_reference(tmp_path):
    blob, spec, t, _ = _golden_1_3()
    path = tmp_path / "g.escepe"
    path.write_bytes(blob)
    m = escepe_rt.load(path)
    from escepe_rt.encodings import decode_reference

    ts = spec.tensors[t]
    ref = decode_reference(
        ts.encoding,
        fmt.buffer_bytes(blob, spec, ts.buffer),
        0,
        ts.count,
        spec.codebooks[ts.codebook][1],
    )
    np.testing.assert_array_equal(m._executor.tensor(t).ravel(), ref)


@pytest.mark.parametrize(
    "offset,value,fmt_,match",
    [
        (3, 3, "<B", "lanes"),
        (2, 16, "<B", "prob_bits"),
        (0, 3, "<H", "symbols"),  # a valid header, but not the codebook's size
        (4, 35, "<I", "indices"),  # count != the tensor's 36
    ],
)
def test_load_refuses_bad_headers_naming_the_tensor(tmp_path, offset, value, fmt_, match):
    blob, spec, t, at = _golden_1_3()
    bad = bytearray(blob)
    struct.pack_into(fmt_, bad, at + offset, value)
    if offset == 0:  # keep the table valid for 3 symbols: move symbol 3's freq onto symbol 2
        f = list(struct.unpack_from("<4H", bad, at + 8))
        struct.pack_into("<4H", bad, at + 8, f[0], f[1], f[2] + f[3], 0)
    path = tmp_path / "bad.escepe"
    path.write_bytes(_sealed(bad))
    with pytest.raises(FormatError, match=match) as e:
        escepe_rt.load(path)
    assert e.value.field == f"tensors[{t}]" and e.value.offset is not None


def test_corrupt_stream_raises_format_error_at_predict(tmp_path):
    blob, spec, t, at = _golden_1_3()
    size = spec.buffers[spec.tensors[t].buffer][1]
    bad = bytearray(blob)
    bad[at + size - 1] ^= 0x5A  # last stream byte: the header stays valid
    path = tmp_path / "bad.escepe"
    path.write_bytes(_sealed(bad))
    m = escepe_rt.load(path)  # the stream is checked when decoded, lazily
    x = np.zeros((1, *spec.input_shape), np.float32)
    with pytest.raises(FormatError) as e:
        m.predict(x)
    assert e.value.field == f"tensors[{t}]" and e.value.offset is not None
