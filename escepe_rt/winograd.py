"""Winograd F(2x2, 3x3) transforms for the 3x3 stride-1 convolutions.

Why: the direct micro-kernels (escepe_rt/microkernel.py) run 3x3 convs at ~87% of this VM's
peak, so the multiplies themselves are what is left. Winograd's minimal filtering computes a
2x2 output tile from a 4x4 input tile with 16 multiplies per (input, output) channel pair
instead of 36 (2.25x fewer): per tile, V = B^T d B (input), U = G g G^T (weights, once per
model), M = sum over input channels of U * V (elementwise in the 16 positions: 16 matrix
products of (tiles x Cin) by (Cin x Cout), which the existing micro-kernel tiles run as 1x1
convs), then Y = A^T M A (output), with the conv's scale, shift, residual and activation
applied before the one store. Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks" (2016); the matrices below are theirs.

The price: U is 16/9 the size of the 3x3 weight (the runtime keeps only U for these convs),
the transforms are extra passes over small per-chunk scratch buffers, and the rounding error
grows a little (the transforms add and subtract several terms; on random data the outputs
differ from the direct kernels' by up to ~1e-6 of their largest magnitude, ad hoc; the tests
compare with a float64 reference and with PyTorch at the runtime's usual tolerance).

The input and output transforms are written in LLVM IR on <LANES x float> vectors (numba
intrinsics, as the micro-kernels): a plain numba loop over channels touches 16 input and 16
output streams at once, more than LLVM's vectoriser will check for aliasing, so it stayed
scalar (a prototype's input transform of a 28x28x16 map took 74 us, this one ~7, ad hoc).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from escepe_rt.vector_ir import Epilogue, array_ptr, vector_at

LANES = 16  # channels per vector (microkernel.LANES)
VECTOR = ir.VectorType(ir.FloatType(), LANES)

# F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A
G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
BT = np.array(
    [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]]
)
AT = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]])


@numba.njit(cache=True, nogil=True)
def transform_weight(panels, out):
    """out[xi * blocks + blk, ci, l] = (G g G^T)[xi // 4, xi % 4] of the 3x3 kernel g =
    panels[blk, (ky * 3 + kx) * C + ci, l] (the direct kernels' panel layout, rows (ky, kx,
    ci)), computed in float64 and rounded once. out: (16 * blocks, C, LANES) float32."""
    blocks, k, lanes = panels.shape
    c = k // 9
    g = np.empty((3, 3))
    t = np.empty((4, 3))
    for blk in range(blocks):
        for ci in range(c):
            for lane in range(lanes):
                for ky in range(3):
                    for kx in range(3):
                        g[ky, kx] = panels[blk, (ky * 3 + kx) * c + ci, lane]
                for i in range(4):  # t = G g
                    for kx in range(3):
                        t[i, kx] = G[i, 0] * g[0, kx] + G[i, 1] * g[1, kx] + G[i, 2] * g[2, kx]
                for i in range(4):  # u = t G^T
                    for j in range(4):
                        u = t[i, 0] * G[j, 0] + t[i, 1] * G[j, 1] + t[i, 2] * G[j, 2]
                        out[(i * 4 + j) * blocks + blk, ci, lane] = u


def weights_of(panels: np.ndarray) -> np.ndarray:
    """The (16 * blocks, C, LANES) Winograd weights of a 3x3 conv's direct-kernel panels."""
    blocks, k, lanes = panels.shape
    if k % 9 or lanes != LANES:
        raise ValueError(f"panels {panels.shape} are not those of a 3x3 conv")
    out = np.empty((16 * blocks, k // 9, LANES), dtype=np.float32)
    transform_weight(panels, out)
    return out


def _ints(context, builder, sig, args, which):
    return [context.cast(builder, args[i], sig.args[i], types.int64) for i in which]


def _bt(builder, a):
    """B^T a for a column of 4 vectors (d0 - d2, d1 + d2, d2 - d1, d1 - d3)."""
    return [
        builder.fsub(a[0], a[2]),
        builder.fadd(a[1], a[2]),
        builder.fsub(a[2], a[1]),
        builder.fsub(a[1], a[3]),
    ]


def _at(builder, a):
    """A^T a for a column of 4 vectors (m0 + m1 + m2, m1 - m2 - m3)."""
    return [
        builder.fadd(builder.fadd(a[0], a[1]), a[2]),
        builder.fsub(builder.fsub(a[1], a[2]), a[3]),
    ]


def _vec_at(builder, ptr, at):
    return vector_at(builder, ptr, at, VECTOR)


@intrinsic
def input_tile(typingctx, src, s_base, s_row, s_col, dst, d_base, d_step):
    """V = B^T d B for one LANES-channel slice of one tile: d[y][x] is the vector at src[s_base
    + y * s_row + x * s_col], V[xi] (xi = 4 * i + j) is stored at dst[d_base + xi * d_step].
    Offsets in elements; the caller guarantees every access is inside the arrays."""
    sig = types.void(src, s_base, s_row, s_col, dst, d_base, d_step)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        ps = array_ptr(context, builder, signature, args, 0)
        pd = array_ptr(context, builder, signature, args, 4)
        base, row, col, d_base, d_step = _ints(context, builder, signature, args, (1, 2, 3, 5, 6))
        d = [
            [
                builder.load(
                    _vec_at(
                        builder,
                        ps,
                        builder.add(
                            builder.add(base, builder.mul(row, ir.Constant(i64, y))),
                            builder.mul(col, ir.Constant(i64, x)),
                        ),
                    ),
                    align=4,
                )  # fmt: skip
                for x in range(4)
            ]
            for y in range(4)
        ]
        cols = [_bt(builder, [d[0][x], d[1][x], d[2][x], d[3][x]]) for x in range(4)]  # B^T d
        for i in range(4):
            v = _bt(builder, [cols[0][i], cols[1][i], cols[2][i], cols[3][i]])  # (B^T d) B
            for j in range(4):
                at = builder.add(d_base, builder.mul(d_step, ir.Constant(i64, 4 * i + j)))
                builder.store(v[j], _vec_at(builder, pd, at), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def output_tile(typingctx, m, m_base, m_step, epi, ep, res, out, qoffs):
    """Y = A^T M A for one LANES-channel slice of one tile, M[xi] the vector at m[m_base + xi *
    m_step]; then out[qoffs[q] + cb] = act(Y[q] * scale + shift (+ res[same])) for each output
    pixel q = 2 * y + x of the 2x2 tile whose qoffs[q] >= 0 (pixels past the map's edge have
    -1). epi holds scale then shift, cp each; ep = (cb, cp, has_res, act), act as
    microkernel's tiles (0 none, 1 relu, 2 relu6; NaN -> 0)."""
    sig = types.void(m, m_base, m_step, epi, ep, res, out, qoffs)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        pm, pe, pr, po, pq = (
            array_ptr(context, builder, signature, args, i) for i in (0, 3, 5, 6, 7)
        )
        m_base, m_step = _ints(context, builder, signature, args, (1, 2))
        mm = [
            builder.load(
                _vec_at(
                    builder, pm, builder.add(m_base, builder.mul(m_step, ir.Constant(i64, xi)))
                ),
                align=4,
            )  # fmt: skip
            for xi in range(16)
        ]
        cols = [_at(builder, [mm[j], mm[4 + j], mm[8 + j], mm[12 + j]]) for j in range(4)]
        ys = [_at(builder, [cols[0][i], cols[1][i], cols[2][i], cols[3][i]]) for i in range(2)]
        epilogue = Epilogue(context, builder, VECTOR, pe, args[4], signature.args[4])
        for q in range(4):
            off = builder.load(builder.gep(pq, [ir.Constant(i64, q)]))
            inside = builder.icmp_signed(">=", off, ir.Constant(i64, 0))
            with builder.if_then(inside, likely=True):
                at = builder.add(off, epilogue.cb)
                epilogue.store(ys[q // 2][q % 2], pr, po, at)
        return context.get_dummy_value()

    return sig, codegen
