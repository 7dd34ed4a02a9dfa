"""A section at batch 1 as one nogil call: the executor's step list compiled into a program.

Why: at batch 1 a small model's ops take a few microseconds each, and every step of the
executor's plan paid ~3 us of Python around its kernel (argument checks, numba's dispatch of a
dozen arguments, the spinning worker's slot, a numpy padding copy). The Fashion-MNIST model's
first exit is 13 steps, so that was a quarter of its time. Here a section's steps become rows of
an int64 instruction array over one float32 arena that holds every value of the model at batch 1,
each map inside a zero border as wide as the widest conv padding (so convs read their input in
place and write straight into the next conv's padded input: no padding copies); `run` walks the
rows in one numba call. Convs run on the same direct kernels with the same chunks as
kernels._conv_direct (big ones shared with the spinning worker through spinpool._run_job), the
pool and head kernels and the linear loop are the step list's, so a program's values equal the
step list's bit for bit (which of the two runs a batch-1 call depends on contention for the
arena).

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

from escepe_rt import kernels, microkernel, parallel, spinpool
from escepe_rt._fbs.OpCode import OpCode
from escepe_rt.summary import node_macs

ENABLED = os.environ.get("ESCEPE_PROGRAMS", "1").strip() != "0"

OP_CONV, OP_ADD, OP_ACT, OP_GAP, OP_LINEAR = 2, 3, 4, 5, 6
WORDS = 32  # int64 words per instruction
ALIGN = 16  # floats: every arena buffer starts on a 64-byte line

_jit = numba.njit(cache=True, nogil=True)


def eligible(spec) -> str | None:
    """None if every section of `spec` can run as a program at batch 1, else the reason."""
    if not ENABLED:
        return "ESCEPE_PROGRAMS=0"
    values = spec.values
    border = borders(spec)
    big = False
    for i, node in enumerate(spec.nodes):
        op, shape_in = node.op, values[node.inputs[0]].shape if node.inputs else ()
        if op == OpCode.CONV2D:
            o = node.options["conv"]
            cout = values[node.output].shape[0]
            if not kernels.runs_direct(cout, o["groups"], o["dilation"][1]):
                return f"node {i}: conv not on the direct kernels"
            if border[node.inputs[0]] < max(o["padding"]):
                return f"node {i}: conv padding wider than its input's border"
            big |= node_macs(spec, node) >= kernels.PARALLEL_MIN_MACS
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
        else:
            return f"node {i}: op {op} has no program instruction"
        if op in (OpCode.ADAPTIVE_AVG_POOL2D, OpCode.FLATTEN) and node.activation:
            return f"node {i}: activation after a pool or flatten"
    if big and parallel.POOL.threads > 2:
        return "a conv big enough for the thread pool, on more than two threads"
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
    """Arena offsets (in floats) of every value at batch 1: a map (C, H, W) as NHWC (1, H + 2b,
    W + 2b, C) with a zero border of b = border[value] pixels; FLATTEN of a 1x1 map is its
    input (the NCHW flatten of a 1x1 NHWC map is the same floats)."""

    def __init__(self, spec):
        self.spec = spec
        self.border = borders(spec)
        self.size = 0
        self.offset: dict[int, int] = {0: self._alloc(self.floats(0))}
        for node in spec.nodes:
            if node.op == OpCode.FLATTEN:
                self.offset[node.output] = self.offset[node.inputs[0]]
            else:
                self.offset[node.output] = self._alloc(self.floats(node.output))

    def dims(self, v: int) -> tuple[int, ...]:
        """(H + 2b, W + 2b, C) of a map, (K,) of a flat value."""
        shape, b = self.spec.values[v].shape, self.border[v]
        if len(shape) == 3:
            c, h, w = shape
            return (h + 2 * b, w + 2 * b, c)
        return tuple(shape)

    def floats(self, v: int) -> int:
        return math.prod(self.dims(v))

    def view(self, arena: np.ndarray, v: int) -> np.ndarray:
        """The value v inside the arena, without its border: (H, W, C) or (K,)."""
        at, dims, b = self.offset[v], self.dims(v), self.border[v]
        whole = arena[at : at + math.prod(dims)].reshape(dims)
        return whole[b : dims[0] - b, b : dims[1] - b] if len(dims) == 3 else whole

    def _alloc(self, floats: int) -> int:
        at = self.size
        self.size += -(-floats // ALIGN) * ALIGN
        return at

    def arena(self) -> np.ndarray:
        """A zeroed arena. Borders stay zero: convs write only the interior of their output and
        spill into the border only act(0 + 0), ADD and activation map zeros to zeros."""
        return np.zeros(self.size, dtype=np.float32)


class Program:
    """One section's instructions; `keep` holds the arrays whose addresses the code names;
    `shares`: whether any conv is cut into chunks for the spinning worker."""

    def __init__(self, code: np.ndarray, keep: list):
        self.code, self.keep = code, keep
        self.shares = bool(np.any((code[:, 0] == OP_CONV) & (code[:, _CHUNKS] > 1)))


_CHUNKS = 26  # the word of a conv row holding its chunk count


def build(spec, layout: Layout, plan: list, params: dict, fused: dict) -> Program:
    """The program of a step list (Executor._section_plan or _body_plan): one row per step."""
    rows, keep = [], []
    off, border = layout.offset, layout.border

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
            panels = weight.panels
            keep += [panels, epi]
            blocks = panels.shape[0]
            pixels = (hq - 2 * border[out]) * (wq - 2 * border[out])
            macs = pixels * cout * weight.kh * weight.kw * c
            if parallel.POOL.threads == 1 or macs < kernels.PAIR_MIN_MACS:
                by_blocks, step, chunks = True, blocks, 1
            else:
                by_blocks, step, chunks = microkernel.split(blocks, pixels, 4)
            res = off[ins[1]] if len(ins) > 1 else -1
            row(
                OP_CONV, off[ins[0]], hp, wp, c, off[out], hq, wq, cout, res,
                spinpool.address_of(panels), blocks, panels.shape[1], panels.shape[2],
                spinpool.address_of(epi), epi.shape[0], act,
                weight.kh, weight.kw, sh, sw, dh, origin, border[out],
                int(by_blocks), step, chunks, pixels,
            )  # fmt: skip
        elif op == OpCode.ADD:
            size = layout.floats(out)
            row(OP_ADD, off[ins[0]], off[ins[1]], off[out], size, node.activation)
        elif op == OpCode.ACTIVATION:
            row(OP_ACT, off[ins[0]], off[out], layout.floats(out), node.activation)
        elif op == OpCode.ADAPTIVE_AVG_POOL2D:
            hp, wp, c = layout.dims(ins[0])
            row(OP_GAP, off[ins[0]], hp, wp, c, off[out], border[ins[0]])
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
        elif op == OP_GAP:
            hp, wp, c = ins[2], ins[3], ins[4]
            x = numba.carray(_at(base, ins[1]), (1, hp, wp, c))
            out = numba.carray(_at(base, ins[5]), (1, 1, 1, c))
            kernels._global_avg_pool(x, ins[6], out)
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
    hp, wp, c, hq, wq, cout = ins[2], ins[3], ins[4], ins[6], ins[7], ins[8]
    xp = numba.carray(_at(base, ins[1]), (1, hp, wp, c))
    out = numba.carray(_at(base, ins[5]), (1, hq, wq, cout))
    has_res = ins[9] >= 0
    res = numba.carray(_at(base, ins[9] if has_res else ins[5]), (1, hq, wq, cout))
    blocks = ins[11]
    w = numba.carray(spinpool._f32_ptr(ins[10]), (blocks, ins[12], ins[13]))
    epi = numba.carray(spinpool._f32_ptr(ins[14]), (ins[15],))
    act = ins[16]
    geom = (ins[17], ins[18], ins[19], ins[20], ins[21], ins[22], ins[23])
    by_blocks, step, chunks, total = ins[24] != 0, ins[25], ins[_CHUNKS], ins[27]
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
