"""Sections as single nogil calls: the executor's step lists compiled into programs.

Why: at batch 1 a small model's ops take a few microseconds each, and every step of the
executor's plan paid ~3 us of Python around its kernel (argument checks, numba's dispatch of a
dozen arguments, the spinning worker's slot, a numpy padding copy). The Fashion-MNIST model's
first exit is 13 steps, so that was a quarter of its time. At batch 32 the per-conv padding
copies and freshly allocated activations cost ResNet-20 ~12% (0.50 vs 0.44 ms per sample,
measured ad hoc), ResNet-18 ~2%. Here a section's steps become
rows of an int64 instruction array over one float32 arena; `run` walks the rows in one numba
call for a batch of n <= the arena's capacity samples.

The arena is planned once per model like TFLite's: every value gets a fixed place for the whole
forward pass, and values whose lifetimes do not overlap share memory (greedy by size), so the
arena holds about the model's largest live set. Each map sits inside a zero border as wide as
the widest conv padding, so convs read their input in place and write straight into the next
conv's padded input (no padding copies). Convs run on the same direct kernels with the same
chunks as kernels._conv_direct (big ones shared with the spinning workers through
spinpool._run_job), and the pool, head and linear loops are the step lists', so a program's
values equal the step lists' bit for bit (which of the two runs a call depends on the batch
size and on contention for the arena).

Programs cover models whose every node is an ungrouped conv on the direct kernels, ADD,
ACTIVATION, a global ADAPTIVE_AVG_POOL2D, FLATTEN of a 1x1 map or a small LINEAR, on any
number of threads. `eligible` says why not otherwise, and the executor keeps the step lists
then. ESCEPE_PROGRAMS=0 switches them off.
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

ENABLED = os.environ.get("ESCEPE_PROGRAMS", "1").strip() != "0"

OP_CONV, OP_ADD, OP_ACT, OP_GAP, OP_LINEAR = 2, 3, 4, 5, 6
WORDS = 32  # int64 words per instruction
ALIGN = 16  # floats: every arena buffer starts on a 64-byte line

_jit = numba.njit(cache=True, nogil=True)
# Called only from `run`: inlined there at numba's level, so LLVM optimises the conv kernels
# they call once less on a cold cache (ResNet-20's first predict without a cache: ~1 s of ~11)
_inline = numba.njit(cache=True, nogil=True, inline="always")


def eligible(spec) -> str | None:
    """None if every section of `spec` can run as a program, else the reason."""
    if not ENABLED:
        return "ESCEPE_PROGRAMS=0"
    values = spec.values
    border = borders(spec)
    for i, node in enumerate(spec.nodes):
        op, shape_in = node.op, values[node.inputs[0]].shape if node.inputs else ()
        if op == OpCode.CONV2D:
            o = node.options["conv"]
            cout = values[node.output].shape[0]
            if not kernels.runs_direct(cout, o["groups"], o["dilation"][1]):
                return f"node {i}: conv not on the direct kernels"
            if border[node.inputs[0]] < max(o["padding"]):
                return f"node {i}: conv padding wider than its input's border"
        elif op in (OpCode.ADD, OpCode.ACTIVATION):
            if op == OpCode.ADD and len({values[v].shape for v in node.inputs}) != 1:
                return f"node {i}: add of differently shaped values"
            if len({border[v] for v in node.inputs}) != 1:
                return f"node {i}: inputs with different borders"
        elif op == OpCode.ADAPTIVE_AVG_POOL2D:
            if tuple(node.options["adaptive_pool"]["output_size"]) != (1, 1):
                return f"node {i}: adaptive pool to more than 1x1"
        elif op == OpCode.FLATTEN:
            if len(shape_in) == 3 and (tuple(shape_in[1:]) != (1, 1) or border[node.inputs[0]]):
                return f"node {i}: flatten of a map larger than 1x1 or with a border"
        elif op == OpCode.LINEAR:
            if len(shape_in) != 1:
                return f"node {i}: linear on a non-flat value"
            if shape_in[0] * values[node.output].shape[0] > kernels.LINEAR_LOOP_MAX:
                return f"node {i}: linear too big for the program's loop (BLAS runs it)"
        else:
            return f"node {i}: op {op} has no program instruction"
        if op in (OpCode.ADAPTIVE_AVG_POOL2D, OpCode.FLATTEN) and node.activation:
            return f"node {i}: activation after a pool or flatten"
    return None


def borders(spec) -> dict[int, int]:
    """Pixels of zero border kept around each value's map in the arena: the widest conv padding
    of the model around the input and every conv output (and the ADDs and activations of
    those), so any conv reads its input in place and writes its output straight into the next
    conv's padded input (no padding copy); none around pooled maps and flat values."""
    pad = max(
        (max(n.options["conv"]["padding"]) for n in spec.nodes if n.op == OpCode.CONV2D),
        default=0,
    )
    border = {0: pad}
    for node in spec.nodes:
        if node.op == OpCode.CONV2D:
            border[node.output] = pad
        elif node.op in (OpCode.ADD, OpCode.ACTIVATION):
            border[node.output] = border[node.inputs[0]]
        else:
            border[node.output] = 0
    return border


class Layout:
    """Where each value lives in the arena. Offsets and sizes are in floats per sample: value v
    of a batch of n <= cap samples occupies floats [offset[v] * cap, offset[v] * cap + n *
    size[v]) of an arena of `per_sample * cap` floats, sample by sample, a map (C, H, W) as
    NHWC (H + 2b, W + 2b, C) with a zero border of b = border[v] pixels. Values that are never
    alive at the same time share memory. FLATTEN of a 1x1 map is its input (the NCHW flatten of
    a 1x1 NHWC map is the same floats).

    steps: per section, the executor's (input values, output value, node) steps, exit head
    included; exits: per section, the value holding its logits (read after the section);
    share=False gives every value memory of its own (tests compare every value after a pass)."""

    def __init__(self, spec, steps: list[list[tuple]], exits: list[int], share: bool = True):
        self.spec = spec
        self.border = borders(spec)
        alias = {}
        for node in spec.nodes:
            if node.op == OpCode.FLATTEN:
                alias[node.output] = alias.get(node.inputs[0], node.inputs[0])
        # lifetimes in steps: the input from before the first; an exit's logits to the end of
        # its section (the caller reads them between programs)
        first, last = {0: -1}, {0: -1}
        t = 0
        for s, section in enumerate(steps):
            for ins, out, _ in section:
                for v in ins:
                    v = alias.get(v, v)
                    last[v] = max(last[v], t)
                out = alias.get(out, out)
                first.setdefault(out, t)
                last[out] = max(last.get(out, t), t)
                t += 1
            logits = alias.get(exits[s], exits[s])
            last[logits] = max(last[logits], t - 1)
        self.size = {v: -(-math.prod(self.dims(v)) // ALIGN) * ALIGN for v in first}
        self.lifetime = {v: (first[v], last[v]) for v in first}
        if not share:
            last = dict.fromkeys(first, t)
            first = dict.fromkeys(first, -1)
        self.offset: dict[int, int] = {}
        placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
        for v in sorted(first, key=lambda v: (-self.size[v], first[v])):  # greedy by size
            at = 0
            alive_with_v = (p[:2] for p in placed if p[2] <= last[v] and first[v] <= p[3])
            for o, size in sorted(alive_with_v):  # the lowest gap that fits
                if at + self.size[v] <= o:
                    break
                at = max(at, o + size)
            self.offset[v] = at
            placed.append((at, self.size[v], first[v], last[v]))
        # maps whose border a value of another layout may have written (the pass repeats, so
        # any overlap counts): their producing conv zeroes the border first. A map sharing
        # memory only with maps of its own layout at its own offset keeps a zero border.
        layout_of = {v: (self.offset[v], self.dims(v), self.border[v]) for v in first}
        self.dirty = {
            v
            for v in first
            if self.border[v]
            and any(
                layout_of[u] != layout_of[v]
                and self.offset[u] < self.offset[v] + self.size[v]
                and self.offset[v] < self.offset[u] + self.size[u]
                for u in first
                if u != v
            )
        }
        for v, root in alias.items():
            self.offset[v], self.size[v] = self.offset[root], self.size[root]
        self.per_sample = max((o + self.size[v] for v, o in self.offset.items()), default=0)

    def dims(self, v: int) -> tuple[int, ...]:
        """(H + 2b, W + 2b, C) of a map, (K,) of a flat value: one sample."""
        shape, b = self.spec.values[v].shape, self.border[v]
        if len(shape) == 3:
            c, h, w = shape
            return (h + 2 * b, w + 2 * b, c)
        return tuple(shape)

    def whole(self, arena: np.ndarray, v: int, n: int) -> np.ndarray:
        """Value v of n samples in an arena, border included: (n, *dims)."""
        cap = arena.size // max(self.per_sample, 1)
        at, dims = self.offset[v] * cap, self.dims(v)
        samples = arena[at : at + n * self.size[v]].reshape(n, self.size[v])
        return samples[:, : math.prod(dims)].reshape(n, *dims)  # a view: numpy splits rows

    def view(self, arena: np.ndarray, v: int, n: int = 1) -> np.ndarray:
        """Value v of n samples without its border: (n, H, W, C) or (n, K)."""
        whole, b = self.whole(arena, v, n), self.border[v]
        return whole[:, b : whole.shape[1] - b, b : whole.shape[2] - b] if b else whole

    def arena(self, cap: int) -> np.ndarray:
        """An arena for batches of up to `cap` samples."""
        return np.zeros(max(self.per_sample, 1) * cap, dtype=np.float32)


class Program:
    """One section's instructions; `keep` holds the arrays whose addresses the code names."""

    def __init__(self, code: np.ndarray, keep: list):
        self.code, self.keep = code, keep


def build(spec, layout: Layout, plan: list, params: dict, fused: dict) -> Program:
    """The program of a step list (Executor._section_plan or _body_plan): one row per step.
    Offsets and sizes are per sample; `run` scales them by the arena's capacity and the
    batch."""
    rows, keep = [], []
    off, border, size = layout.offset, layout.border, layout.size
    # below this many multiply-adds (per call) a conv runs on the caller alone
    pair_min = kernels.PAIR_MIN_MACS if parallel.POOL.threads > 1 else 1 << 62

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
            hp, wp, c = layout.dims(ins[0])
            hq, wq, cout = layout.dims(out)
            b_in = border[ins[0]]
            origin = ((b_in - ph) * wp + (b_in - pw)) * c  # where the conv's padded input starts
            p = params[i]
            weight = p["weight"]
            act = spec.nodes[fused[i][0]].activation if i in fused else node.activation
            sc, has_sc = kernels._vec(p["scale"], cout, "scale")
            sf, has_sf = kernels._vec(p["shift"], cout, "shift")
            epi = kernels._direct_epilogue(sc, sf, has_sc, has_sf, cout)
            panels = weight.panel_array()
            keep += [panels, epi]
            res = off[ins[1]] if len(ins) > 1 else -1
            pixels = (hq - 2 * border[out]) * (wq - 2 * border[out])  # per sample
            macs = pixels * cout * weight.kh * weight.kw * c
            row(
                OP_CONV, off[ins[0]], hp, wp, c, off[out], hq, wq, cout, res,
                spinpool.address_of(panels), panels.shape[0], panels.shape[1], panels.shape[2],
                spinpool.address_of(epi), epi.shape[0], act,
                weight.kh, weight.kw, sh, sw, dh, origin, border[out],
                size[ins[0]], size[out], macs, pair_min, int(out in layout.dirty),
                weight.kind,
            )  # fmt: skip
        elif op == OpCode.ADD:
            row(OP_ADD, off[ins[0]], off[ins[1]], off[out], size[out], node.activation)
        elif op == OpCode.ACTIVATION:
            row(OP_ACT, off[ins[0]], off[out], size[out], node.activation)
        elif op == OpCode.ADAPTIVE_AVG_POOL2D:
            hp, wp, c = layout.dims(ins[0])
            row(OP_GAP, off[ins[0]], hp, wp, c, off[out], border[ins[0]], size[ins[0]], size[out])
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
                node.activation, size[ins[0]], size[out],
            )  # fmt: skip
        # FLATTEN: no instruction (Layout aliases its output to its input)
    code = np.stack(rows) if rows else np.zeros((0, WORDS), dtype=np.int64)
    return Program(code, keep)


def execute(program: Program, arena: np.ndarray, n: int, cap: int) -> None:
    """Run a program on n samples of an arena of capacity cap, sharing big convs with the
    spinning worker when it is free."""
    if parallel.POOL.threads > 1:
        spinpool.TEAM.run_sequence(run, program.code, arena, n, cap)
    else:
        run(spinpool.with_entry(_UNSHARED), 0, False, program.code, arena, n, cap)


_UNSHARED = np.zeros(spinpool.CTRL_WORDS, dtype=np.int64)  # only its ENTRY and SPLIT are read
_UNSHARED[spinpool.SPLIT] = 1


# ---------------------------------------------------------------------------------------------
# the interpreter (nogil); arena views are numba.carray over addresses, so each has exactly the
# type the step list's arrays have and the kernels it calls are compiled once for both


@_jit
def _at(base, offset):
    return spinpool._f32_ptr(base + 4 * offset)


@_jit
def run(ctrl, seq, shared, code, arena, n, cap):
    """Execute `code` on n samples of `arena` (capacity cap); conv jobs shared with the worker
    are numbered seq + 1, ... (only when `shared`: the caller holds spinpool.TEAM's slot), each
    cut into about ctrl[SPLIT] chunks.
    Returns the last number used."""
    base = spinpool._address(arena)
    for k in range(code.shape[0]):
        ins = code[k]
        op = ins[0]
        if shared:
            spinpool.keep_alive(ctrl)
        if op == OP_CONV:
            seq = _conv(ins, base, cap, n, ctrl, seq, shared)
        elif op == OP_GAP:
            hp, wp, c, size_in, size_out = ins[2], ins[3], ins[4], ins[7], ins[8]
            for i in range(n):  # one sample at a time: sizes are padded to whole lines
                x = numba.carray(_at(base, ins[1] * cap + i * size_in), (1, hp, wp, c))
                out = numba.carray(_at(base, ins[5] * cap + i * size_out), (1, 1, 1, c))
                kernels._global_avg_pool(x, ins[6], out)
        elif op == OP_LINEAR:
            _linear(ins, base, cap, n)
        elif op == OP_ADD:
            m = n * ins[4]
            a = numba.carray(_at(base, ins[1] * cap), (m,))
            b = numba.carray(_at(base, ins[2] * cap), (m,))
            kernels._add1d(a, b, numba.carray(_at(base, ins[3] * cap), (m,)), ins[5])
        elif op == OP_ACT:
            m = n * ins[3]
            x = numba.carray(_at(base, ins[1] * cap), (m,))
            kernels._activate1d(x, numba.carray(_at(base, ins[2] * cap), (m,)), ins[4])
    return seq


@_inline
def _conv(ins, base, cap, n, ctrl, seq, shared):
    hp, wp, c, hq, wq, cout = ins[2], ins[3], ins[4], ins[6], ins[7], ins[8]
    size_in, size_out, macs, pair_min = ins[24], ins[25], ins[26], ins[27]
    # one sample's map fills its size exactly only when the padding to whole lines is zero;
    # then the batch is one 4-D array, else the conv runs sample by sample
    whole = size_in == hp * wp * c and size_out == hq * wq * cout
    batch, per_call = (n, 1) if whole else (1, n)
    out_at = ins[5] * cap
    if ins[28]:  # the output's memory held another value's floats (Layout.dirty)
        _zero_border(base, out_at, n, size_out, hq, wq, cout, ins[23])
    w = numba.carray(spinpool._f32_ptr(ins[10]), (ins[11], ins[12], ins[13]))
    epi = numba.carray(spinpool._f32_ptr(ins[14]), (ins[15],))
    act = ins[16]
    geom = (ins[17], ins[18], ins[19], ins[20], ins[21], ins[22], ins[23], ins[29])
    blocks = -(-cout // microkernel.LANES)  # channel blocks, whatever the kind of weights
    has_res = ins[9] >= 0
    res_at = ins[9] * cap if has_res else out_at
    ho, wo = hq - 2 * ins[23], wq - 2 * ins[23]
    total = microkernel.work(geom, batch, ho, wo)
    by_blocks, step, chunks = microkernel.split(
        blocks, total, ctrl[spinpool.SPLIT], ins[29] == microkernel.KIND_WINOGRAD
    )
    share = shared and chunks > 1 and batch * macs >= pair_min
    for i in range(per_call):
        xp = numba.carray(_at(base, ins[1] * cap + i * size_in), (batch, hp, wp, c))
        out = numba.carray(_at(base, out_at + i * size_out), (batch, hq, wq, cout))
        res = numba.carray(_at(base, res_at + i * size_out), (batch, hq, wq, cout))
        if share:
            seq += 1
            spinpool._run_job(
                ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, chunks
            )
        else:
            spinpool.run_alone(ctrl[spinpool.ENTRY], xp, w, out, res, has_res, epi, act, geom)
    return seq


@intrinsic
def _memset0(typingctx, addr, nbytes):
    """Zero nbytes at an int64 address (numba's element loops, with their index wraparound
    checks, took ~8 us for the border of a 30x30x16 map)."""

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        cgutils.memset(builder, ptr, args[1], 0)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@_jit
def _zero_border(base, at, n, size, hq, wq, c, b):
    """Zero the border of b pixels around each of n (hq, wq, c) maps (samples `size` floats
    apart): the memory held another value earlier in the pass (Layout.dirty), and a conv writes
    only the interior (its partial-panel spills into the border write act(0 + 0))."""
    row = 4 * wq * c  # bytes
    side = 4 * b * c
    for i in range(n):
        m = base + 4 * (at + i * size)
        _memset0(m, b * row + side)  # the top rows and the first row's left border
        for y in range(b, hq - b - 1):  # a row's right border + the next row's left one
            _memset0(m + y * row + row - side, 2 * side)
        _memset0(m + (hq - b) * row - side, side + b * row)  # the last right border, bottom


@_inline
def _linear(ins, base, cap, n):
    """out = act(x @ w * scale + shift) per sample (kernels._linear1: the step lists' loop)."""
    n_in, n_out, size_in, size_out = ins[2], ins[4], ins[11], ins[12]
    w = numba.carray(spinpool._f32_ptr(ins[5]), (n_in, n_out))
    sc = numba.carray(spinpool._f32_ptr(ins[6]), (n_out,))
    sf = numba.carray(spinpool._f32_ptr(ins[8]), (n_out,))
    for i in range(n):
        x = numba.carray(_at(base, ins[1] * cap + i * size_in), (n_in,))
        out = numba.carray(_at(base, ins[3] * cap + i * size_out), (n_out,))
        kernels._linear1(x, w, sc, sf, ins[7] != 0, ins[9] != 0, ins[10], out)
