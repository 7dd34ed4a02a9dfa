"""Direct micro-kernel convs against a plain float64 numpy conv, without torch (so that the
arm64 check, tools/arm64-check.sh, runs them too: the LLVM-IR tiles, partial channel panels
and the spinning worker's chunks on aarch64). tests/test_kernels.py runs the same cases
against torch and against the im2col path."""

from __future__ import annotations

import numpy as np
import pytest

from escepe_rt import kernels as K
from escepe_rt import parallel

DIRECT_CASES = [
    # (n, h, w, cin, cout, (kh, kw), stride, padding, dilation)
    (1, 28, 28, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 7, 9, 5, 32, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 4, 4, 64, 128, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 8, 8, 16, 48, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 9, 7, 3, 16, (5, 5), (2, 2), (2, 2), (1, 1)),
    (1, 8, 8, 8, 16, (3, 3), (1, 1), (2, 2), (2, 1)),  # height dilation: direct
    (1, 8, 8, 8, 16, (3, 3), (1, 1), (2, 2), (1, 2)),  # width dilation: im2col on panels
    (2, 6, 11, 4, 16, (1, 3), (1, 2), (0, 1), (1, 1)),
    (1, 1, 1, 7, 32, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 5, 13, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # 13 = 8 + 4 + 1 pixel tiles
    # Cout not a multiple of 16: a zero-padded last panel computed through a scratch tile
    (1, 28, 28, 16, 8, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 14, 14, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 5, 13, 6, 24, (3, 3), (1, 1), (1, 1), (1, 1)),  # one full + one partial panel
    (1, 3, 3, 8, 40, (3, 3), (2, 2), (1, 1), (1, 1)),  # 4 pixels: one 4-pixel tile
    (1, 7, 7, 4, 9, (1, 3), (1, 1), (0, 1), (1, 1)),
    # wide inputs: long reductions, many pixels
    (1, 20, 20, 256, 32, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 18, 18, 256, 8, (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, 10, 10, 512, 24, (1, 1), (1, 1), (0, 0), (1, 1)),
]
EPILOGUES = ["none", "scale_shift_relu", "residual_relu6"]


def conv_reference(x, w, stride, padding, dilation) -> np.ndarray:
    """NHWC x, OIHW w -> NHWC, in float64: one matmul per kernel tap over strided views."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, h, wd, _ = x.shape
    cout, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, ho, wo, cout))
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            patch = xp[:, y0 : y0 + sh * (ho - 1) + 1 : sh, x0 : x0 + sw * (wo - 1) + 1 : sw]
            out += patch @ w[:, :, ky, kx].astype(np.float64).T
    return out


def make_case(case, epilogue, seed_offset=0):
    """(x, prepared weight, scale, shift, residual, act, float64 reference)."""
    n, h, w, cin, cout, k, stride, padding, dilation = case
    rng = np.random.default_rng(sum(case[:5]) + len(epilogue) + seed_offset)
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    # Kaiming-scaled weights: outputs stay O(1) for every reduction length (up to 2304 here),
    # so one absolute tolerance fits every case
    wt = (rng.standard_normal((cout, cin, *k)) / np.sqrt(cin * k[0] * k[1])).astype(np.float32)
    ref = conv_reference(x, wt, stride, padding, dilation)
    sc = sf = res = None
    act = K.ACT_NONE
    if epilogue == "scale_shift_relu":
        sc = rng.random(cout, dtype=np.float32) + 0.5
        sf = rng.standard_normal(cout, dtype=np.float32)
        ref, act = np.maximum(ref * sc + sf, 0.0), K.ACT_RELU
    elif epilogue == "residual_relu6":
        res = rng.standard_normal(ref.shape, dtype=np.float32)
        ref, act = np.clip(ref + res, 0.0, 6.0), K.ACT_RELU6
    return x, wt, sc, sf, res, act, ref


@pytest.mark.parametrize("case", DIRECT_CASES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_direct_conv_matches_numpy(case, epilogue):
    x, wt, sc, sf, res, act, ref = make_case(case, epilogue)
    stride, padding, dilation = case[6:]
    prepared = K.prepare_conv_weight(wt, 1)
    assert prepared.panels is not None
    got = K.conv2d(x, prepared, sc, sf, stride, padding, dilation, act, residual=res)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("case", DIRECT_CASES[10:], ids=str)
def test_direct_conv_shared_chunks_match_numpy(case, threads, monkeypatch):
    """Every conv cut into chunks (the spinning worker on 2 threads, the Python pool on 4),
    including the partial panels, == the numpy reference."""
    monkeypatch.setattr(parallel, "POOL", parallel.Pool(threads))
    for name in ("PARALLEL_MIN_MACS", "PAIR_MIN_MACS"):
        monkeypatch.setattr(K, name, 1)
    x, wt, sc, sf, res, act, ref = make_case(case, "residual_relu6", seed_offset=threads)
    stride, padding, dilation = case[6:]
    prepared = K.prepare_conv_weight(wt, 1)
    for _ in range(3):  # repeated: reused buffers, new job sequence numbers
        got = K.conv2d(x, prepared, sc, sf, stride, padding, dilation, act, residual=res)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * max(1.0, float(np.abs(ref).max())))
