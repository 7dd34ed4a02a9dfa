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
    (1, 5, 13, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # rows of 13: 8 + 4 + a 1-pixel tail
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
    """Every conv cut into chunks (shared with 1 spinning worker on 2 threads, 3 on 4),
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


def _bordered(a: np.ndarray, b: int, fill: float = 0.0) -> np.ndarray:
    """a (N, H, W, C) inside a border of b pixels holding `fill`."""
    n, h, w, c = a.shape
    out = np.full((n, h + 2 * b, w + 2 * b, c), fill, dtype=np.float32)
    out[:, b : b + h, b : b + w] = a
    return out


@pytest.mark.parametrize("b_out", [0, 1, 2])
@pytest.mark.parametrize("split", ["whole", "chunks", "pair"])
@pytest.mark.parametrize("case", [c for c in DIRECT_CASES if c[8][1] == 1], ids=str)
def test_direct_conv_reads_and_writes_inside_borders(case, split, b_out):
    """The section programs' layout (escepe_rt/program.py): the input read in place from inside
    a wider zero border (geom's origin), the output and residual written inside a border of
    b_out pixels (geom's pad_out) == the numpy reference, with every border left zero (partial
    panels spill whole vectors into the next pixel, which may be border)."""
    x, wt, sc, sf, res, act, ref = make_case(case, "residual_relu6", seed_offset=b_out)
    (sh, sw), (ph, pw), (dh, _) = case[6:]
    kh, kw = case[5]
    b_in = max(ph, pw) + 1  # wider than the conv needs
    xb = _bordered(x, b_in)
    origin = ((b_in - ph) * xb.shape[2] + (b_in - pw)) * xb.shape[3]
    out = _bordered(np.full(ref.shape, np.nan, np.float32), b_out)
    resb = _bordered(res, b_out)
    panels = K.prepare_conv_weight(wt, 1).panels
    cout = ref.shape[3]
    epi = K._direct_epilogue(np.ones(cout, np.float32), np.zeros(cout, np.float32), 1, 1, cout)
    args = (xb, panels, out, resb, True, epi, act, (kh, kw, sh, sw, dh, origin, b_out, 0))
    run_split(args, split, panels.shape[0], ref[..., 0].size, winograd=False)
    check_inside_border(out, b_out, ref)


def run_split(args: tuple, split: str, blocks: int, units: int, winograd: bool) -> None:
    """A conv (microkernel.conv_range's arguments without the ranges) run whole, in chunks in
    reverse order, or shared with the spinning worker ("whole", "chunks", "pair")."""
    from escepe_rt import microkernel, spinpool

    if split == "whole":
        microkernel.conv_range(*args, 0, blocks, 0, units)
        return
    by_blocks, step, n = microkernel.split(blocks, units, 4, winograd)
    if split == "pair":
        assert spinpool.TEAM.run(args, by_blocks, step, units, n)
    else:
        for i in reversed(range(n)):  # another order than the pair's
            microkernel.conv_chunk(*args, by_blocks, step, units, i)


def check_inside_border(out: np.ndarray, b_out: int, ref: np.ndarray) -> None:
    """out's interior == ref, and its border of b_out pixels left zero."""
    inner = out[:, b_out : out.shape[1] - b_out, b_out : out.shape[2] - b_out]
    np.testing.assert_allclose(inner, ref, rtol=0, atol=2e-5 * max(1.0, float(np.abs(ref).max())))
    border = out.copy()
    border[:, b_out : out.shape[1] - b_out, b_out : out.shape[2] - b_out] = 0.0
    assert not border.any(), "a conv wrote into its output's border"


_NARROW_CHILD = """
import sys
import numpy as np
from escepe_rt import kernels as K, vector_ir
assert not vector_ir.WIDE_TILES
sys.path.insert(0, sys.argv[2])
from test_direct_conv import narrow_cases
np.savez(sys.argv[1], *narrow_cases())
"""


def narrow_cases() -> list[np.ndarray]:
    """Convs of every tile kind with tails of 1-7 pixels: float32 and float16 panels, a
    partial channel block, half-width tiles, Winograd; residual + relu6."""
    rng = np.random.default_rng(42)
    outs = []
    for cin, cout, h, w, f16, wino in [
        (16, 64, 9, 11, False, False),
        (16, 32, 7, 13, True, False),
        (8, 24, 5, 9, False, False),
        (16, 8, 6, 7, False, False),
        (16, 32, 10, 9, False, True),
    ]:
        x = rng.standard_normal((2, h, w, cin), dtype=np.float32)
        wt = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32)
        if f16:
            wt = wt.astype(np.float16).astype(np.float32)
        cw = K.prepare_conv_weight(wt, 1, wino, f16)
        res = rng.standard_normal((2, h, w, cout), dtype=np.float32)
        sc = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        sf = rng.standard_normal(cout).astype(np.float32)
        run = K.make_conv(cw, sc, sf, 1, 1, 1, K.ACT_RELU6)
        outs.append(run(x, res).copy())
    return outs


def test_four_pixel_tiles_only_give_the_same_floats(tmp_path):
    """ESCEPE_WIDE_TILES=0 (a fresh process: the tile width is fixed when the kernels compile)
    runs every conv on the 4-pixel tiles: each output's reduction order is the same, so the
    results equal the default's bit for bit."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ESCEPE_WIDE_TILES="0", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "narrow.npz"
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run(
        [sys.executable, "-c", _NARROW_CHILD, str(out), here],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    narrow = np.load(out)
    wide = narrow_cases()
    assert len(narrow.files) == len(wide)
    for i, got in enumerate(wide):
        np.testing.assert_array_equal(narrow[f"arr_{i}"], got)
