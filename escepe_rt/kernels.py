"""Op kernels of the escepe runtime: numpy + numba, float32, channels-last.

Activations are NHWC (or (N, F) for 2-D) so that the channel vector of one pixel is contiguous:
im2col can then copy whole channel runs per kernel tap, and the per-channel epilogue
(folded batch-norm scale/shift + activation) and depthwise/pooling loops vectorise over the
innermost axis. A convolution is (N*Ho*Wo, kh*kw*Cin) x (kh*kw*Cin, Cout) sgemm per group, which
hands the heavy arithmetic to numpy's BLAS. An ungrouped conv runs in blocks of output pixels:
im2col of a block into a per-thread scratch buffer (at most COL_BLOCK_BYTES), sgemm, then one
fused epilogue pass (scale/shift, optional residual add, activation) while the block is still in
cache. Big convs are cut into chunks run by escepe_rt.parallel's threads (see there why not
BLAS's own threads). Everything around the sgemm is plain deterministic numba loops.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import NamedTuple

import numba
import numpy as np
from numba import prange

from escepe_rt import microkernel, parallel, spinpool, vector_ir
from escepe_rt.winograd import weights_of as winograd_weights

__all__ = [
    "ACT_NONE",
    "ACT_RELU",
    "ACT_RELU6",
    "ConvWeight",
    "prepare_conv_weight",
    "conv2d",
    "make_conv",
    "prepare_linear_weight",
    "linear",
    "affine",
    "activate",
    "add",
    "concat_channels",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "flatten_nchw",
    "softmax",
    "max_softmax",
    "entropy",
    "pool_output_size",
]

ACT_NONE, ACT_RELU, ACT_RELU6 = 0, 1, 2
_ACTS = (ACT_NONE, ACT_RELU, ACT_RELU6)

_F32 = np.float32
# Ungrouped convs with Cout >= microkernel.LANES / 2 (and no width dilation) run on the direct
# SIMD micro-kernels (escepe_rt/microkernel.py) instead of im2col + sgemm; decided when the weight
# is prepared. ESCEPE_DIRECT_CONV=0 switches them off (the tests compare both paths).
DIRECT_CONV = os.environ.get("ESCEPE_DIRECT_CONV", "1").strip() != "0"
# 3x3 stride-1 convs with channel counts in whole LANES run Winograd F(2x2, 3x3) on the same
# micro-kernels (escepe_rt/winograd.py); the weight is prepared for it when the executor knows
# the conv's stride and map size (runs_winograd). ESCEPE_WINOGRAD=0 keeps them on the direct
# kernels; ESCEPE_WINOGRAD=all runs every eligible conv on Winograd, also those whose big
# weights make it slower at batch 1 (for batched throughput; more memory).
_WINOGRAD_ENV = os.environ.get("ESCEPE_WINOGRAD", "1").strip().lower()
WINOGRAD = _WINOGRAD_ENV != "0"
WINOGRAD_ALL = _WINOGRAD_ENV == "all"


# Direct convs whose weights are exact in float16 (codebooks the compiler rounded to float16,
# RAW_F16 tensors) keep float16 panels, widened in registers by the micro-kernels: half the
# memory and half the bytes streamed per forward pass, the same products (runs_f16). Only
# where the CPU widens them in one instruction (vector_ir.HALF_NATIVE; elsewhere the kernels
# widen them exactly with integer operations, too slow to be worth the memory by default).
# ESCEPE_F16_PANELS=0 keeps every panel float32.
F16_PANELS = os.environ.get("ESCEPE_F16_PANELS", "1").strip() != "0" and vector_ir.HALF_NATIVE
_EMPTY = np.empty(0, dtype=_F32)

# Row-parallel kernels are written with prange but compiled serially: numba's OpenMP pool
# spin-waits after each parallel region, which fought BLAS's threads (a 3x3 conv ~6x slower on
# 2 cores), and numba's workqueue layer is not safe for concurrent predict() calls. Parallelism
# comes from escepe_rt.parallel instead (Python threads running these nogil kernels).
_PARALLEL = False

# nogil: escepe_rt.parallel runs these kernels on several Python threads at once.
_jit = numba.njit(cache=True, fastmath=False, nogil=True)
_pjit = numba.njit(cache=True, fastmath=False, nogil=True, parallel=_PARALLEL)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _f32(x) -> np.ndarray:
    """float32, C-contiguous view of x (copies only when needed)."""
    return np.ascontiguousarray(x, dtype=_F32)


def _vec(v, n: int, name: str) -> tuple[np.ndarray, bool]:
    if v is None:
        return _EMPTY, False
    a = _f32(v).reshape(-1)
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries, expected {n}")
    return a, True


def _check_act(activation: int) -> int:
    act = int(activation)
    if act not in _ACTS:
        raise ValueError(f"unknown activation code {activation!r}")
    return act


# ----------------------------------------------------------------------------------------------
# numba kernels
# ----------------------------------------------------------------------------------------------


@_jit
def _act1(v, act):
    # NaN-preserving (like torch): comparisons with NaN are false.
    if act == 1:
        if v < 0.0:
            v = 0.0
    elif act == 2:
        if v < 0.0:
            v = 0.0
        elif v > 6.0:
            v = 6.0
    return v


@_pjit
def _epilogue2d(src, dst, scale, shift, has_scale, has_shift, act):
    """dst = act(src * scale + shift) per column; src may be dst itself (in place)."""
    m, c = src.shape
    for i in prange(m):
        s = src[i]
        d = dst[i]
        if has_scale and has_shift:
            for j in range(c):
                d[j] = _act1(s[j] * scale[j] + shift[j], act)
        elif has_scale:
            for j in range(c):
                d[j] = _act1(s[j] * scale[j], act)
        elif has_shift:
            for j in range(c):
                d[j] = _act1(s[j] + shift[j], act)
        else:
            for j in range(c):
                d[j] = _act1(s[j], act)


@_jit
def _activate1d(x, out, act):
    for i in range(x.shape[0]):
        out[i] = _act1(x[i], act)


@_jit
def _add1d(a, b, out, act):
    for i in range(a.shape[0]):
        out[i] = _act1(a[i] + b[i], act)


@_pjit
def _im2col(x, cols, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """cols[g, (n*ho+oy)*wo+ox, (ky*kw+kx)*cg + c] = x[n, iy, ix, g*cg + c] (0 outside),
    with G = cols.shape[0] groups of cg = C // G channels each."""
    n_, h, w, cin = x.shape
    groups = cols.shape[0]
    cg = cin // groups
    for r in prange(n_ * ho):
        n = r // ho
        oy = r - n * ho
        for ox in range(wo):
            row = r * wo + ox
            for ky in range(kh):
                iy = oy * sh - ph + ky * dh
                yok = iy >= 0 and iy < h
                for kx in range(kw):
                    ix = ox * sw - pw + kx * dw
                    k0 = (ky * kw + kx) * cg
                    if yok and ix >= 0 and ix < w:
                        px = x[n, iy, ix]
                        for g in range(groups):
                            dst = cols[g, row]
                            c0 = g * cg
                            for c in range(cg):
                                dst[k0 + c] = px[c0 + c]
                    else:
                        for g in range(groups):
                            dst = cols[g, row]
                            for c in range(cg):
                                dst[k0 + c] = 0.0


@_jit
def _im2col_rows(x, cols, m0, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """cols[r, (ky*kw+kx)*C + c] = x[n, iy, ix, c] (0 outside) for output pixels m0 + r, where
    pixel m = (n*ho + oy)*wo + ox; one group. (Written per pixel through row views: measured
    faster under numba than flat-index or slice copies of whole kw*C runs.)"""
    n_, h, w, cin = x.shape
    for r in range(cols.shape[0]):
        m = m0 + r
        ox = m % wo
        t = m // wo
        oy = t % ho
        n = t // ho
        dst = cols[r]
        for ky in range(kh):
            iy = oy * sh - ph + ky * dh
            yok = iy >= 0 and iy < h
            for kx in range(kw):
                ix = ox * sw - pw + kx * dw
                k0 = (ky * kw + kx) * cin
                if yok and ix >= 0 and ix < w:
                    px = x[n, iy, ix]
                    for c in range(cin):
                        dst[k0 + c] = px[c]
                else:
                    for c in range(cin):
                        dst[k0 + c] = 0.0


@_jit
def _epilogue_res(src, dst, scale, shift, has_scale, has_shift, res, act):
    """dst = act(src * scale + shift + res) per column (res: the residual branch, same shape)."""
    m, c = src.shape
    for i in range(m):
        s = src[i]
        d = dst[i]
        q = res[i]
        if has_scale and has_shift:
            for j in range(c):
                d[j] = _act1(s[j] * scale[j] + shift[j] + q[j], act)
        elif has_scale:
            for j in range(c):
                d[j] = _act1(s[j] * scale[j] + q[j], act)
        elif has_shift:
            for j in range(c):
                d[j] = _act1(s[j] + shift[j] + q[j], act)
        else:
            for j in range(c):
                d[j] = _act1(s[j] + q[j], act)


@_jit
def _epilogue_cols(src, dst, c0, scale, shift, has_scale, has_shift, res, has_res, act):
    """dst[:, c0 + j] = act(src[:, j] * scale + shift (+ res[:, c0 + j])), one column block."""
    m, c = src.shape
    for i in range(m):
        s = src[i]
        d = dst[i]
        q = res[i]
        for j in range(c):
            v = s[j]
            if has_scale:
                v = v * scale[c0 + j]
            if has_shift:
                v = v + shift[c0 + j]
            if has_res:
                v = v + q[c0 + j]
            d[c0 + j] = _act1(v, act)


@_pjit
def _epilogue_grouped(src, dst, scale, shift, has_scale, has_shift, act):
    """dst[i, g*Cg + j] = act(src[g, i, j] * scale + shift): (G, M, Cg) -> (M, G*Cg)."""
    groups, m, cg = src.shape
    for i in prange(m):
        d = dst[i]
        for g in range(groups):
            s = src[g, i]
            o = g * cg
            if has_scale and has_shift:
                for j in range(cg):
                    d[o + j] = _act1(s[j] * scale[o + j] + shift[o + j], act)
            elif has_scale:
                for j in range(cg):
                    d[o + j] = _act1(s[j] * scale[o + j], act)
            elif has_shift:
                for j in range(cg):
                    d[o + j] = _act1(s[j] + shift[o + j], act)
            else:
                for j in range(cg):
                    d[o + j] = _act1(s[j], act)


@_pjit
def _depthwise(x, wt, out, mult, sh, sw, ph, pw, dh, dw, scale, shift, has_scale, has_shift, act):
    """Depthwise conv, output channel o reads input channel o // mult; wt is (kh, kw, Cout)."""
    n_, h, w, cin = x.shape
    kh, kw, cout = wt.shape
    ho = out.shape[1]
    wo = out.shape[2]
    for r in prange(n_ * ho):
        n = r // ho
        oy = r - n * ho
        for ox in range(wo):
            acc = out[n, oy, ox]
            for o in range(cout):
                acc[o] = 0.0
            for ky in range(kh):
                iy = oy * sh - ph + ky * dh
                if iy < 0 or iy >= h:
                    continue
                for kx in range(kw):
                    ix = ox * sw - pw + kx * dw
                    if ix < 0 or ix >= w:
                        continue
                    px = x[n, iy, ix]
                    wk = wt[ky, kx]
                    if mult == 1:
                        for c in range(cin):
                            acc[c] += px[c] * wk[c]
                    else:
                        for c in range(cin):
                            xv = px[c]
                            base = c * mult
                            for j in range(mult):
                                acc[base + j] += xv * wk[base + j]
            if has_scale and has_shift:
                for o in range(cout):
                    acc[o] = _act1(acc[o] * scale[o] + shift[o], act)
            elif has_scale:
                for o in range(cout):
                    acc[o] = _act1(acc[o] * scale[o], act)
            elif has_shift:
                for o in range(cout):
                    acc[o] = _act1(acc[o] + shift[o], act)
            elif act != 0:
                for o in range(cout):
                    acc[o] = _act1(acc[o], act)


@_pjit
def _max_pool(x, out, kh, kw, sh, sw, ph, pw, dh, dw):
    n_, h, w, c = x.shape
    ho = out.shape[1]
    wo = out.shape[2]
    for r in prange(n_ * ho):
        n = r // ho
        oy = r - n * ho
        for ox in range(wo):
            acc = out[n, oy, ox]
            for j in range(c):
                acc[j] = -np.inf
            for ky in range(kh):
                iy = oy * sh - ph + ky * dh
                if iy < 0 or iy >= h:
                    continue
                for kx in range(kw):
                    ix = ox * sw - pw + kx * dw
                    if ix < 0 or ix >= w:
                        continue
                    px = x[n, iy, ix]
                    for j in range(c):
                        v = px[j]
                        # torch propagates NaN: (v > m) || isnan(v)
                        if v > acc[j] or v != v:
                            acc[j] = v


@_pjit
def _avg_pool(x, out, kh, kw, sh, sw, ph, pw, count_include_pad, divisor):
    n_, h, w, c = x.shape
    ho = out.shape[1]
    wo = out.shape[2]
    for r in prange(n_ * ho):
        n = r // ho
        oy = r - n * ho
        # torch: window clipped to the padded extent for the pool size, then to the input
        y0 = oy * sh - ph
        y1 = min(y0 + kh, h + ph)
        pool_h = y1 - y0
        y0 = max(y0, 0)
        y1 = min(y1, h)
        for ox in range(wo):
            x0 = ox * sw - pw
            x1 = min(x0 + kw, w + pw)
            pool_size = pool_h * (x1 - x0)
            x0 = max(x0, 0)
            x1 = min(x1, w)
            if divisor != 0:
                div = divisor
            elif count_include_pad:
                div = pool_size
            else:
                div = (y1 - y0) * (x1 - x0)
            acc = out[n, oy, ox]
            for j in range(c):
                acc[j] = 0.0
            for iy in range(y0, y1):
                for ix in range(x0, x1):
                    px = x[n, iy, ix]
                    for j in range(c):
                        acc[j] += px[j]
            fdiv = np.float32(div)
            for j in range(c):
                acc[j] = acc[j] / fdiv


@_pjit
def _adaptive_avg_pool(x, out):
    n_, h, w, c = x.shape
    oh = out.shape[1]
    ow = out.shape[2]
    for r in prange(n_ * oh):
        n = r // oh
        i = r - n * oh
        y0 = (i * h) // oh
        y1 = ((i + 1) * h + oh - 1) // oh
        for k in range(ow):
            x0 = (k * w) // ow
            x1 = ((k + 1) * w + ow - 1) // ow
            acc = out[n, i, k]
            for j in range(c):
                acc[j] = 0.0
            for iy in range(y0, y1):
                for ix in range(x0, x1):
                    px = x[n, iy, ix]
                    for j in range(c):
                        acc[j] += px[j]
            fdiv = np.float32((y1 - y0) * (x1 - x0))
            for j in range(c):
                acc[j] = acc[j] / fdiv


# ----------------------------------------------------------------------------------------------
# convolution
# ----------------------------------------------------------------------------------------------


class ConvWeight(NamedTuple):
    """A conv weight prepared once per model load.

    ``gemm``: (groups, kh*kw*Cin_g, Cout_g) float32, row order (ky, kx, ci) matching im2col of
    NHWC input; None for depthwise and for convs in ``panels``. ``dw``: (kh, kw, Cout) float32
    for depthwise convs (groups == Cin, Cin_g == 1, Cout = multiplier * Cin); None otherwise.
    ``panels``: (ceil(Cout / LANES), kh*kw*Cin, LANES) float32 for the direct micro-kernels
    (ungrouped, Cout >= LANES / 2): the same matrix as ``gemm``, cut into column panels of LANES
    so that each panel streams contiguously, the last one zero-padded past Cout; None otherwise.
    ``winograd``: ``panels`` holds a 3x3 conv's Winograd F(2x2, 3x3) weights instead,
    (16 * Cout / LANES, Cin, LANES) (escepe_rt.winograd.weights_of); only for stride 1, no
    dilation (make_conv checks). ``panels`` of dtype float16: the same matrix in float16, for
    weights exact in float16 (``kind``; see :func:`runs_f16`).
    """

    Cout: int
    Cin: int  # total input channels (Cin_g * groups)
    kh: int
    kw: int
    groups: int
    gemm: np.ndarray | None
    dw: np.ndarray | None
    panels: np.ndarray | None = None
    winograd: bool = False

    @property
    def kind(self) -> int:
        """What the micro-kernels read (their geom word 7): float32 panels, Winograd weights,
        or float16 panels (``panels`` of dtype float16)."""
        if self.winograd:
            return microkernel.KIND_WINOGRAD
        if self.panels is not None and self.panels.dtype == np.float16:
            return microkernel.KIND_F16
        return microkernel.KIND_F32

    def panel_array(self) -> np.ndarray:
        """``panels`` as the numba kernels take them: float32, float16 panels as pairs of
        halves, (blocks, rows, LANES / 2); the kernels address weights by index either way."""
        p = self.panels
        return p.view(np.float32) if p.dtype == np.float16 else p

    @property
    def depthwise(self) -> bool:
        return self.dw is not None


def prepare_conv_weight(
    weight_oihw: np.ndarray, groups: int, winograd: bool = False, f16: bool = False
) -> ConvWeight:
    """Prepare a PyTorch-layout (Cout, Cin/groups, kh, kw) weight for :func:`conv2d`; with
    `winograd`, for a 3x3 stride-1 conv that runs Winograd (see :func:`runs_winograd`); with
    `f16`, as float16 panels (every weight must be exact in float16; see :func:`runs_f16`)."""
    w = np.asarray(weight_oihw, dtype=_F32)
    if w.ndim != 4:
        raise ValueError(f"conv weight must be 4-D (Cout, Cin/groups, kh, kw), got {w.shape}")
    groups = int(groups)
    cout, cin_g, kh, kw = (int(s) for s in w.shape)
    if groups < 1 or cout % groups != 0:
        raise ValueError(f"Cout={cout} is not divisible by groups={groups}")
    cin = cin_g * groups
    if f16:
        _check_f16(cout, groups, winograd)
    if groups > 1 and cin_g == 1:
        # depthwise (with channel multiplier): (Cout, 1, kh, kw) -> (kh, kw, Cout)
        dw = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
        return ConvWeight(cout, cin, kh, kw, groups, None, dw)
    cout_g = cout // groups
    if _uses_panels(cout, groups):
        # (Cp, Cin, kh, kw) -> (Cp/L, L, kh, kw, Cin) -> (Cp/L, kh, kw, Cin, L), Cp = Cout
        # rounded up to whole panels (zero weights past Cout)
        blocks = -(-cout // _LANES)
        if blocks * _LANES != cout:
            w = np.concatenate([w, np.zeros((blocks * _LANES - cout, cin, kh, kw), _F32)])
        p = w.reshape(blocks, _LANES, cin, kh, kw).transpose(0, 3, 4, 2, 1)
        panels = np.ascontiguousarray(p).reshape(blocks, kh * kw * cin, _LANES)
        if f16:
            if not half_exact(panels):
                raise ValueError("f16 panels need weights that are exact in float16")
            panels = panels.astype(np.float16)
        return _with_panels(ConvWeight(cout, cin, kh, kw, 1, None, None, panels), winograd)
    # (G, Cout_g, Cin_g, kh, kw) -> (G, kh, kw, Cin_g, Cout_g) -> (G, kh*kw*Cin_g, Cout_g)
    g = w.reshape(groups, cout_g, cin_g, kh, kw).transpose(0, 3, 4, 2, 1)
    gemm = np.ascontiguousarray(g).reshape(groups, kh * kw * cin_g, cout_g)
    return ConvWeight(cout, cin, kh, kw, groups, gemm, None)


_LANES = microkernel.LANES


def _uses_panels(cout: int, groups: int) -> bool:
    """Whether a conv's weight is prepared as panels for the direct micro-kernels: ungrouped,
    with at least half a panel of output channels (the zero lanes of a partial last panel are
    computed and thrown away; below LANES / 2 channels im2col + sgemm wastes less)."""
    return DIRECT_CONV and groups == 1 and cout >= _LANES // 2


def runs_direct(cout: int, groups: int, dilation_w: int) -> bool:
    """Whether a conv runs on the direct micro-kernels (no BLAS) rather than im2col + sgemm."""
    return _uses_panels(cout, groups) and dilation_w == 1


# Winograd's weights are 16/9 the size of the 3x3 kernel's. A conv with few output tiles per
# sample, whose weights are too big to stay in cache between two forward passes, is bound by
# streaming them from memory at batch 1, and then Winograd's bigger weights cost more than its
# fewer multiplies save: ResNet-18 w64 at batch 1, dense, ran 6.0 ms/sample with every 3x3
# stride-1 conv on Winograd, 5.4 with its 8x8x256 and 4x4x512 convs (4.2 and 16.8 MB of
# Winograd weights) left direct, 6.4 with none (ad hoc, 3 alternating rounds). At batch 32 those
# convs gain 1.6-2x on Winograd (3.6 vs 4.4 ms/sample), but keeping both forms would cost
# ResNet-18 another ~65 MB (their Winograd weights; estimated); batch 1 is this runtime's case.
# Small convs (Winograd weights up to WINOGRAD_CACHED_BYTES) stay in cache and win at any map
# size (7x7x64 -> 64: 1.44x).
WINOGRAD_MIN_TILES = 64  # 2x2 output tiles per sample: a 16x16 output map
WINOGRAD_CACHED_BYTES = 1 << 20


def runs_winograd(cout: int, cin: int, groups: int, kernel, stride, dilation, out_hw) -> bool:
    """Whether a conv runs Winograd F(2x2, 3x3) on the micro-kernels: ungrouped 3x3, stride 1,
    no dilation, input and output channels in whole LANES (the transforms work on whole
    vectors), and either enough output tiles per sample (out_hw: the output map) or small
    weights (see above). Measured ad hoc on the 2-vCPU VM at batch 1, 2 threads, through
    make_conv: 32x32x64 -> 64 531 -> 283 us, 16x16x128 434 -> 223 us, 28x28x16 -> 16 1.15x,
    14x14x32 1.17-1.22x."""
    tiles = -(-out_hw[0] // 2) * -(-out_hw[1] // 2)
    return (
        WINOGRAD
        and _uses_panels(cout, groups)
        and tuple(kernel) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and cin % _LANES == 0
        and cout % _LANES == 0
        and (
            WINOGRAD_ALL
            or tiles >= WINOGRAD_MIN_TILES
            or 16 * cin * cout * 4 <= WINOGRAD_CACHED_BYTES
        )
    )


def half_exact(values) -> bool:
    """Whether every value survives a round trip through float16 (NaN never does)."""
    v = np.asarray(values, dtype=_F32)
    with np.errstate(over="ignore"):
        return bool(np.array_equal(v.astype(np.float16).astype(_F32), v))


def _f16_unfit(cout: int, groups: int, winograd: bool) -> str | None:
    """Why a conv's weights cannot be float16 panels (None: they can): the panels of an
    ungrouped conv on the full-width tiles (not Cout == LANES / 2), not Winograd weights (their
    transformed values are not exact in float16)."""
    if not _uses_panels(cout, groups):
        return "f16 panels are for ungrouped convs on the direct micro-kernels"
    if cout == _LANES // 2:
        return f"f16 panels need more than {_LANES // 2} output channels"
    if winograd:
        return "Winograd weights are float32: they are not exact in float16"
    return None


def _check_f16(cout: int, groups: int, winograd: bool) -> None:
    why = _f16_unfit(cout, groups, winograd)
    if why is not None:
        raise ValueError(why)


def runs_f16(cout: int, groups: int, dilation_w: int, winograd: bool, exact: bool) -> bool:
    """Whether a conv keeps float16 panels: weights exact in float16 (`exact`), panels that
    can be float16 (_f16_unfit) on the direct micro-kernels (no width dilation), on a CPU that
    widens float16 natively (F16_PANELS)."""
    return F16_PANELS and exact and dilation_w == 1 and _f16_unfit(cout, groups, winograd) is None


def _with_panels(w: ConvWeight, winograd: bool) -> ConvWeight:
    """w, its panels replaced by Winograd weights if `winograd` (the panels are then dropped)."""
    if not winograd:
        return w
    if (w.kh, w.kw) != (3, 3) or w.Cin % _LANES or w.Cout % _LANES:
        raise ValueError(
            f"Winograd needs a 3x3 conv with channels in multiples of {_LANES}, "
            f"got {w.kh}x{w.kw}, {w.Cin} -> {w.Cout}"
        )
    return w._replace(panels=winograd_weights(w.panels), winograd=True)


def _gemm_of(w: ConvWeight) -> np.ndarray:
    """The (kh*kw*Cin, Cout) sgemm matrix of an ungrouped conv, rebuilt from the panels if
    needed (make_conv does it once for a width-dilated conv, which the direct kernels cannot
    run)."""
    if w.gemm is not None:
        return w.gemm[0]
    blocks, k, lanes = w.panels.shape
    full = w.panels.transpose(1, 0, 2).reshape(k, blocks * lanes)
    return np.ascontiguousarray(full[:, : w.Cout], dtype=_F32)


def prepare_conv_weight_from_indices(
    indices: np.ndarray,
    codebook: np.ndarray,
    shape,
    groups: int,
    winograd: bool = False,
    f16: bool = False,
) -> ConvWeight:
    """:func:`prepare_conv_weight` of ``codebook[indices].reshape(shape)``, without the float32
    tensor in stored (OIHW) order: the codebook values are gathered straight into the sgemm
    layout. That skips one full-size float32 buffer and its transposing copy when a section is
    decoded (ResNet-18's last section: 33.5 MB of weights). Every index must be < len(codebook)
    (the verifier checks the symbol count of entropy-coded tensors against the codebook). With
    `f16` the panels are float16, gathered from the codebook's float16 bits (every codebook
    value must be exact in float16)."""
    cout, cin_g, kh, kw = (int(v) for v in shape)
    groups = int(groups)
    cb = np.ascontiguousarray(codebook, dtype=_F32).ravel()
    idx = np.ascontiguousarray(indices).ravel()
    if idx.dtype != np.uint8 or idx.size != cout * cin_g * kh * kw:
        raise ValueError(f"indices must be {cout * cin_g * kh * kw} uint8 values for {shape}")
    if groups < 1 or cout % groups != 0:
        raise ValueError(f"Cout={cout} is not divisible by groups={groups}")
    if f16:
        _check_f16(cout, groups, winograd)
    if groups > 1 and cin_g == 1:  # depthwise: small, use the plain path
        return prepare_conv_weight(cb[idx].reshape(cout, cin_g, kh, kw), groups)
    cout_g = cout // groups
    if _uses_panels(cout, groups):
        # the panels are the sgemm matrix of LANES-wide column blocks: gather block by block
        panel_shape = (-(-cout // _LANES), kh * kw * cin_g, _LANES)
        if f16:
            if not half_exact(cb):
                raise ValueError("f16 panels need a codebook that is exact in float16")
            bits = np.empty(panel_shape, dtype=np.uint16)  # float16 bit patterns (+0.0 is 0)
            _gather_gemm(idx, cb.astype(np.float16).view(np.uint16), _LANES, cin_g, kh * kw,
                         cout, bits)  # fmt: skip
            panels = bits.view(np.float16)
        else:
            panels = np.empty(panel_shape, dtype=_F32)
            _gather_gemm(idx, cb, _LANES, cin_g, kh * kw, cout, panels)
        return _with_panels(ConvWeight(cout, cin_g, kh, kw, 1, None, None, panels), winograd)
    gemm = np.empty((groups, kh * kw * cin_g, cout_g), dtype=_F32)
    _gather_gemm(idx, cb, cout_g, cin_g, kh * kw, cout, gemm)
    return ConvWeight(cout, cin_g * groups, kh, kw, groups, gemm, None)


@_jit
def _gather_gemm(idx, codebook, cout_g, cin_g, taps, cout, out):
    """out[g, tap*cin_g + ci, co] = codebook[idx of weight (g*cout_g + co, ci, tap)], and 0 for
    the channels g*cout_g + co >= cout (the padding of a partial last panel).

    One output row at a time (its cout_g values gathered at a stride of cin_g*taps bytes):
    each row is written whole and once, measured 2x faster than numpy's float transpose.
    Indexed by unsigned integers (numba adds a negative-index wraparound to every signed
    index): 4.0-4.3 -> 5.1-5.2 GB/s on a 512x512x3x3 conv's panels (ad hoc)."""
    flat = out.ravel()  # a view: out is C-contiguous
    stride = np.uint64(cin_g * taps)
    width = np.uint64(out.shape[2])
    rows = np.uint64(out.shape[1])
    for g in range(out.shape[0]):
        gb = np.uint64(g * cout_g) * stride
        valid = np.uint64(min(cout_g, cout - g * cout_g))
        at_g = np.uint64(g) * rows * width
        for tap in range(taps):
            for ci in range(cin_g):
                r = at_g + np.uint64(tap * cin_g + ci) * width
                b = gb + np.uint64(ci * taps + tap)
                for co in range(valid):
                    flat[r + np.uint64(co)] = codebook[idx[b + np.uint64(co) * stride]]
                for co in range(valid, width):
                    flat[r + np.uint64(co)] = 0


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv2d(
    x: np.ndarray,
    w: ConvWeight,
    scale,
    shift,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    activation: int,
    residual: np.ndarray | None = None,
) -> np.ndarray:
    """NHWC conv with torch semantics, fused per-channel ``acc * scale + shift``, optional
    residual add (``+ residual``, same shape as the output) and activation."""
    return make_conv(w, scale, shift, stride, padding, dilation, activation)(x, residual)


def conv_kernel(w: ConvWeight, dilation_w: int) -> str:
    """The kernel make_conv runs a conv on: "winograd", "direct" (the micro-kernels on float32
    panels), "direct_f16" (on float16 panels), "depthwise", or "im2col_sgemm" (grouped convs,
    Cout < LANES / 2, width dilation)."""
    if w.dw is not None:
        return "depthwise"
    if w.panels is None or not runs_direct(w.Cout, w.groups, dilation_w):
        return "im2col_sgemm"
    if w.winograd:
        return "winograd"
    return "direct_f16" if w.kind == microkernel.KIND_F16 else "direct"


def make_conv(w: ConvWeight, scale, shift, stride, padding, dilation, activation: int):
    """Validate a conv's parameters once; returns ``run(x, residual=None) -> out`` (NHWC)."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride/dilation must be >= 1 and padding >= 0")
    act = _check_act(activation)
    if w.winograd and (sh, sw, dh, dw) != (1, 1, 1, 1):
        raise ValueError(
            f"Winograd weights need stride 1 and no dilation, got {stride}, {dilation}"
        )
    if w.panels is not None and conv_kernel(w, dw) == "im2col_sgemm":  # matrix rebuilt once
        w = w._replace(gemm=_gemm_of(w)[None], panels=None)
    kh, kw, cout, cin = w.kh, w.kw, w.Cout, w.Cin
    sc, has_sc = _vec(scale, cout, "scale")
    sf, has_sf = _vec(shift, cout, "shift")
    epi = _direct_epilogue(sc, sf, has_sc, has_sf, cout) if w.panels is not None else None
    geometry: dict[tuple[int, int], tuple[int, int]] = {}

    def run(x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        if not (type(x) is np.ndarray and x.dtype == _F32 and x.flags.c_contiguous):
            x = _f32(x)
        if x.ndim != 4:
            raise ValueError(f"conv2d expects NHWC input, got shape {x.shape}")
        n, h, wd, c = x.shape
        if c != cin:
            raise ValueError(f"input has {c} channels, weight expects {cin}")
        hw = geometry.get((h, wd))
        if hw is None:
            ho = _conv_out(h, kh, sh, ph, dh)
            wo = _conv_out(wd, kw, sw, pw, dw)
            if ho < 1 or wo < 1:
                raise ValueError(f"conv output would be empty ({ho}x{wo}) for input {h}x{wd}")
            hw = geometry[(h, wd)] = (ho, wo)
        ho, wo = hw
        if residual is not None:
            if w.dw is not None or w.groups != 1:
                raise ValueError("a residual is only fused into an ungrouped conv")
            residual = _f32(residual)
            if residual.shape != (n, ho, wo, cout):
                raise ValueError(f"residual {residual.shape} does not match {(n, ho, wo, cout)}")
        out = out_slot.take((n, ho, wo, cout))
        if n == 0:
            return out
        if w.dw is not None:
            _depthwise(x, w.dw, out, cout // c, sh, sw, ph, pw, dh, dw, sc, sf, has_sc, has_sf, act)
        elif w.groups != 1:
            _conv_grouped(x, w, out, sc, sf, has_sc, has_sf, act, sh, sw, ph, pw, dh, dw, ho, wo)
        elif w.panels is not None:
            _conv_direct(pad_slot.padded(x, ph, pw), w, out, epi, residual, act, sh, sw, dh)
        else:
            _conv_gemm(x, w, out, sc, sf, has_sc, has_sf, residual, act, sh, sw, ph, pw, dh, dw)
        return out

    out_slot, pad_slot = _Reused(), _Reused()
    return run


# A conv keeps its last output and padded input (per thread, up to REUSE_MAX_BYTES each) and
# writes the next call's into them when nothing else refers to them any more. Why: a fresh
# buffer above glibc's mmap threshold is new pages from the kernel on every call, and freeing it
# unmaps them (probably a TLB shoot-down of the core the spinning worker ran on; not measured
# directly). Measured ad hoc on the 2-vCPU VM: a 32x32x64 3x3 conv at batch 1 took 552-570 us
# with a freshly padded input vs 348-388 us with a reused one (the copy itself: 9 us). 1 MB
# covers every buffer of the 32x32 models at batch 1; at 4 MB the kept buffers of batch-32
# calls raised ResNet-18's peak RSS by ~28 MB (benchmarks/memory.py), for no measured gain
# there (batch 32 spends far longer per byte in the convs).
REUSE_MAX_BYTES = 1 << 20


class _Reused(threading.local):
    """One float32 array per thread, handed out again while nobody else holds it; arrays above
    REUSE_MAX_BYTES come from the thread's _BigBuffers instead (shared by all convs)."""

    def __init__(self):
        self.buf = None

    def take(self, shape: tuple, zeroed: bool = False, pad: tuple = ()) -> np.ndarray:
        buf = self.buf
        # 3 references: self.buf, `buf`, getrefcount's argument. More: an earlier result (or a
        # view of it) is still alive somewhere, so it must not be overwritten.
        if buf is not None and buf.shape == shape and sys.getrefcount(buf) == 3:
            return buf
        if 4 * math.prod(shape) > REUSE_MAX_BYTES:
            return _BIG.take(shape, zeroed, pad)
        buf = np.zeros(shape, dtype=_F32) if zeroed else np.empty(shape, dtype=_F32)
        self.buf = buf
        return buf

    def padded(self, x: np.ndarray, ph: int, pw: int) -> np.ndarray:
        """x with ph zero rows above and below and pw zero columns either side (x itself
        without padding); a reused buffer keeps the zero border it was created with."""
        if ph == 0 and pw == 0:
            return x
        n, h, w, c = x.shape
        xp = self.take((n, h + 2 * ph, w + 2 * pw, c), zeroed=True, pad=(ph, pw))
        xp[:, ph : ph + h, pw : pw + w] = x
        return xp


# Activations above REUSE_MAX_BYTES (batch 32 and up) come from a per-thread set of buffers that
# are handed out again once nothing else refers to them (the executor drops each value after its
# last reader, so a forward pass cycles through about its largest live set). Why: freshly
# allocated buffers of a few MB are either new pages from the kernel on every call or recycled
# heap memory, depending on glibc's dynamic mmap threshold, i.e. on what the process happened
# to allocate and free before. Measured on the 2-vCPU VM (ResNet-20, batch 32, dense): the
# same code ran at 0.49 or 0.64 ms per sample depending on the warm-up's allocations; with the
# page faults, the ~1 ms of Python between two convs outlasted the spinning worker's idle spin
# limit, so it parked and missed jobs. Kept buffers are capped at BIG_BUFFERS_MAX_BYTES per
# thread; beyond that, calls allocate as before.
BIG_BUFFERS_MAX_BYTES = 256 << 20


class _BigBuffers(threading.local):
    def __init__(self):
        self.free: dict[tuple, list[np.ndarray]] = {}
        self.bytes = 0

    def take(self, shape: tuple, zeroed: bool, pad: tuple) -> np.ndarray:
        """A (shape) buffer nobody else holds; zeroed ones (padded inputs, keyed by their
        padding too) keep the zero border they were created with."""
        key = (shape, zeroed, pad)
        kept = self.free.get(key)
        if kept is not None:
            for buf in kept:
                if sys.getrefcount(buf) == 3:  # the list, `buf`, getrefcount's argument
                    return buf
        buf = np.zeros(shape, dtype=_F32) if zeroed else np.empty(shape, dtype=_F32)
        if self.bytes + buf.nbytes <= BIG_BUFFERS_MAX_BYTES:
            self.free.setdefault(key, []).append(buf)
            self.bytes += buf.nbytes
        return buf


_BIG = _BigBuffers()


# Bytes of im2col columns per sgemm call: the M axis (output pixels) is cut in blocks so the
# columns are a bounded scratch buffer that stays in cache (not N*Ho*Wo*kh*kw*C floats: 600 MB
# for a 256-sample chunk of a 64-channel 32x32 layer), and each block's epilogue runs on an
# output block that is still in cache.
COL_BLOCK_BYTES = 2 << 20
_scratch = threading.local()  # per-thread: concurrent predict() calls never share a buffer


def _scratch_cols(rows: int, k: int) -> np.ndarray:
    need = rows * k
    buf = getattr(_scratch, "cols", None)
    if buf is None or buf.size < need:
        buf = np.empty(need, dtype=_F32)
        _scratch.cols = buf
    return buf[:need].reshape(rows, k)


# Below this many multiply-adds a conv runs on the calling thread (a hand-off to a worker costs
# tens of microseconds); above it, it is cut into chunks for escepe_rt.parallel.POOL.
PARALLEL_MIN_MACS = 1 << 24
# Direct convs of at least this many multiply-adds are shared with the spinning workers
# (escepe_rt/spinpool.py: the worker never leaves its nogil loop, so a hand-off is a few atomic
# operations). Below it, the join and the input's trip to the other core's cache cost more than
# the second core saves (measured ad hoc through make_conv at batch 1: 28x28x16 -> 16 1x1, 0.2M
# MACs, 15.0 -> 11.6 us shared; 7x7x32 -> 16 3x3, 0.23M, a tie; 7x7x16 -> 16 3x3, 0.11M, 6.3 ->
# 7.2 us; 28x28x16 -> 16 3x3, 1.8M, 46 -> 29-34 us).
PAIR_MIN_MACS = 1 << 18
PARALLEL_MIN_ROWS = 64  # output pixels per row chunk; with fewer, the output channels are split


def _direct_epilogue(sc, sf, has_sc, has_sf, cout: int) -> np.ndarray:
    """(2 * Cp,) float32: scale then shift for the direct kernels (ones / zeros if absent), Cp =
    Cout rounded up to whole panels (padded with ones / zeros)."""
    cp = -(-cout // _LANES) * _LANES
    epi = np.ones(2 * cp, dtype=_F32)
    epi[cp:] = 0.0
    epi[:cout] = sc if has_sc else 1.0
    epi[cp : cp + cout] = sf if has_sf else 0.0
    return epi


def _conv_gemm(x, w, out, sc, sf, has_sc, has_sf, residual, act, sh, sw, ph, pw, dh, dw):
    """One group: out = act(im2col(x) @ W * scale + shift + residual), in blocks of rows."""
    n, ho, wo, cout = out.shape
    c = x.shape[3]
    wmat = w.gemm[0]
    k = wmat.shape[0]
    m = n * ho * wo
    out2d = out.reshape(m, cout)
    res2d = None if residual is None else residual.reshape(m, cout)
    pointwise = k == c and sh == 1 and sw == 1 and ph == 0 and pw == 0
    geom = (w.kh, w.kw, sh, sw, ph, pw, dh, dw, ho, wo)
    epi = (sc, sf, has_sc, has_sf, act)
    pool = parallel.POOL
    if not pool.chunking_here() or m * k * cout < PARALLEL_MIN_MACS:
        _conv_rows(x, wmat, out2d, res2d, 0, m, pointwise, geom, epi)
        return
    if m >= 2 * PARALLEL_MIN_ROWS:  # row chunks, two per thread: a late worker costs little
        chunks = min(2 * pool.threads, m // PARALLEL_MIN_ROWS)
        step = -(-m // chunks)

        def rows(i):
            m0 = i * step
            if m0 < m:
                _conv_rows(x, wmat, out2d, res2d, m0, min(m, m0 + step), pointwise, geom, epi)

        pool.run(rows, chunks)
        return
    # few output pixels (deep layers at batch 1): one im2col, the output channels split
    if pointwise:
        cols = x.reshape(m, c)
    else:
        cols = np.empty((m, k), dtype=_F32)
        _im2col_rows(x, cols, 0, *geom)
    chunks = min(pool.threads, max(1, cout // 32))
    step = -(-cout // (chunks * 16)) * 16  # whole 64-byte lines per chunk
    has_res = res2d is not None
    res = res2d if has_res else out2d

    def channels(i):
        c0 = i * step
        c1 = min(cout, c0 + step)
        if c0 < c1:
            part = np.dot(cols, wmat[:, c0:c1])  # BLAS reads the column block in place
            _epilogue_cols(part, out2d, c0, sc, sf, has_sc, has_sf, res, has_res, act)

    pool.run(channels, chunks)


def _conv_direct(xp, w, out, epi, residual, act, sh, sw, dh):
    """out = act(conv(xp, w) * scale + shift + residual) on the direct micro-kernels, xp the
    padded input, `epi` the packed scale/shift of _direct_epilogue (make_conv leaves panels only
    where the width dilation is 1). Convs of >= PAIR_MIN_MACS are cut (microkernel.split) into
    about two chunks per thread, channel blocks or runs of 8-pixel tiles, shared with the
    spinning workers (escepe_rt/spinpool.py); at batch 1 too: the kernel calls no BLAS, and one
    chunk is one nogil call."""
    n, ho, wo, cout = out.shape
    has_res = residual is not None
    args = (
        xp,
        w.panel_array(),
        out,
        residual if has_res else out,
        has_res,
        epi,
        act,
        (w.kh, w.kw, sh, sw, dh, 0, 0, w.kind),  # no border on xp's own, none on out
    )
    blocks = -(-cout // _LANES)  # channel blocks, whatever the kind of weights
    units = microkernel.work(args[7], n, ho, wo)
    pool = parallel.POOL
    macs = n * ho * wo * cout * w.kh * w.kw * xp.shape[3]
    # every conv runs through spinpool's C entry (compiled once, see spinpool._chunk)
    if pool.threads == 1 or macs < PAIR_MIN_MACS:
        spinpool.run_alone(spinpool.chunk_entry(), *args)
        return
    # the caller + the spinning workers, handed over without the GIL (escepe_rt/spinpool.py)
    by_blocks, step, n_chunks = microkernel.split(blocks, units, 2 * pool.threads, w.winograd)
    if not spinpool.TEAM.run(args, by_blocks, step, units, n_chunks):
        spinpool.run_alone(spinpool.chunk_entry(), *args)  # team busy


def _conv_rows(x, wmat, out2d, res2d, m0, m1, pointwise, geom, epi):
    """Output pixels [m0, m1): im2col in blocks of <= COL_BLOCK_BYTES, sgemm, epilogue."""
    sc, sf, has_sc, has_sf, act = epi
    if pointwise:
        o = out2d[m0:m1]
        np.dot(x.reshape(out2d.shape[0], x.shape[3])[m0:m1], wmat, out=o)
        _epilogue(o, sc, sf, has_sc, has_sf, None if res2d is None else res2d[m0:m1], act)
        return
    k = wmat.shape[0]
    block = max(1, min(m1 - m0, COL_BLOCK_BYTES // (4 * k)))
    cols_buf = _scratch_cols(block, k)
    for b0 in range(m0, m1, block):
        b1 = min(m1, b0 + block)
        cols = cols_buf[: b1 - b0]
        _im2col_rows(x, cols, b0, *geom)
        o = out2d[b0:b1]
        np.dot(cols, wmat, out=o)
        _epilogue(o, sc, sf, has_sc, has_sf, None if res2d is None else res2d[b0:b1], act)


def _epilogue(o, sc, sf, has_sc, has_sf, res, act):
    """In place on the (M, C) sgemm result o."""
    if res is not None:
        _epilogue_res(o, o, sc, sf, has_sc, has_sf, res, act)
    elif has_sc or has_sf or act != ACT_NONE:
        _epilogue2d(o, o, sc, sf, has_sc, has_sf, act)


def _conv_grouped(x, w, out, sc, sf, has_sc, has_sf, act, sh, sw, ph, pw, dh, dw, ho, wo):
    """groups > 1 (not depthwise): one sgemm per group over grouped im2col columns."""
    n, _, _, c = x.shape
    g = w.groups
    m = n * ho * wo
    cols = np.empty((g, m, w.kh * w.kw * (c // g)), dtype=_F32)
    _im2col(x, cols, w.kh, w.kw, sh, sw, ph, pw, dh, dw, ho, wo)
    tmp = np.matmul(cols, w.gemm)  # numpy's matmul loops BLAS over the stacked groups
    _epilogue_grouped(tmp, out.reshape(m, w.Cout), sc, sf, has_sc, has_sf, act)


# ----------------------------------------------------------------------------------------------
# linear / elementwise
# ----------------------------------------------------------------------------------------------


def prepare_linear_weight(weight_oi: np.ndarray) -> np.ndarray:
    """PyTorch (O, I) weight -> contiguous float32 (I, O) so that ``x @ w`` is one sgemm."""
    w = np.asarray(weight_oi, dtype=_F32)
    if w.ndim != 2:
        raise ValueError(f"linear weight must be 2-D (O, I), got {w.shape}")
    return np.ascontiguousarray(w.T)


def linear(x: np.ndarray, w_prepared, scale, shift, activation: int) -> np.ndarray:
    """(N, I) @ (I, O) with fused per-feature ``scale``/``shift`` (bias) and activation."""
    x = _f32(x)
    w = w_prepared
    if x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"linear: input {x.shape} does not match weight (I, O) = {w.shape}")
    act = _check_act(activation)
    o = w.shape[1]
    sc, has_sc = _vec(scale, o, "scale")
    sf, has_sf = _vec(shift, o, "shift")
    out = np.empty((x.shape[0], o), dtype=_F32)
    if x.shape[0] == 1 or w.size <= LINEAR_LOOP_MAX:
        # one summation order for every batch size and for the section programs
        _linear_rows(x, w, sc, sf, has_sc, has_sf, act, out)
        return out
    np.dot(x, w, out=out)
    if has_sc or has_sf or act != ACT_NONE:
        _epilogue2d(out, out, sc, sf, has_sc, has_sf, act)
    return out


# Linear layers with at most this many weights run as numba loops, one sample at a time, at
# every batch size (exit heads: 128 x 10); bigger ones use numpy's BLAS from batch 2 on.
LINEAR_LOOP_MAX = 1 << 16


@_jit
def _linear_rows(x, w, sc, sf, has_sc, has_sf, act, out):
    for r in range(x.shape[0]):
        _linear1(x[r], w, sc, sf, has_sc, has_sf, act, out[r])


@_jit
def _linear1(x, w, sc, sf, has_sc, has_sf, act, out):
    """One sample: out = act(x @ w * scale + shift), x (I,), w (I, O) row-major. Both the step
    lists and the section programs (escepe_rt/program.py) use this loop, so a sample's logits do
    not depend on which of them ran it, nor on the batch size (numpy's BLAS sums in another
    order, and a different one for one row and for many)."""
    n_in, n_out = w.shape
    acc = np.zeros(n_out, dtype=np.float32)
    for i in range(n_in):
        xi = x[i]
        for o in range(n_out):
            acc[o] += xi * w[i, o]
    for o in range(n_out):
        v = acc[o]
        if has_sc:
            v = v * sc[o]
        if has_sf:
            v = v + sf[o]
        out[o] = _act1(v, act)


def affine(x: np.ndarray, scale, shift, activation: int) -> np.ndarray:
    """Per-channel ``x * scale + shift`` then activation, on the last axis (standalone BN)."""
    x = _f32(x)
    act = _check_act(activation)
    c = x.shape[-1]
    sc, has_sc = _vec(scale, c, "scale")
    sf, has_sf = _vec(shift, c, "shift")
    out = np.empty(x.shape, dtype=_F32)
    src = x.reshape(-1, c)
    _epilogue2d(src, out.reshape(-1, c), sc, sf, has_sc, has_sf, act)
    return out


def activate(x: np.ndarray, activation: int) -> np.ndarray:
    """Standalone ReLU / ReLU6 (ACT_NONE returns a copy)."""
    x = _f32(x)
    act = _check_act(activation)
    out = np.empty(x.shape, dtype=_F32)
    _activate1d(x.reshape(-1), out.reshape(-1), act)
    return out


def add(a: np.ndarray, b: np.ndarray, activation: int) -> np.ndarray:
    """Residual add of two same-shaped tensors, then activation."""
    a = _f32(a)
    b = _f32(b)
    if a.shape != b.shape:
        raise ValueError(f"add: shapes differ {a.shape} vs {b.shape}")
    act = _check_act(activation)
    out = np.empty(a.shape, dtype=_F32)
    _add1d(a.reshape(-1), b.reshape(-1), out.reshape(-1), act)
    return out


def concat_channels(xs: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the last axis (channels for NHWC, features for (N, F))."""
    if len(xs) == 0:
        raise ValueError("concat_channels needs at least one input")
    return np.concatenate([np.asarray(t, dtype=_F32) for t in xs], axis=-1)


# ----------------------------------------------------------------------------------------------
# pooling
# ----------------------------------------------------------------------------------------------


def pool_output_size(
    in_size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> int:
    """torch's pooling_output_shape: floor/ceil division, and with ceil_mode the last window must
    start inside the input or the left padding (otherwise it is dropped)."""
    num = in_size + 2 * padding - dilation * (kernel - 1) - 1
    if ceil_mode:
        num += stride - 1
    out = num // stride + 1  # python floor division == torch's div_rtn
    if ceil_mode and (out - 1) * stride >= in_size + padding:
        out -= 1
    return out


def _pool_geometry(x, kernel, stride, padding, dilation, ceil_mode, name):
    if x.ndim != 4:
        raise ValueError(f"{name} expects NHWC input, got shape {x.shape}")
    kh, kw = _pair(kernel)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{name}: kernel/stride/dilation must be >= 1 and padding >= 0")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{name}: padding should be at most half of kernel size")
    ho = pool_output_size(x.shape[1], kh, sh, ph, dh, bool(ceil_mode))
    wo = pool_output_size(x.shape[2], kw, sw, pw, dw, bool(ceil_mode))
    if ho < 1 or wo < 1:
        raise ValueError(f"{name}: output would be empty ({ho}x{wo})")
    return kh, kw, sh, sw, ph, pw, dh, dw, ho, wo


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode) -> np.ndarray:
    """NHWC max pooling, torch semantics (implicit -inf padding, dilation, ceil_mode)."""
    x = _f32(x)
    kh, kw, sh, sw, ph, pw, dh, dw, ho, wo = _pool_geometry(
        x, kernel, stride, padding, dilation, ceil_mode, "max_pool2d"
    )
    out = np.empty((x.shape[0], ho, wo, x.shape[3]), dtype=_F32)
    _max_pool(x, out, kh, kw, sh, sw, ph, pw, dh, dw)
    return out


def avg_pool2d(
    x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
) -> np.ndarray:
    """NHWC average pooling, torch semantics (incl. ceil_mode windows clipped to the padded
    extent, count_include_pad and divisor_override)."""
    x = _f32(x)
    kh, kw, sh, sw, ph, pw, _, _, ho, wo = _pool_geometry(
        x, kernel, stride, padding, 1, ceil_mode, "avg_pool2d"
    )
    div = 0 if divisor_override is None else int(divisor_override)
    if divisor_override is not None and div == 0:
        raise ValueError("avg_pool2d: divisor_override must be non-zero")
    out = np.empty((x.shape[0], ho, wo, x.shape[3]), dtype=_F32)
    _avg_pool(x, out, kh, kw, sh, sw, ph, pw, bool(count_include_pad), div)
    return out


def adaptive_avg_pool2d(x, output_size: tuple[int, int]) -> np.ndarray:
    """NHWC adaptive average pooling with torch's bins [floor(i*H/oh), ceil((i+1)*H/oh))."""
    x = _f32(x)
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool2d expects NHWC input, got shape {x.shape}")
    oh, ow = _pair(output_size)
    if oh < 1 or ow < 1:
        raise ValueError("adaptive_avg_pool2d: output size must be >= 1")
    n, h, w, c = x.shape
    out = np.empty((n, oh, ow, c), dtype=_F32)
    if oh == 1 and ow == 1:
        # global average pool (every exit head): one nogil pass summing in float64, ~1 us at
        # batch 1 where numpy's two-axis mean costs ~5 us of call overhead
        _global_avg_pool(x, 0, out)
        return out
    _adaptive_avg_pool(x, out)
    return out


@_jit
def _global_avg_pool(x, border, out):
    """Mean over each image of x (N, H, W, C) inside a border of `border` pixels (a section
    program's maps keep a zero border, escepe_rt/program.py; the step lists' have none)."""
    n, hb, wb, c = x.shape
    h, w = hb - 2 * border, wb - 2 * border
    acc = np.empty(c, dtype=np.float64)
    inv = 1.0 / (h * w)
    for i in range(n):
        acc[:] = 0.0
        for y in range(border, border + h):
            for xx in range(border, border + w):
                for ch in range(c):
                    acc[ch] += x[i, y, xx, ch]
        for ch in range(c):
            out[i, 0, 0, ch] = acc[ch] * inv


# ----------------------------------------------------------------------------------------------
# reshaping / heads
# ----------------------------------------------------------------------------------------------


def flatten_nchw(x: np.ndarray) -> np.ndarray:
    """NHWC (N, H, W, C) -> (N, C*H*W) in PyTorch's NCHW flatten order; 2-D passes through."""
    x = np.asarray(x, dtype=_F32)
    if x.ndim == 2:
        return x
    if x.ndim != 4:
        raise ValueError(f"flatten_nchw expects 2-D or NHWC input, got shape {x.shape}")
    n = x.shape[0]
    # no copy when H == W == 1 (the transposed view is already C-contiguous)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(n, -1)


def _shifted(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"expected (N, K) logits, got shape {z.shape}")
    return z - z.max(axis=1, keepdims=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, max-subtracted (stable for huge logits)."""
    e = np.exp(_shifted(logits))
    return (e / e.sum(axis=1, keepdims=True)).astype(_F32)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """(N,) confidence: the largest softmax probability, 1 / sum(exp(z - max z)), in float64
    (one nogil pass: ~1 us for one row where the numpy expression cost ~5 us). A NaN or inf
    logit gives NaN, as numpy's max / exp / sum would."""
    z = np.asarray(logits)
    if z.ndim != 2:
        raise ValueError(f"expected (N, K) logits, got shape {z.shape}")
    out = np.empty(z.shape[0], dtype=_F32)
    _max_softmax(np.ascontiguousarray(z, dtype=_F32), out)
    return out


def first_nonfinite_row(x: np.ndarray) -> int:
    """Index of the first sample (along axis 0) holding a NaN or inf, or -1: one nogil pass over
    a C-contiguous float32 array without the boolean temporary of np.isfinite (~1 us for one
    28x28 image where the numpy check cost ~3.5 us)."""
    if x.dtype != _F32 or not x.flags.c_contiguous:
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        return -1 if finite.all() else int(np.argmin(finite))
    return _first_nonfinite_row(x.reshape(len(x), -1))


@_jit
def _first_nonfinite_row(x):
    n, k = x.shape
    for i in range(n):
        acc = np.float32(0.0)
        for j in range(k):
            acc += x[i, j] * np.float32(0.0)  # 0 * finite = 0; 0 * NaN or inf = NaN
        if acc != acc:
            return i
    return -1


@_jit
def _max_softmax(z, out):
    n, k = z.shape
    for i in range(n):
        m = -np.inf
        nan = False
        for j in range(k):
            v = np.float64(z[i, j])
            if v != v:
                nan = True
            elif v > m:
                m = v
        s = 0.0
        for j in range(k):
            s += np.exp(np.float64(z[i, j]) - m)
        out[i] = np.nan if nan or k == 0 else 1.0 / s


def entropy(logits: np.ndarray) -> np.ndarray:
    """(N,) softmax entropy divided by log K, in [0, 1] (0 when K == 1)."""
    z = _shifted(logits)
    k = z.shape[1]
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    # H = -sum p log p with log p = z - log s; terms with p == 0 contribute 0 (avoid 0 * -inf)
    plogp = np.where(p > 0.0, p * (z - np.log(s)), 0.0)
    h = -plogp.sum(axis=1)
    if k <= 1:
        return np.zeros(z.shape[0], dtype=_F32)
    return np.clip(h / math.log(k), 0.0, 1.0).astype(_F32)
