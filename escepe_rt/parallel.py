"""The runtime's own intra-op threads, and keeping numpy's BLAS single-threaded meanwhile.

Why not just let OpenBLAS thread each sgemm: it splits every call statically between its
threads and the caller then waits for all of them. On an idle machine that is fine; on a device
that also runs other work, every one of the ~60 sgemm calls of a forward pass waits for a
descheduled BLAS thread to get a time slice, and batch-1 latency went from ~2 ms to 100-400 ms
(measured on 2 cores at load average 8, benchmarks/README.md). Here a conv is cut into chunks
that the caller and the worker threads claim one at a time, each chunk a single-threaded sgemm
plus its numba im2col / epilogue (which release the GIL): when a worker does not get a core, the
caller simply does its chunks, and im2col / epilogue run in parallel too.

Side effect: while any predict() of any model is running, numpy's OpenBLAS runs single-threaded
in the whole process (the previous thread count comes back when the last predict returns).

Threads: ESCEPE_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs this process may use (its
affinity mask, capped by its cgroup's CPU quota, e.g. in a container; at most 8). 1 (or a BLAS
other than OpenBLAS, whose thread count cannot be set here) leaves BLAS alone and runs every
kernel on the calling thread.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


def cgroup_cpus(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.0 for `docker run --cpus=2`), or
    None without one. A container sees every core of its host in its affinity mask however
    small its quota; spinning workers beyond the quota only take time slices from the caller
    (on this 2-core VM, 4 threads instead of 2: ResNet-18 batch 1 dense 12.9 vs ~7 ms)."""
    try:  # cgroup v2: "max 100000" or "200000 100000" (quota, period in microseconds)
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 is none
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _default_threads() -> int:
    for var in ("ESCEPE_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, min(8, n))


class _OpenBLAS:
    """set/get_num_threads of the OpenBLAS numpy is linked with (found in /proc/self/maps)."""

    def __init__(self):
        self.get = self.set = None
        try:
            import numpy  # noqa: F401  (loads the library)

            with open("/proc/self/maps") as f:
                paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower()})
        except OSError:
            return
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix in (
                ("scipy_openblas", "64_"),
                ("scipy_openblas", ""),
                ("openblas", ""),
            ):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    self.get, self.set = get, set_
                    return


class _Job:
    """fn(0..n-1) on whoever claims each index first; wait() returns once all n are done."""

    def __init__(self, fn, n: int):
        self.fn, self.n = fn, n
        self.claims = itertools.count()  # next() is atomic under the GIL
        self.lock = threading.Lock()
        self.done = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def work(self) -> None:
        while True:
            i = next(self.claims)
            if i >= self.n:
                return  # nothing left: touches no data (the caller may have returned already)
            try:
                self.fn(i)
            except BaseException as e:  # re-raised in the caller
                self.error = e
            with self.lock:
                self.done += 1
                if self.done == self.n:
                    self.finished.set()

    def wait(self) -> None:
        self.finished.wait()
        if self.error is not None:
            raise self.error


class Pool:
    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._blas = _OpenBLAS() if self.threads > 1 else None
        if self._blas is not None and self._blas.set is None:
            self.threads = 1  # cannot keep BLAS single-threaded: let it thread on its own
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._inside = 0
        self._blas_threads_before = 0
        self._local = threading.local()

    def run(self, fn, n: int) -> None:
        """fn(i) for i in range(n), on the caller and up to threads - 1 workers."""
        if self.threads == 1 or n <= 1:
            for i in range(n):
                fn(i)
            return
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.threads - 1, "escepe_rt")
        job = _Job(fn, n)
        for _ in range(min(self.threads, n) - 1):
            self._executor.submit(job.work)
        job.work()
        job.wait()

    def chunking_here(self) -> bool:
        """Whether convs on this thread are cut into chunks for the pool (see blas_threaded)."""
        return self.threads > 1 and not getattr(self._local, "blas_threaded", False)

    @contextmanager
    def blas_threaded(self):
        """On this thread, run each conv whole and let BLAS thread its sgemm.

        For batch 1 that was faster on an idle machine (ResNet-18 width 64, 2 threads: 13.1 ms
        vs 21.2 ms per sample with chunks, benchmarks/latency.py); at batch 32 chunks were
        (248 vs 477 ms). BLAS runs single-threaded anyway while another predict holds
        blas_single_threaded: slower, never wrong.
        """
        before = getattr(self._local, "blas_threaded", False)
        self._local.blas_threaded = True
        try:
            yield
        finally:
            self._local.blas_threaded = before

    @contextmanager
    def blas_single_threaded(self):
        """While any predict is inside, OpenBLAS runs each call on its caller's thread."""
        if self.threads == 1:
            yield
            return
        with self._lock:
            if self._inside == 0:
                self._blas_threads_before = self._blas.get()
                self._blas.set(1)
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    self._blas.set(self._blas_threads_before)


POOL = Pool(_default_threads())
