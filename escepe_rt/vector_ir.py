"""LLVM IR pieces shared by the micro-kernel tiles (escepe_rt/microkernel.py) and the Winograd
transforms (escepe_rt/winograd.py): array pointers, vector intrinsics, and the one definition
of the conv epilogue both apply to their registers before the store."""

from __future__ import annotations

import os
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils


def _half_is_native() -> bool:
    """Whether the CPU numba compiles for widens float16 to float32 in one instruction (x86
    F16C, every aarch64). Elsewhere LLVM would lower `fpext half` to a call to __extendhfsf2,
    which numba's JIT cannot resolve: the whole module fails to link ("LLVM ERROR: Symbol not
    found", a process abort), as it did with NUMBA_CPU_NAME=generic before this check."""
    try:
        from numba.core import config

        machine = platform.machine().lower()
        if machine in ("aarch64", "arm64"):
            return True
        if machine not in ("x86_64", "amd64", "i686", "x86"):
            return False
        if config.CPU_NAME and config.CPU_NAME != "host":  # a portable cache: its features only
            features = config.CPU_FEATURES or ""
        else:
            import llvmlite.binding as llvm

            features = config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
        return "+f16c" in features.split(",")
    except Exception:  # no feature list: the integer widening, which is always exact
        return False


HALF_NATIVE = _half_is_native()


def _wide_tiles() -> bool:
    """Whether the micro-kernels use their 8-pixel tiles (else only 4-pixel ones). An 8-pixel
    tile keeps 8 x 16 float32 accumulators in registers, plus the weight vector and a
    broadcast input: 10 of AVX-512's 32 registers, but 19 AVX2 ones (of 16) and 37 NEON ones
    (of 32, 4 a vector), so there LLVM spills accumulators to the stack inside the reduction
    loop (benchmarks/tile_asm.py: 14-16 stack accesses per 32 fmla compiled for a Cortex-A72,
    8 per 16 FMAs for Haswell; the 4-pixel loops none). They stay the default everywhere: on
    this Zen 4 VM they measured faster with AVX2 code too (NUMBA_CPU_NAME=haswell: 671-719 vs
    685-842 us for a 32x32x64 conv, three alternating rounds), and llvm-mca's Cortex-A72
    model does not agree with itself across panel kinds (the 4-pixel loop ~30 % more fmla per
    cycle on float32 panels, ~7 % fewer on float16 ones). ESCEPE_WIDE_TILES=0 runs the
    4-pixel tiles only, to measure the choice on a board (same results, bit for bit)."""
    return os.environ.get("ESCEPE_WIDE_TILES", "1").strip() != "0"


WIDE_TILES = _wide_tiles()


def array_ptr(context, builder, sig, args, i):
    """The data pointer of array argument i."""
    return context.make_array(sig.args[i])(context, builder, args[i]).data


def vector_fn(builder, name: str, vty, arity: int):
    """The LLVM vector intrinsic llvm.<name>.v<n>f32 over vty (fma, maxnum, minnum)."""
    fnty = ir.FunctionType(vty, [vty] * arity)
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.v{vty.count}f32")


def vector_at(builder, ptr, at, vty):
    """A vty pointer to element `at` of a float pointer."""
    return builder.bitcast(builder.gep(ptr, [at]), vty.as_pointer())


class Epilogue:
    """out = act(acc * scale + shift + (res if has_res)) on vty registers, act 0 none, 1 relu,
    2 relu6 (NaN -> 0, as kernels._act1). epi holds scale then shift, cp floats each; ep =
    (cb, cp, has_res, act), the tuple argument of type ep_type: the scale and shift vectors
    are read at cb once, here."""

    def __init__(self, context, builder, vty, ptr_e, ep, ep_type):
        i64 = ir.IntType(64)
        cb, cp, has_res, act = (
            context.cast(builder, v, t, types.int64)
            for v, t in zip(cgutils.unpack_tuple(builder, ep, 4), ep_type.types)
        )
        self.builder, self.vty, self.cb = builder, vty, cb
        self.sc = builder.load(vector_at(builder, ptr_e, cb, vty), align=4)
        self.sf = builder.load(vector_at(builder, ptr_e, builder.add(cp, cb), vty), align=4)
        self.use_res = builder.icmp_signed("!=", has_res, ir.Constant(i64, 0))
        self.is_relu = builder.icmp_signed("==", act, ir.Constant(i64, 1))
        self.is_relu6 = builder.icmp_signed("==", act, ir.Constant(i64, 2))
        self.fma = vector_fn(builder, "fma", vty, 3)
        self.vmax = vector_fn(builder, "maxnum", vty, 2)
        self.vmin = vector_fn(builder, "minnum", vty, 2)
        self.zero = ir.Constant(vty, None)
        self.six = ir.Constant(vty, [6.0] * vty.count)

    def store(self, acc, ptr_r, ptr_c, at) -> None:
        """c[at:] = the epilogue of acc, with res[at:] (res is c itself without a residual:
        the load is in bounds, its value unused)."""
        b, vty, zero = self.builder, self.vty, self.zero
        v = b.call(self.fma, [acc, self.sc, self.sf])
        rv = b.load(vector_at(b, ptr_r, at, vty), align=4)
        v = b.fadd(v, b.select(self.use_res, rv, zero))
        relu = b.call(self.vmax, [v, zero])
        v = b.select(self.is_relu, relu, v)
        v = b.select(self.is_relu6, b.call(self.vmin, [relu, self.six]), v)
        b.store(v, vector_at(b, ptr_c, at, vty), align=4)


def half_to_float(builder, bits, native: bool = HALF_NATIVE):
    """<n x i16> float16 bit patterns -> <n x float>, exactly (every value, subnormals, inf and
    NaN included). native: LLVM's fpext (one vcvtph2ps / fcvtl); otherwise integer operations
    on the bits (after F. Giesen's half_to_float_fast), with no library call."""
    n = bits.type.count
    if native:
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), n)),
                             ir.VectorType(ir.FloatType(), n))  # fmt: skip
    i32v = ir.VectorType(ir.IntType(32), n)
    f32v = ir.VectorType(ir.FloatType(), n)

    def splat(v):
        return ir.Constant(i32v, [v] * n)

    w = builder.zext(bits, i32v)
    o = builder.shl(builder.and_(w, splat(0x7FFF)), splat(13))  # exponent and mantissa
    exp = builder.and_(o, splat(0x7C00 << 13))
    o = builder.add(o, splat((127 - 15) << 23))  # rebias the exponent
    infnan = builder.icmp_unsigned("==", exp, splat(0x7C00 << 13))
    o = builder.select(infnan, builder.add(o, splat((128 - 16) << 23)), o)
    # zero / subnormal: exponent 1 of the float, minus 2^-14 in float arithmetic (exact)
    den = builder.fsub(
        builder.bitcast(builder.add(o, splat(1 << 23)), f32v),
        builder.bitcast(splat(113 << 23), f32v),
    )
    tiny = builder.icmp_unsigned("==", exp, splat(0))
    o = builder.select(tiny, builder.bitcast(den, i32v), o)
    o = builder.or_(o, builder.shl(builder.and_(w, splat(0x8000)), splat(16)))
    return builder.bitcast(o, f32v)
