"""A section at batch 1 as one nogil call: the executor's step list compiled into a program.

Why: at batch 1 a small model's ops take a few microseconds each, and every step of the
executor's plan paid ~3 us of Python around its kernel (argument checks, numba's dispatch of a
dozen arguments, the spinning worker's slot, a numpy padding copy). The Fashion-MNIST model's
first exit is 13 steps, so that was a quarter of its time. Here a section's steps become rows of
an int64 instruction array over one float32 arena that holds every value of the model at batch 1
(plus a zero-bordered copy of each value that a padded conv reads); `run` walks the rows in one
numba call. Convs run on the same direct kernels with the same chunks as kernels._conv_direct
(big ones shared with the spinning worker through spinpool._run_job), the pool and head kernels
and the linear loop are the step list's, so a program's values equal the step list's bit for bit
(which of the two runs a batch-1 call depends on contention for the arena).

Programs cover models whose every node is an ungrouped conv on the direct kernels, ADD,
ACTIVATION, a global ADAPTIVE_AVG_POOL2D, FLATTEN of a 1x1 map or LINEAR, on at most two
threads (more threads cut big convs for escepe_rt.parallel's pool, which a nogil program cannot
call); `eligible` says why not otherwise, and the executor keeps the step list then.
ESCEPE_PROGRAMS=0 switches them off.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from escepe_rt import kernels, microkernel, parallel, spinpool
from escepe_rt._fbs.OpCode import OpCode
from escepe_rt.summary import node_macs

ENABLED = os.environ.get("ESCEPE_PROGRAMS", "1").strip() != "0"

OP_PAD, OP_CONV, OP_ADD, OP_ACT, OP_GAP, OP_LINEAR = 1, 2, 3, 4, 5, 6
WORDS = 32  # int64 words per instruction
ALIGN = 16  # floats: every arena buffer starts on a 64-byte line

_jit = numba.njit(cache=True, nogil=True)


def eligible(spec) -> str | None:
    """None if every section of `spec` can run as a program at batch 1, else the reason."""
    if not ENABLED:
        return "ESCEPE_PROGRAMS=0"
    values = spec.values
    big = False
    for i, node in enumerate(spec.nodes):
        op, shape_in = node.op, values[node.inputs[0]].shape if node.inputs else ()
        if op == OpCode.CONV2D:
            o = node.options["conv"]
            cout = values[node.output].shape[0]
            if not kernels.runs_direct(cout, o["groups"], o["dilation"][1]):
                return f"node {i}: conv not on the direct kernels"
            big |= node_macs(spec, node) >= kernels.PARALLEL_MIN_MACS
        elif op in (OpCode.ADD, OpCode.ACTIVATION):
            if op == OpCode.ADD and len({values[v].shape for v in node.inputs}) != 1:
                return f"node {i}: add of differently shaped values"
        elif op == OpCode.ADAPTIVE_AVG_POOL2D:
            if tuple(node.options["adaptive_pool"]["output_size"]) != (1, 1):
                return f"node {i}: adaptive pool to more than 1x1"
        elif op == OpCode.FLATTEN:
            if len(shape_in) == 3 and tuple(shape_in[1:]) != (1, 1):
                return f"node {i}: flatten of a map larger than 1x1"
        elif op == OpCode.LINEAR:
            if len(shape_in) != 1:
                return f"node {i}: linear on a non-flat value"
        else:
            return f"node {i}: op {op} has no program instruction"
        if op in (OpCode.ADAPTIVE_AVG_POOL2D, OpCode.FLATTEN) and node.activation:
            return f"node {i}: activation after a pool or flatten"
    if big and parallel.POOL.threads > 2:
        return "a conv big enough for the thread pool, on more than two threads"
    return None


class Layout:
    """Arena offsets (in floats) of every value at batch 1, NHWC, and of the zero-bordered
    copies that padded convs read: {(value, ph, pw): offset}. FLATTEN of a 1x1 map is its input
    (the NCHW flatten of a 1x1 NHWC map is the same floats)."""

    def __init__(self, spec):
        self.size = 0
        self.offset: dict[int, int] = {0: self._alloc(math.prod(spec.values[0].shape))}
        self.padded: dict[tuple[int, int, int], int] = {}
        for node in spec.nodes:
            if node.op == OpCode.FLATTEN:
                self.offset[node.output] = self.offset[node.inputs[0]]
                continue
            self.offset[node.output] = self._alloc(math.prod(spec.values[node.output].shape))
            if node.op == OpCode.CONV2D:
                ph, pw = node.options["conv"]["padding"]
                key = (node.inputs[0], ph, pw)
                if (ph or pw) and key not in self.padded:
                    c, h, w = spec.values[key[0]].shape
                    self.padded[key] = self._alloc((h + 2 * ph) * (w + 2 * pw) * c)

    def _alloc(self, floats: int) -> int:
        at = self.size
        self.size += -(-floats // ALIGN) * ALIGN
        return at

    def arena(self) -> np.ndarray:
        """A zeroed arena: the padded copies' borders are never written, so they stay zero."""
        return np.zeros(self.size, dtype=np.float32)


class Program:
    """One section's instructions; `keep` holds the arrays whose addresses the code names;
    `shares`: whether any conv is cut into chunks for the spinning worker."""

    def __init__(self, code: np.ndarray, keep: list):
        self.code, self.keep = code, keep
        self.shares = bool(np.any((code[:, 0] == OP_CONV) & (code[:, 24] > 1)))


def build(spec, layout: Layout, plan: list, params: dict, fused: dict) -> Program:
    """The program of a step list (Executor._section_plan or _body_plan): one row per step, plus
    a PAD row before the first conv of the program that reads each padded copy."""
    rows, keep, padded_here = [], [], set()
    off = layout.offset

    def row(*words):
        r = np.zeros(WORDS, dtype=np.int64)
        r[: len(words)] = words
        rows.append(r)

    for _, ins, out, i in plan:
        node = spec.nodes[i]
        op = node.op
        if op == OpCode.CONV2D:
            o = node.options["conv"]
            (sh, sw), (ph, pw), (dh, _) = o["stride"], o["padding"], o["dilation"]
            c, h, w = spec.values[ins[0]].shape
            cout, ho, wo = spec.values[out].shape
            x_at = off[ins[0]]
            if ph or pw:
                key = (ins[0], ph, pw)
                x_at = layout.padded[key]
                if key not in padded_here:
                    padded_here.add(key)
                    row(OP_PAD, off[ins[0]], h, w, c, x_at, ph, pw)
            p = params[i]
            weight = p["weight"]
            act = spec.nodes[fused[i][0]].activation if i in fused else node.activation
            sc, has_sc = kernels._vec(p["scale"], cout, "scale")
            sf, has_sf = kernels._vec(p["shift"], cout, "shift")
            epi = kernels._direct_epilogue(sc, sf, has_sc, has_sf, cout)
            panels = weight.panels
            keep += [panels, epi]
            blocks, pixels = panels.shape[0], ho * wo
            macs = pixels * cout * weight.kh * weight.kw * c
            if parallel.POOL.threads == 1 or macs < kernels.PAIR_MIN_MACS:
                by_blocks, step, chunks = True, blocks, 1
            else:
                by_blocks, step, chunks = microkernel.split(blocks, pixels, 4)
            res = off[ins[1]] if len(ins) > 1 else -1
            hp, wp = h + 2 * ph, w + 2 * pw
            row(
                OP_CONV, x_at, hp, wp, c, off[out], ho, wo, cout, res,
                spinpool.address_of(panels), blocks, panels.shape[1], panels.shape[2],
                spinpool.address_of(epi), epi.shape[0], act,
                weight.kh, weight.kw, sh, sw, dh, int(by_blocks), step, chunks,
            )  # fmt: skip
        elif op == OpCode.ADD:
            size = math.prod(spec.values[out].shape)
            row(OP_ADD, off[ins[0]], off[ins[1]], off[out], size, node.activation)
        elif op == OpCode.ACTIVATION:
            size = math.prod(spec.values[out].shape)
            row(OP_ACT, off[ins[0]], off[out], size, node.activation)
        elif op == OpCode.ADAPTIVE_AVG_POOL2D:
            c, h, w = spec.values[ins[0]].shape
            row(OP_GAP, off[ins[0]], h, w, c, off[out])
        elif op == OpCode.LINEAR:
            p = params[i]
            w = p["weight"]  # (I, O)
            n_in, n_out = w.shape
            sc, has_sc = kernels._vec(p["scale"], n_out, "scale")
            sf, has_sf = kernels._vec(p["shift"], n_out, "shift")
            if not has_sc:
                sc = np.ones(n_out, np.float32)  # never read: the code says there is none
            if not has_sf:
                sf = np.zeros(n_out, np.float32)
            keep += [w, sc, sf]
            row(
                OP_LINEAR, off[ins[0]], n_in, off[out], n_out, spinpool.address_of(w),
                spinpool.address_of(sc), int(has_sc), spinpool.address_of(sf), int(has_sf),
                node.activation,
            )  # fmt: skip
        # FLATTEN: no instruction (Layout aliases its output to its input)
    code = np.stack(rows) if rows else np.zeros((0, WORDS), dtype=np.int64)
    return Program(code, keep)


def execute(program: Program, arena: np.ndarray) -> None:
    """Run a program on the arena, sharing big convs with the spinning worker when it is free."""
    if program.shares:
        spinpool.PAIR.run_sequence(run, program.code, arena)
    else:
        run(_UNSHARED, 0, False, program.code, arena)


_UNSHARED = np.zeros(spinpool.CTRL_WORDS, dtype=np.int64)  # never read: no job is posted


# ---------------------------------------------------------------------------------------------
# the interpreter (nogil); arena views are numba.carray over addresses, so each has exactly the
# type the step list's arrays have and the kernels it calls are compiled once for both


@_jit
def _at(base, offset):
    return spinpool._f32_ptr(base + 4 * offset)


@_jit
def run(ctrl, seq, shared, code, arena):
    """Execute `code` on `arena`; conv jobs shared with the worker are numbered seq + 1, ...
    (only when `shared`: the caller holds spinpool.PAIR's slot). Returns the last number used."""
    base = spinpool._address(arena)
    for k in range(code.shape[0]):
        ins = code[k]
        op = ins[0]
        if op == OP_CONV:
            seq = _conv(ins, base, ctrl, seq, shared)
        elif op == OP_PAD:
            _pad(ins, base)
        elif op == OP_GAP:
            h, w, c = ins[2], ins[3], ins[4]
            x = numba.carray(_at(base, ins[1]), (1, h, w, c))
            out = numba.carray(_at(base, ins[5]), (1, 1, 1, c))
            kernels._global_avg_pool(x, out)
        elif op == OP_LINEAR:
            _linear(ins, base)
        elif op == OP_ADD:
            n = ins[4]
            a = numba.carray(_at(base, ins[1]), (n,))
            b = numba.carray(_at(base, ins[2]), (n,))
            kernels._add1d(a, b, numba.carray(_at(base, ins[3]), (n,)), ins[5])
        elif op == OP_ACT:
            n = ins[3]
            x = numba.carray(_at(base, ins[1]), (n,))
            kernels._activate1d(x, numba.carray(_at(base, ins[2]), (n,)), ins[4])
    return seq


@_jit
def _conv(ins, base, ctrl, seq, shared):
    hp, wp, c, ho, wo, cout = ins[2], ins[3], ins[4], ins[6], ins[7], ins[8]
    xp = numba.carray(_at(base, ins[1]), (1, hp, wp, c))
    out = numba.carray(_at(base, ins[5]), (1, ho, wo, cout))
    has_res = ins[9] >= 0
    res = numba.carray(_at(base, ins[9] if has_res else ins[5]), (1, ho, wo, cout))
    blocks = ins[11]
    w = numba.carray(spinpool._f32_ptr(ins[10]), (blocks, ins[12], ins[13]))
    epi = numba.carray(spinpool._f32_ptr(ins[14]), (ins[15],))
    act = ins[16]
    geom = (ins[17], ins[18], ins[19], ins[20], ins[21])
    by_blocks, step, chunks = ins[22] != 0, ins[23], ins[24]
    total = ho * wo
    if shared and chunks > 1:
        seq += 1
        spinpool._run_job(
            ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, chunks
        )
    else:
        first = total - total  # not a literal 0: conv_direct compiles once (see conv_chunk)
        microkernel.conv_direct(
            xp, w, out, res, has_res, epi, act, geom, first, blocks, first, total
        )
    return seq


@intrinsic
def _memcpy(typingctx, dst, src, nbytes):
    """memcpy between two int64 addresses (numba's element loops with index wraparound checks
    did not vectorise: a 28x28x16 row-by-row copy took 5.8 us, this 1.2 us)."""

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        d, s = (builder.inttoptr(a, i8p) for a in args[:2])
        cgutils.raw_memcpy(builder, d, s, args[2], 1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@_jit
def _pad(ins, base):
    """The value at ins[1] ((h, w, c) = ins[2:5]) into the interior of its zero-bordered copy
    at ins[5] (ph, pw = ins[6:8]); one contiguous run of w * c floats per row."""
    h, w, c, ph, pw = ins[2], ins[3], ins[4], ins[6], ins[7]
    wp = w + 2 * pw
    src = base + 4 * ins[1]
    dst = base + 4 * (ins[5] + (ph * wp + pw) * c)
    row = 4 * w * c
    for _ in range(h):
        _memcpy(dst, src, row)
        src += row
        dst += 4 * wp * c


@_jit
def _linear(ins, base):
    """out = act(x @ w * scale + shift) for one sample (kernels._linear1: the step lists' loop)."""
    n_in, n_out = ins[2], ins[4]
    x = numba.carray(_at(base, ins[1]), (n_in,))
    out = numba.carray(_at(base, ins[3]), (n_out,))
    w = numba.carray(spinpool._f32_ptr(ins[5]), (n_in, n_out))
    sc = numba.carray(spinpool._f32_ptr(ins[6]), (n_out,))
    sf = numba.carray(spinpool._f32_ptr(ins[8]), (n_out,))
    kernels._linear1(x, w, sc, sf, ins[7] != 0, ins[9] != 0, ins[10], out)
