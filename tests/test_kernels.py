"""Differential tests of escepe_rt.kernels against torch.nn.functional (NCHW reference)."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_direct_conv import DIRECT_CASES, make_case  # noqa: E402
from test_direct_conv import EPILOGUES as DIRECT_EPILOGUES  # noqa: E402

F = torch.nn.functional

from escepe_rt import kernels as K  # noqa: E402

torch.set_num_threads(1)


def _seeded(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def torch_act(t: torch.Tensor, act: int) -> torch.Tensor:
    if act == K.ACT_RELU:
        return F.relu(t)
    if act == K.ACT_RELU6:
        return F.relu6(t)
    return t


def assert_close(got: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> None:
    ref = np.asarray(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert got.dtype == np.float32
    assert np.isfinite(got).all() == np.isfinite(ref).all()
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol * scale:.3g}"


# ----------------------------------------------------------------------------------------------
# conv2d
# ----------------------------------------------------------------------------------------------

SPATIAL = [(7, 9), (28, 28), (32, 32), (9, 7)]
GROUPINGS = ["1", "2", "dw", "dw2"]
ACTS = [K.ACT_NONE, K.ACT_RELU, K.ACT_RELU6]
EPILOGUES = ["none", "bias", "bn", "bias+bn"]


def _conv_ok(hw, k, s, p, d) -> bool:
    return all(
        (n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 >= 1 for n, kk, ss, pp, dd in zip(hw, k, s, p, d)
    )


def _geometry_cases():
    """Every kernel x stride x padding x dilation x grouping; epilogue, activation, batch and
    spatial size cycle through with co-prime periods so they are not tied to one geometry."""
    cases = []
    kernels = [(1, 1), (3, 3), (5, 5), (7, 7), (1, 3), (3, 1)]
    paddings = [(0, 0), (1, 1), (2, 2), (0, 1)]
    grid = itertools.product(kernels, [1, 2], paddings, [1, 2], GROUPINGS)
    for i, (k, s, p, d, g) in enumerate(grid):
        stride, dil = (s, s), (d, d)
        epi, act = EPILOGUES[(i // 3) % 4], ACTS[i % 3]
        n = 7 if i % 5 == 0 else 1
        hw = SPATIAL[(i // 7) % len(SPATIAL)]
        if n == 7:
            hw = (7, 9) if i % 2 else (9, 7)
        if not _conv_ok(hw, k, stride, p, dil):
            hw = (28, 28) if n == 1 else (15, 13)
        cases.append(
            pytest.param(
                n,
                hw,
                k,
                stride,
                p,
                dil,
                g,
                epi,
                act,
                id=f"k{k[0]}x{k[1]}-s{s}-p{p[0]}{p[1]}-d{d}-{g}-n{n}-{hw[0]}x{hw[1]}-{epi}-a{act}",
            )
        )
    return cases


def _feature_cases():
    """Every grouping x epilogue x activation x batch, on a few geometries."""
    cases = []
    geoms = [
        ((3, 3), (1, 1), (1, 1), (1, 1)),
        ((3, 3), (2, 2), (1, 1), (1, 1)),
        ((1, 1), (1, 1), (0, 0), (1, 1)),
        ((5, 5), (1, 1), (2, 2), (2, 2)),
    ]
    for i, (g, epi, act, n) in enumerate(itertools.product(GROUPINGS, EPILOGUES, ACTS, [1, 7])):
        k, s, p, d = geoms[(i + i // 6) % len(geoms)]
        hw = (7, 9) if n == 7 else SPATIAL[i % len(SPATIAL)]
        cases.append(
            pytest.param(n, hw, k, s, p, d, g, epi, act, id=f"{g}-{epi}-a{act}-n{n}-k{k[0]}")
        )
    return cases


def _run_conv_case(n, hw, k, stride, padding, dilation, grouping, epi, act, cin=4, seed=0):
    rng = _seeded(seed)
    if grouping == "1":
        groups, cout = 1, 6
    elif grouping == "2":
        groups, cout = 2, 6
    elif grouping == "dw":
        groups, cout = cin, cin
    else:  # depthwise with channel multiplier 2
        groups, cout = cin, 2 * cin
    x = rng.standard_normal((n, *hw, cin), dtype=np.float32)
    w = rng.standard_normal((cout, cin // groups, *k), dtype=np.float32) * 0.5
    bias = rng.standard_normal(cout, dtype=np.float32) if "bias" in epi else None

    ref = F.conv2d(
        nhwc_to_nchw(x),
        torch.from_numpy(w),
        None if bias is None else torch.from_numpy(bias),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    scale = shift = None
    if "bn" in epi:
        gamma = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        beta = rng.standard_normal(cout, dtype=np.float32)
        mean = rng.standard_normal(cout, dtype=np.float32)
        var = rng.uniform(0.5, 2.0, cout).astype(np.float32)
        eps = 1e-5
        ref = F.batch_norm(
            ref,
            torch.from_numpy(mean),
            torch.from_numpy(var),
            torch.from_numpy(gamma),
            torch.from_numpy(beta),
            False,
            0.0,
            eps,
        )
        scale = (gamma / np.sqrt(var + eps)).astype(np.float32)
        shift = (beta - mean * scale).astype(np.float32)
        if bias is not None:
            shift = (shift + bias * scale).astype(np.float32)
    elif bias is not None:
        shift = bias
    ref = nchw_to_nhwc(torch_act(ref, act))

    cw = K.prepare_conv_weight(w, groups)
    assert (cw.Cout, cw.Cin, cw.kh, cw.kw, cw.groups) == (cout, cin, k[0], k[1], groups)
    got = K.conv2d(x, cw, scale, shift, stride, padding, dilation, act)
    assert_close(got, ref)


@pytest.mark.parametrize(
    "n,hw,k,stride,padding,dilation,grouping,epi,act", _geometry_cases() + _feature_cases()
)
def test_conv2d(n, hw, k, stride, padding, dilation, grouping, epi, act):
    _run_conv_case(n, hw, k, stride, padding, dilation, grouping, epi, act)


@pytest.mark.parametrize(
    "cin,cout,groups,k,stride,padding,dilation",
    [
        (3, 16, 1, (3, 3), (2, 2), (1, 1), (1, 1)),  # stem conv, RGB input
        (8, 16, 4, (3, 3), (1, 1), (1, 1), (1, 1)),  # ResNeXt-style grouped conv
        (8, 8, 4, (1, 1), (1, 1), (0, 0), (1, 1)),  # grouped pointwise (ShuffleNet)
        (16, 8, 1, (1, 1), (1, 1), (0, 0), (1, 1)),  # pointwise fast path
        (8, 12, 1, (1, 1), (2, 2), (0, 0), (1, 1)),  # strided pointwise (ResNet downsample)
        (8, 24, 8, (3, 3), (2, 2), (1, 1), (1, 1)),  # depthwise multiplier 3, strided
        (1, 4, 1, (3, 3), (1, 1), (1, 1), (1, 1)),  # single input channel
        (6, 6, 6, (3, 5), (1, 2), (1, 2), (2, 1)),  # depthwise, non-square everything
        (6, 12, 6, (5, 3), (2, 1), (2, 0), (1, 3)),  # depthwise x2, non-square everything
        (4, 6, 1, (3, 5), (1, 2), (2, 1), (2, 1)),  # general, non-square everything
        (4, 6, 2, (5, 3), (2, 1), (0, 2), (1, 2)),  # grouped, non-square everything
    ],
)
def test_conv2d_shapes(cin, cout, groups, k, stride, padding, dilation):
    rng = _seeded(cin * 100 + cout + groups + k[0] * k[1])
    x = rng.standard_normal((2, 11, 13, cin), dtype=np.float32)
    w = rng.standard_normal((cout, cin // groups, *k), dtype=np.float32)
    b = rng.standard_normal(cout, dtype=np.float32)
    ref = F.conv2d(
        nhwc_to_nchw(x),
        torch.from_numpy(w),
        torch.from_numpy(b),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    cw = K.prepare_conv_weight(w, groups)
    got = K.conv2d(x, cw, None, b, stride, padding, dilation, K.ACT_NONE)
    assert_close(got, nchw_to_nhwc(ref))


def test_conv2d_non_contiguous_input_and_reuse():
    rng = _seeded(3)
    x = rng.standard_normal((2, 4, 9, 10), dtype=np.float32).transpose(0, 2, 3, 1)  # NHWC view
    w = rng.standard_normal((5, 4, 3, 3), dtype=np.float32)
    cw = K.prepare_conv_weight(w, 1)
    ref = nchw_to_nhwc(F.conv2d(nhwc_to_nchw(x), torch.from_numpy(w), padding=1))
    for _ in range(2):
        out = K.conv2d(x, cw, None, None, (1, 1), (1, 1), (1, 1), K.ACT_NONE)
        assert out.flags.c_contiguous
        assert_close(out, ref)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("k,stride,padding", [((3, 3), 1, 1), ((1, 1), 1, 0), ((1, 1), 2, 0)])
@pytest.mark.parametrize("block_bytes", [None, 1000])
def test_conv2d_fused_residual_matches_torch(act, k, stride, padding, block_bytes, monkeypatch):
    """act(bn(conv(x)) + residual): the epilogue the executor fuses a residual ADD into; with a
    tiny COL_BLOCK_BYTES the im2col/sgemm/epilogue run in many row blocks."""
    if block_bytes is not None:
        monkeypatch.setattr(K, "COL_BLOCK_BYTES", block_bytes)
    rng = _seeded(act * 10 + k[0] + stride)
    n, cin, cout = 3, 5, 7
    x = rng.standard_normal((n, 9, 11, cin), dtype=np.float32)
    w = rng.standard_normal((cout, cin, *k), dtype=np.float32) * 0.5
    scale = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    shift = rng.standard_normal(cout, dtype=np.float32)
    conv = F.conv2d(nhwc_to_nchw(x), torch.from_numpy(w), stride=stride, padding=padding)
    res = rng.standard_normal(tuple(conv.permute(0, 2, 3, 1).shape), dtype=np.float32)
    ref = conv * torch.from_numpy(scale).reshape(1, -1, 1, 1)
    ref = ref + torch.from_numpy(shift).reshape(1, -1, 1, 1) + nhwc_to_nchw(res)
    ref = nchw_to_nhwc(torch_act(ref, act))
    cw = K.prepare_conv_weight(w, 1)
    got = K.conv2d(x, cw, scale, shift, (stride,) * 2, (padding,) * 2, (1, 1), act, residual=res)
    assert_close(got, ref)
    # the plain path: conv, then a separate add + activation
    plain = K.add(K.conv2d(x, cw, scale, shift, stride, padding, 1, K.ACT_NONE), res, act)
    assert_close(got, plain, tol=1e-6)


def test_conv2d_blocks_equal_one_block(monkeypatch):
    rng = _seeded(21)
    x = rng.standard_normal((4, 13, 10, 6), dtype=np.float32)
    cw = K.prepare_conv_weight(rng.standard_normal((8, 6, 3, 3), dtype=np.float32), 1)
    one = K.conv2d(x, cw, None, None, (1, 1), (1, 1), (1, 1), K.ACT_RELU)
    for block_bytes in (4 * 54, 4 * 54 * 7, 4 * 54 * 130):  # 1, 7 and 130 rows per block
        monkeypatch.setattr(K, "COL_BLOCK_BYTES", block_bytes)
        got = K.conv2d(x, cw, None, None, (1, 1), (1, 1), (1, 1), K.ACT_RELU)
        assert_close(got, one, tol=1e-6)  # BLAS may sum in another order for another M


@pytest.mark.parametrize("hw", [(12, 12), (2, 3)])  # row chunks; few pixels: channel chunks
@pytest.mark.parametrize("k,padding", [(3, 1), (1, 0)])
@pytest.mark.parametrize("residual", [False, True])
def test_conv2d_parallel_chunks_match_torch(hw, k, padding, residual, monkeypatch):
    """escepe_rt.parallel: a conv cut into row or output-channel chunks on 3 threads."""
    from escepe_rt import parallel

    monkeypatch.setattr(parallel, "POOL", parallel.Pool(3))
    monkeypatch.setattr(K, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(K, "PARALLEL_MIN_ROWS", 8)
    monkeypatch.setattr(K, "COL_BLOCK_BYTES", 4 * k * k * 6 * 5)  # 5 rows per im2col block
    rng = _seeded(hw[0] + k + residual)
    n, cin, cout = 2, 6, 80
    x = rng.standard_normal((n, *hw, cin), dtype=np.float32)
    w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * 0.5
    scale = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    shift = rng.standard_normal(cout, dtype=np.float32)
    conv = F.conv2d(nhwc_to_nchw(x), torch.from_numpy(w), padding=padding)
    ref = conv * torch.from_numpy(scale).reshape(1, -1, 1, 1)
    ref = ref + torch.from_numpy(shift).reshape(1, -1, 1, 1)
    res = None
    if residual:
        res = rng.standard_normal(tuple(conv.permute(0, 2, 3, 1).shape), dtype=np.float32)
        ref = ref + nhwc_to_nchw(res)
    ref = nchw_to_nhwc(F.relu(ref))
    cw = K.prepare_conv_weight(w, 1)
    for _ in range(3):  # the same answer every time, whichever thread took which chunk
        got = K.conv2d(x, cw, scale, shift, 1, padding, 1, K.ACT_RELU, residual=res)
        assert_close(got, ref)


def test_concurrent_convs_share_the_pool_safely(monkeypatch):
    """Several threads run chunked convs at once on one 2-worker pool: every answer equals
    the one computed alone (no shared scratch buffer, no lost chunk)."""
    from concurrent.futures import ThreadPoolExecutor

    from escepe_rt import parallel

    monkeypatch.setattr(parallel, "POOL", parallel.Pool(3))
    monkeypatch.setattr(K, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(K, "PARALLEL_MIN_ROWS", 4)
    rng = _seeded(31)
    cw = K.prepare_conv_weight(rng.standard_normal((24, 8, 3, 3), dtype=np.float32), 1)
    xs = [rng.standard_normal((2, 9, 9 + i % 3, 8), dtype=np.float32) for i in range(12)]
    alone = [K.conv2d(x, cw, None, None, 1, 1, 1, K.ACT_RELU) for x in xs]
    with ThreadPoolExecutor(6) as ex:
        for _ in range(3):
            got = list(ex.map(lambda x: K.conv2d(x, cw, None, None, 1, 1, 1, K.ACT_RELU), xs))
            for a, b in zip(got, alone):
                np.testing.assert_array_equal(a, b)


def test_pool_runs_every_chunk_once_and_reraises():
    from escepe_rt import parallel

    pool = parallel.Pool(3)
    seen = []
    pool.run(seen.append, 50)
    assert sorted(seen) == list(range(50))

    def boom(i):
        if i == 7:
            raise RuntimeError("chunk 7")

    with pytest.raises(RuntimeError, match="chunk 7"):
        pool.run(boom, 20)
    blas = pool._blas
    if pool.threads > 1 and blas is not None and blas.get is not None:
        before = blas.get()
        with pool.blas_single_threaded():
            with pool.blas_single_threaded():  # nested / concurrent predicts: counted
                assert blas.get() == 1
            assert blas.get() == 1
        assert blas.get() == before


def test_make_conv_reuses_validation_across_shapes():
    rng = _seeded(22)
    w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    cw = K.prepare_conv_weight(w, 1)
    run = K.make_conv(cw, None, None, (2, 2), (1, 1), (1, 1), K.ACT_NONE)
    for shape in [(1, 8, 8, 3), (5, 7, 9, 3), (2, 8, 8, 3)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        ref = F.conv2d(nhwc_to_nchw(x), torch.from_numpy(w), stride=2, padding=1)
        assert_close(run(x), nchw_to_nhwc(ref))
    with pytest.raises(ValueError):
        run(np.zeros((1, 8, 8, 3), np.float32), residual=np.zeros((1, 8, 8, 4), np.float32))
    dw = K.make_conv(K.prepare_conv_weight(w[:3, :1], 3), None, None, 1, 1, 1, K.ACT_NONE)
    with pytest.raises(ValueError):  # a residual is fused into ungrouped convs only
        dw(np.zeros((1, 8, 8, 3), np.float32), residual=np.zeros((1, 8, 8, 3), np.float32))


def test_fused_executor_equals_plain_executor():
    """The executor's plan (residual adds folded into convs) against one step per node."""
    from pathlib import Path

    import escepe_rt
    from escepe_rt.executor import Executor

    m = escepe_rt.load(Path(__file__).resolve().parent.parent / "examples/fashion_resnet18.escepe")
    fused = Executor(m.spec, m._buf, "lazy")
    plain = Executor(m.spec, m._buf, "lazy", fuse=False)
    assert len(fused._fused) > 0  # the shipped ResNet-18 has residual adds to fold
    x = _seeded(23).standard_normal((6, *m.input_shape), dtype=np.float32)
    xh = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    for a, b in zip(fused.run_all_exits(xh), plain.run_all_exits(xh)):
        assert_close(a, b, tol=1e-6)
    pa = fused.predict(xh, [0.6] * len(m.spec.exits), m.policy)
    pb = plain.predict(xh, [0.6] * len(m.spec.exits), m.policy)
    np.testing.assert_array_equal(pa.exit_index, pb.exit_index)
    assert_close(pa.logits, pb.logits, tol=1e-6)


def test_conv2d_rejects_bad_input():
    cw = K.prepare_conv_weight(np.ones((4, 3, 3, 3), np.float32), 1)
    with pytest.raises(ValueError):
        K.conv2d(np.ones((1, 5, 5, 2), np.float32), cw, None, None, (1, 1), (0, 0), (1, 1), 0)
    with pytest.raises(ValueError):
        K.conv2d(np.ones((1, 2, 2, 3), np.float32), cw, None, None, (1, 1), (0, 0), (1, 1), 0)


# ----------------------------------------------------------------------------------------------
# linear / affine / activate / add / concat
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_linear(n, bias, bn, act):
    rng = _seeded(n * 10 + bias * 2 + bn + 100 * act)
    fi, fo = 37, 11
    x = rng.standard_normal((n, fi), dtype=np.float32)
    w = rng.standard_normal((fo, fi), dtype=np.float32)
    b = rng.standard_normal(fo, dtype=np.float32) if bias else None
    ref = F.linear(
        torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b)
    )
    scale, shift = None, b
    if bn:
        scale = rng.uniform(0.5, 2.0, fo).astype(np.float32)
        beta = rng.standard_normal(fo, dtype=np.float32)
        ref = ref * torch.from_numpy(scale) + torch.from_numpy(beta)
        shift = beta if b is None else (b * scale + beta).astype(np.float32)
    ref = torch_act(ref, act).numpy()
    wp = K.prepare_linear_weight(w)
    assert wp.shape == (fi, fo) and wp.flags.c_contiguous
    assert_close(K.linear(x, wp, scale, shift, act), ref)


@pytest.mark.parametrize("shape", [(3, 7, 9, 5), (4, 13)])
@pytest.mark.parametrize("which", ["both", "scale", "shift", "neither"])
@pytest.mark.parametrize("act", ACTS)
def test_affine_matches_batch_norm(shape, which, act):
    rng = _seeded(len(shape) * 7 + act + len(which))
    c = shape[-1]
    x = rng.standard_normal(shape, dtype=np.float32) * 4
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.standard_normal(c, dtype=np.float32)
    mean = rng.standard_normal(c, dtype=np.float32)
    var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    scale = (gamma / np.sqrt(var + 1e-5)).astype(np.float32)
    shift = (beta - mean * scale).astype(np.float32)
    xt = nhwc_to_nchw(x) if x.ndim == 4 else torch.from_numpy(x)
    if which == "both":
        ref = F.batch_norm(
            xt,
            torch.from_numpy(mean),
            torch.from_numpy(var),
            torch.from_numpy(gamma),
            torch.from_numpy(beta),
            False,
            0.0,
            1e-5,
        )
        s, t = scale, shift
    else:
        s = scale if which == "scale" else None
        t = shift if which == "shift" else None
        bshape = (1, c, 1, 1) if x.ndim == 4 else (1, c)
        ref = xt
        if s is not None:
            ref = ref * torch.from_numpy(s).reshape(bshape)
        if t is not None:
            ref = ref + torch.from_numpy(t).reshape(bshape)
    ref = torch_act(ref, act)
    ref = nchw_to_nhwc(ref) if x.ndim == 4 else ref.numpy()
    assert_close(K.affine(x, s, t, act), ref)


@pytest.mark.parametrize("act", ACTS)
def test_activate_and_add(act):
    rng = _seeded(act)
    a = rng.standard_normal((2, 5, 7, 3), dtype=np.float32) * 8
    b = rng.standard_normal((2, 5, 7, 3), dtype=np.float32) * 8
    assert_close(K.activate(a, act), torch_act(torch.from_numpy(a), act).numpy(), tol=0)
    assert_close(
        K.add(a, b, act), torch_act(torch.from_numpy(a) + torch.from_numpy(b), act).numpy(), tol=0
    )
    a2, b2 = a.reshape(10, -1), b.reshape(10, -1)
    assert_close(K.add(a2, b2, act), torch_act(torch.from_numpy(a2 + b2), act).numpy(), tol=0)
    with pytest.raises(ValueError):
        K.add(a, b[:1], act)


def test_concat_channels():
    rng = _seeded(11)
    xs = [rng.standard_normal((2, 5, 7, c), dtype=np.float32) for c in (3, 1, 4)]
    ref = torch.cat([nhwc_to_nchw(t) for t in xs], dim=1)
    assert_close(K.concat_channels(xs), nchw_to_nhwc(ref), tol=0)
    fs = [rng.standard_normal((3, f), dtype=np.float32) for f in (2, 5)]
    assert_close(
        K.concat_channels(fs), torch.cat([torch.from_numpy(t) for t in fs], 1).numpy(), tol=0
    )


# ----------------------------------------------------------------------------------------------
# pooling
# ----------------------------------------------------------------------------------------------

POOL_CASES = [
    (k, s, p, ceil) for k, s, p, ceil in itertools.product([2, 3], [1, 2], [0, 1], [False, True])
]
POOL_SIZES = [(7, 9), (6, 6), (5, 8)]


@pytest.mark.parametrize("k,s,p,ceil", POOL_CASES)
@pytest.mark.parametrize("dil", [1, 2])
def test_max_pool2d(k, s, p, ceil, dil):
    rng = _seeded(k * 1000 + s * 100 + p * 10 + ceil + 7 * dil)
    for h, w in POOL_SIZES:
        x = rng.standard_normal((2, h, w, 3), dtype=np.float32)
        ref = F.max_pool2d(nhwc_to_nchw(x), k, s, p, dil, ceil_mode=ceil)
        got = K.max_pool2d(x, (k, k), (s, s), (p, p), (dil, dil), ceil)
        assert_close(got, nchw_to_nhwc(ref), tol=0)


def test_max_pool2d_non_square_and_all_negative():
    x = -np.abs(_seeded(5).standard_normal((1, 7, 10, 4), dtype=np.float32)) - 1
    ref = F.max_pool2d(nhwc_to_nchw(x), (3, 2), (2, 3), (1, 1), (1, 2), ceil_mode=True)
    got = K.max_pool2d(x, (3, 2), (2, 3), (1, 1), (1, 2), True)
    assert_close(got, nchw_to_nhwc(ref), tol=0)  # padding must act as -inf, not 0


@pytest.mark.parametrize("k,s,p,ceil", POOL_CASES)
@pytest.mark.parametrize("cip", [False, True])
@pytest.mark.parametrize("div", [None, 3])
def test_avg_pool2d(k, s, p, ceil, cip, div):
    rng = _seeded(k * 1000 + s * 100 + p * 10 + ceil + 3 * cip + (div or 0))
    for h, w in POOL_SIZES:
        x = rng.standard_normal((2, h, w, 3), dtype=np.float32)
        ref = F.avg_pool2d(
            nhwc_to_nchw(x), k, s, p, ceil_mode=ceil, count_include_pad=cip, divisor_override=div
        )
        got = K.avg_pool2d(x, (k, k), (s, s), (p, p), ceil, cip, div)
        assert_close(got, nchw_to_nhwc(ref), tol=1e-5)


def test_avg_pool2d_non_square():
    x = _seeded(6).standard_normal((3, 9, 11, 2), dtype=np.float32)
    for ceil, cip in itertools.product([False, True], [False, True]):
        ref = F.avg_pool2d(
            nhwc_to_nchw(x), (3, 2), (2, 3), (1, 1), ceil_mode=ceil, count_include_pad=cip
        )
        got = K.avg_pool2d(x, (3, 2), (2, 3), (1, 1), ceil, cip, None)
        assert_close(got, nchw_to_nhwc(ref), tol=1e-5)


@pytest.mark.parametrize("out_size", [(1, 1), (2, 2), (3, 3), (5, 7), (7, 5)])
@pytest.mark.parametrize("hw", [(7, 9), (10, 13), (5, 7), (1, 1)])
def test_adaptive_avg_pool2d(out_size, hw):
    x = _seeded(hw[0] * 31 + hw[1]).standard_normal((2, *hw, 3), dtype=np.float32)
    ref = F.adaptive_avg_pool2d(nhwc_to_nchw(x), out_size)
    assert_close(K.adaptive_avg_pool2d(x, out_size), nchw_to_nhwc(ref), tol=1e-5)


def test_pool_output_size_matches_torch():
    """Shape formula incl. ceil_mode's 'last window starts inside input or left padding' rule."""
    checked = 0
    for n, k, s, p, d, ceil in itertools.product(
        range(1, 12), [1, 2, 3, 4], [1, 2, 3], [0, 1, 2], [1, 2], [False, True]
    ):
        if p > k // 2:
            continue
        expect = K.pool_output_size(n, k, s, p, d, ceil)
        x = torch.zeros(1, 1, n, 1)
        try:
            got = F.max_pool2d(x, (k, 1), (s, 1), (p, 0), (d, 1), ceil_mode=ceil).shape[2]
        except RuntimeError:
            assert expect < 1
            continue
        assert got == expect, (n, k, s, p, d, ceil)
        checked += 1
    assert checked > 500
    # the documented edge case: ceil would create a window starting in the right padding
    assert K.pool_output_size(5, 2, 2, 1, 1, True) == 3
    assert K.pool_output_size(6, 3, 2, 1, 1, True) == 4


def test_pool_rejects_large_padding():
    x = np.zeros((1, 5, 5, 1), np.float32)
    with pytest.raises(ValueError):
        K.max_pool2d(x, (2, 2), (2, 2), (2, 2), (1, 1), False)


# ----------------------------------------------------------------------------------------------
# flatten / heads
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 1, 1, 8), (1, 2, 2, 1)])
def test_flatten_nchw(shape):
    x = _seeded(sum(shape)).standard_normal(shape, dtype=np.float32)
    ref = torch.flatten(nhwc_to_nchw(x), 1).numpy()
    got = K.flatten_nchw(x)
    assert got.flags.c_contiguous
    assert_close(got, ref, tol=0)
    y = x.reshape(shape[0], -1)
    assert K.flatten_nchw(y) is y or np.array_equal(K.flatten_nchw(y), y)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("k", [2, 10, 1000])
def test_softmax_heads(scale, k):
    rng = _seeded(int(scale) + k)
    z = (rng.standard_normal((6, k)) * scale).astype(np.float32)
    z[0] = 0.0  # uniform row: entropy exactly 1, confidence 1/K
    z[1, :] = -1e4
    z[1, 0] = 1e4  # one-hot row: entropy 0, confidence 1
    zt = torch.from_numpy(z)
    p_ref = torch.softmax(zt.double(), 1)
    h_ref = (
        (-(p_ref * torch.log_softmax(zt.double(), 1)).nan_to_num().sum(1) / np.log(k))
        .float()
        .numpy()
    )

    p = K.softmax(z)
    assert p.dtype == np.float32 and np.isfinite(p).all()
    assert_close(p, torch.softmax(zt, 1).numpy(), tol=1e-5)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)

    c = K.max_softmax(z)
    assert c.shape == (6,) and np.isfinite(c).all()
    assert_close(c, p_ref.max(1).values.float().numpy(), tol=1e-5)
    assert abs(c[0] - 1.0 / k) < 1e-6 and abs(c[1] - 1.0) < 1e-6

    h = K.entropy(z)
    assert h.shape == (6,) and np.isfinite(h).all()
    assert (h >= 0).all() and (h <= 1).all()
    assert_close(h, h_ref, tol=1e-5)
    assert abs(h[0] - 1.0) < 1e-5 and abs(h[1]) < 1e-6


def test_entropy_single_class():
    z = np.array([[3.0], [-2.0]], np.float32)
    np.testing.assert_array_equal(K.entropy(z), [0.0, 0.0])
    np.testing.assert_array_equal(K.max_softmax(z), [1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# decode fast paths (1-bit table, 8-per-word gather) against the numpy reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k_small", [False, True])
def test_decode_packed_fast_paths_match_reference(bits, k_small):
    from escepe_rt import decode, encodings

    rng = _seeded(bits * 2 + k_small)
    k = 1 if (k_small and bits == 1) else (max(1, (1 << bits) - 3) if k_small else 1 << bits)
    for count in (0, 1, 7, 8, 9, 63, 64, 1001):
        idx = rng.integers(0, k, count)
        packed = np.frombuffer(encodings.pack_indices(idx, bits), np.uint8)
        codebook = rng.standard_normal(k).astype(np.float32)
        got = decode.decode_packed(packed, bits, count, codebook)
        np.testing.assert_array_equal(got, codebook[idx])


def test_blas_threaded_runs_convs_whole_with_the_same_answer(monkeypatch):
    """Batch 1 leaves threading to BLAS (no chunks on that thread); the answer is the same.
    (im2col + sgemm convs: direct ones call no BLAS.)"""
    from escepe_rt import parallel

    monkeypatch.setattr(K, "DIRECT_CONV", False)
    pool = parallel.Pool(3)
    monkeypatch.setattr(parallel, "POOL", pool)
    monkeypatch.setattr(K, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(K, "PARALLEL_MIN_ROWS", 4)
    rng = _seeded(41)
    cw = K.prepare_conv_weight(rng.standard_normal((24, 8, 3, 3), dtype=np.float32), 1)
    x = rng.standard_normal((1, 10, 10, 8), dtype=np.float32)
    chunks = []
    real_run = pool.run
    monkeypatch.setattr(pool, "run", lambda fn, n: (chunks.append(n), real_run(fn, n)))
    chunked = K.conv2d(x, cw, None, None, 1, 1, 1, K.ACT_RELU)
    assert chunks and pool.chunking_here()
    chunks.clear()
    with pool.blas_threaded():
        assert not pool.chunking_here()
        whole = K.conv2d(x, cw, None, None, 1, 1, 1, K.ACT_RELU)
    assert chunks == [] and pool.chunking_here()
    assert_close(whole, chunked, tol=1e-6)


# ---------------------------------------------------------------- conv weights from indices
@pytest.mark.parametrize(
    "shape,groups",
    [
        ((16, 8, 3, 3), 1),
        ((64, 64, 3, 3), 1),
        ((7, 5, 1, 1), 1),
        ((6, 3, 2, 5), 1),
        ((12, 4, 3, 3), 2),
        ((8, 2, 3, 3), 4),
        ((16, 1, 3, 3), 8),  # depthwise with channel multiplier 2
        ((8, 1, 3, 3), 8),  # depthwise
        ((1, 1, 1, 1), 1),
    ],
)
@pytest.mark.parametrize("k", [1, 4, 256])
def test_conv_weight_from_indices_equals_float_path(shape, groups, k):
    """Gathering codebook values straight into the sgemm layout == decoding to float32 in
    stored order and preparing that (bit for bit)."""
    rng = np.random.default_rng(sum(shape) * 31 + groups + k)
    codebook = rng.standard_normal(k).astype(np.float32)
    idx = rng.integers(0, k, size=int(np.prod(shape))).astype(np.uint8)
    got = K.prepare_conv_weight_from_indices(idx, codebook, shape, groups)
    want = K.prepare_conv_weight(codebook[idx].reshape(shape), groups)
    assert got[:5] == want[:5]
    for a, b in ((got.gemm, want.gemm), (got.dw, want.dw), (got.panels, want.panels)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == np.float32 and a.flags.c_contiguous and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_conv_weight_from_indices_rejects_bad_arguments():
    cb = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="uint8"):
        K.prepare_conv_weight_from_indices(np.zeros(10, np.uint8), cb, (2, 2, 3, 3), 1)
    with pytest.raises(ValueError, match="uint8"):
        K.prepare_conv_weight_from_indices(np.zeros(18, np.int64), cb, (2, 1, 3, 3), 1)
    with pytest.raises(ValueError, match="divisible"):
        K.prepare_conv_weight_from_indices(np.zeros(27, np.uint8), cb, (3, 1, 3, 3), 2)


# ---------------------------------------------------------------- direct micro-kernel convs
@pytest.mark.parametrize("case", DIRECT_CASES, ids=str)
@pytest.mark.parametrize("epilogue", DIRECT_EPILOGUES)
def test_direct_conv_matches_torch_and_the_im2col_path(case, epilogue, monkeypatch):
    """Convs on the direct micro-kernels (weights in panels) == torch, and == the same conv on
    im2col + sgemm (weights in the gemm layout), for every epilogue (cases and the float64
    numpy reference: tests/test_direct_conv.py)."""
    x, wt, sc, sf, res, act, _ = make_case(case, epilogue)
    stride, padding, dilation = case[6:]
    y = F.conv2d(nhwc_to_nchw(x), torch.from_numpy(wt), None, stride, padding, dilation)
    ref = nchw_to_nhwc(y).astype(np.float64)
    if sc is not None:
        ref = np.maximum(ref * sc + sf, 0.0)
    if res is not None:
        ref = np.clip(ref + res, 0.0, 6.0)
    direct = K.prepare_conv_weight(wt, 1)
    assert direct.panels is not None and direct.gemm is None
    got = K.conv2d(x, direct, sc, sf, stride, padding, dilation, act, residual=res)
    monkeypatch.setattr(K, "DIRECT_CONV", False)
    plain = K.prepare_conv_weight(wt, 1)
    assert plain.panels is None and plain.gemm is not None
    want = K.conv2d(x, plain, sc, sf, stride, padding, dilation, act, residual=res)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("threads", [2, 4])
def test_direct_conv_threaded_chunks_match_one_call(monkeypatch, threads):
    """A conv big enough to share (blocks or pixel runs split over threads) == one call: on 2
    threads with 1 spinning worker, on 4 with 3."""
    from escepe_rt import parallel

    monkeypatch.setattr(parallel, "POOL", parallel.Pool(threads))
    rng = np.random.default_rng(5)
    # Cout 8 and 24: partial last panels (Cout 8 stores whole vectors except at chunk ends)
    for shape, cout in (
        ((2, 16, 16, 32), 32),
        ((1, 4, 4, 64), 256),
        ((2, 16, 16, 16), 8),
        ((1, 12, 12, 8), 24),
    ):
        x = rng.standard_normal(shape, dtype=np.float32)
        cw = K.prepare_conv_weight(rng.standard_normal((cout, shape[3], 3, 3), np.float32), 1)
        for name in ("PARALLEL_MIN_MACS", "PAIR_MIN_MACS"):
            monkeypatch.setattr(K, name, 1)
        chunked = K.conv2d(x, cw, None, None, 1, 1, 1, K.ACT_RELU)
        for name in ("PARALLEL_MIN_MACS", "PAIR_MIN_MACS"):
            monkeypatch.setattr(K, name, 1 << 62)
        whole = K.conv2d(x, cw, None, None, 1, 1, 1, K.ACT_RELU)
        np.testing.assert_array_equal(chunked, whole)


# ---------------------------------------------------------------- reused conv buffers
def _reuse_conv(seed=3, cout=32, h=9):
    rng = np.random.default_rng(seed)
    cw = K.prepare_conv_weight(rng.standard_normal((cout, 8, 3, 3), dtype=np.float32), 1)
    run = K.make_conv(cw, None, None, (1, 1), (1, 1), (1, 1), K.ACT_RELU)
    xs = [rng.standard_normal((1, h, h, 8), dtype=np.float32) for _ in range(3)]
    fresh = [K.conv2d(x, cw, None, None, 1, 1, 1, K.ACT_RELU) for x in xs]  # own buffers
    return run, xs, fresh


def test_conv_reuses_its_output_only_when_nothing_holds_it():
    run, xs, fresh = _reuse_conv()
    held = run(xs[0])
    second = run(xs[1])  # `held` is alive: a new buffer
    assert second.ctypes.data != held.ctypes.data
    np.testing.assert_array_equal(held, fresh[0])
    np.testing.assert_array_equal(second, fresh[1])
    address = second.ctypes.data
    del second
    third = run(xs[2])  # nothing holds the last output: written in place
    assert third.ctypes.data == address
    np.testing.assert_array_equal(third, fresh[2])
    view = third[0, 1:]  # a view keeps its base alive
    fourth = run(xs[0])
    assert fourth.ctypes.data != address
    np.testing.assert_array_equal(view, fresh[2][0, 1:])
    np.testing.assert_array_equal(fourth, fresh[0])


def test_reused_padded_input_keeps_a_zero_border():
    """Inputs of growing magnitude through one conv, results dropped between calls (so the
    padded input and the output are reused), each against a conv with fresh buffers."""
    run, xs, fresh = _reuse_conv(seed=4)
    for _ in range(3):
        for x, want in zip(xs, fresh):
            np.testing.assert_array_equal(run(x), want)


def test_big_buffers_come_from_the_shared_set(monkeypatch):
    """Above REUSE_MAX_BYTES a conv keeps nothing of its own: buffers come from the thread's
    _BigBuffers, shared by every conv, handed out again only once nothing else holds them."""
    monkeypatch.setattr(K, "REUSE_MAX_BYTES", 1024)
    monkeypatch.setattr(K, "_BIG", K._BigBuffers())
    run, xs, fresh = _reuse_conv(seed=5)
    other, other_xs, fresh_other = _reuse_conv(seed=7)  # another conv of the same shapes
    held = run(xs[0])
    got = run(xs[1])  # `held` is alive: another buffer
    assert got.ctypes.data != held.ctypes.data
    np.testing.assert_array_equal(held, fresh[0])
    np.testing.assert_array_equal(got, fresh[1])
    address = got.ctypes.data
    del got
    shared = other(other_xs[2])  # the other conv gets the freed output buffer
    assert shared.ctypes.data == address
    np.testing.assert_array_equal(shared, fresh_other[2])
    np.testing.assert_array_equal(held, fresh[0])
    slot_bufs = [c.cell_contents for c in run.__closure__ if isinstance(c.cell_contents, K._Reused)]
    assert slot_bufs and all(s.buf is None for s in slot_bufs)
    # padded inputs are kept apart from outputs (their border must stay zero) and by padding
    keys = set(K._BIG.free)
    assert {(k[1], k[2]) for k in keys} == {(False, ()), (True, (1, 1))}
    for _ in range(3):  # outputs and padded inputs cycling through the shared buffers
        for x, want in zip(xs, fresh):
            np.testing.assert_array_equal(run(x), want)


def test_big_buffers_beyond_the_cap_are_not_kept(monkeypatch):
    monkeypatch.setattr(K, "REUSE_MAX_BYTES", 1024)
    monkeypatch.setattr(K, "BIG_BUFFERS_MAX_BYTES", 1024)
    monkeypatch.setattr(K, "_BIG", K._BigBuffers())
    run, xs, fresh = _reuse_conv(seed=8)
    for x, want in zip(xs, fresh):
        np.testing.assert_array_equal(run(x), want)
    assert K._BIG.bytes == 0 and not any(K._BIG.free.values())


def test_threads_sharing_one_conv_keep_their_own_buffers():
    run, xs, fresh = _reuse_conv(seed=6, cout=48, h=16)
    errors = []

    def worker(k):
        try:
            for _ in range(50):
                np.testing.assert_array_equal(run(xs[k]), fresh[k])
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
