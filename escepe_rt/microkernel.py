"""Direct convolution on register-blocked SIMD micro-kernels written in LLVM IR (numba intrinsics).

Why not im2col + numpy's sgemm for every conv: at batch 1 the convs of small models are small
(a 28x28x16 -> 16 conv is 3.6 MFLOP) and OpenBLAS reaches only ~40-70 GFLOP/s on such shapes
(16 output channels), after an im2col pass that copies the input nine times. Plain numba loops do
not help: LLVM keeps the accumulators in memory because it cannot prove they do not alias the
inputs (prototypes ran several times slower than im2col + sgemm). So the inner kernel is written
in LLVM IR directly: a tile of up to 8 output pixels x LANES output channels lives in vector
registers for the whole reduction; each step loads one weight vector and one broadcast input
value per pixel and issues one fused multiply-add per pixel (`benchmarks/batch1_threads.py`
times it against im2col + sgemm per conv shape). LLVM lowers the generic <16 x float> type to
whatever the target has: 1 AVX-512 register, 2 AVX2 registers, 4 NEON registers on a Pi/Jetson.

The convolution reads its input in place (no im2col): for a fixed kernel row ky, the taps
(kx, ci) of output pixel ox are the contiguous run of kw*C floats starting at input pixel
ox*stride of the padded NHWC input, and consecutive output pixels are stride*C floats apart, so
one micro-kernel call per kernel row accumulates a tile. The weight is the sgemm layout the
runtime already uses, (kh*kw*Cin, Cout) with rows (ky, kx, ci).

Used for ungrouped convs with at least LANES / 2 output channels (a partial last block of
channels is zero-padded in the weights) and no dilation along the width; kernels keeps im2col +
sgemm for everything else.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from escepe_rt import winograd
from escepe_rt.vector_ir import (
    WIDE_TILES,
    Epilogue,
    array_ptr,
    half_to_float,
    vector_at,
    vector_fn,
)

LANES = 16  # output channels per tile: one <16 x float> accumulator per pixel


def _phis(builder, ty, values, block) -> list:
    """One phi of type ty per value, each starting with that value when entered from block."""
    phis = []
    for v in values:
        phi = builder.phi(ty)
        phi.add_incoming(v, block)
        phis.append(phi)
    return phis


def _make_tile(rows: int, epilogue: bool = True, lanes: int = LANES, f16: bool = False):
    """An intrinsic computing one tile of `rows` output pixels x `lanes` channels, epilogue
    included (on the registers, before the one store; without `epilogue`, the sums are stored
    as they are and epi, res, ep are not read: Winograd's products). lanes = LANES / 2 reads
    the first half of each panel row and stores half vectors (convs of exactly LANES / 2
    output channels, which full vectors would compute twice over). With `f16` the panel holds
    float16 weights (b is their float32 view; offsets still count weights), widened to float32
    in registers as each row is loaded: half the bytes streamed, the same products (the
    runtime makes such panels only from weights that are exact in float16):

        acc = sum over ky < kh, k < krow of
            a[offs[o0 + r] + ky*a_ky + k] * b[b_off + (ky*krow + k)*LANES : +LANES]
        c[coffs[c0 + r] + c_add : +LANES] =
            act(acc * epi[cb:] + epi[cp + cb:] + (res[same] if has_res))

    for r < rows; act 0 none, 1 relu, 2 relu6 (as kernels._act1: NaN -> 0). offs holds each
    pixel's input offset and coffs each pixel's output offset (pixels of a tile may span output
    rows, and the output may have a border); b is a panel, kh*krow rows of
    LANES floats, contiguous; epi holds scale then shift, cp entries each (ep = (cb, cp, has_res,
    act); the caller passes ones / zeros when the conv has none); res has c's layout (c itself
    when has_res is false). Offsets are in elements; the caller guarantees every access is
    inside the arrays (there are no bounds checks here)."""

    @intrinsic
    def tile(typingctx, a, offs, o0, kh, a_ky, krow, b, b_off, c, coffs, c0, c_add, epi, res, ep):
        sig = types.void(a, offs, o0, kh, a_ky, krow, b, b_off, c, coffs, c0, c_add, epi, res, ep)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            vty = ir.VectorType(ir.FloatType(), lanes)
            ptr_a = array_ptr(context, builder, signature, args, 0)
            ptr_o = array_ptr(context, builder, signature, args, 1)
            ptr_b = array_ptr(context, builder, signature, args, 6)
            if f16:  # float16 bit patterns, widened by vector_ir.half_to_float
                hty = ir.VectorType(ir.IntType(16), lanes)
                ptr_b = builder.bitcast(ptr_b, ir.IntType(16).as_pointer())
            ptr_c = array_ptr(context, builder, signature, args, 8)
            ptr_co = array_ptr(context, builder, signature, args, 9)
            o0, kh, a_ky, krow, b_off, c0, c_add = (
                context.cast(builder, args[i], signature.args[i], types.int64)
                for i in (2, 3, 4, 5, 7, 10, 11)
            )
            fma = vector_fn(builder, "fma", vty, 3)
            undef = ir.Constant(vty, ir.Undefined)
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            zero = ir.Constant(vty, None)
            a_base = [
                builder.load(builder.gep(ptr_o, [builder.add(o0, ir.Constant(i64, r))]))
                for r in range(rows)
            ]
            entry = builder.block
            ky_head = builder.append_basic_block("tile_ky")
            k_head = builder.append_basic_block("tile_k")
            k_body = builder.append_basic_block("tile_k_body")
            ky_latch = builder.append_basic_block("tile_ky_next")
            done = builder.append_basic_block("tile_done")
            builder.branch(ky_head)

            builder.position_at_end(ky_head)  # for ky in range(kh)
            ky = builder.phi(i64)
            ky.add_incoming(ir.Constant(i64, 0), entry)
            accs_ky = _phis(builder, vty, [zero] * rows, entry)
            a_ky_off = builder.mul(ky, a_ky)
            a_rows = [builder.gep(ptr_a, [builder.add(a_base[r], a_ky_off)]) for r in range(rows)]
            row_len = ir.Constant(i64, LANES)  # a panel row: LANES floats whatever the tile width
            b_ky_off = builder.add(b_off, builder.mul(builder.mul(ky, krow), row_len))
            builder.cbranch(builder.icmp_signed("<", ky, kh), k_head, done)

            builder.position_at_end(k_head)  # for k in range(krow)
            k = builder.phi(i64)
            k.add_incoming(ir.Constant(i64, 0), ky_head)
            accs = _phis(builder, vty, accs_ky, ky_head)
            builder.cbranch(builder.icmp_signed("<", k, krow), k_body, ky_latch)

            builder.position_at_end(k_body)
            b_at = builder.add(b_ky_off, builder.mul(k, ir.Constant(i64, LANES)))
            if f16:
                hv = builder.load(vector_at(builder, ptr_b, b_at, hty), align=2)
                bv = half_to_float(builder, hv)
            else:
                bv = builder.load(vector_at(builder, ptr_b, b_at, vty), align=4)
            new = []
            for r in range(rows):
                av = builder.load(builder.gep(a_rows[r], [k]), align=4)
                splat = builder.shuffle_vector(
                    builder.insert_element(undef, av, ir.Constant(ir.IntType(32), 0)),
                    undef,
                    splat_mask,
                )
                new.append(builder.call(fma, [splat, bv, accs[r]]))
            k.add_incoming(builder.add(k, ir.Constant(i64, 1)), k_body)
            for r in range(rows):
                accs[r].add_incoming(new[r], k_body)
            builder.branch(k_head)

            builder.position_at_end(ky_latch)
            ky.add_incoming(builder.add(ky, ir.Constant(i64, 1)), ky_latch)
            for r in range(rows):
                accs_ky[r].add_incoming(accs[r], ky_latch)
            builder.branch(ky_head)

            builder.position_at_end(done)
            if not epilogue:
                for r in range(rows):
                    at = builder.add(c0, ir.Constant(i64, r))
                    off = builder.add(builder.load(builder.gep(ptr_co, [at])), c_add)
                    builder.store(accs_ky[r], vector_at(builder, ptr_c, off, vty), align=4)
                return context.get_dummy_value()
            # epilogue: epi = [scale (cp), shift (cp)] flat; ep = (cb, cp, has_res, act)
            ptr_e = array_ptr(context, builder, signature, args, 12)
            ptr_r = array_ptr(context, builder, signature, args, 13)
            epi_ops = Epilogue(context, builder, vty, ptr_e, args[14], signature.args[14])
            for r in range(rows):
                at = builder.add(c0, ir.Constant(i64, r))
                off = builder.add(builder.load(builder.gep(ptr_co, [at])), c_add)
                epi_ops.store(accs_ky[r], ptr_r, ptr_c, off)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile8 = _make_tile(8)
_tile4 = _make_tile(4)
_sums8 = _make_tile(8, epilogue=False)
_sums4 = _make_tile(4, epilogue=False)
_sums2 = _make_tile(2, epilogue=False)
_sums1 = _make_tile(1, epilogue=False)
_half8 = _make_tile(8, lanes=LANES // 2)
_half4 = _make_tile(4, lanes=LANES // 2)
_f16_8 = _make_tile(8, f16=True)
_f16_4 = _make_tile(4, f16=True)

# geom[7]: what a conv's weights are (kernels.ConvWeight.kind)
KIND_F32, KIND_WINOGRAD, KIND_F16 = 0, 1, 2

_jit = numba.njit(cache=True, nogil=True)


@_jit
def conv_direct(xp, w, out, res, has_res, epi, act, geom, b0, b1, m0, m1):
    """out = act(conv(xp, w) * scale + shift + res) for channel blocks [b0, b1) (of LANES) and
    output pixels [m0, m1) (pixel m = (n * Ho + oy) * Wo + ox).

    xp: padded NHWC input (N, Hp, Wp, C), C-contiguous; w: panels (ceil(Cout / LANES),
    kh*kw*C, LANES), rows (ky, kx, ci), the last panel zero-padded when Cout % LANES != 0;
    out, res: (N, Ho + 2 * pad_out, Wo + 2 * pad_out, Cout), of which the interior is written
    (res = out when has_res is false); epi: (2 * Cp,) scale then shift (ones / zeros where the
    conv has none), Cp = LANES * panels, padded like the panels; act 0/1/2 (none, relu, relu6).
    geom = (kh, kw, sh, sw, dh, origin, pad_out, kind): the conv's padded input starts
    `origin` floats into each image of xp (a section program keeps every map inside a zero
    border of its own, at least as wide as the convs that read it need, so it is read in place
    and written into the next conv's border without a padding copy; the step lists pass 0, 0);
    kind is KIND_F32 or KIND_F16 here (w then holds float16 panels, viewed as float32 pairs:
    (blocks, kh*kw*C, LANES / 2); KIND_WINOGRAD: conv_winograd's weights, see conv_range; no
    float16 with Cout == LANES / 2). The caller checked the
    shapes: every tap of every output pixel lies inside xp. Tiles are 8 consecutive output pixels
    (across output rows: each pixel has its own input and output offset), channel blocks the
    outer loop: a block's panel (kh*kw*C x LANES floats, contiguous) stays in cache while every
    pixel uses it. A partial last block (Cout % LANES channels) computes its tiles into a
    LANES-wide scratch and copies the valid channels out (the tiles load and store whole
    vectors); with Cout < LANES only the last tile of the range needs that (see below).
    """
    kh, kw, sh, sw, dh, origin, pad_out, _ = geom
    _, hp, wp, c = xp.shape
    _, hq, wq, cout = out.shape
    ho, wo = hq - 2 * pad_out, wq - 2 * pad_out
    cp = w.shape[0] * LANES  # epilogue stride: scale[0:cp], shift[cp:2cp]
    krow = kw * c  # reduction length of one kernel row (kx, ci): contiguous in xp
    a_ky = dh * wp * c
    panel = kh * krow * LANES
    npx = m1 - m0
    # each pixel's input and output offsets, walked without a division per pixel (two 64-bit
    # divisions per pixel cost ~8 us on a 28x28 output, more than a 1x1 conv's multiply-adds)
    # (3 more entries: a tail of 1-3 pixels runs a 4-pixel tile whose extra rows repeat the last
    # pixel, reading the same input and writing the same value to the same place again, which
    # holds because res never is out when has_res (a residual written over in place would be
    # read again changed); the 2- and 1-pixel tiles this replaces cost ~1 s of a cold cache's
    # compile, CPU time)
    offs = np.empty(npx + 3, dtype=np.int64)
    outs = np.empty(npx + 3, dtype=np.int64)
    ox = m0 % wo
    t = m0 // wo
    oy = t % ho
    row = ((t // ho) * hp + oy * sh) * wp  # input pixel index of (n, oy * sh, 0)
    out_row = ((t // ho) * hq + oy + pad_out) * wq + pad_out  # output pixel index of (n, oy, 0)
    for i in range(npx):
        offs[i] = (row + ox * sw) * c + origin
        outs[i] = (out_row + ox) * cout
        ox += 1
        if ox == wo:
            ox = 0
            oy += 1
            row += sh * wp
            out_row += wq
            if oy == ho:
                oy = 0
                row += (hp - ho * sh) * wp
                out_row += (hq - ho) * wq
    for e in range(npx, npx + 3 if npx else 0):
        offs[e] = offs[npx - 1]
        outs[e] = outs[npx - 1]
    # A partial last block (Cout % LANES channels) runs its tiles on an (8, LANES) scratch (its
    # residual copied in, its valid channels copied out), so no vector store reaches past the
    # block's channels into another block's, another chunk's pixels or past the end of out.
    # With Cout < LANES (one partial block) only the last tile needs it: each row's
    # whole-vector store spills into the next pixel, which the next row or tile overwrites, or
    # which is border: the spilled lanes hold act(0 * 1 + 0 + res), and res's border is zero.
    # The scratches are 4-D like out and res and each tile width has one call site, so the
    # tiles compile once (numba's cold-cache compile time tripled with a second, 2-D
    # instantiation); they are empty when every block is full.
    half = cout == LANES // 2  # half-width tiles: exact stores, no scratch
    f16 = geom[7] == KIND_F16
    scratch_rows = 8 if cout % LANES and not half else 0
    tmp = np.zeros((1, 1, scratch_rows, LANES), dtype=np.float32)
    tmp_res = np.zeros((1, 1, scratch_rows, LANES), dtype=np.float32)
    tmp_outs = np.arange(scratch_rows) * LANES
    src = tmp.ravel()
    src_res = tmp_res.ravel()
    flat_out = out.ravel()
    flat_res = res.ravel()
    for blk in range(b0, b1):
        cb = blk * LANES
        b_off = blk * panel
        ep = (cb, cp, 1 if has_res else 0, act)
        valid = min(LANES, cout - cb)
        i = 0
        while i < npx:
            rows = min(8, npx - i)
            if half:  # half-width tiles of 8 pixels fit every target's registers
                if rows >= 8:
                    _half8(xp, offs, i, kh, a_ky, krow, w, b_off, out, outs, i, cb, epi, res, ep)
                else:
                    _half4(xp, offs, i, kh, a_ky, krow, w, b_off, out, outs, i, cb, epi, res, ep)
                i += 8 if rows >= 8 else min(4, rows)
                continue
            wide = WIDE_TILES and rows >= 8  # 8-pixel tiles only where they fit the registers
            done = 8 if wide else min(4, rows)  # a tail of 1-3 pixels: a 4-pixel tile, see above
            direct = valid == LANES or (cout < LANES and i + done < npx)
            if direct:
                c, c_offs, c0, c_add, r_in = out, outs, i, cb, res
            else:
                c, c_offs, c0, c_add, r_in = tmp, tmp_outs, i - i, cb - cb, tmp_res
                if has_res:
                    for r in range(done):
                        at = outs[i + r] + cb
                        for k in range(valid):
                            src_res[r * LANES + k] = flat_res[at + k]
            # one call site per tile (compile time); float16 panels: the f16 tiles
            if wide:
                if f16:
                    _f16_8(
                        xp, offs, i, kh, a_ky, krow, w, b_off, c, c_offs, c0, c_add, epi, r_in, ep
                    )
                else:
                    _tile8(
                        xp, offs, i, kh, a_ky, krow, w, b_off, c, c_offs, c0, c_add, epi, r_in, ep
                    )
            elif f16:
                _f16_4(xp, offs, i, kh, a_ky, krow, w, b_off, c, c_offs, c0, c_add, epi, r_in, ep)
            else:
                _tile4(xp, offs, i, kh, a_ky, krow, w, b_off, c, c_offs, c0, c_add, epi, r_in, ep)
            if not direct:
                for r in range(done):
                    at = outs[i + r] + cb
                    for k in range(valid):
                        flat_out[at + k] = src[r * LANES + k]
            i += done


# Floats of a Winograd conv's per-block scratch (the transformed inputs V of a block of tiles
# and their products M): the block stays in one core's L2 (512 KB on a Cortex-A76 and here).
WINOGRAD_BLOCK_FLOATS = 1 << 17


@_jit
def conv_winograd(xp, u, out, res, has_res, epi, act, geom, b0, b1, t0, t1):
    """conv_direct's contract for a 3x3 stride-1 conv on Winograd F(2x2, 3x3) weights u
    ((16 * blocks, C, LANES), escepe_rt.winograd.weights_of; C and Cout multiples of LANES):
    channel blocks [b0, b1) of the 2x2 output tiles [t0, t1), tile t = (n * th + ty) * tw + tx
    with th, tw = ceil(Ho / 2), ceil(Wo / 2). A 2x2 tile reads the 4x4 window of the conv's
    padded input (Ho + 2 rows, Wo + 2 columns from `origin`) at (2 ty, 2 tx); with an odd Ho or
    Wo the last tiles' windows pass that edge by one row or column (see below), and their
    outputs past the map are not stored.

    Per block of tiles: V = B^T d B of every tile (winograd.input_tile), then for each of the 16
    positions xi the product V[xi] (tiles x C) @ u[xi] (C x LANES per block) on this module's
    tiles as a 1x1 conv (no epilogue), then Y = A^T M A with the conv's epilogue
    (winograd.output_tile). Each output's reduction runs in the same order whatever the
    chunking, so results do not depend on how a conv is split between threads."""
    origin, pad_out = geom[5], geom[6]
    _, hp, wp, c = xp.shape
    _, hq, wq, cout = out.shape
    ho, wo = hq - 2 * pad_out, wq - 2 * pad_out
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    blocks = u.shape[0] // 16
    width = (b1 - b0) * LANES  # channels of M
    cp = epi.shape[0] // 2
    tb = min(256, max(8, WINOGRAD_BLOCK_FLOATS // (16 * (c + width)) // 8 * 8))
    tb = max(1, min(tb, t1 - t0))
    # two allocations per call (a chunk is a few microseconds of work)
    nv, nm = 16 * tb * c, 16 * tb * width
    # (flat views: a reshape would compile numba's shape-error path, ~2 s of a cold cache)
    floats = np.empty(nv + nm + 16 * c, dtype=np.float32)
    vf = floats[:nv]  # V[xi] of tile r at (xi * tb + r) * c
    mf = floats[nv : nv + nm]  # M[xi] of tile r at (xi * tb + r) * width
    edge = floats[nv + nm :]  # a window at xp's very end, zero-filled
    ints = np.empty(21 * tb + 4, dtype=np.int64)
    offs = ints[: 16 * tb]  # row r of V[xi]: tile r, at (xi * tb + r) * c
    coffs = ints[16 * tb : 17 * tb]  # row r of M[xi]: at r * width
    for r in range(16 * tb):
        offs[r] = r * c
    for r in range(tb):
        coffs[r] = r * width
    ibase = ints[17 * tb : 18 * tb]  # each tile's 4x4 window in xp
    window = ints[18 * tb : 19 * tb]  # rows * 8 + columns of it inside the padded input
    obase = ints[19 * tb : 20 * tb]  # its top-left output pixel in out
    part = ints[20 * tb : 21 * tb]  # bit 0: has a right column, bit 1: a bottom row
    qoffs = ints[21 * tb :]
    xf, of, rf = xp.ravel(), out.ravel(), res.ravel()
    row = wp * c
    tx = t0 % tw
    q = t0 // tw
    ty = q % th
    ni = q // th
    for t_at in range(t0, t1, tb):
        nt = min(tb, t1 - t_at)
        for k in range(nt):  # where each tile reads and writes (no division per tile)
            ibase[k] = (ni * hp * wp + 2 * ty * wp + 2 * tx) * c + origin
            window[k] = min(4, ho + 2 - 2 * ty) * 8 + min(4, wo + 2 - 2 * tx)
            obase[k] = ((ni * hq + 2 * ty + pad_out) * wq + 2 * tx + pad_out) * cout
            part[k] = (1 if 2 * tx + 1 < wo else 0) | (2 if 2 * ty + 1 < ho else 0)
            tx += 1
            if tx == tw:
                tx = 0
                ty += 1
                if ty == th:
                    ty = 0
                    ni += 1
        for k in range(nt):  # V = B^T d B
            src, base, step = xf, ibase[k], row
            # A window past the padded input's edge (odd Ho or Wo): its last row / column only
            # reach V's last row / column, thence only Y's second row / column, which lies
            # outside the map and is not stored; so it is read in place whatever those floats
            # are (the next image's, the next row's) while that memory is inside xp, and from
            # a zero-filled copy at xp's very end.
            if window[k] != 4 * 8 + 4 and base + 3 * row + 4 * c > xf.size:
                rows, cols = window[k] // 8, window[k] % 8
                edge[:] = 0.0
                for y in range(rows):
                    for x in range(cols):
                        at, to = base + y * row + x * c, (y * 4 + x) * c
                        for ch in range(c):  # (a slice assignment compiles numba's
                            edge[to + ch] = xf[at + ch]  # shape-error path: ~2 s cold)
                src, base, step = edge, 0, 4 * c
            for ch in range(0, c, LANES):
                winograd.input_tile(src, base + ch, step, c, vf, k * c + ch, tb * c)
        for blk in range(b0, b1):  # M[xi] = V[xi] @ u[xi], channel block by block
            ep = (blk, blk, blk, blk)  # not read (no epilogue)
            for xi in range(16):
                b_off = (xi * blocks + blk) * c * LANES
                c_add = xi * tb * width + (blk - b0) * LANES
                i = 0
                while i < nt:
                    o0 = xi * tb + i
                    if WIDE_TILES and nt - i >= 8:
                        _sums8(vf, offs, o0, 1, 0, c, u, b_off, mf, coffs, i, c_add, mf, mf, ep)
                        i += 8
                    elif nt - i >= 4:
                        _sums4(vf, offs, o0, 1, 0, c, u, b_off, mf, coffs, i, c_add, mf, mf, ep)
                        i += 4
                    elif nt - i >= 2:
                        _sums2(vf, offs, o0, 1, 0, c, u, b_off, mf, coffs, i, c_add, mf, mf, ep)
                        i += 2
                    else:
                        _sums1(vf, offs, o0, 1, 0, c, u, b_off, mf, coffs, i, c_add, mf, mf, ep)
                        i += 1
        for k in range(nt):  # Y = A^T M A, epilogue, store
            ob, p = obase[k], part[k]
            qoffs[0] = ob
            qoffs[1] = ob + cout if p & 1 else -1
            qoffs[2] = ob + wq * cout if p & 2 else -1
            qoffs[3] = ob + (wq + 1) * cout if p == 3 else -1
            for blk in range(b0, b1):
                ep = (blk * LANES, cp, 1 if has_res else 0, act)
                m_at = k * width + (blk - b0) * LANES
                winograd.output_tile(mf, m_at, tb * width, epi, ep, rf, of, qoffs)


@numba.njit(cache=True, nogil=True, inline="always")  # into conv_chunk and programs
def conv_range(xp, w, out, res, has_res, epi, act, geom, b0, b1, m0, m1):
    """Channel blocks [b0, b1) of work units [m0, m1) of a conv: output pixels on the direct
    kernels, or 2x2 output tiles on Winograd weights (geom[7] = KIND_WINOGRAD, see
    conv_winograd)."""
    if geom[7] == KIND_WINOGRAD:
        conv_winograd(xp, w, out, res, has_res, epi, act, geom, b0, b1, m0, m1)
    else:
        conv_direct(xp, w, out, res, has_res, epi, act, geom, b0, b1, m0, m1)


@_jit
def work(geom, n, ho, wo):
    """The work units of a conv (n samples, Ho x Wo): output pixels, or Winograd's 2x2 tiles."""
    if geom[7] == KIND_WINOGRAD:
        return n * ((ho + 1) // 2) * ((wo + 1) // 2)
    return n * ho * wo


@numba.njit(cache=True, nogil=True, inline="always")  # into spinpool's C entry
def conv_chunk(xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, i):
    """Chunk i of a conv cut for threads: `step` channel blocks (by_blocks) or `step` of the
    `total` work units (conv_range's other arguments as there)."""
    blocks = -(-out.shape[3] // LANES)  # channel blocks, whatever the kind of weights
    lo = i * step
    # one call site, no literal arguments: each would compile the kernels once more (a
    # literal 0 is its own type to numba), tripling the cold-cache compile time
    if by_blocks:
        b0, b1, m0, m1 = lo, min(blocks, lo + step), lo - lo, total
    else:
        b0, b1, m0, m1 = lo - lo, blocks, lo, min(total, lo + step)
    conv_range(xp, w, out, res, has_res, epi, act, geom, b0, b1, m0, m1)


@_jit
def split(blocks, units, chunks, winograd):
    """(by_blocks, step, n): about `chunks` chunks of a conv for conv_chunk. Direct convs: channel
    blocks when there are enough of them (or too few pixels to share), else runs of whole
    8-pixel tiles. Winograd convs: even runs of at least 8 tiles whenever there are two (fewer
    chunks rather than channel blocks: a chunk of channel blocks repeats the input transform of
    every tile; 7x7x64 -> 64 at batch 1, 16 tiles, ran slower than the direct kernels on 2
    threads cut in 4 channel chunks, faster in 2 tile chunks, ad hoc)."""
    if winograd and units >= 16:  # even runs (196 tiles: 49 each, not 56, 56, 56, 28)
        step = -(-units // min(chunks, units // 8))
        return False, step, -(-units // step)
    if winograd or units < 8 * chunks or blocks >= chunks:
        step = -(-blocks // min(blocks, chunks))
        return True, step, -(-blocks // step)
    step = -(-units // (chunks * 8)) * 8
    return False, step, -(-units // step)
