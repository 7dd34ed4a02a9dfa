"""A second core for direct convolutions, handed over without the GIL.

escepe_rt.parallel's Python pool costs ~50-110 us per hand-off on a small VM (a queue wake-up
plus GIL hand-offs, `benchmarks/batch1_threads.py`): a tenth of a 0.5 ms conv, more than a whole
28x28x16 one. Here one worker thread waits for work by spinning inside a numba function that
holds no GIL and never returns to Python while there is work: the caller describes each conv in
a control block (array addresses, shapes, options) from inside its own nogil call, and the
worker rebuilds the arrays from that description (numba.carray). A hand-off is a few atomic
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

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from escepe_rt import microkernel

POSTED, NEXT, DONE = 0, 1, 2
ALIVE = 3  # bumped by a caller that is about to post (restarts the worker's idle count)
IDLE_ALIVE = 4  # the ALIVE value through the worker's last full idle count (it parks then)
WORKER_JOBS = 5  # jobs the worker has looked at (diagnostics, tests)
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
DESC = 8
XP, XP_SHAPE = DESC, DESC + 1  # address, 4 dims
W, W_SHAPE = DESC + 5, DESC + 6  # 3 dims
OUT, OUT_SHAPE = DESC + 9, DESC + 10  # 4 dims (res has out's shape)
RES, EPI, EPI_LEN = DESC + 14, DESC + 15, DESC + 16
HAS_RES, ACT, GEOM = DESC + 17, DESC + 18, DESC + 19  # geom: GEOM_WORDS words
GEOM_WORDS = 8
BY_BLOCKS, STEP, TOTAL, CHUNKS = DESC + 27, DESC + 28, DESC + 29, DESC + 30
CTRL_WORDS = DESC + 32


@numba.njit(cache=True, nogil=True, inline="always")  # into _run_job and _serve
def _take_chunks(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n):
    """Claim chunks of job `seq` until none is left; each chunk is `step` channel blocks
    (by_blocks) or `step` of the `total` work units (pixels, or Winograd tiles). NEXT holds
    (seq << TAG) | next chunk and is claimed by compare-and-swap, so a worker still holding an
    older job's arguments can never take a chunk of a newer job."""
    while True:
        v = _load(ctrl, NEXT)
        i = v & CHUNK_MASK
        if (v >> TAG) != seq or i >= n:
            return
        if not _cas(ctrl, NEXT, v, v + 1):
            continue
        microkernel.conv_chunk(xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, i)
        _fetch_add(ctrl, DONE, 1)


@numba.njit(cache=True, nogil=True, inline="always")
def _begin_job(ctrl, seq):
    """Before the caller rewrites the descriptor for job `seq`: the chunk counter gets the new
    tag with no chunk left, then a release fence. A worker late for the previous job (it read
    POSTED, then was descheduled) may read some of the new descriptor's words; its acquire
    fence after them (see _take_described) then guarantees it sees this tag, so it claims
    nothing with them. Without this, the counter still carried the old tag while the words
    changed: a late worker could claim a chunk index past the old job's last one, valid in a
    new job with more chunks, and run it on half-written arrays."""
    _store(ctrl, NEXT, (seq << TAG) | CHUNK_MASK)
    _fence(True)


@_jit
def _run_job(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n):
    """The caller's side: describe job `seq` in ctrl (after _begin_job), publish it (chunk
    counter and DONE reset first, POSTED last, with release: the worker that reads POSTED sees
    the descriptor), take chunks, then wait for the chunks the worker took (DONE only counts
    chunks of this job: the caller publishes no new job, and frees none of these arrays,
    before this one is complete)."""
    _begin_job(ctrl, seq)
    ctrl[XP] = _address(xp)
    ctrl[W] = _address(w)
    ctrl[OUT] = _address(out)
    ctrl[RES] = _address(res)
    ctrl[EPI] = _address(epi)
    for d in range(4):
        ctrl[XP_SHAPE + d] = xp.shape[d]
        ctrl[OUT_SHAPE + d] = out.shape[d]
    for d in range(3):
        ctrl[W_SHAPE + d] = w.shape[d]
    for d in range(GEOM_WORDS):
        ctrl[GEOM + d] = geom[d]
    ctrl[EPI_LEN] = epi.shape[0]
    ctrl[HAS_RES] = has_res
    ctrl[ACT] = act
    ctrl[BY_BLOCKS] = by_blocks
    ctrl[STEP] = step
    ctrl[TOTAL] = total
    ctrl[CHUNKS] = n
    _store(ctrl, DONE, 0)
    _store(ctrl, NEXT, seq << TAG)
    _store(ctrl, POSTED, seq)
    _take_chunks(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n)
    while _load(ctrl, DONE) < n:
        pass


@numba.njit(cache=True, nogil=True, inline="always")  # one caller, _serve (compile time)
def _take_described(ctrl, seq):
    """The worker's side of job `seq`, from its descriptor. If the caller has already finished
    the job (and maybe written some of the next one's descriptor), the arrays built here may be
    stale, but then every claim fails on the sequence tag (the acquire fence below pairs with
    _begin_job's release fence) and nothing is read through them."""
    xp_shape = (ctrl[XP_SHAPE], ctrl[XP_SHAPE + 1], ctrl[XP_SHAPE + 2], ctrl[XP_SHAPE + 3])
    out_shape = (ctrl[OUT_SHAPE], ctrl[OUT_SHAPE + 1], ctrl[OUT_SHAPE + 2], ctrl[OUT_SHAPE + 3])
    w_shape = (ctrl[W_SHAPE], ctrl[W_SHAPE + 1], ctrl[W_SHAPE + 2])
    xp = numba.carray(_f32_ptr(ctrl[XP]), xp_shape)
    w = numba.carray(_f32_ptr(ctrl[W]), w_shape)
    out = numba.carray(_f32_ptr(ctrl[OUT]), out_shape)
    res = numba.carray(_f32_ptr(ctrl[RES]), out_shape)
    epi = numba.carray(_f32_ptr(ctrl[EPI]), (ctrl[EPI_LEN],))
    g = ctrl[GEOM : GEOM + GEOM_WORDS]
    geom = (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7])
    has_res = ctrl[HAS_RES] != 0
    by_blocks = ctrl[BY_BLOCKS] != 0
    act, step, total, n = ctrl[ACT], ctrl[STEP], ctrl[TOTAL], ctrl[CHUNKS]
    _fence(False)
    _take_chunks(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n)


@_jit
def _serve(ctrl, seen, limit):
    """The worker's loop, all of it without the GIL: wait for a job newer than `seen`, take its
    chunks, wait for the next. Returns the last sequence number seen after `limit` idle spins
    (the worker then parks in Python)."""
    while True:
        seq = _wait_posted(ctrl, seen, limit)
        if seq < 0:
            return seen
        seen = seq
        _take_described(ctrl, seq)
        _fetch_add(ctrl, WORKER_JOBS, 1)


@_jit
def _wait_posted(ctrl, seen, limit):
    """The worker's idle loop: the newest posted sequence number once it is > seen, or -1
    after `limit` spins with neither a post nor a keep-alive (ALIVE moving)."""
    alive = _load(ctrl, ALIVE)
    i = 0
    while i < limit:
        p = _load(ctrl, POSTED)
        if p > seen:
            return p
        a = _load(ctrl, ALIVE)
        if a != alive:
            alive = a
            i = 0
        i += 1
    _store(ctrl, IDLE_ALIVE, alive)
    return -1


@_jit
def keep_alive(ctrl):
    """Tell the spinning worker that jobs are coming (a section program calls this before each
    instruction, so the worker does not park between two of its jobs: it could not be woken
    from inside the program)."""
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
    ctrl = np.zeros(CTRL_WORDS, dtype=np.int64)  # a private slot: the worker never sees this job
    _run_job(ctrl, 1, *job)
    microkernel.conv_chunk(*job[:-1], 0)  # the Python pool's entry (machines with > 2 threads)
    _serve(ctrl, 1, 0)  # the worker's loop: returns at once (no idle spin allowed)


class SpinPair:
    """The caller plus one spinning worker thread (see the module docstring)."""

    def __init__(self):
        self.ctrl = np.zeros(CTRL_WORDS, dtype=np.int64)
        self._slot = threading.Lock()  # one job at a time
        self._seq = 0
        self._cond = threading.Condition()
        self._parked = False
        self._wake = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._work, name="escepe_rt-spin", daemon=True
                    )
                    self._thread.start()

    def _ready_worker(self) -> None:
        """Before posting (the caller holds the slot): a live worker that will not park before
        the jobs come, woken if it is parked."""
        self._ensure_worker()
        keep_alive(self.ctrl)  # before the parked check (see _work)
        if self._parked:
            with self._cond:
                self._wake = True
                self._cond.notify()

    def _work(self) -> None:
        seen = 0
        while True:
            seen = _serve(self.ctrl, seen, SPIN_LIMIT)  # returns only when idle
            with self._cond:  # park until a caller wakes it
                self._parked = True
                # a caller that bumped ALIVE before it could see _parked set is about to post
                if self.ctrl[ALIVE] == self.ctrl[IDLE_ALIVE]:
                    while not self._wake and self.ctrl[POSTED] <= seen:
                        self._cond.wait()
                self._wake = self._parked = False
            # back to spinning even if the job is not posted yet: a caller wakes the worker
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
            fn(self.ctrl, 0, False, *args)
            return
        try:
            self._ready_worker()
            self._seq = fn(self.ctrl, self._seq, True, *args)
        finally:
            self._slot.release()

    def run(self, args: tuple, by_blocks: bool, step: int, total: int, n: int) -> bool:
        """Run a direct conv (`args` as for microkernel.conv_range, without the ranges) in n
        chunks on the caller and the worker; False (nothing done) if another caller holds the
        slot: the caller then runs the conv alone."""
        if not self._slot.acquire(blocking=False):
            return False
        try:
            self._ready_worker()
            self._seq += 1
            _run_job(self.ctrl, self._seq, *args, by_blocks, step, total, n)
            return True
        finally:
            self._slot.release()


PAIR = SpinPair()
