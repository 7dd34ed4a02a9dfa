"""Bad and unusual inputs to predict / run_all_exits: a clear ValueError or the right answer.

Policy (documented in escepe_rt.load and Model.predict): float32 NCHW of the model's
shape with any strides; N = 0 gives empty results; a NaN or inf anywhere refuses the
whole batch with a ValueError naming the first bad sample; big batches run in chunks
so memory beyond the input and the results does not grow with N.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import escepe_rt
from escepe_rt.executor import CHUNK

GOLDEN = sorted((Path(__file__).resolve().parent / "golden").glob("tiny_v*.escepe"))[-1]


@pytest.fixture(scope="module")
def model() -> escepe_rt.Model:
    return escepe_rt.load(GOLDEN)


def _batch(model, n: int, seed: int = 0) -> np.ndarray:
    shape = (n, *model.input_shape)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("method", ["predict", "run_all_exits"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, 7, CHUNK + 3], ids=["first", "7", "second-chunk"])
def test_non_finite_input_names_the_first_bad_sample(model, method, bad, where):
    x = _batch(model, CHUNK + 10)
    x[where, 0, 1, 2] = bad
    x[where + 5, 0, 0, 0] = np.nan  # a later bad sample is not the one named
    with pytest.raises(ValueError, match=rf"input sample {where} holds NaN or inf"):
        getattr(model, method)(x)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float16, np.int32, np.uint8, bool, ">f4"], ids=str
)
def test_other_dtypes_are_refused(model, dtype):
    x = _batch(model, 2).astype(dtype)
    with pytest.raises(ValueError, match="expected float32 input"):
        model.predict(x)


@pytest.mark.parametrize(
    "shape",
    [(), (8,), (1, 8, 8), (2, 1, 8), (2, 1, 8, 8, 1), (2, 2, 8, 8), (2, 1, 8, 9), (2, 1, 0, 8)],
    ids=str,
)
def test_wrong_shapes_are_refused_with_the_expected_shape(model, shape):
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, 8, 8\)"):
        model.run_all_exits(np.zeros(shape, np.float32))


def test_not_an_array_is_refused(model):
    with pytest.raises(ValueError, match="numpy array"):
        model.predict(_batch(model, 2).tolist())


@pytest.mark.parametrize("layout", ["fortran", "reversed", "broadcast", "readonly", "strided"])
def test_any_strides_give_the_contiguous_answer(model, layout):
    x = _batch(model, 9)
    view = {
        "fortran": lambda: np.asfortranarray(x),
        "reversed": lambda: x[::-1],
        "broadcast": lambda: np.broadcast_to(x[:1], x.shape),
        "readonly": lambda: np.frombuffer(x.tobytes(), np.float32).reshape(x.shape),
        "strided": lambda: np.repeat(x, 2, axis=0)[::2],
    }[layout]()
    want = model.run_all_exits(np.ascontiguousarray(view))
    got = model.run_all_exits(view)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(
        model.predict(view).logits, model.predict(np.ascontiguousarray(view)).logits
    )


def test_empty_batch_gives_empty_results(model):
    x = np.zeros((0, *model.input_shape), np.float32)
    p = model.predict(x)
    k = model.num_classes
    assert p.labels.shape == p.exit_index.shape == p.confidence.shape == (0,)
    assert p.logits.shape == (0, k) and p.logits.dtype == np.float32
    assert [a.shape for a in model.run_all_exits(x)] == [(0, k)] * len(model.spec.exits)


@pytest.mark.parametrize("method", ["predict", "run_all_exits"])
def test_memory_of_a_big_batch_does_not_grow_with_the_batch(model, method):
    """40,000 samples: numpy allocations peak well under the input's own size."""
    x = _batch(model, 40_000)
    getattr(model, method)(x[: 2 * CHUNK])  # decode weights and compile before measuring
    tracemalloc.start()
    try:
        getattr(model, method)(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = 40_000 * (model.num_classes * 4 + 8 + 8 + 4) * len(model.spec.exits)
    assert peak < x.nbytes // 2 + results, (peak, x.nbytes)


def test_first_nonfinite_row_matches_numpy():
    """The one-pass numba check == np.isfinite over every sample, for NaN, +inf and -inf
    anywhere, for C-contiguous float32 and for the fallback (strided, float64)."""
    from escepe_rt import kernels

    rng = np.random.default_rng(11)
    for trial in range(200):
        x = rng.normal(size=(int(rng.integers(1, 9)), 2, 3, 5)).astype(np.float32)
        x *= np.float32(10.0 ** rng.integers(-3, 38))  # huge finite values stay finite
        for _ in range(int(rng.integers(0, 3))):
            x.flat[int(rng.integers(x.size))] = rng.choice([np.nan, np.inf, -np.inf])
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        want = -1 if finite.all() else int(np.argmin(finite))
        assert kernels.first_nonfinite_row(x) == want, trial
        assert kernels.first_nonfinite_row(x.astype(np.float64)) == want
        view = x[:, :, :, ::2]
        finite = np.isfinite(view).reshape(len(x), -1).all(axis=1)
        assert kernels.first_nonfinite_row(view) == (-1 if finite.all() else int(np.argmin(finite)))


def test_max_softmax_is_bit_identical_to_the_numpy_expression():
    """The numba confidence == 1 / sum(exp(z - max z)) in float64 (the expression the exit
    thresholds were calibrated with before), NaN for rows with NaN or inf."""
    from escepe_rt import kernels

    def numpy_max_softmax(z):
        z = z.astype(np.float64)
        with np.errstate(all="ignore"):
            return (1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)).astype(np.float32)

    rng = np.random.default_rng(12)
    for k in (1, 2, 10, 1000):
        for scale in (1.0, 30.0, 1e4):
            z = (rng.standard_normal((300, k)) * scale).astype(np.float32)
            np.testing.assert_array_equal(kernels.max_softmax(z), numpy_max_softmax(z))
    z = np.array(
        [[np.nan, 1, 2], [np.inf, 1, 2], [-np.inf, 1, 2], [np.inf, np.inf, 0], [-np.inf] * 3],
        np.float32,
    )
    np.testing.assert_array_equal(kernels.max_softmax(z), numpy_max_softmax(z))
