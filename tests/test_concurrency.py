"""predict() from many threads on one Model, and very large batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import escepe_rt

GOLDEN = sorted((Path(__file__).resolve().parent / "golden").glob("tiny_v*.escepe"))[-1]


def test_eight_threads_give_the_sequential_answers():
    m = escepe_rt.load(GOLDEN, decode="lazy")  # lazy: threads race to decode sections too
    rng = np.random.default_rng(0)
    batches = [
        rng.normal(size=(int(rng.integers(1, 40)), 1, 8, 8)).astype(np.float32) for _ in range(64)
    ]
    sequential = [escepe_rt.load(GOLDEN).predict(b) for b in batches]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(m.predict, batches))
    for s, t in zip(sequential, threaded):
        np.testing.assert_array_equal(s.labels, t.labels)
        np.testing.assert_array_equal(s.exit_index, t.exit_index)
        np.testing.assert_array_equal(s.logits, t.logits)


def test_batch_of_ten_thousand_equals_small_batches():
    m = escepe_rt.load(GOLDEN)
    x = np.random.default_rng(1).normal(size=(10_000, 1, 8, 8)).astype(np.float32)
    big = m.predict(x)
    parts = [m.predict(x[i : i + 97]) for i in range(0, len(x), 97)]
    np.testing.assert_array_equal(big.labels, np.concatenate([p.labels for p in parts]))
    np.testing.assert_array_equal(big.exit_index, np.concatenate([p.exit_index for p in parts]))
    np.testing.assert_allclose(big.logits, np.concatenate([p.logits for p in parts]), atol=1e-5)


def test_non_contiguous_input_gives_the_contiguous_answer():
    m = escepe_rt.load(GOLDEN)
    x = np.random.default_rng(2).normal(size=(6, 1, 8, 16)).astype(np.float32)
    view = x[:, :, :, ::2]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(
        m.predict(view).logits, m.predict(np.ascontiguousarray(view)).logits
    )


def test_results_held_across_calls_are_never_overwritten():
    """Convs reuse their buffers between calls (kernels._Reused): every array a call returned
    stays as it was while the next calls run, batch 1 and bigger, Fashion model and golden."""
    example = Path(__file__).resolve().parent.parent / "examples/fashion_resnet18.escepe"
    for path in (example, GOLDEN):
        m = escepe_rt.load(path)
        rng = np.random.default_rng(3)
        xs = [rng.normal(size=(n, *m.input_shape)).astype(np.float32) for n in (1, 1, 3, 1)]
        held = [(m.run_all_exits(x), m.predict(x)) for x in xs]
        for x, (exits, pred) in zip(xs, held):
            again = escepe_rt.load(path)
            for a, b in zip(exits, again.run_all_exits(x)):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(pred.logits, again.predict(x).logits)
