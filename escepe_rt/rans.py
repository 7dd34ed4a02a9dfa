"""RANS_INDICES: byte-wise rANS entropy coding of codebook indices (after ryg's rans_byte.h).

Conv weights are stored as indices 0..k-1 (k <= 256) into a per-section codebook. Their
distribution is skewed (a zero cluster often holds 70-90 % of the weights), so an arithmetic-class
coder pays off: rANS goes well below 1 bit per index, which Huffman cannot.

Buffer layout
-------------
A RANS_INDICES buffer is self-contained, all integers little-endian::

    off  size     field
    0    u16      num_symbols S (1..256)   -- must equal the codebook size k (checked by caller)
    2    u16      prob_bits P              -- the writer uses 12; readers accept 10..14
    4    u32      count N of indices encoded -- caller checks it against the tensor's shape
    8    u16[S]   freq[S]                  -- quantised frequencies, sum == M = 1 << P;
                                              freq > 0 for every used symbol, 0 allowed for unused
    8+2S ...      zero bytes up to the next 4-byte boundary: H = (8 + 2S + 3) & ~3
    H    u32      x0, the final encoder state = the decoder's initial state; L <= x0 < L << 8,
                  L = 1 << 23
    H+4  u8[...]  stream: renormalisation bytes, read FORWARD by the decoder, up to the end
                  of the buffer

Let cum[s] = freq[0] + ... + freq[s-1]. The encoder starts from x = L and processes the indices
in reverse order (N-1 down to 0), so that the decoder produces them in order; for symbol s,
with f = freq[s]::

    while x >= ((L >> P) << 8) * f:  emit byte (x & 0xFF); x >>= 8
    x = (x // f) * M + (x % f) + cum[s]

The bytes are emitted last-to-first, i.e. the stored stream is the emission order reversed.
Decoding, with x = x0 and ptr = 0, for i = 0..N-1::

    slot = x & (M - 1)
    s = the symbol with cum[s] <= slot < cum[s] + freq[s];  out[i] = s
    x = freq[s] * (x >> P) + slot - cum[s]
    while x < L:
        if ptr == len(stream): error (the stream would be read past its end)
        x = (x << 8) | stream[ptr]; ptr += 1

Integrity: after the N-th index the decoder must be back at the encoder's initial state
(x == L) with every stream byte consumed (ptr == len(stream)); anything else is an error
("stream does not end where it should"). This catches nearly all corruption and truncation.

Reader obligations: the header is checked (length, S in 1..256, P in 10..14, zero padding,
sum(freq) == M, L <= x0 < L << 8, and the count bound below), and the decoder never reads
outside the buffer, whatever its content.

Count bound: every index costs at least log2(M / fmax) bits (fmax = max freq), so any stream
produced by the encoder above, of B = len(stream) bytes, has
N * (log2(M/fmax) - 0.00282) < 8 + 8.00282 * B. Readers reject, before allocating anything,
N > floor((16 + 8.05 * B) / r) + 2 with r = 0.99 * log2(M/fmax) - 0.005, whenever r > 0.005
(no bound otherwise; this margin never rejects a valid stream).

The caller must check S against the codebook size and N against the tensor's shape BEFORE
decoding: decode allocates N output elements, and a buffer whose frequency table
gives one symbol all of M may legitimately encode any N in zero stream bytes.

Errors are `RansError` (a `FormatError`, hence a `ValueError`) carrying the byte offset within
the buffer.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import numba
import numpy as np

from escepe_rt.errors import FormatError

PROB_BITS = 12
MIN_PROB_BITS = 10
MAX_PROB_BITS = 14
QUANT_MAX_PROB_BITS = 15  # quantize_freqs serves both rANS coders
MAX_SYMBOLS = 256
RANS_L = 1 << 23  # lower bound of the normalised state interval [L, L << 8)

_FIXED = 8  # bytes before the freq table

# kernel status codes
_OK = 0
_OVERRUN = 1
_BAD_END = 2
_BAD_TABLE = 3


class RansError(FormatError):
    """A RANS_INDICES buffer is malformed; `offset` is the byte offset within the buffer."""

    def __init__(self, message: str, offset: int | None = None):
        super().__init__(message, offset=offset)


class RansHeader(NamedTuple):
    num_symbols: int
    prob_bits: int
    count: int
    freqs: np.ndarray  # (num_symbols,) uint16, sums to 1 << prob_bits
    state: int  # x0, the decoder's initial state
    stream_offset: int  # byte offset of the stream within the buffer


def _state_offset(num_symbols: int) -> int:
    return (_FIXED + 2 * num_symbols + 3) & ~3


# ----------------------------------------------------------------------------- frequencies


def quantize_freqs(counts: np.ndarray, prob_bits: int = PROB_BITS) -> np.ndarray:
    """Quantise symbol counts to uint16 frequencies summing to exactly 1 << prob_bits.

    Every symbol with count > 0 gets freq >= 1, unused symbols get 0. The result minimises the
    coded size sum(c * log2(M / f)) over integer frequencies: scale and round, then greedy
    unit moves by marginal cost (optimal for this separable convex objective). All-zero counts
    give symbol 0 the whole range. prob_bits may be 10..15 (RANS_INTERLEAVED reads up to 15;
    16 would not fit a one-symbol table's freq in a u16).
    """
    if not MIN_PROB_BITS <= prob_bits <= QUANT_MAX_PROB_BITS:
        raise ValueError(
            f"prob_bits must be in {MIN_PROB_BITS}..{QUANT_MAX_PROB_BITS}, got {prob_bits}"
        )
    c = np.asarray(counts)
    if c.ndim != 1 or not 1 <= c.shape[0] <= MAX_SYMBOLS:
        raise ValueError(f"counts must be a 1-D array of 1..{MAX_SYMBOLS} entries, got {c.shape}")
    if c.size and c.min() < 0:
        raise ValueError("counts must be non-negative")
    c = c.astype(np.float64)
    m = 1 << prob_bits
    used = c > 0
    f = np.zeros(c.shape[0], dtype=np.int64)
    total = c.sum()
    if total == 0:
        f[0] = m
        return f.astype(np.uint16)
    f[used] = np.maximum(1, np.rint(c[used] * (m / total))).astype(np.int64)

    def gain(ff):  # bits saved by freq += 1 (used symbols only)
        g = np.full(ff.shape, -np.inf)
        g[used] = c[used] * np.log2((ff[used] + 1) / ff[used])
        return g

    def loss(ff):  # bits lost by freq -= 1 (used symbols with freq > 1 only)
        lo = np.full(ff.shape, np.inf)
        ok = used & (ff > 1)
        lo[ok] = c[ok] * np.log2(ff[ok] / (ff[ok] - 1))
        return lo

    diff = m - int(f.sum())
    while diff > 0:
        f[int(np.argmax(gain(f)))] += 1
        diff -= 1
    while diff < 0:  # possible: sum(used) <= 256 <= M, so some used freq is > 1
        f[int(np.argmin(loss(f)))] -= 1
        diff += 1
    # swap moves while they pay (bounded; each strictly reduces the cost)
    for _ in range(4 * c.shape[0] + 64):
        g = gain(f)
        lo = loss(f)
        i = int(np.argmax(g))
        lo[i] = np.inf
        j = int(np.argmin(lo))
        if not g[i] > lo[j] * (1 + 1e-12) + 1e-9:
            break
        f[i] += 1
        f[j] -= 1
    assert int(f.sum()) == m and np.all(f[used] >= 1)
    return f.astype(np.uint16)


def max_count(freqs: np.ndarray, prob_bits: int, stream_len: int) -> int | None:
    """Upper bound on N for any buffer our encoder can produce, or None if unbounded.

    Each index costs at least log2(M / max(freq)) bits. Following the encoder, every index
    multiplies the state by >= (M/f)(1 - 2^-9) and every emitted byte divides it by
    <= 256 / (1 - 2^-9), from L up to x0 < 2^31, hence
    N * (log2(M/fmax) - 0.00282) < 8 + B * 8.00282 (B = stream bytes). Used with a margin.
    """
    m = 1 << prob_bits
    fmax = int(np.max(freqs))
    per = 0.99 * math.log2(m / fmax) - 0.005 if fmax > 0 else 0.0
    if per <= 0.005:
        return None
    return int((16 + 8.05 * stream_len) / per) + 2


# ----------------------------------------------------------------------------- encoder


@numba.njit(cache=True, nogil=True)
def _encode_kernel(indices, freq, cum, prob_bits, out):
    """rANS-encode `indices` in reverse, writing bytes backwards from the end of `out`.

    Returns (final state, start of the stream in `out`). `out` needs 2 bytes per index
    (x < 2^31 and x_max >= 2^(31-P) with P <= 14, so at most 2 bytes per step).
    """
    x = np.int64(RANS_L)
    pos = out.shape[0]
    xm_unit = np.int64((RANS_L >> prob_bits) << 8)
    for i in range(indices.shape[0] - 1, -1, -1):
        s = indices[i]
        f = np.int64(freq[s])
        x_max = xm_unit * f
        while x >= x_max:
            pos -= 1
            out[pos] = np.uint8(x & 0xFF)
            x >>= 8
        q = x // f
        x = (q << prob_bits) + (x - q * f) + np.int64(cum[s])
    return x, pos


def encode(indices: np.ndarray, num_symbols: int, prob_bits: int = PROB_BITS) -> bytes:
    """Encode integer indices (any shape, C order; values in [0, num_symbols)) as RANS_INDICES."""
    if not 1 <= num_symbols <= MAX_SYMBOLS:
        raise ValueError(f"num_symbols must be in 1..{MAX_SYMBOLS}, got {num_symbols}")
    if not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise ValueError(f"prob_bits must be in {MIN_PROB_BITS}..{MAX_PROB_BITS}, got {prob_bits}")
    idx = np.asarray(indices).ravel()
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers, got {idx.dtype}")
    if idx.size > 0xFFFFFFFF:
        raise ValueError(f"at most 2^32-1 indices per buffer, got {idx.size}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_symbols):
        raise ValueError(f"indices must be in [0, {num_symbols}), got [{idx.min()}, {idx.max()}]")
    idx = np.ascontiguousarray(idx, dtype=np.uint8)
    counts = np.bincount(idx, minlength=num_symbols)
    freq = quantize_freqs(counts, prob_bits)
    f32 = freq.astype(np.uint32)
    cum = np.zeros(num_symbols, dtype=np.uint32)
    cum[1:] = np.cumsum(f32)[:-1]
    out = np.empty(2 * idx.size, dtype=np.uint8)
    state, pos = _encode_kernel(idx, f32, cum, prob_bits, out)
    head = struct.pack(f"<HHI{num_symbols}H", num_symbols, prob_bits, idx.size, *freq.tolist())
    head += b"\0" * (_state_offset(num_symbols) - len(head))
    return head + struct.pack("<I", int(state)) + out[pos:].tobytes()


# ----------------------------------------------------------------------------- header


def _as_u8(buf) -> np.ndarray:
    if isinstance(buf, (bytes, bytearray, memoryview)):
        return np.frombuffer(buf, dtype=np.uint8)
    a = np.asarray(buf)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise TypeError(f"expected a 1-D uint8 buffer, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def parse_header(buf: np.ndarray) -> RansHeader:
    """Read and validate the header of a RANS_INDICES buffer; RansError if malformed."""
    b = _as_u8(buf)
    n = b.shape[0]
    if n < _FIXED:
        raise RansError(f"buffer of {n} bytes is shorter than the {_FIXED}-byte header", 0)
    num_symbols, prob_bits, count = struct.unpack_from("<HHI", b, 0)
    if not 1 <= num_symbols <= MAX_SYMBOLS:
        raise RansError(f"num_symbols {num_symbols} not in 1..{MAX_SYMBOLS}", 0)
    if not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise RansError(f"prob_bits {prob_bits} not in {MIN_PROB_BITS}..{MAX_PROB_BITS}", 2)
    soff = _state_offset(num_symbols)
    if n < soff + 4:
        raise RansError(
            f"buffer of {n} bytes too short for a header with {num_symbols} symbols "
            f"({soff + 4} bytes)",
            n,
        )
    freqs = b[_FIXED : _FIXED + 2 * num_symbols].view("<u2").astype(np.uint16)
    total = int(freqs.sum(dtype=np.int64))
    if total != 1 << prob_bits:
        raise RansError(f"frequencies sum to {total}, not 1 << {prob_bits}", _FIXED)
    pad = b[_FIXED + 2 * num_symbols : soff]
    if pad.size and pad.any():
        raise RansError("non-zero padding after the frequency table", _FIXED + 2 * num_symbols)
    (state,) = struct.unpack_from("<I", b, soff)
    if not RANS_L <= state < RANS_L << 8:
        raise RansError(f"initial state {state:#x} not in [2^23, 2^31)", soff)
    stream_offset = soff + 4
    bound = max_count(freqs, prob_bits, n - stream_offset)
    if bound is not None and count > bound:
        raise RansError(
            f"count {count} impossible: {n - stream_offset} stream bytes hold at most {bound} "
            "indices with these frequencies",
            4,
        )
    return RansHeader(num_symbols, prob_bits, count, freqs, state, stream_offset)


def _end_error(h: RansHeader, n: int, ptr: int, x: int) -> RansError:
    return RansError(
        f"stream does not end where it should: after {h.count} indices the state is {x:#x} "
        f"(expected {RANS_L:#x}) and {n - ptr} of {n - h.stream_offset} stream bytes are unread",
        ptr,
    )


def _overrun_error(h: RansHeader, n: int, i: int) -> RansError:
    return RansError(
        f"stream exhausted while decoding index {i} of {h.count}: it would be read past the "
        f"end of the buffer",
        n,
    )


# ----------------------------------------------------------------------------- reference decoder


def decode_reference(buf: np.ndarray) -> np.ndarray:
    """Plain-Python rANS decoder (the oracle): (N,) uint8 indices; RansError if malformed."""
    b = _as_u8(buf)
    h = parse_header(b)
    p = h.prob_bits
    mask = (1 << p) - 1
    freq = [int(v) for v in h.freqs]
    cum = [0] * h.num_symbols
    for s in range(1, h.num_symbols):
        cum[s] = cum[s - 1] + freq[s - 1]
    slot2sym = np.repeat(np.arange(h.num_symbols, dtype=np.int64), h.freqs).tolist()
    data = b.tobytes()
    n = len(data)
    ptr = h.stream_offset
    x = h.state
    out = bytearray(h.count)
    for i in range(h.count):
        slot = x & mask
        s = slot2sym[slot]
        out[i] = s
        x = freq[s] * (x >> p) + slot - cum[s]
        while x < RANS_L:
            if ptr >= n:
                raise _overrun_error(h, n, i)
            x = (x << 8) | data[ptr]
            ptr += 1
    if x != RANS_L or ptr != n:
        raise _end_error(h, n, ptr, x)
    return np.frombuffer(bytes(out), dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- numba decoder


@numba.njit(cache=True, nogil=True)
def _slot_tables(freq, prob_bits):
    """Per-slot tables: sym[slot] and packed (freq << 16) | (slot - cum). ok=False if bad."""
    m = 1 << prob_bits
    sym = np.zeros(m, dtype=np.uint8)
    fb = np.zeros(m, dtype=np.uint32)
    pos = 0
    for s in range(freq.shape[0]):
        f = np.int64(freq[s])
        if pos + f > m:
            return sym, fb, False
        for j in range(f):
            sym[pos + j] = s
            fb[pos + j] = np.uint32((f << 16) | j)
        pos += f
    return sym, fb, pos == m


@numba.njit(cache=True, nogil=True)
def _decode_loop(buf, ptr, count, prob_bits, x, sym, fb, table, out):
    """The hot loop: out[i] = table[slot]; returns (status, i, ptr, x)."""
    n = buf.shape[0]
    mask = np.int64((1 << prob_bits) - 1)
    L = np.int64(RANS_L)
    for i in range(count):
        slot = x & mask
        out[i] = table[slot]
        e = np.int64(fb[slot])
        x = (e >> 16) * (x >> prob_bits) + (e & 0xFFFF)
        while x < L:
            if ptr >= n:
                return _OVERRUN, i, ptr, x
            x = (x << 8) | np.int64(buf[ptr])
            ptr += 1
    if x != L or ptr != n:
        return _BAD_END, count, ptr, x
    return _OK, count, ptr, x


@numba.njit(cache=True, nogil=True)
def _decode_indices(buf, ptr, count, freq, prob_bits, x0, out):
    sym, fb, ok = _slot_tables(freq, prob_bits)
    if not ok:
        return _BAD_TABLE, 0, ptr, np.int64(x0)
    return _decode_loop(buf, ptr, count, prob_bits, np.int64(x0), sym, fb, sym, out)


@numba.njit(cache=True, nogil=True)
def _decode_gather(buf, ptr, count, freq, prob_bits, x0, codebook, out):
    sym, fb, ok = _slot_tables(freq, prob_bits)
    if not ok:
        return _BAD_TABLE, 0, ptr, np.int64(x0)
    vals = slot_values(sym, codebook)
    return _decode_loop(buf, ptr, count, prob_bits, np.int64(x0), sym, fb, vals, out)


@numba.njit(cache=True, nogil=True)
def slot_values(sym, codebook):
    """The codebook value of every slot's symbol, so that a decode loop gathering floats
    looks its output up per slot exactly as it looks up indices (both coders)."""
    vals = np.empty(sym.shape[0], dtype=np.float32)
    for j in range(sym.shape[0]):
        vals[j] = codebook[sym[j]]
    return vals


def decode_target(h, codebook, expected_count: int | None):
    """What both coders' decode() check before decoding, and its output buffer: the count
    against `expected_count` (before anything of that size is allocated), the codebook against
    the stream's symbols. Returns (out, codebook as contiguous float32, or None for indices)."""
    if expected_count is not None and h.count != expected_count:
        raise RansError(f"count {h.count} != expected {expected_count}", 4)
    if codebook is None:
        return np.empty(h.count, dtype=np.uint8), None
    cb = np.ascontiguousarray(codebook, dtype=np.float32).ravel()
    if cb.shape[0] < h.num_symbols:
        raise RansError(
            f"codebook of {cb.shape[0]} entries for a stream of {h.num_symbols} symbols", 0
        )
    return np.empty(h.count, dtype=np.float32), cb


def decode(
    buf: np.ndarray,
    codebook: np.ndarray | None = None,
    *,
    expected_count: int | None = None,
) -> np.ndarray:
    """Decode a RANS_INDICES buffer with the numba kernel.

    Without `codebook`: (N,) uint8 indices. With `codebook` (>= num_symbols entries): (N,)
    float32 = codebook[index], gathered inside the decode loop. `expected_count`, if given,
    must equal N (checked before the output is allocated; the caller must bound N against the
    tensor's shape one way or the other). RansError for any malformed buffer.
    """
    b = _as_u8(buf)
    h = parse_header(b)
    out, cb = decode_target(h, codebook, expected_count)
    freq = h.freqs.astype(np.uint32)
    if cb is None:
        res = _decode_indices(b, h.stream_offset, h.count, freq, h.prob_bits, h.state, out)
    else:
        res = _decode_gather(b, h.stream_offset, h.count, freq, h.prob_bits, h.state, cb, out)
    status, i, ptr, x = (int(v) for v in res)
    if status == _OK:
        return out
    n = b.shape[0]
    if status == _OVERRUN:
        raise _overrun_error(h, n, i)
    if status == _BAD_END:
        raise _end_error(h, n, ptr, x)
    raise RansError("frequency table does not sum to 1 << prob_bits", _FIXED)


# ----------------------------------------------------------------------------- reports


def entropy_bits(indices: np.ndarray, num_symbols: int) -> float:
    """Empirical (order-0) entropy of the data in bits per index; 0.0 for no data."""
    idx = np.asarray(indices).ravel()
    if idx.size == 0:
        return 0.0
    counts = np.bincount(idx.astype(np.int64), minlength=num_symbols).astype(np.float64)
    p = counts[counts > 0] / idx.size
    return float(-(p * np.log2(p)).sum())
