"""A second core for direct convolutions, handed over without the GIL.

escepe_rt.parallel's Python pool costs ~50-110 us per hand-off on a small VM (a queue wake-up
plus GIL hand-offs, `benchmarks/batch1_threads.py`): a tenth of a 0.5 ms conv, more than a whole
28x28x16 one. Here one worker thread waits for work by spinning inside a numba function that
holds no GIL, and the caller publishes a conv from inside its own nogil call: the hand-off is a
few atomic memory operations. kernels._conv_direct uses it for convs of >= PAIR_MIN_MACS (2^22)
multiply-adds; below that the per-job Python work here still costs more than it saves.

Protocol (all words of the int64 array `ctrl`, accessed with atomic acquire/release operations,
so it is right on ARM's weak memory model too):

    POSTED  sequence number of the last job published (the caller stores it, release)
    NEXT    (POSTED << TAG) | next chunk index; both threads claim chunks one at a time by
            compare-and-swap, so a worker descheduled mid-job delays one chunk, not the caller,
            and a worker late for a job can never claim a chunk of the next one
    DONE    chunks finished (fetch-add after each chunk; the caller waits for all)

The caller sets the job's arrays on the Python object while holding the GIL, then calls
`run_job`, which releases the GIL, stores POSTED, takes chunks until none is left and spins
until DONE == chunks. The worker spins (nogil) until POSTED moves, takes the GIL to read the job
(free: the caller is inside its nogil call), then takes chunks in the same nogil loop. After
SPIN_LIMIT idle spins the worker parks on a condition variable; a parked or dead worker (e.g.
after fork) only means the caller does every chunk itself. One job at a time: a second caller
that finds the slot busy runs its conv alone.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from escepe_rt import microkernel

POSTED, NEXT, DONE = 0, 1, 2
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


_jit = numba.njit(cache=True, nogil=True)


@_jit
def _take_chunks(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n):
    """Claim chunks of job `seq` until none is left; each chunk is `step` channel blocks
    (by_blocks) or `step` of the `total` output pixels. NEXT holds (seq << TAG) | next chunk and
    is claimed by compare-and-swap, so a worker still holding an older job's arguments can never
    take a chunk of a newer job."""
    while True:
        v = _load(ctrl, NEXT)
        i = v & CHUNK_MASK
        if (v >> TAG) != seq or i >= n:
            return
        if not _cas(ctrl, NEXT, v, v + 1):
            continue
        microkernel.conv_chunk(xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, i)
        _fetch_add(ctrl, DONE, 1)


@_jit
def _run_job(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n):
    """The caller's side: publish job `seq` (chunk counter and DONE reset first), take chunks,
    then wait for the chunks the worker took (DONE only counts chunks of this job: the caller
    publishes no new job before this one is complete)."""
    _store(ctrl, DONE, 0)
    _store(ctrl, NEXT, seq << TAG)
    _store(ctrl, POSTED, seq)
    _take_chunks(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n)
    while _load(ctrl, DONE) < n:
        pass


@_jit
def _take_and_wait(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n):
    """The worker's side of job `seq`: take chunks, then (still without the GIL) wait for the
    next job: the worker only needs the GIL again when a caller is inside _run_job, i.e. when
    the GIL is free, so the two threads never queue for it."""
    _take_chunks(ctrl, seq, xp, w, out, res, has_res, epi, act, geom, by_blocks, step, total, n)
    return _wait_posted(ctrl, seq, SPIN_LIMIT)


@_jit
def _wait_posted(ctrl, seen, limit):
    """The worker's idle loop: the newest posted sequence number once it is > seen, or -1
    after `limit` spins."""
    for _ in range(limit):
        p = _load(ctrl, POSTED)
        if p > seen:
            return p
    return -1


def warm() -> None:
    """Compile (or load from numba's cache) the caller's and the worker's functions with the
    argument types the runtime uses, on a tiny conv that the caller runs alone."""
    lanes = microkernel.LANES
    xp = np.zeros((1, 1, 1, 1), dtype=np.float32)
    w = np.zeros((1, 1, lanes), dtype=np.float32)
    out = np.zeros((1, 1, 1, lanes), dtype=np.float32)
    epi = np.zeros(2 * lanes, dtype=np.float32)
    job = (xp, w, out, out, False, epi, 0, (1, 1, 1, 1, 1), True, 1, 1, 1)
    ctrl = np.zeros(8, dtype=np.int64)  # a private slot: the worker never sees this job
    _run_job(ctrl, 1, *job)
    microkernel.conv_chunk(*job[:-1], 0)  # the Python pool's entry (machines with > 2 threads)
    _take_and_wait.compile(tuple(numba.typeof(a) for a in (ctrl, 1, *job)))  # the worker's


class SpinPair:
    """The caller plus one spinning worker thread (see the module docstring)."""

    def __init__(self):
        self.ctrl = np.zeros(8, dtype=np.int64)
        self._slot = threading.Lock()  # one job at a time
        self._seq = 0
        self._job = None
        self._cond = threading.Condition()
        self._parked = False
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

    def _work(self) -> None:
        seen = 0
        seq = _wait_posted(self.ctrl, seen, SPIN_LIMIT)
        while True:
            if seq < 0:  # idle: park until a caller posts and notifies
                with self._cond:
                    self._parked = True
                    while self.ctrl[POSTED] <= seen:
                        self._cond.wait()
                    self._parked = False
                seq = int(self.ctrl[POSTED])
                continue
            seen = seq
            job = self._job
            if job is not None and job[0] == seq:
                seq = _take_and_wait(self.ctrl, *job)
            else:  # that job is over (the caller did it all): wait for the next
                seq = _wait_posted(self.ctrl, seen, SPIN_LIMIT)

    def run(self, args: tuple, by_blocks: bool, step: int, total: int, n: int) -> bool:
        """Run a direct conv (`args` as for microkernel.conv_direct, without the ranges) in n
        chunks on the caller and the worker; False (nothing done) if another caller holds the
        slot: the caller then runs the conv alone."""
        if not self._slot.acquire(blocking=False):
            return False
        try:
            self._ensure_worker()
            self._seq += 1
            seq = self._seq
            job_args = (*args, by_blocks, step, total, n)
            self._job = (seq, *job_args)
            if self._parked:
                with self._cond:
                    self._cond.notify()
            _run_job(self.ctrl, seq, *job_args)
            self._job = None
            return True
        finally:
            self._slot.release()


PAIR = SpinPair()
