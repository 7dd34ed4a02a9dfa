""".escepe -> ONNX (compiler/escepe_to_onnx.py): onnxruntime on the exported graph against
escepe_rt on the file itself, every exit, batch 1 and 7; --exit N; metadata; the CLI; bad files.

The small nets are the ones test_runtime_vs_torch checks against torch (depthwise, groups,
dilation, ceil_mode max/avg pools, count_include_pad, divisor_override, unequal adaptive bins,
residual add, concat, ReLU6, standalone AFFINE), stored raw, bit-packed and rANS-coded, and
with float16 per-channel vectors (format 1.2).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_runtime_vs_torch import KS, SMALL_NETS, _randomise_bn, _small

import escepe_rt
from compiler import cli
from compiler.cluster import cluster_sections
from compiler.escepe_to_onnx import escepe_to_onnx, exit_output_name
from compiler.export import export
from compiler.models import build_model
from escepe_rt._fbs.Encoding import Encoding

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fashion_resnet18.escepe"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _inputs(shape, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Same tolerance as the runtime-vs-torch tests: 1e-4 relative to the logits' scale."""
    assert len(got) == len(want)
    worst = 0.0
    for e, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.float32 and g.shape == w.shape, (e, g.dtype, g.shape, w.shape)
        tol = 1e-4 * max(1.0, float(np.abs(w).max()))
        err = float(np.abs(g - w).max())
        assert err <= tol, f"exit {e}: max |onnxruntime - escepe_rt| = {err:.3g} > {tol:.3g}"
        worst = max(worst, err)
    return worst


def _check_all_exits(escepe_path, onnx_path, n_exits: int) -> None:
    rt = escepe_rt.load(escepe_path)
    sess = _session(onnx_path)
    assert [o.name for o in sess.get_outputs()] == [exit_output_name(e) for e in range(n_exits)]
    assert sess.get_inputs()[0].name == "input"
    for batch in (1, 7):
        x = _inputs(rt.input_shape, batch, seed=batch)
        _assert_close(sess.run(None, {"input": x}), rt.run_all_exits(x))


def _compile(model, shape, path, encoding: str | None, **kw) -> Path:
    """Cluster (unless raw) and export `model` to `path` with the given index encoding."""
    example = torch.from_numpy(_inputs(shape, 1))
    ks = None
    if encoding is not None:
        with torch.no_grad():
            n_exits = len(model(example))
        ks = KS[:n_exits]
        cluster_sections(model, example, ks)
        kw["index_encoding"] = encoding
    export(model, example, path, clusters=ks, **kw)
    return path


# ------------------------------------------------------------------------ every exit, every net


def test_shipped_example_every_exit(tmp_path):
    out = tmp_path / "fashion.onnx"
    names = escepe_to_onnx(EXAMPLE, out)
    assert names == [exit_output_name(e) for e in range(4)]
    onnx.checker.check_model(onnx.load(out), full_check=True)
    _check_all_exits(EXAMPLE, out, 4)


@pytest.mark.parametrize("encoding", [None, "packed", "rans"], ids=["raw", "packed", "rans"])
@pytest.mark.parametrize("cls,shape", SMALL_NETS, ids=[c.__name__ for c, _ in SMALL_NETS])
def test_small_nets_every_exit(cls, shape, encoding, tmp_path):
    path = _compile(_small(cls, shape), shape, tmp_path / "m.escepe", encoding)
    n_exits = len(escepe_rt.load(path).spec.exits)
    escepe_to_onnx(path, tmp_path / "m.onnx")
    _check_all_exits(path, tmp_path / "m.onnx", n_exits)


@pytest.mark.parametrize("cls,shape", SMALL_NETS[:3], ids=[c.__name__ for c, _ in SMALL_NETS[:3]])
def test_float16_channel_vectors(cls, shape, tmp_path):
    """Format 1.2 RAW_F16 scale/shift: the exporter reads them widened, as the runtime does."""
    path = _compile(_small(cls, shape), shape, tmp_path / "h.escepe", "rans", channel_dtype="f16")
    rt = escepe_rt.load(path)
    assert any(t.encoding == Encoding.RAW_F16 for t in rt.spec.tensors)
    escepe_to_onnx(path, tmp_path / "h.onnx")
    _check_all_exits(path, tmp_path / "h.onnx", len(rt.spec.exits))


def test_mobilenet_relu6_depthwise(tmp_path):
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = _randomise_bn(build_model("mobilenet", num_classes=7, in_channels=3, width=8))
    path = _compile(model, shape, tmp_path / "mb.escepe", "packed")
    n_exits = len(escepe_rt.load(path).spec.exits)
    escepe_to_onnx(path, tmp_path / "mb.onnx")
    _check_all_exits(path, tmp_path / "mb.onnx", n_exits)


class DilatedCeilPool(torch.nn.Module):
    """A dilated ceil-mode max pool whose implied tail padding (2) is not below its kernel (2):
    too much for ORT's pool pads, so the exporter pads explicitly with -inf."""

    def __init__(self, c_in: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2, stride=3, dilation=3, ceil_mode=True)
        self.fc = torch.nn.Linear(4 * 5 * 5, 5)

    def forward(self, x):
        x = self.pool(self.conv(x))  # no ReLU first: padding must be -inf, not 0
        return [self.fc(torch.flatten(x, 1))]


def test_dilated_ceil_max_pool_pads_explicitly(tmp_path):
    torch.manual_seed(0)
    shape = (2, 14, 14)
    model = DilatedCeilPool(2).eval()
    path = _compile(model, shape, tmp_path / "d.escepe", None)
    escepe_to_onnx(path, tmp_path / "d.onnx")
    assert "Pad" in {n.op_type for n in onnx.load(tmp_path / "d.onnx").graph.node}
    _check_all_exits(path, tmp_path / "d.onnx", 1)
    x = _inputs(shape, 3)
    with torch.no_grad():
        want = model(torch.from_numpy(x))[0].numpy()
    _assert_close(escepe_rt.load(path).run_all_exits(x), [want])  # and both agree with torch


def test_the_hard_ops_are_in_the_graph(tmp_path):
    """The pooling nets must exercise the non-trivial mappings, not only the plain ones."""
    ops = set()
    for cls, shape in SMALL_NETS:
        path = _compile(_small(cls, shape), shape, tmp_path / f"{cls.__name__}.escepe", None)
        escepe_to_onnx(path, tmp_path / "m.onnx")
        ops |= {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    want = {"Conv", "Gemm", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool"}
    want |= {"MatMul", "Mul", "Add", "Concat", "Flatten"}
    assert want <= ops, want - ops


# ------------------------------------------------------------------------------- --exit N


@pytest.fixture(scope="module")
def convzoo(tmp_path_factory):
    shape = (3, 17, 15)
    cls = next(c for c, s in SMALL_NETS if s == shape)
    path = tmp_path_factory.mktemp("zoo") / "zoo.escepe"
    return _compile(_small(cls, shape, seed=2), shape, path, "packed")


@pytest.mark.parametrize("which", [0, 1, 2, -1])
def test_single_exit_is_that_exit_only(convzoo, which, tmp_path):
    rt = escepe_rt.load(convzoo)
    n_exits = len(rt.spec.exits)
    e = which % n_exits
    out = tmp_path / "one.onnx"
    assert escepe_to_onnx(convzoo, out, exit=which) == [exit_output_name(e)]
    proto = onnx.load(out)
    full = tmp_path / "all.onnx"
    escepe_to_onnx(convzoo, full)
    full_nodes = len(onnx.load(full).graph.node)
    if e < n_exits - 1:  # later sections and other heads are pruned
        assert len(proto.graph.node) < full_nodes
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["escepe.exits"]) == [e]
    sess = _session(out)
    for batch in (1, 7):
        x = _inputs(rt.input_shape, batch, seed=10 + batch)
        (got,) = sess.run(None, {"input": x})
        _assert_close([got], [rt.run_all_exits(x)[e]])


def test_exit_out_of_range_is_a_value_error(convzoo, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        escepe_to_onnx(convzoo, tmp_path / "x.onnx", exit=3)
    assert not (tmp_path / "x.onnx").exists()


def test_metadata_carries_labels_thresholds_and_policy(tmp_path):
    out = tmp_path / "f.onnx"
    escepe_to_onnx(EXAMPLE, out)
    rt = escepe_rt.load(EXAMPLE)
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["escepe.labels"]) == rt.labels
    np.testing.assert_allclose(json.loads(meta["escepe.thresholds"]), rt.thresholds, rtol=1e-6)
    assert meta["escepe.exit_policy"] == "max_softmax"
    assert json.loads(meta["escepe.input_mean"]) == pytest.approx(list(rt.spec.input_mean))
    assert meta["escepe.meta.dataset"] == rt.spec.metadata["dataset"]


# --------------------------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert cli.main(["export-onnx", str(EXAMPLE), "-o", str(out), "--exit", "1"]) == 0
    assert "exit1_logits" in capsys.readouterr().out
    rt = escepe_rt.load(EXAMPLE)
    x = _inputs(rt.input_shape, 3)
    (got,) = _session(out).run(None, {"input": x})
    _assert_close([got], [rt.run_all_exits(x)[1]])
    assert cli.main(["export-onnx", str(EXAMPLE), "-o", str(out), "--all-exits"]) == 0
    assert [o.name for o in _session(out).get_outputs()] == [f"exit{e}_logits" for e in range(4)]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export-onnx", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: escepe export-onnx" in text and "--all-exits" in text and "default" in text


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_bad_file_is_a_format_error_and_exit_code_1(damage, tmp_path, capsys):
    blob = bytearray(EXAMPLE.read_bytes())
    if damage == "truncated":
        blob = blob[: len(blob) // 2]
    elif damage == "flipped":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = bytearray()
    bad = tmp_path / "bad.escepe"
    bad.write_bytes(bytes(blob))
    out = tmp_path / "bad.onnx"
    with pytest.raises(escepe_rt.FormatError):
        escepe_to_onnx(bad, out)
    assert cli.main(["export-onnx", str(bad), "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert "cannot export" in captured.err and "Traceback" not in captured.err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]  # no temp file left behind
