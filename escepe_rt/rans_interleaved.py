"""RANS_INTERLEAVED: word-wise rANS in W interleaved lanes (after ryg's rans_word.h, "rans32x16").

RANS_INDICES (rans.py) has one state and a data-dependent `while x < L` loop that reads bytes:
every decoded index waits for the previous one (a multiply and a table load), so it produces
only ~0.5-0.75 GB/s of float32. Here every index still costs one multiply and one table load,
but index i belongs to lane i % W, and W lanes decode side by side: the only dependency between
lanes is the pointer into their one shared word stream, a cheap add. 32-bit states with
L = 1 << 16 and 16-bit words mean a lane reads at most ONE word per index, so renormalisation
is branchless (`need = x < L; x = need ? (x << 16) | word : x; ptr += need`).

Buffer layout
-------------
A RANS_INTERLEAVED buffer is self-contained, all integers little-endian::

    off    size     field
    0      u16      num_symbols S (1..256)   -- must equal the codebook size k (checked by caller)
    2      u8       prob_bits P              -- the writer uses 12; readers accept 10..15
    3      u8       lanes W                  -- a power of two, 1..32
    4      u32      count N of indices encoded -- caller checks it against the tensor's shape
    8      u16[S]   freq[S]                  -- quantised frequencies, sum == M = 1 << P;
                                                freq > 0 for every used symbol, 0 for unused
    8+2S   ...      zero bytes up to the next 4-byte boundary: H = (8 + 2S + 3) & ~3
    H      u32[W]   x0[j], lane j's final encoder state = its initial decoder state, >= L
    H+4W   u16[...] stream: renormalisation words, read FORWARD by the decoder, to the end of
                    the buffer (so the buffer length - H - 4W must be even)

with L = 1 << 16. Let cum[s] = freq[0] + ... + freq[s-1]. Index i is coded by lane j = i % W.
Every lane starts encoding from x = L; the encoder processes the indices in reverse order
(N-1 down to 0), so that the decoder produces them in order; for symbol s of lane j, with
f = freq[s]::

    if x_j >= ((L >> P) << 16) * f:  emit word (x_j & 0xFFFF); x_j >>= 16   (at most once)
    x_j = (x_j // f) * M + (x_j % f) + cum[s]

All lanes emit into one word sequence, last-to-first; the stored stream is that sequence
reversed. Decoding, with x_j = x0[j] and ptr = 0, for i = 0..N-1 (j = i % W)::

    slot = x_j & (M - 1)
    s = the symbol with cum[s] <= slot < cum[s] + freq[s];  out[i] = s
    x_j = freq[s] * (x_j >> P) + slot - cum[s]
    if x_j < L:
        if ptr == len(stream): error (the stream would be read past its end)
        x_j = (x_j << 16) | stream[ptr]; ptr += 1

States stay in [L, 2^32), so all arithmetic fits in 32 bits, and since x_j >= 2^(16-P)·f >= 1
after a decode step one word always brings it back to >= L (hence P <= 15; P = 16 would also
not fit a one-symbol freq of 2^16 in a u16).

Integrity: after the N-th index every lane must be back at the encoder's initial state
(x_j == L) with every stream word consumed (ptr == len(stream)); anything else is an error
("stream does not end where it should"). This catches nearly all corruption and truncation.

Reader obligations: the header is checked (length, S in 1..256, P in 10..15, W a power of two
in 1..32, zero padding, sum(freq) == M, every x0[j] >= L, an even stream length, and the count
bound below), and the decoder never reads outside the buffer, whatever its content: it runs
whole rounds of W indices unchecked only while ptr + W <= len(stream) (a round reads at most W
words), then finishes with a bounds-checked loop.

Count bound: a decode step shrinks a state at least by M/f up to a factor (1 + M/x) <= 1 +
2^(P-16) (x >= L), and a word grows it by < 2^16; each lane goes from x0 < 2^32 down to L. So
N * r < 16 * (len(stream) + W) with r = log2(M/fmax) - log2(1 + 2^(P-16)) (fmax = max freq).
Readers reject, before allocating anything, N > floor(16 * (len(stream) + W) / r') + 1 with
r' = r - 1e-9, whenever r' > 1e-6 (no bound otherwise; this never rejects a valid stream).

The caller must check S against the codebook size and N against the tensor's shape BEFORE
decoding: decode allocates N output elements, and a buffer whose frequency table gives one
symbol all of M may legitimately encode any N in zero stream words.

Errors are `RansError` (a `FormatError`, hence a `ValueError`) carrying the byte offset within
the buffer.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import numba
import numpy as np

from escepe_rt.rans import (
    MAX_SYMBOLS,
    RansError,
    _slot_tables,
    decode_target,
    quantize_freqs,
    slot_values,
)

PROB_BITS = 12  # 14 measured no smaller on the shipped example, and its tables spill L1
MIN_PROB_BITS = 10
MAX_PROB_BITS = 15
MAX_LANES = 32
# 16 and 32 lanes decoded no faster (~2.4 GB/s, when every lane count had a fast loop) and cost
# 4 B a lane; _decode_loop's fast part now serves 8 lanes only
WRITER_MAX_LANES = 8
RANS_L = 1 << 16  # lower bound of the normalised state interval [L, 2^32)

_FIXED = 8  # bytes before the freq table

# kernel status codes
_OK = 0
_OVERRUN = 1
_BAD_END = 2
_BAD_TABLE = 3


class Header(NamedTuple):
    num_symbols: int
    prob_bits: int
    lanes: int
    count: int
    freqs: np.ndarray  # (num_symbols,) uint16, sums to 1 << prob_bits
    states: np.ndarray  # (lanes,) uint32, the decoder's initial states
    stream_offset: int  # byte offset of the word stream within the buffer


def _states_offset(num_symbols: int) -> int:
    return (_FIXED + 2 * num_symbols + 3) & ~3


def size_margin(nbytes: int) -> int:
    """Bytes the writer will pay for interleaving over a buffer of `nbytes`: 1 %, at least 8."""
    return max(nbytes // 100, 8)


# ----------------------------------------------------------------------------- encoder


@numba.njit(cache=True, nogil=True)
def _encode_kernel(indices, freq, cum, prob_bits, lanes, states, out):
    """Encode `indices` in reverse, lane i % lanes, writing words backwards from the end of `out`.

    Fills `states` with the final encoder states; returns the start of the stream in `out`
    (at most one word per index, so `out` needs `len(indices)` words).
    """
    for j in range(lanes):
        states[j] = RANS_L
    pos = out.shape[0]
    xm_unit = np.int64((RANS_L >> prob_bits) << 16)
    for i in range(indices.shape[0] - 1, -1, -1):
        j = i & (lanes - 1)
        s = indices[i]
        f = np.int64(freq[s])
        x = states[j]
        if x >= xm_unit * f:
            pos -= 1
            out[pos] = np.uint16(x & 0xFFFF)
            x >>= 16
        q = x // f
        states[j] = (q << prob_bits) + (x - q * f) + np.int64(cum[s])
    return pos


def _check_params(num_symbols: int, prob_bits: int, lanes: int) -> None:
    if not 1 <= num_symbols <= MAX_SYMBOLS:
        raise ValueError(f"num_symbols must be in 1..{MAX_SYMBOLS}, got {num_symbols}")
    if not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise ValueError(f"prob_bits must be in {MIN_PROB_BITS}..{MAX_PROB_BITS}, got {prob_bits}")
    if not (1 <= lanes <= MAX_LANES and lanes & (lanes - 1) == 0):
        raise ValueError(f"lanes must be a power of two in 1..{MAX_LANES}, got {lanes}")


def _as_indices(indices: np.ndarray, num_symbols: int) -> np.ndarray:
    idx = np.asarray(indices).ravel()
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers, got {idx.dtype}")
    if idx.size > 0xFFFFFFFF:
        raise ValueError(f"at most 2^32-1 indices per buffer, got {idx.size}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_symbols):
        raise ValueError(f"indices must be in [0, {num_symbols}), got [{idx.min()}, {idx.max()}]")
    return np.ascontiguousarray(idx, dtype=np.uint8)


def _encode_lanes(idx: np.ndarray, freq: np.ndarray, prob_bits: int, lanes: int) -> bytes:
    s = freq.shape[0]
    f32 = freq.astype(np.uint32)
    cum = np.zeros(s, dtype=np.uint32)
    cum[1:] = np.cumsum(f32)[:-1]
    states = np.empty(lanes, dtype=np.int64)
    out = np.empty(idx.size, dtype=np.uint16)
    pos = _encode_kernel(idx, f32, cum, prob_bits, lanes, states, out)
    head = struct.pack(f"<HBBI{s}H", s, prob_bits, lanes, idx.size, *freq.tolist())
    head += b"\0" * (_states_offset(s) - len(head))
    return head + states.astype("<u4").tobytes() + out[pos:].astype("<u2").tobytes()


def encode(
    indices: np.ndarray,
    num_symbols: int,
    prob_bits: int = PROB_BITS,
    lanes: int | None = None,
    max_bytes: int | None = None,
) -> bytes | None:
    """Encode integer indices (any shape, C order; values in [0, num_symbols)) as RANS_INTERLEAVED.

    `lanes` fixes W. Without it the writer picks the largest W <= WRITER_MAX_LANES whose buffer
    is at most `max_bytes` long (default: the one-lane buffer plus `size_margin` of it): each
    lane costs a 4-byte state (~3 bytes net), worth paying on large tensors (decode speed) but
    not on a 100-byte one. Returns None only if no W, not even 1, fits `max_bytes`.
    """
    _check_params(num_symbols, prob_bits, 1 if lanes is None else lanes)
    idx = _as_indices(indices, num_symbols)
    freq = quantize_freqs(np.bincount(idx, minlength=num_symbols), prob_bits)
    if lanes is not None:
        return _encode_lanes(idx, freq, prob_bits, lanes)
    one = _encode_lanes(idx, freq, prob_bits, 1)
    limit = len(one) + size_margin(len(one)) if max_bytes is None else max_bytes
    w = WRITER_MAX_LANES
    while w > 1:
        # each lane adds >= ~2 net bytes: skip encodes that cannot fit
        if len(one) + 2 * (w - 1) <= limit:
            buf = _encode_lanes(idx, freq, prob_bits, w)
            if len(buf) <= limit:
                return buf
        w //= 2
    return one if len(one) <= limit else None


# ----------------------------------------------------------------------------- header


def _as_u8(buf) -> np.ndarray:
    if isinstance(buf, (bytes, bytearray, memoryview)):
        return np.frombuffer(buf, dtype=np.uint8)
    a = np.asarray(buf)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise TypeError(f"expected a 1-D uint8 buffer, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def max_count(freqs: np.ndarray, prob_bits: int, lanes: int, stream_words: int) -> int | None:
    """Upper bound on N for any valid buffer with this table, or None if unbounded.

    See the module docstring: N * r < 16 * (words + W), r = log2(M/fmax) - log2(1 + 2^(P-16)).
    """
    fmax = int(np.max(freqs))
    if fmax <= 0:
        return None
    r = math.log2((1 << prob_bits) / fmax) - math.log2(1 + 2.0 ** (prob_bits - 16)) - 1e-9
    if r <= 1e-6:
        return None
    return int(16 * (stream_words + lanes) / r) + 1


def parse_header(buf) -> Header:
    """Read and validate the header of a RANS_INTERLEAVED buffer; RansError if malformed."""
    b = _as_u8(buf)
    n = b.shape[0]
    if n < _FIXED:
        raise RansError(f"buffer of {n} bytes is shorter than the {_FIXED}-byte header", 0)
    num_symbols, prob_bits, lanes, count = struct.unpack_from("<HBBI", b, 0)
    if not 1 <= num_symbols <= MAX_SYMBOLS:
        raise RansError(f"num_symbols {num_symbols} not in 1..{MAX_SYMBOLS}", 0)
    if not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise RansError(f"prob_bits {prob_bits} not in {MIN_PROB_BITS}..{MAX_PROB_BITS}", 2)
    if not (1 <= lanes <= MAX_LANES and lanes & (lanes - 1) == 0):
        raise RansError(f"lanes {lanes} is not a power of two in 1..{MAX_LANES}", 3)
    soff = _states_offset(num_symbols)
    stream_offset = soff + 4 * lanes
    if n < stream_offset:
        raise RansError(
            f"buffer of {n} bytes too short for a header with {num_symbols} symbols and "
            f"{lanes} lanes ({stream_offset} bytes)",
            n,
        )
    freqs = b[_FIXED : _FIXED + 2 * num_symbols].view("<u2").astype(np.uint16)
    total = int(freqs.sum(dtype=np.int64))
    if total != 1 << prob_bits:
        raise RansError(f"frequencies sum to {total}, not 1 << {prob_bits}", _FIXED)
    pad = b[_FIXED + 2 * num_symbols : soff]
    if pad.size and pad.any():
        raise RansError("non-zero padding after the frequency table", _FIXED + 2 * num_symbols)
    states = b[soff:stream_offset].view("<u4").astype(np.uint32)
    low = np.flatnonzero(states < RANS_L)
    if low.size:
        j = int(low[0])
        raise RansError(
            f"initial state of lane {j} {int(states[j]):#x} is below 2^16", soff + 4 * j
        )
    if (n - stream_offset) % 2:
        raise RansError(
            f"word stream of {n - stream_offset} bytes is not a whole number of 16-bit words",
            n - 1,
        )
    words = (n - stream_offset) // 2
    bound = max_count(freqs, prob_bits, lanes, words)
    if bound is not None and count > bound:
        raise RansError(
            f"count {count} impossible: {words} stream words and {lanes} lanes hold at most "
            f"{bound} indices with these frequencies",
            4,
        )
    return Header(num_symbols, prob_bits, lanes, count, freqs, states, stream_offset)


def _words(b: np.ndarray, h: Header) -> np.ndarray:
    """The stream as uint16 words; a copy only if the buffer sits at an odd address."""
    words = b[h.stream_offset :]
    if words.ctypes.data % 2:
        words = words.copy()
    return words.view("<u2")


def _end_error(h: Header, n: int, word: int, states: np.ndarray) -> RansError:
    bad = [j for j in range(h.lanes) if int(states[j]) != RANS_L]
    unread = (n - h.stream_offset) // 2 - word
    lanes = f"lane {bad[0]} ends in state {int(states[bad[0]]):#x}" if bad else "every lane is home"
    return RansError(
        f"stream does not end where it should: after {h.count} indices {lanes} (expected "
        f"{RANS_L:#x}) and {unread} of {(n - h.stream_offset) // 2} stream words are unread",
        h.stream_offset + 2 * word,
    )


def _overrun_error(h: Header, n: int, i: int) -> RansError:
    return RansError(
        f"stream exhausted while decoding index {i} of {h.count}: it would be read past the "
        f"end of the buffer",
        n,
    )


# ----------------------------------------------------------------------------- reference decoder


def decode_reference(buf) -> np.ndarray:
    """Plain-Python decoder (the oracle): (N,) uint8 indices; RansError if malformed."""
    b = _as_u8(buf)
    h = parse_header(b)
    p, w = h.prob_bits, h.lanes
    mask = (1 << p) - 1
    freq = [int(v) for v in h.freqs]
    cum = [0] * h.num_symbols
    for s in range(1, h.num_symbols):
        cum[s] = cum[s - 1] + freq[s - 1]
    slot2sym = np.repeat(np.arange(h.num_symbols, dtype=np.int64), h.freqs).tolist()
    data = b.tobytes()
    n = len(data)
    words = [v for (v,) in struct.iter_unpack("<H", data[h.stream_offset :])]
    ptr = 0
    x = [int(v) for v in h.states]
    out = bytearray(h.count)
    for i in range(h.count):
        j = i % w
        slot = x[j] & mask
        s = slot2sym[slot]
        out[i] = s
        x[j] = freq[s] * (x[j] >> p) + slot - cum[s]
        if x[j] < RANS_L:
            if ptr >= len(words):
                raise _overrun_error(h, n, i)
            x[j] = (x[j] << 16) | words[ptr]
            ptr += 1
    if any(v != RANS_L for v in x) or ptr != len(words):
        raise _end_error(h, n, ptr, np.array(x, dtype=np.int64))
    return np.frombuffer(bytes(out), dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- numba decoder


@numba.njit(cache=True, nogil=True)
def _decode_loop(words, count, prob_bits, lanes, x, fb, table, out):
    """The hot loop: out[i] = table[slot]; returns (status, i, ptr). `x` holds the lane states.

    Fast part, 8 lanes only (what the writer makes for every big tensor): whole rounds,
    unchecked, while a round's at most 8 word reads stay inside the stream. The eight states
    live in registers, each lane's step then its branchless renormalisation written out
    (states in the array cost a store and a reload per index), indexed by unsigned integers
    (numba adds a negative-index wraparound to every signed index): the largest ResNet-18
    tensor 2.41 -> 3.18 GB/s of float32 in benchmarks/decode.py. Written out here rather than
    through helpers returning tuples (~2.3 s more of numba's cold compile; this costs ~0.7 s);
    a generic fast loop for other lane counts would cost ~0.65 s more, so those (tensors of a
    few KB, where building the slot tables dominates; other writers' 16 or 32 lanes) run the
    checked loop. All arithmetic is uint32 (states < 2^32, see the module docstring)."""
    nw = words.shape[0]
    mask = np.uint32((1 << prob_bits) - 1)
    p = np.uint32(prob_bits)
    s16 = np.uint32(16)
    m16 = np.uint32(0xFFFF)
    lo = np.uint32(RANS_L)
    ptr = 0
    i = 0
    if lanes == 8:
        u, q, eight = np.uint64(0), np.uint64(0), np.uint64(8)
        n_out, n_words = np.uint64(count), np.uint64(nw)
        x0, x1, x2, x3, x4, x5, x6, x7 = x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]
        while u + eight <= n_out and q + eight <= n_words:
            slot = x0 & mask
            out[u + np.uint64(0)] = table[slot]
            e = fb[slot]
            x0 = (e >> s16) * (x0 >> p) + (e & m16)
            slot = x1 & mask
            out[u + np.uint64(1)] = table[slot]
            e = fb[slot]
            x1 = (e >> s16) * (x1 >> p) + (e & m16)
            slot = x2 & mask
            out[u + np.uint64(2)] = table[slot]
            e = fb[slot]
            x2 = (e >> s16) * (x2 >> p) + (e & m16)
            slot = x3 & mask
            out[u + np.uint64(3)] = table[slot]
            e = fb[slot]
            x3 = (e >> s16) * (x3 >> p) + (e & m16)
            slot = x4 & mask
            out[u + np.uint64(4)] = table[slot]
            e = fb[slot]
            x4 = (e >> s16) * (x4 >> p) + (e & m16)
            slot = x5 & mask
            out[u + np.uint64(5)] = table[slot]
            e = fb[slot]
            x5 = (e >> s16) * (x5 >> p) + (e & m16)
            slot = x6 & mask
            out[u + np.uint64(6)] = table[slot]
            e = fb[slot]
            x6 = (e >> s16) * (x6 >> p) + (e & m16)
            slot = x7 & mask
            out[u + np.uint64(7)] = table[slot]
            e = fb[slot]
            x7 = (e >> s16) * (x7 >> p) + (e & m16)
            need = x0 < lo
            w = np.uint32(words[q])
            x0 = ((x0 << s16) | w) if need else x0
            q += np.uint64(need)
            need = x1 < lo
            w = np.uint32(words[q])
            x1 = ((x1 << s16) | w) if need else x1
            q += np.uint64(need)
            need = x2 < lo
            w = np.uint32(words[q])
            x2 = ((x2 << s16) | w) if need else x2
            q += np.uint64(need)
            need = x3 < lo
            w = np.uint32(words[q])
            x3 = ((x3 << s16) | w) if need else x3
            q += np.uint64(need)
            need = x4 < lo
            w = np.uint32(words[q])
            x4 = ((x4 << s16) | w) if need else x4
            q += np.uint64(need)
            need = x5 < lo
            w = np.uint32(words[q])
            x5 = ((x5 << s16) | w) if need else x5
            q += np.uint64(need)
            need = x6 < lo
            w = np.uint32(words[q])
            x6 = ((x6 << s16) | w) if need else x6
            q += np.uint64(need)
            need = x7 < lo
            w = np.uint32(words[q])
            x7 = ((x7 << s16) | w) if need else x7
            q += np.uint64(need)
            u += eight
        x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7] = x0, x1, x2, x3, x4, x5, x6, x7
        i, ptr = np.int64(u), np.int64(q)
    # Checked tail: the last rounds (few words left) and a partial round.
    start = i
    for i in range(start, count):
        j = i & (lanes - 1)
        xj = x[j]
        slot = xj & mask
        out[i] = table[slot]
        e = fb[slot]
        xj = (e >> s16) * (xj >> p) + (e & m16)
        if xj < lo:
            if ptr >= nw:
                return _OVERRUN, i, ptr
            xj = (xj << s16) | np.uint32(words[ptr])
            ptr += 1
        x[j] = xj
    if ptr != nw:
        return _BAD_END, count, ptr
    for j in range(lanes):
        if x[j] != lo:
            return _BAD_END, count, ptr
    return _OK, count, ptr


@numba.njit(cache=True, nogil=True)
def _decode_indices(words, count, freq, prob_bits, lanes, x, out):
    sym, fb, ok = _slot_tables(freq, prob_bits)
    if not ok:
        return _BAD_TABLE, 0, 0
    return _decode_loop(words, count, prob_bits, lanes, x, fb, sym, out)


@numba.njit(cache=True, nogil=True)
def _decode_gather(words, count, freq, prob_bits, lanes, x, codebook, out):
    sym, fb, ok = _slot_tables(freq, prob_bits)
    if not ok:
        return _BAD_TABLE, 0, 0
    return _decode_loop(words, count, prob_bits, lanes, x, fb, slot_values(sym, codebook), out)


def decode(
    buf,
    codebook: np.ndarray | None = None,
    *,
    expected_count: int | None = None,
) -> np.ndarray:
    """Decode a RANS_INTERLEAVED buffer with the numba kernel.

    Without `codebook`: (N,) uint8 indices. With `codebook` (>= num_symbols entries): (N,)
    float32 = codebook[index], gathered inside the decode loop. `expected_count`, if given,
    must equal N (checked before the output is allocated; the caller must bound N against the
    tensor's shape one way or the other). RansError for any malformed buffer.
    """
    b = _as_u8(buf)
    h = parse_header(b)
    out, cb = decode_target(h, codebook, expected_count)
    freq = h.freqs.astype(np.uint32)
    words = _words(b, h)
    x = h.states.copy()
    if cb is None:
        res = _decode_indices(words, h.count, freq, h.prob_bits, h.lanes, x, out)
    else:
        res = _decode_gather(words, h.count, freq, h.prob_bits, h.lanes, x, cb, out)
    status, i, ptr = (int(v) for v in res)
    if status == _OK:
        return out
    n = b.shape[0]
    if status == _OVERRUN:
        raise _overrun_error(h, n, i)
    if status == _BAD_END:
        raise _end_error(h, n, ptr, x)
    raise RansError("frequency table does not sum to 1 << prob_bits", _FIXED)
