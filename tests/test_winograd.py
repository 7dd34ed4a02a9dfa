"""Winograd F(2x2, 3x3) convs (escepe_rt/winograd.py, microkernel.conv_winograd) against the
plain float64 numpy conv, without torch (the arm64 check runs them too): the weight transform,
odd map sizes (edge tiles), paddings 0-2, borders on both sides (section programs), every way of
cutting a conv between threads, and the step lists / executor choosing it."""

from __future__ import annotations

import numpy as np
import pytest
from test_direct_conv import _bordered, check_inside_border, make_case, run_split

from escepe_rt import kernels as K
from escepe_rt import microkernel, parallel, winograd

WINOGRAD_CASES = [
    # (n, h, w, cin, cout, (kh, kw), stride, padding, dilation): 3x3, stride 1
    (1, 28, 28, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 7, 7, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # odd: edge tiles on both sides
    (1, 5, 9, 16, 32, (3, 3), (1, 1), (0, 0), (1, 1)),  # valid conv, 3x7 out
    (3, 8, 8, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 1, 1, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # one pixel
    (1, 3, 2, 16, 16, (3, 3), (1, 1), (2, 2), (1, 1)),  # padding 2: 5x4 out
    (1, 4, 4, 128, 256, (3, 3), (1, 1), (1, 1), (1, 1)),  # more channel blocks than tiles
    (2, 13, 6, 16, 48, (3, 3), (1, 1), (1, 1), (1, 1)),  # 7x3 tiles per image
    (1, 6, 6, 256, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # long reduction
    (2, 9, 6, 16, 16, (3, 3), (1, 1), (1, 0), (1, 1)),  # asymmetric padding: 9x4 out
    (1, 5, 8, 32, 16, (3, 3), (1, 1), (0, 2), (1, 1)),  # 3x10 out
]
EPILOGUES = ["none", "scale_shift_relu", "residual_relu6"]


def _tol(ref) -> float:
    return 2e-5 * max(1.0, float(np.abs(ref).max()))


def test_weight_transform_matches_numpy():
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((48, 32, 3, 3)).astype(np.float32)
    u = K.prepare_conv_weight(wt, 1, winograd=True).panels
    ref = np.einsum("ia,ocab,jb->ijco", winograd.G, wt.astype(np.float64), winograd.G)
    ref = ref.reshape(16, 32, 3, 16).transpose(0, 2, 1, 3).reshape(48, 32, 16)
    assert u.shape == (16 * 3, 32, 16) and u.dtype == np.float32
    np.testing.assert_allclose(u, ref, rtol=1e-6, atol=1e-6)


def test_transform_matrices_compute_the_conv():
    """A^T [(G g G^T) * (B^T d B)] A == the 2x2 valid correlation of a 4x4 tile (float64)."""
    rng = np.random.default_rng(1)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    y = winograd.AT @ ((winograd.G @ g @ winograd.G.T) * (winograd.BT @ d @ winograd.BT.T))
    y = y @ winograd.AT.T
    ref = [[(d[i : i + 3, j : j + 3] * g).sum() for j in range(2)] for i in range(2)]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_winograd_conv_matches_numpy(case, epilogue):
    x, wt, sc, sf, res, act, ref = make_case(case, epilogue)
    stride, padding, dilation = case[6:]
    prepared = K.prepare_conv_weight(wt, 1, winograd=True)
    assert prepared.winograd
    got = K.conv2d(x, prepared, sc, sf, stride, padding, dilation, act, residual=res)
    np.testing.assert_allclose(got, ref, rtol=0, atol=_tol(ref))


@pytest.mark.parametrize("b_out", [0, 1, 2])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
def test_winograd_reads_and_writes_inside_borders_whatever_the_split(case, b_out):
    """The section programs' layout: input read in place inside a wider border, output and
    residual inside a border of b_out pixels; run whole, in chunks (in another order) and
    shared with the spinning worker: each == the numpy reference, all three bit for bit equal
    (the executor's two paths rely on it), and no border written."""
    x, wt, sc, sf, res, act, ref = make_case(case, "residual_relu6", seed_offset=b_out)
    ph, pw = case[7]
    b_in = max(ph, pw) + 1
    xb = _bordered(x, b_in)
    # NaN outside the conv's padded input: an odd map's last windows read one row / column
    # past it in place, which must reach no stored output
    ring = np.ones(xb.shape[1:3], bool)
    ring[b_in - ph : xb.shape[1] - b_in + ph, b_in - pw : xb.shape[2] - b_in + pw] = False
    xb[:, ring] = np.nan
    origin = ((b_in - ph) * xb.shape[2] + (b_in - pw)) * xb.shape[3]
    resb = _bordered(res, b_out)
    u = K.prepare_conv_weight(wt, 1, winograd=True).panels
    cout = ref.shape[3]
    epi = K._direct_epilogue(np.ones(cout, np.float32), np.zeros(cout, np.float32), 1, 1, cout)
    geom = (3, 3, 1, 1, 1, origin, b_out, 1)
    blocks = cout // microkernel.LANES
    units = microkernel.work(geom, *ref.shape[:3])
    assert units == ref.shape[0] * (-(-ref.shape[1] // 2)) * (-(-ref.shape[2] // 2))
    outs = []
    for split in ("whole", "chunks", "pair"):
        out = _bordered(np.full(ref.shape, np.nan, np.float32), b_out)
        run_split((xb, u, out, resb, True, epi, act, geom), split, blocks, units, winograd=True)
        check_inside_border(out, b_out, ref)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("threads", [2, 4])
def test_winograd_shared_chunks_match_numpy(threads, monkeypatch):
    """Cut for 1 spinning worker (2 threads) or 3 (4 threads), by tiles and by channel
    blocks (few tiles), repeated (reused buffers, new job numbers)."""
    monkeypatch.setattr(parallel, "POOL", parallel.Pool(threads))
    for name in ("PARALLEL_MIN_MACS", "PAIR_MIN_MACS"):
        monkeypatch.setattr(K, name, 1)
    for case in (WINOGRAD_CASES[0], WINOGRAD_CASES[6], WINOGRAD_CASES[7]):
        x, wt, sc, sf, res, act, ref = make_case(case, "residual_relu6", seed_offset=threads)
        prepared = K.prepare_conv_weight(wt, 1, winograd=True)
        for _ in range(3):
            got = K.conv2d(x, prepared, sc, sf, 1, case[7], 1, act, residual=res)
            np.testing.assert_allclose(got, ref, rtol=0, atol=_tol(ref))


def test_winograd_only_where_it_applies(monkeypatch):
    ok = dict(cout=32, cin=16, groups=1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1))
    assert K.runs_winograd(**ok, out_hw=(4, 4))
    for change in (
        {"cout": 24},  # a partial channel block
        {"cin": 8},
        {"groups": 2},
        {"kernel": (5, 5)},
        {"kernel": (1, 1)},
        {"stride": (2, 2)},
        {"dilation": (2, 2)},
    ):
        assert not K.runs_winograd(**{**ok, **change}, out_hw=(32, 32)), change
    # big weights (16.8 MB as Winograd's): only on maps with enough tiles per sample
    big = {**ok, "cin": 512, "cout": 512}
    assert not K.runs_winograd(**big, out_hw=(8, 8))
    assert K.runs_winograd(**big, out_hw=(16, 16))
    assert K.runs_winograd(**big, out_hw=(15, 15))  # 8 x 8 tiles
    assert not K.runs_winograd(**big, out_hw=(14, 14))  # 7 x 7
    monkeypatch.setattr(K, "WINOGRAD_ALL", True)  # ESCEPE_WINOGRAD=all: batched throughput
    assert K.runs_winograd(**big, out_hw=(4, 4))
    assert not K.runs_winograd(**{**big, "stride": (2, 2)}, out_hw=(4, 4))
    monkeypatch.setattr(K, "WINOGRAD", False)  # ESCEPE_WINOGRAD=0
    assert not K.runs_winograd(**ok, out_hw=(32, 32))
    wt = np.ones((24, 16, 3, 3), np.float32)
    with pytest.raises(ValueError, match="Winograd needs a 3x3 conv"):
        K.prepare_conv_weight(wt, 1, winograd=True)
    prepared = K.prepare_conv_weight(np.ones((16, 16, 3, 3), np.float32), 1, winograd=True)
    with pytest.raises(ValueError, match="stride 1 and no dilation"):
        K.make_conv(prepared, None, None, 2, 1, 1, K.ACT_NONE)


def test_from_indices_matches_from_floats():
    """The lazy decode path (codebook indices gathered into panels, then transformed) gives
    the same Winograd weights as the float path."""
    rng = np.random.default_rng(2)
    codebook = rng.standard_normal(16).astype(np.float32)
    idx = rng.integers(0, 16, size=32 * 16 * 9, dtype=np.uint8)
    a = K.prepare_conv_weight_from_indices(idx, codebook, (32, 16, 3, 3), 1, winograd=True)
    b = K.prepare_conv_weight(codebook[idx].reshape(32, 16, 3, 3), 1, winograd=True)
    assert a.winograd and b.winograd
    assert np.array_equal(a.panels, b.panels)


def test_winograd_reference_is_not_the_direct_result():
    """The Winograd path really runs (its rounding differs from the direct kernels')."""
    case = WINOGRAD_CASES[3]
    x, wt, _, _, _, act, ref = make_case(case, "none")
    direct = K.conv2d(x, K.prepare_conv_weight(wt, 1), None, None, 1, 1, 1, act)
    wino = K.conv2d(x, K.prepare_conv_weight(wt, 1, winograd=True), None, None, 1, 1, 1, act)
    assert not np.array_equal(direct, wino)
    np.testing.assert_allclose(wino, direct, rtol=0, atol=_tol(ref))
