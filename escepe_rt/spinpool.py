"""The other cores for direct convolutions, handed over without the GIL.

escepe_rt.parallel's Python pool costs ~50-110 us per hand-off on a small VM (a queue wake-up
plus GIL hand-offs, `benchmarks/batch1_threads.py`): a tenth of a 0.5 ms conv, more than a whole
28x28x16 one. Here threads - 1 worker threads wait for work by spinning inside a numba function
that holds no GIL and never returns to Python while there is work: the caller describes each conv in
a control block (array addresses, shapes, options) from inside its own nogil call, and both
run its chunks through one C entry that rebuilds the arrays from that description
(numba.carray; see _chunk for why every conv goes through it). A hand-off is a few atomic
memory operations, so kernels._conv_direct shares convs down to PAIR_MIN_MACS (2^18)
multiply-adds, e.g. every 3x3 conv of a 28x28 Fashion-MNIST model at batch 1.

Protocol (words of the int64 array `ctrl`; the counters are accessed with atomic
acquire/release operations, so it is right on ARM's weak memory model too):

    POSTED  sequence number of the last job published (the caller stores it, release)
    NEXT    (POSTED << TAG) | next chunk index; both threads claim chunks one at a time by
            compare-and-swap, so a worker descheduled mid-job delays one chunk, not the caller,
            and a worker late for a job can never claim a chunk of the next one
    DONE    chunks finished (fetch-add after each chunk; the caller waits for all)
    DESC..  the job's descriptor (written before POSTED; read after it with acquire). Before
            rewriting it the caller moves NEXT to the new tag with no chunk left (then a
            release fence), so a worker still reading an older job's words claims nothing

`_run_job` (the caller, GIL released) writes the descriptor, stores POSTED, takes chunks until
none is left and spins until DONE == chunks. The worker (`_serve`) spins until POSTED moves,
reads the descriptor and takes chunks in the same loop. After SPIN_LIMIT idle spins it returns
to Python and parks on a condition variable; a parked or dead worker (e.g. after fork) only
means the caller does every chunk itself. One job at a time: a second caller that finds the
slot busy runs its conv alone.
"""

from __future__ import annotations

import functools
import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from escepe_rt import microkernel, parallel

POSTED, NEXT, DONE = 0, 1, 2
ALIVE = 3  # bumped by a caller that is about to post (restarts the workers' idle counts)
SPLIT = 4  # chunks a shared conv is cut into (2 per thread; set by Python, read by programs)
WORKER_JOBS = 5  # jobs the workers have looked at, summed (diagnostics, tests)
TAG = 20  # NEXT = (job sequence number << TAG) | next chunk index
CHUNK_MASK = (1 << TAG) - 1
SPIN_LIMIT = 1 << 21  # idle spins (~1-3 ms) before the worker parks


def _word(context, builder, sig, args):
    """Pointer to the int64 word arr[i] (args = arr, i, ...), and the other arguments as int64."""
    ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
    ints = [context.cast(builder, a, t, types.int64) for a, t in zip(args[1:], sig.args[1:])]
    return builder.gep(ptr, [ints[0]]), ints[1:]


@intrinsic
def _load(typingctx, arr, i):
    """arr[i] (int64) with an acquire load."""

    def codegen(context, builder, sig, args):
        word, _ = _word(context, builder, sig, args)
        return builder.load_atomic(word, "acquire", 8)

    return types.int64(arr, i), codegen


@intrinsic
def _store(typingctx, arr, i, v):
    """arr[i] = v (int64) with a release store."""

    def codegen(context, builder, sig, args):
        word, (val,) = _word(context, builder, sig, args)
        builder.store_atomic(val, word, "release", 8)
        return context.get_dummy_value()

    return types.void(arr, i, v), codegen


@intrinsic
def _cas(typingctx, arr, i, expected, new):
    """If arr[i] == expected: arr[i] = new, return True (acq_rel); else False."""

    def codegen(context, builder, sig, args):
        word, (exp, val) = _word(context, builder, sig, args)
        res = builder.cmpxchg(word, exp, val, "acq_rel", "acquire")
        return builder.extract_value(res, 1)

    return types.boolean(arr, i, expected, new), codegen


@intrinsic
def _fetch_add(typingctx, arr, i, v):
    """old = arr[i]; arr[i] += v, atomically (acq_rel); returns old."""

    def codegen(context, builder, sig, args):
        word, (val,) = _word(context, builder, sig, args)
        return builder.atomic_rmw("add", word, val, "acq_rel")

    return types.int64(arr, i, v), codegen


@intrinsic
def _fence(typingctx, release):
    """A release fence (release True) or an acquire fence, as a literal choice."""
    if not isinstance(release, types.BooleanLiteral):
        return None

    def codegen(context, builder, sig, args):
        builder.fence("release" if release.literal_value else "acquire")
        return context.get_dummy_value()

    return types.void(release), codegen


_jit = numba.njit(cache=True, nogil=True)


@intrinsic
def _address(typingctx, arr):
    """The address of arr's first element, as an int64."""

    def codegen(context, builder, sig, args):
        ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(ptr, ir.IntType(64))

    return types.int64(arr), codegen


@intrinsic
def _f32_ptr(typingctx, addr):
    """An int64 address as a float32 pointer (for numba.carray)."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return types.CPointer(types.float32)(addr), codegen


# The job descriptor: words of ctrl from DESC on (a cache line away from the hot counters), so
# the worker rebuilds the job's arrays without the GIL (numba.carray over the caller's memory).
# A conv run alone has the same descriptor in a private array (run_alone).
DESC = 8
XP, XP_SHAPE = DESC, DESC + 1  # address, 4 dims
W, W_SHAPE = DESC + 5, DESC + 6  # 3 dims
OUT, OUT_SHAPE = DESC + 9, DESC + 10  # 4 dims (res has out's shape)
RES, EPI, EPI_LEN = DESC + 14, DESC + 15, DESC + 16
HAS_RES, ACT, GEOM = DESC + 17, DESC + 18, DESC + 19  # geom: GEOM_WORDS words
GEOM_WORDS = 8
BY_BLOCKS, STEP, TOTAL, CHUNKS = DESC + 27, DESC + 28, DESC + 29, DESC + 30
ENTRY = DESC + 31  # the address of the conv kernels' C entry (chunk_entry; set once, by Python)
CTRL_WORDS = DESC + 32


# Every conv chunk runs through one C callback, compiled once, that the nogil callers (_run_job,
# the worker's _serve, run_alone, section programs) call through its address in the descriptor.
# numba compiles a jitted callee into each caller's machine code again (it links callees in as
# linkonce_odr copies), and the micro-kernels are most of the runtime's code: called directly
# from five entry points, a cold cache spent ~2 s more of CPU on the Fashion example's first
# predict (median of five alternating fresh caches 19.0 vs 17.1 s; LLVM's share 8.4-11.0 vs
# 6.2-7.1 s). One indirect call per chunk costs nothing measurable.
def _chunk(desc_ptr, i):
    """Chunk i of the conv described at desc_ptr (CTRL_WORDS words, DESC.. as in ctrl)."""
    d = numba.carray(desc_ptr, (CTRL_WORDS,))
    xp = numba.carray(
        _f32_ptr(d[XP]), (d[XP_SHAPE], d[XP_SHAPE + 1], d[XP_SHAPE + 2], d[XP_SHAPE + 3])
    )
    w = numba.carray(_f32_ptr(d[W]), (d[W_SHAPE], d[W_SHAPE + 1], d[W_SHAPE + 2]))
    out_shape = (d[OUT_SHAPE], d[OUT_SHAPE + 1], d[OUT_SHAPE + 2], d[OUT_SHAPE + 3])
    out = numba.carray(_f32_ptr(d[OUT]), out_shape)
    res = numba.carray(_f32_ptr(d[RES]), out_shape)
    epi = numba.carray(_f32_ptr(d[EPI]), (d[EPI_LEN],))
    g = GEOM
    geom = (d[g], d[g + 1], d[g + 2], d[g + 3], d[g + 4], d[g + 5], d[g + 6], d[g + 7])
    microkernel.conv_chunk(
        xp, w, out, res, d[HAS_RES] != 0, epi, d[ACT], geom, d[BY_BLOCKS] != 0, d[STEP],
        d[TOTAL], i,
    )  # fmt: skip


_CHUNK_SIG = types.void(types.CPointer(types.int64), types.int64)


@functools.cache
def chunk_entry() -> int:
    """The address of _chunk's C callback: compiled, or loaded from numba's cache, on first
    use (not at import)."""
    return numba.cfunc(_CHUNK_SIG, cache=True)(_chunk).address


@intrinsic
def _call_chunk(typingctx, desc, i):
    """Chunk i of the conv described in desc (an int64 array), through desc[ENTRY]."""

    def codegen(context, builder, sig, args):
        ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
        entry = builder.load(builder.gep(ptr, [ir.Constant(ir.IntType(64), ENTRY)]))
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, ir.IntType(64)])
        chunk = context.cast(builder, args[1], sig.args[1], types.int64)
        builder.call(builder.inttoptr(entry, fnty.as_pointer()), [ptr, chunk])
        return context.get_dummy_value()

    return types.void(desc, i), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _check_entry(entry):
    """A zero entry (a descriptor that did not pass through with_entry) would be called."""
    if entry == 0:
        raise ValueError("spinpool: the descriptor has no C entry (pass it through with_entry)")


def with_entry(desc: np.ndarray) -> np.ndarray:
    """desc (a ctrl or descriptor array) with its ENTRY word set; every array handed to the
    nogil functions below passes here first (a zero entry would be called)."""
    if desc[ENTRY] == 0:
        desc[ENTRY] = chunk_entry()
    return desc


@numba.njit(cache=True, nogil=True, inline="always")
def _describe(desc, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n):
    """Write a conv's descriptor (DESC.. words of desc; ENTRY is left as it is)."""
    desc[XP] = _address(xp)
    desc[W] = _address(w)
    desc[OUT] = _address(out)
    desc[RES] = _address(res)
    desc[EPI] = _address(epi)
    for d in range(4):
        desc[XP_SHAPE + d] = xp.shape[d]
        desc[OUT_SHAPE + d] = out.shape[d]
    for d in range(3):
        desc[W_SHAPE + d] = w.shape[d]
    for d in range(GEOM_WORDS):
        desc[GEOM + d] = geom[d]
    desc[EPI_LEN] = epi.shape[0]
    desc[HAS_RES] = has_res
    desc[ACT] = act
    desc[BY_BLOCKS] = by_blocks
    desc[STEP] = step
    desc[TOTAL] = total
    desc[CHUNKS] = n


@_jit
def run_alone(entry, xp, w, out, res, has_res, epi, act, geom):
    """A whole conv on this thread (microkernel.conv_range's arguments without the ranges),
    through the C entry at address `entry` (a ctrl's ENTRY word)."""
    _check_entry(entry)
    desc = np.empty(CTRL_WORDS, dtype=np.int64)
    desc[ENTRY] = entry
    blocks = -(-out.shape[3] // microkernel.LANES)
    total = microkernel.work(
        geom, out.shape[0], out.shape[1] - 2 * geom[6], out.shape[2] - 2 * geom[6]
    )
    _describe(desc, xp, w, out, res, has_res, epi, act, geom, True, blocks, total, 1)
    _call_chunk(desc, total - total)


@numba.njit(cache=True, nogil=True, inline="always")  # into _run_job and _serve
def _take_chunks(ctrl, seq, n):
    """Claim chunks of job `seq` until none is left, and run each through the descriptor (read
    after the claim: a claim that succeeds on job seq's tag synchronises with the caller's
    release of it, and the caller rewrites no word before all n chunks are done). NEXT holds
    (seq << TAG) | next chunk and is claimed by compare-and-swap, so a worker still holding an
    older job's chunk count can never take a chunk of a newer job."""
    while True:
        v = _load(ctrl, NEXT)
        i = v & CHUNK_MASK
        if (v >> TAG) != seq or i >= n:
            return
        if not _cas(ctrl, NEXT, v, v + 1):
            continue
        _call_chunk(ctrl, i)
        _fetch_add(ctrl, DONE, 1)


@numba.njit(cache=True, nogil=True, inline="always")
def _begin_job(ctrl, seq):
    """Before the caller rewrites the descriptor for job `seq`: the chunk counter gets the new
    tag with no chunk left, then a release fence. A worker late for the previous job (it read
    POSTED, then was descheduled) may read the new descriptor's chunk count; its acquire fence
    after it (see _serve) then guarantees it sees this tag, so it claims nothing with it.
    Without this, the counter still carried the old tag while the words changed: a late worker
    could claim a chunk index past the old job's last one, valid in a new job with more chunks,
    and run it on half-written arrays."""
    _store(ctrl, NEXT, (seq << TAG) | CHUNK_MASK)
    _fence(True)


@_jit
def _run_job(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n):
    """The caller's side: describe job `seq` in ctrl (after _begin_job), publish it (chunk
    counter and DONE reset first, POSTED last, with release: the worker that reads POSTED sees
    the descriptor), take chunks, then wait for the chunks the worker took (DONE only counts
    chunks of this job: the caller publishes no new job, and frees none of these arrays,
    before this one is complete)."""
    _check_entry(ctrl[ENTRY])
    _begin_job(ctrl, seq)
    _describe(ctrl, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n)
    _store(ctrl, DONE, 0)
    _store(ctrl, NEXT, seq << TAG)
    _store(ctrl, POSTED, seq)
    _take_chunks(ctrl, seq, n)
    while _load(ctrl, DONE) < n:
        pass


@_jit
def _serve(ctrl, seen, limit):
    """A worker's loop, all of it without the GIL: wait for a job newer than `seen`, take its
    chunks, wait for the next. After `limit` idle spins returns the last sequence number seen
    and the ALIVE value its idle count ended with (the worker then parks in Python). If the
    caller has already finished job seq (and maybe written some of the next one's
    descriptor), the chunk count read here may be stale, but then every claim fails on the
    sequence tag (the acquire fence pairs with _begin_job's release fence)."""
    while True:
        seq, alive = _wait_posted(ctrl, seen, limit)
        if seq < 0:
            return seen, alive
        seen = seq
        n = ctrl[CHUNKS]
        _fence(False)
        _take_chunks(ctrl, seq, n)
        _fetch_add(ctrl, WORKER_JOBS, 1)


@_jit
def _wait_posted(ctrl, seen, limit):
    """The worker's idle loop: (the newest posted sequence number once it is > seen, ALIVE),
    or (-1, ALIVE) after `limit` spins with neither a post nor a keep-alive (ALIVE moving)."""
    alive = _load(ctrl, ALIVE)
    i = 0
    while i < limit:
        p = _load(ctrl, POSTED)
        if p > seen:
            return p, alive
        a = _load(ctrl, ALIVE)
        if a != alive:
            alive = a
            i = 0
        i += 1
    return -1, alive


@_jit
def keep_alive(ctrl):
    """Tell the spinning workers that jobs are coming (a section program calls this before each
    instruction, so no worker parks between two of its jobs: it could not be woken from inside
    the program)."""
    _fetch_add(ctrl, ALIVE, 1)


def address_of(a: np.ndarray) -> int:
    """The address of a C-contiguous array's first element, for a job descriptor or a program
    (the caller keeps the array alive while anything may read through the address)."""
    assert a.flags.c_contiguous
    return a.ctypes.data


def warm() -> None:
    """Compile (or load from numba's cache) the caller's and the worker's functions with the
    argument types the runtime uses, on a tiny conv that the caller runs alone."""
    lanes = microkernel.LANES
    xp = np.zeros((1, 1, 1, 1), dtype=np.float32)
    w = np.zeros((1, 1, lanes), dtype=np.float32)
    out = np.zeros((1, 1, 1, lanes), dtype=np.float32)
    epi = np.zeros(2 * lanes, dtype=np.float32)
    job = (xp, w, out, out, False, epi, 0, (1, 1, 1, 1, 1, 0, 0, 0), True, 1, 1, 1)
    # a private slot: the worker never sees this job
    ctrl = with_entry(np.zeros(CTRL_WORDS, dtype=np.int64))
    _run_job(ctrl, 1, *job)
    run_alone(ctrl[ENTRY], *job[:-4])
    _serve(ctrl, 1, 0)  # the worker's loop: returns at once (no idle spin allowed)


class SpinTeam:
    """The caller plus threads - 1 spinning workers (see the module docstring), threads being
    escepe_rt.parallel.POOL's: 2 on this project's 2-core VM, 4 on a Raspberry Pi 4 or 5. All
    the workers wait on the same control block and claim the same jobs' chunks."""

    def __init__(self):
        self.ctrl = np.zeros(CTRL_WORDS, dtype=np.int64)
        self._slot = threading.Lock()  # one job at a time
        self._seq = 0
        self._cond = threading.Condition()
        self._parked = 0  # workers parked in _work
        self._wakes = 0  # wake-ups so far (a parked worker waits for this to move)
        self._threads: list[threading.Thread] = []
        self._pid = os.getpid()  # the process the threads were started in
        self._start_lock = threading.Lock()

    def _ensure_workers(self, n: int) -> None:
        """n live workers at least: more are started if the pool's thread count grew, and
        again in a forked child (a worker never returns, so only a fork ends one; checking the
        pid costs less than asking each thread, ~1 us each, before every job)."""
        if len(self._threads) >= n and self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid != os.getpid():  # a forked child: the parent's parking state is not ours
                self._cond, self._parked = threading.Condition(), 0
            self._threads = [t for t in self._threads if t.is_alive()]
            self._pid = os.getpid()
            while len(self._threads) < n:
                t = threading.Thread(target=self._work, name="escepe_rt-spin", daemon=True)
                t.start()
                self._threads.append(t)

    def _ready(self) -> None:
        """Before posting (the caller holds the slot): the descriptor's C entry and split, live
        workers that will not park before the jobs come, the parked ones woken."""
        threads = parallel.POOL.threads
        with_entry(self.ctrl)
        self.ctrl[SPLIT] = 2 * threads
        self._ensure_workers(threads - 1)
        keep_alive(self.ctrl)  # before the parked check (see _work)
        if self._parked:
            with self._cond:
                self._wakes += 1
                self._cond.notify_all()

    def _work(self) -> None:
        seen = 0
        while True:
            seen, alive = _serve(self.ctrl, seen, SPIN_LIMIT)  # returns only when idle
            with self._cond:  # park until a caller wakes it
                self._parked += 1
                wakes = self._wakes
                # a caller that bumped ALIVE before it could see this worker parked is about
                # to post: do not wait then
                if self.ctrl[ALIVE] == alive:
                    while self._wakes == wakes and self.ctrl[POSTED] <= seen:
                        self._cond.wait()
                self._parked -= 1
            # back to spinning even if the job is not posted yet: a caller wakes the workers
            # just before it posts, and a section program (escepe_rt/program.py) posts all its
            # jobs after one wake-up (going back to sleep here cost ResNet-18's first section
            # at batch 32 its second core: 122 vs 61 ms)

    def run_sequence(self, fn, *args) -> None:
        """fn(ctrl, seq, shared, *args), a nogil numba function that posts any number of jobs
        numbered seq + 1, seq + 2, ... through _run_job and returns the last number it used (a
        section program, escepe_rt/program.py). shared is False, and fn must run every job
        alone, when another caller holds the slot."""
        shared = self._slot.acquire(blocking=False)
        if not shared:
            fn(with_entry(self.ctrl), 0, False, *args)
            return
        try:
            self._ready()
            self._seq = fn(self.ctrl, self._seq, True, *args)
        finally:
            self._slot.release()

    def run(self, args: tuple, by_blocks: bool, step: int, total: int, n: int) -> bool:
        """Run a direct conv (`args` as for microkernel.conv_range, without the ranges) in n
        chunks on the caller and the workers; False (nothing done) if another caller holds the
        slot: the caller then runs the conv alone."""
        if not self._slot.acquire(blocking=False):
            return False
        try:
            self._ready()
            self._seq += 1
            _run_job(self.ctrl, self._seq, *args, by_blocks, step, total, n)
            return True
        finally:
            self._slot.release()


TEAM = SpinTeam()
