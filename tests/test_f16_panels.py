"""Float16 panels (kernels.runs_f16): direct convs whose weights are exact in float16 keep them
as float16 and widen them in registers. The products are those of the float32 panels, so every
case here must equal the float32 path bit for bit: whole, in chunks, shared with the spinning
worker, inside the programs' borders, and a whole model. The kernel cases need no torch (the
arm64 check, tools/arm64-check.sh, runs them on aarch64's own float16 conversion)."""

from __future__ import annotations

import numpy as np
import pytest
from test_direct_conv import DIRECT_CASES, EPILOGUES, _bordered, make_case, run_split

from escepe_rt import kernels as K
from escepe_rt import microkernel, parallel

# float16 panels need full-width tiles: every case but Cout == LANES / 2
F16_CASES = [c for c in DIRECT_CASES if c[4] != microkernel.LANES // 2]


def _f16_weights(wt: np.ndarray, seed: int, k: int = 16):
    """wt's shape, values from a k-entry codebook exact in float16: (weights, codebook, idx)."""
    rng = np.random.default_rng(seed)
    scale = float(np.abs(wt).max()) or 1.0
    cb = np.unique((rng.standard_normal(k) * scale).astype(np.float16)).astype(np.float32)
    idx = rng.integers(0, cb.size, wt.shape).astype(np.uint8)
    return cb[idx], cb, idx


def test_half_exact():
    assert K.half_exact(np.array([0.0, -0.0, 1.5, -(2.0**-24), 65504.0, np.inf], np.float32))
    assert K.half_exact(np.zeros(0, np.float32))
    assert not K.half_exact(np.array([0.1], np.float32))  # 0.1 needs more than 11 bits
    assert not K.half_exact(np.array([1.0, 65520.0], np.float32))  # past float16's range
    assert not K.half_exact(np.array([np.nan], np.float32))
    assert not K.half_exact(np.array([2.0**-26], np.float32))  # below float16's subnormals


@pytest.mark.parametrize("case", F16_CASES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_f16_conv_equals_f32_conv(case, epilogue):
    x, wt, sc, sf, res, act, _ = make_case(case, epilogue)
    wt, _, _ = _f16_weights(wt, seed=sum(case[:5]))
    stride, padding, dilation = case[6:]
    w32 = K.prepare_conv_weight(wt, 1)
    w16 = K.prepare_conv_weight(wt, 1, f16=True)
    assert w16.panels.dtype == np.float16 and w16.kind == microkernel.KIND_F16
    assert w16.panels.nbytes * 2 == w32.panels.nbytes
    np.testing.assert_array_equal(w16.panels.astype(np.float32), w32.panels)
    want = K.conv2d(x, w32, sc, sf, stride, padding, dilation, act, residual=res).copy()
    got = K.conv2d(x, w16, sc, sf, stride, padding, dilation, act, residual=res)
    np.testing.assert_array_equal(got, want)  # width dilation too: im2col on widened panels


@pytest.mark.parametrize("case", [c for c in F16_CASES if c[0] * c[1] * c[2] > 8], ids=str)
def test_f16_panels_from_indices(case):
    """Gathered from the codebook's float16 bits == converted from the float32 panels."""
    _, wt, *_ = make_case(case, "none")
    wt, cb, idx = _f16_weights(wt, seed=7)
    got = K.prepare_conv_weight_from_indices(idx, cb, idx.shape, 1, f16=True)
    want = K.prepare_conv_weight(wt, 1, f16=True)
    assert got.panels.dtype == np.float16
    np.testing.assert_array_equal(got.panels.view(np.uint16), want.panels.view(np.uint16))
    f32 = K.prepare_conv_weight_from_indices(idx, cb, idx.shape, 1)
    np.testing.assert_array_equal(got.panels.astype(np.float32), f32.panels)


@pytest.mark.parametrize("split", ["whole", "chunks", "pair"])
@pytest.mark.parametrize("case", [c for c in F16_CASES if c[8][1] == 1], ids=str)
def test_f16_chunks_and_borders_equal_f32(case, split):
    """The programs' layout (input inside a wider border, output inside its own), run whole,
    in chunks or shared with the worker: float16 panels == float32 panels, bit for bit."""
    x, wt, sc, sf, res, act, ref = make_case(case, "residual_relu6", seed_offset=3)
    wt, _, _ = _f16_weights(wt, seed=11)
    (sh, sw), (ph, pw), (dh, _) = case[6:]
    kh, kw = case[5]
    b_in, b_out = max(ph, pw) + 1, 1
    xb = _bordered(x, b_in)
    origin = ((b_in - ph) * xb.shape[2] + (b_in - pw)) * xb.shape[3]
    cout = ref.shape[3]
    epi = K._direct_epilogue(sc, sf, sc is not None, sf is not None, cout)
    outs = []
    for f16 in (False, True):
        w = K.prepare_conv_weight(wt, 1, f16=f16)
        out = _bordered(np.full(ref.shape, np.nan, np.float32), b_out)
        geom = (kh, kw, sh, sw, dh, origin, b_out, w.kind)
        args = (xb, w.panel_array(), out, _bordered(res, b_out), True, epi, act, geom)
        run_split(args, split, w.panels.shape[0], ref[..., 0].size, winograd=False)
        outs.append(out)
    assert not np.isnan(outs[0]).any()
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("threads", [2, 4])
def test_f16_conv_shared_between_threads(threads, monkeypatch):
    monkeypatch.setattr(parallel, "POOL", parallel.Pool(threads))
    for name in ("PARALLEL_MIN_MACS", "PAIR_MIN_MACS"):
        monkeypatch.setattr(K, name, 1)
    case = (1, 4, 4, 64, 128, (3, 3), (1, 1), (1, 1), (1, 1))
    x, wt, sc, sf, res, act, _ = make_case(case, "residual_relu6", seed_offset=threads)
    wt, _, _ = _f16_weights(wt, seed=5)
    args = (sc, sf, (1, 1), (1, 1), (1, 1), act)
    want = K.conv2d(x, K.prepare_conv_weight(wt, 1), *args, residual=res).copy()
    w16 = K.prepare_conv_weight(wt, 1, f16=True)
    for _ in range(3):
        np.testing.assert_array_equal(K.conv2d(x, w16, *args, residual=res), want)


def test_f16_refuses_what_it_cannot_hold():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)  # not exact in float16
    with pytest.raises(ValueError, match="exact in float16"):
        K.prepare_conv_weight(w, 1, f16=True)
    idx = rng.integers(0, 4, w.shape).astype(np.uint8)
    with pytest.raises(ValueError, match="exact in float16"):
        K.prepare_conv_weight_from_indices(idx, np.float32([0.1, 0.2, 0.3, 0.4]), w.shape, 1,
                                           f16=True)  # fmt: skip
    exact = w.astype(np.float16).astype(np.float32)
    with pytest.raises(ValueError, match="Winograd"):
        K.prepare_conv_weight(exact, 1, winograd=True, f16=True)
    with pytest.raises(ValueError, match="output channels"):
        K.prepare_conv_weight(exact[:8], 1, f16=True)
    with pytest.raises(ValueError, match="ungrouped"):
        K.prepare_conv_weight(exact[:, :8], 2, f16=True)
    with pytest.raises(ValueError, match="ungrouped"):
        K.prepare_conv_weight_from_indices(idx[:, :8], np.float32([0, 1, 2, 3]), (32, 8, 3, 3), 2,
                                           f16=True)  # fmt: skip


def test_which_convs_run_f16(monkeypatch):
    monkeypatch.setattr(K, "F16_PANELS", True)
    assert K.runs_f16(64, 1, 1, False, True)
    assert K.runs_f16(40, 1, 1, False, True)  # a partial last panel
    assert not K.runs_f16(64, 1, 1, False, False)  # not exact
    assert not K.runs_f16(64, 1, 1, True, True)  # Winograd
    assert not K.runs_f16(8, 1, 1, False, True)  # half-width tiles
    assert not K.runs_f16(64, 2, 1, False, True)  # grouped: im2col + sgemm
    assert not K.runs_f16(64, 1, 2, False, True)  # width dilation: im2col + sgemm
    monkeypatch.setattr(K, "F16_PANELS", False)
    assert not K.runs_f16(64, 1, 1, False, True)


def test_a_model_with_float16_codebooks_runs_f16_and_answers_the_same(tmp_path, monkeypatch):
    """The compiler rounds codebooks to float16 (compiler.cluster.float16_grid): a compiled
    model's direct convs get float16 panels, and every exit's logits and every answer equal
    those of the same file on float32 panels, on the section programs and the step lists."""
    torch = pytest.importorskip("torch")
    import escepe_rt
    from compiler.cluster import cluster_sections
    from compiler.export import export
    from compiler.models import build_model
    from escepe_rt import bench, program

    monkeypatch.setattr(K, "F16_PANELS", True)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=7, in_channels=3, width=16).eval()
    path = tmp_path / "r18.escepe"
    example = torch.zeros((1, 3, 32, 32))
    cluster_sections(model, example, [32, 16, 8, 4])
    export(model, example, path, clusters=[32, 16, 8, 4])
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    answers = {}
    for f16 in (True, False):
        monkeypatch.setattr(K, "F16_PANELS", f16)
        m = escepe_rt.load(path, decode="eager")
        kinds = bench.conv_kernels(m)
        assert (kinds["direct_f16"] > 0) == f16, kinds
        pred = m.predict(x)
        one = m.predict(x[:1])  # batch 1: a section program
        assert program.eligible(m.spec) is None
        answers[f16] = (m.run_all_exits(x), pred, one)
    for a, b in zip(answers[True][0], answers[False][0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(answers[True][1:], answers[False][1:]):
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.exit_index, b.exit_index)


def _widener(native: bool):
    """An njit function widening float16 bit patterns (uint16, a multiple of 16 of them) to
    float32 with vector_ir.half_to_float, 16 at a time."""
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from escepe_rt.vector_ir import array_ptr, half_to_float, vector_at

    @intrinsic
    def widen16(typingctx, src, at, dst):
        def codegen(context, builder, sig, args):
            ps = builder.bitcast(array_ptr(context, builder, sig, args, 0),
                                 ir.IntType(16).as_pointer())  # fmt: skip
            pd = array_ptr(context, builder, sig, args, 2)
            vh = ir.VectorType(ir.IntType(16), 16)
            bits = builder.load(vector_at(builder, ps, args[1], vh), align=2)
            v = half_to_float(builder, bits, native)
            builder.store(v, vector_at(builder, pd, args[1], v.type), align=4)
            return context.get_dummy_value()

        return types.void(src, at, dst), codegen

    @numba.njit
    def widen(src, dst):
        for i in range(0, src.shape[0], 16):
            widen16(src, i, dst)

    return widen


@pytest.mark.parametrize("native", [False, True])
def test_half_to_float_is_exact_for_every_float16(native):
    """All 65,536 bit patterns == numpy's float16 -> float32 (NaNs: NaN), both the native
    instruction (where this CPU has one) and the integer widening other CPUs get."""
    from escepe_rt import vector_ir

    if native and not vector_ir.HALF_NATIVE:
        pytest.skip("this CPU has no native float16 widening")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = np.empty(bits.size, np.float32)
    _widener(native)(bits, got)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_a_portable_numba_target_runs_f16_panels_without_native_widening(tmp_path):
    """NUMBA_CPU_NAME=generic (a portable cache) has no F16C: the tiles must then widen with
    integer operations. `fpext half` there became a call numba's JIT cannot link, and the
    process aborted at the first conv ("LLVM ERROR: Symbol not found: __extendhfsf2")."""
    import os
    import platform
    import subprocess
    import sys
    import textwrap

    if platform.machine().lower() in ("aarch64", "arm64"):
        pytest.skip("every aarch64 CPU widens float16 in one instruction")
    code = textwrap.dedent(
        """
        import numpy as np
        from escepe_rt import kernels as K, vector_ir
        assert not vector_ir.HALF_NATIVE and not K.F16_PANELS
        rng = np.random.default_rng(0)
        w = rng.standard_normal((64, 32, 3, 3)).astype(np.float16).astype(np.float32)
        x = rng.standard_normal((1, 6, 7, 32)).astype(np.float32)
        a = K.conv2d(x, K.prepare_conv_weight(w, 1), None, None, 1, 1, 1, 0).copy()
        b = K.conv2d(x, K.prepare_conv_weight(w, 1, f16=True), None, None, 1, 1, 1, 0)
        assert np.array_equal(a, b)
        print("ok")
        """
    )
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CPU_FEATURES", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
