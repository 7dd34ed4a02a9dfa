"""Batch-1 section programs (escepe_rt/program.py) against the executor's step lists.

The step lists are themselves compared with PyTorch (test_runtime_vs_torch, test_kernels); here
a program must reproduce them bit for bit: every value of the model, every exit's logits, and
predict's answers, over repeated calls (the arena and its zero borders are reused).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import escepe_rt
from escepe_rt import parallel, program, spinpool
from escepe_rt.executor import Executor

FASHION = Path(__file__).resolve().parent.parent / "examples/fashion_resnet18.escepe"


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _zoo(name: str, shape: tuple, tmp_path, **kw) -> escepe_rt.Model:
    """A zoo model with random weights, compiled here (needs torch: skipped on the torch-free
    arm64 check, tools/arm64-check.sh, which runs the Fashion cases)."""
    torch = pytest.importorskip("torch")
    from compiler.export import export
    from compiler.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=shape[0], **kw).eval()
    path = tmp_path / f"{name}.escepe"
    export(model, torch.zeros((1, *shape)), path)
    return escepe_rt.load(path)


ZOO = {
    "resnet18_3x32": ("resnet18", (3, 32, 32), {"width": 16}),
    "resnet20_1x28": ("resnet20", (1, 28, 28), {"width": 8}),
}


class _Models(dict):
    """The shipped Fashion model and zoo models, each built on first use."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, name):
        if name == "fashion":
            m = escepe_rt.load(FASHION)
        else:
            arch, shape, kw = ZOO[name]
            m = _zoo(arch, shape, self.tmp_path_factory.mktemp("zoo"), **kw)
        self[name] = m
        return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _Models(tmp_path_factory)


NAMES = ["fashion", "resnet18_3x32", "resnet20_1x28"]


def _executors(m, share=True):
    with_programs = Executor(m.spec, m._buf, "lazy")
    if not share:  # every value keeps its own memory: all of them can be compared after a pass
        steps = [with_programs._steps(s) for s in range(len(m.spec.sections))]
        exits = [e.logits for e in m.spec.exits]
        with_programs._layout = program.Layout(m.spec, steps, exits, share=False)
    steps = Executor(m.spec, m._buf, "lazy", programs=False)
    assert with_programs.program_unavailable is None, with_programs.program_unavailable
    assert steps.program_unavailable == "programs=False"
    return with_programs, steps


@pytest.mark.parametrize("name", NAMES)
def test_every_value_equals_the_step_lists(models, name):
    m = models[name]
    prog, steps = _executors(m, share=False)
    rng = np.random.default_rng(3)
    for n in (1, 3, 2, 1):  # a reused arena: values and zero borders of the last call must not leak
        x = _nhwc(rng.standard_normal((n, *m.input_shape), dtype=np.float32))
        got = prog.run_all_exits(x)
        env = steps._env(x)
        for s in range(len(m.spec.sections)):
            steps.run_section(s, env, keep_values=True)
        layout, arena = prog._layout, prog._arena
        compared = 0
        for v in layout.offset:
            if env[v] is None:  # a residual add folded into its conv has no value of its own
                continue
            np.testing.assert_array_equal(layout.view(arena, v, n), env[v])
            compared += 1
            b = layout.border[v]
            if b:  # the zero border that lets convs skip padding copies stays zero
                whole = layout.whole(arena, v, n).copy()
                whole[:, b:-b, b:-b] = 0.0
                assert not whole.any(), f"value {v}: its border was written"
        assert compared >= len(m.spec.nodes) - len(steps._fused)
        assert max(layout.border.values()) == 1  # 3x3 convs with padding 1
        for s, logits in enumerate(got):
            np.testing.assert_array_equal(logits, env[m.spec.exits[s].logits])


@pytest.mark.parametrize("name", NAMES)
def test_values_alive_together_never_share_memory(models, name):
    """The arena planner (greedy by size over lifetimes in steps): any two values whose
    lifetimes overlap get disjoint floats, aliases (FLATTEN of a 1x1 map) aside; and sharing
    makes the arena smaller than one place per value."""
    m = models[name]
    prog, _ = _executors(m)
    layout = prog._layout
    roots = {v for v in layout.offset if v in layout.lifetime}
    for a in roots:
        for b in roots:
            if a >= b:
                continue
            (fa, la), (fb, lb) = layout.lifetime[a], layout.lifetime[b]
            if fa <= lb and fb <= la:  # alive at the same time
                oa, ob = layout.offset[a], layout.offset[b]
                assert oa + layout.size[a] <= ob or ob + layout.size[b] <= oa, (a, b)
    assert layout.per_sample < sum(layout.size[v] for v in roots)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.6, 0.9, 2.0])
def test_predict_equals_the_step_lists(models, name, threshold):
    m = models[name]
    prog, steps = _executors(m)
    thresholds = [threshold] * (len(m.spec.exits) - 1) + [0.0]
    rng = np.random.default_rng(4)
    held = []
    for n in (1, 1, 5, 1, 32, 3):
        x = _nhwc(rng.standard_normal((n, *m.input_shape), dtype=np.float32) * 2)
        a = prog.predict(x, thresholds, m.policy)
        b = steps.predict(x, thresholds, m.policy)
        for f in ("labels", "exit_index", "confidence", "logits"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
            assert getattr(a, f).dtype == getattr(b, f).dtype
        held.append((a, b))
    for a, b in held:  # results handed out earlier are not views of the arena
        np.testing.assert_array_equal(a.logits, b.logits)


def test_programs_ran_and_shared_convs_with_the_worker(models):
    m = models["fashion"]
    prog, _ = _executors(m)
    x = _nhwc(np.zeros((1, *m.input_shape), np.float32))
    prog.predict(x, [2.0] * len(m.spec.exits), m.policy)
    built = prog._programs
    last = len(m.spec.exits) - 1
    assert set(built) == {(s, False) for s in range(last)} | {(last, True)}
    ops = np.concatenate([p.code[:, 0] for p in built.values()])
    assert {program.OP_CONV, program.OP_GAP, program.OP_LINEAR} <= set(ops)
    # the dense pass runs the body convs of the Winograd kind (exit heads excluded): 4 + 3 + 3
    # + 3 (tests/test_bench.py counts every conv)
    rows = np.concatenate([p.code for p in built.values()])
    kinds = rows[rows[:, 0] == program.OP_CONV, 29]
    assert np.count_nonzero(kinds == 1) == 13
    if parallel.POOL.threads == 2:  # the 28x28x16 3x3 convs are shared with the worker
        before = spinpool.TEAM._seq
        prog.predict(x, [2.0] * len(m.spec.exits), m.policy)
        assert spinpool.TEAM._seq >= before + 4


def test_an_exit_head_nobody_leaves_at_is_not_in_the_body_program(models):
    m = models["fashion"]
    prog, _ = _executors(m)
    x = _nhwc(np.zeros((1, *m.input_shape), np.float32))
    prog.predict(x, [2.0] * len(m.spec.exits), m.policy)
    prog.run_all_exits(x)
    body, full = prog._programs[(0, False)].code, prog._programs[(0, True)].code
    assert len(body) < len(full)
    assert program.OP_LINEAR not in body[:, 0] and program.OP_LINEAR in full[:, 0]


def test_single_thread_programs_share_nothing(models, monkeypatch):
    m = models["fashion"]
    monkeypatch.setattr(parallel.POOL, "threads", 1)
    prog, steps = _executors(m)
    x = _nhwc(np.random.default_rng(5).standard_normal((1, *m.input_shape), dtype=np.float32))
    for a, b in zip(prog.run_all_exits(x), steps.run_all_exits(x)):
        np.testing.assert_array_equal(a, b)
    before = spinpool.TEAM._seq
    for a, b in zip(prog.run_all_exits(x), steps.run_all_exits(x)):
        np.testing.assert_array_equal(a, b)
    assert spinpool.TEAM._seq == before  # no job was handed to the worker


def test_a_held_arena_sends_the_call_to_the_step_lists(models):
    m = models["fashion"]
    prog, steps = _executors(m)
    x = _nhwc(np.random.default_rng(6).standard_normal((1, *m.input_shape), dtype=np.float32))
    with prog._arena_lock:  # another thread is inside a program
        got = prog.predict(x, m.thresholds, m.policy)
        assert prog._arena is None and not prog._programs
    want = steps.predict(x, m.thresholds, m.policy)
    np.testing.assert_array_equal(got.logits, want.logits)
    np.testing.assert_array_equal(got.exit_index, want.exit_index)


def test_threads_racing_for_the_arena_get_the_sequential_answers(models):
    m = models["fashion"]
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, *m.input_shape), dtype=np.float32) for _ in range(48)]
    want = [escepe_rt.load(FASHION).predict(x) for x in xs]
    shared = escepe_rt.load(FASHION)
    got = [None] * len(xs)

    def work(k):
        for i in range(k, len(xs), 4):
            got[i] = shared.predict(xs[i])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.logits, w.logits)
        np.testing.assert_array_equal(g.exit_index, w.exit_index)


def test_models_without_a_program_say_why(tmp_path, monkeypatch):
    mobile = _zoo("mobilenet", (3, 32, 32), tmp_path, width=8)  # depthwise convs
    assert "not on the direct kernels" in Executor(mobile.spec, mobile._buf).program_unavailable
    m = escepe_rt.load(FASHION)
    assert Executor(m.spec, m._buf, fuse=False).program_unavailable == "fuse=False"
    monkeypatch.setattr(program, "ENABLED", False)
    assert Executor(m.spec, m._buf).program_unavailable == "ESCEPE_PROGRAMS=0"


def test_arena_grows_to_the_biggest_batch_and_bigger_batches_use_the_step_lists(models):
    from escepe_rt import executor

    m = models["fashion"]
    prog, steps = _executors(m)
    rng = np.random.default_rng(8)
    per_sample = prog._layout.per_sample
    for n, cap in ((3, 3), (2, 3), (5, 5), (executor.PROGRAM_MAX_BATCH + 1, 5)):
        x = _nhwc(rng.standard_normal((n, *m.input_shape), dtype=np.float32))
        for a, b in zip(prog.run_all_exits(x), steps.run_all_exits(x)):
            np.testing.assert_array_equal(a, b)
        assert prog._arena.size == cap * per_sample


@pytest.mark.parametrize("threshold", [0.0, 0.6, 2.0])
def test_batches_above_the_arena_budget_run_in_sub_batches(models, monkeypatch, threshold):
    """With ARENA_BYTES room for 3 samples, a batch of 8 runs as sub-batches of 3, 3 and 2: the
    arena stays at 3 samples, and every exit's logits and every answer equal the step lists'
    (per-sample results do not depend on the batch)."""
    from escepe_rt import executor

    m = models["fashion"]
    monkeypatch.setattr(executor, "ARENA_BYTES", 3 * 4 * _executors(m)[0]._layout.per_sample)
    prog, steps = _executors(m)
    assert prog._arena_batch == 3
    x = _nhwc(np.random.default_rng(9).standard_normal((8, *m.input_shape), dtype=np.float32))
    for a, b in zip(prog.run_all_exits(x), steps.run_all_exits(x)):
        np.testing.assert_array_equal(a, b)
    thresholds = [threshold] * len(m.spec.exits)
    got = prog.predict(x, thresholds, m.policy)
    want = steps.predict(x, thresholds, m.policy)
    for f in ("labels", "exit_index", "confidence", "logits"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    assert prog._arena.size == 3 * prog._layout.per_sample


def test_step_lists_drop_each_value_after_its_last_reader(models):
    """Without keep_values, env keeps only what later sections and the caller read: the input,
    the exit's logits and the values live after the section (big batches hold their largest
    live set, not every activation); the answers are the same."""
    m = models["resnet20_1x28"]
    _, steps = _executors(m)
    x = _nhwc(np.random.default_rng(9).standard_normal((3, *m.input_shape), dtype=np.float32))
    kept, full = steps._env(x), steps._env(x)
    for s in range(len(m.spec.sections)):
        steps.run_section(s, kept)
        steps.run_section(s, full, keep_values=True)
        held = {v for v, a in enumerate(kept) if a is not None}
        want = {0, m.spec.exits[s].logits} | set(steps._live_after[s])
        want |= {v for t in range(s) for v in [m.spec.exits[t].logits]}  # earlier exits' logits
        assert held == want, (s, sorted(held ^ want))
        np.testing.assert_array_equal(kept[m.spec.exits[s].logits], full[m.spec.exits[s].logits])


def test_the_worker_stays_for_a_programs_jobs(models, monkeypatch):
    """The worker parks after SPIN_LIMIT idle spins and a program cannot wake it from inside,
    so a program wakes it once at its start (the woken worker spins even though no job is
    posted yet) and keeps it from parking between its instructions (keep_alive). Here a long
    prefix of small convs run alone precedes twenty shared convs; before those fixes the worker
    parked during the prefix (or went back to sleep when woken) and the shared convs ran on one
    core."""
    import time

    if parallel.POOL.threads != 2:
        pytest.skip("the spinning worker is used on two threads")
    m = models["fashion"]
    pair = spinpool.SpinTeam()
    monkeypatch.setattr(spinpool, "TEAM", pair)
    monkeypatch.setattr(spinpool, "SPIN_LIMIT", 1 << 18)  # parks after ~0.1 ms of idling
    prog, _ = _executors(m)
    x = _nhwc(np.random.default_rng(10).standard_normal((1, *m.input_shape), dtype=np.float32))
    prog.run_all_exits(x)  # builds the programs and the arena
    full = prog._programs[(0, True)]
    rows = full.code[full.code[:, 0] == program.OP_CONV]
    conv = rows[np.argmax(rows[:, 26])]  # the biggest conv of section 0: a 28x28x16 3x3 one
    small = rows[np.argmin(rows[:, 26])].copy()  # a head conv on a 4x4 map: ~1 us, alone
    small[27] = 1 << 62  # pair_min: below it a conv runs on the caller alone
    # the prefix lasts far longer than the idle limit, each of its instructions far less (also
    # under emulation, where a conv slows down more than a spin)
    code = np.concatenate([np.repeat(small[None], 400, 0), np.repeat(conv[None], 20, 0)])
    test_prog = program.Program(code, full.keep)
    arena, cap = prog._arena, prog._arena.size // prog._layout.per_sample
    for parked_first in (True, False, True):
        deadline = time.monotonic() + 5
        while parked_first and not pair._parked and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pair._parked or not parked_first
        before = pair.ctrl[spinpool.WORKER_JOBS]
        program.execute(test_prog, arena, 1, cap)
        # it came back for the shared convs: a worker left parked looks at none, ever; one
        # that is awake looks at least at the newest job, maybe late (descheduled, or under
        # emulation: the arm64 check), so wait for it a little
        deadline = time.monotonic() + 5
        while pair.ctrl[spinpool.WORKER_JOBS] == before and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pair.ctrl[spinpool.WORKER_JOBS] > before


@pytest.mark.parametrize("name", ["fashion", "resnet18_3x32"])
@pytest.mark.parametrize("threads", [3, 4])
def test_programs_on_more_threads_match_one_thread(models, name, threads, monkeypatch):
    """A Pi has 4 cores: programs run there too, their big convs cut into 2 chunks per thread
    and shared with threads - 1 spinning workers. Every exit's logits equal the step lists' on
    one thread (no chunks, nothing shared), batches 1 and 5 (ResNet-18 w16 at 32x32: 18 convs
    above the sharing threshold)."""
    m = models[name]
    rng = np.random.default_rng(threads)
    xs = [_nhwc(rng.standard_normal((b, *m.input_shape), dtype=np.float32)) for b in (1, 5)]
    monkeypatch.setattr(parallel, "POOL", parallel.Pool(1))
    alone = Executor(m.spec, m._buf, "lazy", programs=False)
    want = [alone.run_all_exits(x) for x in xs]
    monkeypatch.setattr(parallel, "POOL", parallel.Pool(threads))
    if parallel.POOL.threads != threads:
        pytest.skip("BLAS threads cannot be set here (escepe_rt.parallel keeps one thread)")
    prog = Executor(m.spec, m._buf, "lazy")
    assert prog.program_unavailable is None
    before = spinpool.TEAM._seq
    for _ in range(3):
        for x, w in zip(xs, want):
            for a, b in zip(prog.run_all_exits(x), w):
                np.testing.assert_array_equal(a, b)
    assert spinpool.TEAM._seq > before  # convs were shared
    assert sum(t.is_alive() for t in spinpool.TEAM._threads) >= threads - 1
