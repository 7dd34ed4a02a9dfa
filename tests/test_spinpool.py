"""The spinning workers (escepe_rt/spinpool.py) against one plain call of the same conv."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from escepe_rt import kernels as K
from escepe_rt import microkernel, parallel, spinpool


def _conv(seed: int, n=1, h=12, w=10, cin=8, cout=48, stride=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    cw = K.prepare_conv_weight(rng.standard_normal((cout, cin, 3, 3), dtype=np.float32), 1)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho = (h + 2 - 3) // stride + 1
    wo = (w + 2 - 3) // stride + 1
    out = np.empty((n, ho, wo, cout), np.float32)
    res = rng.standard_normal(out.shape, dtype=np.float32)
    epi = rng.standard_normal(2 * cout).astype(np.float32)
    args = (xp, cw.panels, out, res, True, epi, K.ACT_RELU, (3, 3, stride, stride, 1, 0, 0, 0))
    return args, out


def _reference(args, out):
    ref = np.empty_like(out)
    a = (args[0], args[1], ref, *args[3:])
    microkernel.conv_direct(*a, 0, out.shape[3] // microkernel.LANES, 0, ref[..., 0].size)
    return ref


@pytest.mark.parametrize("by_blocks", [True, False])
@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_pair_run_equals_one_call(by_blocks, chunks):
    args, out = _conv(chunks + 10 * by_blocks, n=2, stride=1 + chunks % 2)
    blocks = out.shape[3] // microkernel.LANES
    pixels = out[..., 0].size
    total_units = blocks if by_blocks else pixels
    step = -(-total_units // chunks)
    if not by_blocks:
        step = -(-step // 8) * 8
    n = -(-total_units // step)
    for _ in range(20):  # many jobs in a row: sequence numbers, chunk tags, reuse of the slot
        out[...] = np.nan
        assert spinpool.TEAM.run(args, by_blocks, step, pixels, n)
        np.testing.assert_array_equal(out, _reference(args, out))


def test_busy_slot_is_refused_and_callers_from_many_threads_stay_correct():
    """Concurrent callers: one gets the worker, the others are told to run alone (False)."""
    jobs = [_conv(100 + i, h=16, w=16, cout=64) for i in range(4)]
    errors = []

    def caller(args, out):
        try:
            for _ in range(30):
                out[...] = np.nan
                blocks = out.shape[3] // microkernel.LANES
                if not spinpool.TEAM.run(args, True, 1, out[..., 0].size, blocks):
                    microkernel.conv_direct(*args, 0, blocks, 0, out[..., 0].size)
                np.testing.assert_array_equal(out, _reference(args, out))
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=caller, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_chunk_claims_are_tagged_with_the_job():
    """A claim against a finished or older job takes nothing (the chunk counter carries the
    job's sequence number)."""
    args, out = _conv(7)
    ctrl = spinpool.with_entry(np.zeros(spinpool.CTRL_WORDS, dtype=np.int64))
    spinpool._describe(ctrl, *args, True, 1, out[..., 0].size, 3)
    ctrl[spinpool.NEXT] = 5 << spinpool.TAG  # job 5 posted, no chunk taken yet
    out[...] = -1.0
    spinpool._take_chunks(ctrl, 4, 3)  # job 4: stale
    assert ctrl[spinpool.NEXT] == 5 << spinpool.TAG and ctrl[spinpool.DONE] == 0
    assert (out == -1.0).all()
    spinpool._take_chunks(ctrl, 5, 3)
    assert ctrl[spinpool.NEXT] == (5 << spinpool.TAG) + 3 and ctrl[spinpool.DONE] == 3
    np.testing.assert_array_equal(out, _reference(args, out))


def test_a_late_worker_claims_nothing_once_the_next_job_has_begun():
    """Job 5 had 3 chunks, all taken; the caller begins job 6 (which will have more chunks)
    and starts rewriting the descriptor. A worker still holding job 5 that has read the new
    chunk count must claim nothing: index 3 is past job 5's chunks but valid in job 6."""
    args, out = _conv(7)
    ctrl = spinpool.with_entry(np.zeros(spinpool.CTRL_WORDS, dtype=np.int64))
    spinpool._describe(ctrl, *args, True, 1, out[..., 0].size, 3)
    ctrl[spinpool.NEXT] = (5 << spinpool.TAG) + 3  # job 5: its 3 chunks taken
    spinpool._begin_job(ctrl, 6)
    out[...] = -1.0
    spinpool._take_chunks(ctrl, 5, 10)  # the late worker
    assert ctrl[spinpool.DONE] == 0 and (out == -1.0).all()
    assert ctrl[spinpool.NEXT] >> spinpool.TAG == 6


def test_a_descriptor_without_the_c_entry_is_refused():
    """Every nogil entry checks the descriptor's ENTRY word (a zero would be called: a crash)."""
    args, out = _conv(8)
    bare = np.zeros(spinpool.CTRL_WORDS, dtype=np.int64)
    with pytest.raises(ValueError, match="no C entry"):
        spinpool.run_alone(0, *args)
    with pytest.raises(ValueError, match="no C entry"):
        spinpool._run_job(bare, 1, *args, True, 1, out[..., 0].size, 3)
    out[...] = np.nan  # the same descriptor with the entry runs
    spinpool.run_alone(spinpool.with_entry(bare)[spinpool.ENTRY], *args)
    np.testing.assert_array_equal(out, _reference(args, out))


def _shared_conv_in_child(seed: int) -> bool:
    args, out = _conv(seed, n=2, h=16, w=16, cout=64)
    blocks = out.shape[3] // microkernel.LANES
    ok = True
    for _ in range(5):
        out[...] = np.nan
        ran = spinpool.TEAM.run(args, True, 1, out[..., 0].size, blocks)
        ok &= ran and np.array_equal(out, _reference(args, out))
    return ok and any(t.is_alive() for t in spinpool.TEAM._threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_workers():
    if parallel.POOL.threads < 2:
        pytest.skip("no worker on one thread")
    """Threads do not survive fork: a child's first shared conv starts new workers (the dead
    ones only ever meant the caller ran every chunk) and gets the right answer."""
    import multiprocessing

    args, out = _conv(9, n=2, h=16, w=16, cout=64)
    assert spinpool.TEAM.run(args, True, 1, out[..., 0].size, 4)  # workers alive here
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_shared_conv_in_child, (11,))


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path, files, quota):
    """cgroup v2's cpu.max or v1's cfs quota / period, in CPUs; None without a quota."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert parallel.cgroup_cpus(str(tmp_path)) == quota


def test_default_threads_follow_a_container_quota(monkeypatch):
    """A container whose affinity shows 8 cores but whose quota is 1.5 CPUs gets 2 threads (a
    spinning worker per core it cannot use would only steal the caller's time slices)."""
    monkeypatch.delenv("ESCEPE_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(parallel, "cgroup_cpus", lambda: 1.5)
    assert parallel._default_threads() == 2
    monkeypatch.setattr(parallel, "cgroup_cpus", lambda: None)
    assert parallel._default_threads() == 8
    monkeypatch.setenv("ESCEPE_NUM_THREADS", "3")
    assert parallel._default_threads() == 3
