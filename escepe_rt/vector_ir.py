"""LLVM IR pieces shared by the micro-kernel tiles (escepe_rt/microkernel.py) and the Winograd
transforms (escepe_rt/winograd.py): array pointers, vector intrinsics, and the one definition
of the conv epilogue both apply to their registers before the store."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils


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
