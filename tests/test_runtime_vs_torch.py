"""escepe_rt against PyTorch: per-exit logits, early exit, compiler errors, export reports, inputs.

Every model is compiled with compiler.export, loaded with escepe_rt.load, and its outputs are
compared with the (BN-randomised, optionally clustered) torch model it came from.
"""

from __future__ import annotations

import logging
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import escepe_rt
from compiler.cluster import cluster_sections
from compiler.export import export
from compiler.graph import UnsupportedOpError
from compiler.models import build_model

KS = [32, 16, 8, 4]  # clusters per section, shallowest first (trimmed to the section count)
K = 5  # classes of the nets built here


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's thread pool only spins against numba and other processes."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats and affine params so that BN folding matters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def _torch_exits(model: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model(torch.from_numpy(x))]


def _assert_exits_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for e, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.float32 and g.shape == w.shape, (e, g.dtype, g.shape, w.shape)
        tol = 1e-4 * max(1.0, float(np.abs(w).max()))
        err = float(np.abs(g - w).max())
        assert err <= tol, f"exit {e}: max |runtime - torch| = {err:.3g} > {tol:.3g}"


def _compile(model, x: np.ndarray, path, clustered: bool, **kw):
    """Optionally cluster `model` in place (k per section), export, load; (rt model, report)."""
    example = torch.from_numpy(x[:1])
    ks = None
    if clustered:
        n_exits = len(_torch_exits(model, x[:1]))
        ks = KS[:n_exits]
        cluster_sections(model, example, ks)
    report = export(model, example, path, clusters=ks, **kw)
    return escepe_rt.load(path), report


def _inputs(shape, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _check_against_torch(model, shape, tmp_path, clustered: bool, **kw) -> None:
    x = _inputs(shape, 7)
    rt, report = _compile(model, x, tmp_path / "m.escepe", clustered, **kw)
    if clustered:
        assert all(s.exact for s in report.sections)
    for batch in (x[:1], x):
        _assert_exits_close(rt.run_all_exits(batch), _torch_exits(model, batch))


# --------------------------------------------------------------------- 1. shipped models

SHIPPED = {
    "resnet18": {"width": 8},
    "resnet20": {"width": 8},
    "mobilenet": {"width": 8},
    "wrn": {"width": 4, "widen": 2},
}


@pytest.mark.parametrize("clustered", [True, False], ids=["clustered", "raw"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28", "3x32"])
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_models_match_torch(name, shape, clustered, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=shape[0], **SHIPPED[name])
    _check_against_torch(_randomise_bn(model), shape, tmp_path, clustered)


# ------------------------------------------------------------------ 2. nets built here


class ConvZoo(nn.Module):
    """3 exits: bias conv without BN, non-square kernel/stride/padding, depthwise (dilated, with
    channel multiplier), grouped convs (2 and 4), ReLU6, adaptive pools to (2, 3) and (1, 1),
    torch.flatten / view(size(0), -1) / nn.Flatten, BN after an activation (not foldable)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.stem = nn.Conv2d(c_in, 8, (3, 5), stride=(1, 2), padding=(1, 2), bias=True)
        self.pool0 = nn.AdaptiveAvgPool2d((2, 3))
        self.fc0 = nn.Linear(8 * 6, K)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.dwm = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn_dwm = nn.BatchNorm2d(16)
        self.act6 = nn.ReLU6()
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, K)
        self.g2 = nn.Conv2d(16, 16, (1, 3), stride=(2, 1), padding=(0, 1), groups=2, bias=False)
        self.relu_g2 = nn.ReLU()
        self.bn_g2 = nn.BatchNorm2d(16)  # after the ReLU: a standalone AFFINE
        self.g4 = nn.Conv2d(16, 12, 3, padding=(2, 1), dilation=(2, 1), groups=4, bias=True)
        self.pool2 = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc2 = nn.Linear(12, K)

    def forward(self, x):
        x = F.relu6(self.stem(x))
        e0 = self.fc0(torch.flatten(self.pool0(x), 1))
        x = F.relu(self.bn_dw(self.dw(x)))
        x = self.act6(self.bn_dwm(self.dwm(x)))
        p = self.pool1(x)
        e1 = self.fc1(p.view(p.size(0), -1))
        x = self.bn_g2(self.relu_g2(self.g2(x)))
        x = F.relu(self.g4(x))
        e2 = self.fc2(self.flat(self.pool2(x)))
        return [e0, e1, e2]


class PoolZoo(nn.Module):
    """2 exits: BN straight on the input and BN(affine=False) after a pool (standalone AFFINEs),
    a biased conv folded with BN, MaxPool2d with padding/dilation/ceil_mode, AvgPool2d with
    count_include_pad=False, ceil_mode and divisor_override."""

    def __init__(self, c_in: int):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, 6, 3, padding=1, bias=True)  # bias folded with BN
        self.bn = nn.BatchNorm2d(6)
        self.mp = nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True)
        self.ap0 = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.fc0 = nn.Linear(6 * 5 * 5, K)
        self.ap1 = nn.AvgPool2d((2, 3), stride=(2, 1), padding=(1, 1), ceil_mode=True)
        self.ap2 = nn.AvgPool2d(2, stride=1, divisor_override=3)
        self.bn_free = nn.BatchNorm2d(6, affine=False)
        self.mp2 = nn.MaxPool2d((2, 3), stride=(1, 2), ceil_mode=True)
        self.fc1 = nn.Linear(6 * 3 * 4, K)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(self.bn_in(x))))
        x = self.mp(x)
        e0 = self.fc0(torch.flatten(self.ap0(x), 1))
        x = F.relu(self.bn_free(self.ap2(self.ap1(x))))
        x = self.mp2(x)
        e1 = self.fc1(x.view(x.size(0), -1))
        return [e0, e1]


class ResCat(nn.Module):
    """2 exits: residual add + ReLU, an unfusable ReLU (its producer also feeds the add),
    torch.cat of feature maps and of feature vectors, a pooled vector used by both exits."""

    def __init__(self, c_in: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.mix = nn.Conv2d(12, 8, 1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc0 = nn.Linear(8, K)
        self.deep = nn.Conv2d(8, 10, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(10)
        self.fc1 = nn.Linear(8 + 10, K)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        a = F.relu(y)  # y also feeds the add below: this ReLU cannot fuse into conv1
        out = F.relu(self.bn2(self.conv2(a)) + y)
        x = self.mix(torch.cat([out, a], dim=1))
        p = torch.flatten(self.pool(x), 1)  # used by both exits
        e0 = self.fc0(p)
        q = torch.flatten(self.pool(F.relu(self.bn3(self.deep(x)))), 1)
        e1 = self.fc1(torch.cat([p, q], 1))
        return [e0, e1]


class OneExit(nn.Module):
    """1 exit: conv -> BN -> ReLU -> max pool -> view -> linear."""

    def __init__(self, c_in: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, K)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return [self.fc(x.view(x.size(0), -1))]


SMALL_NETS = [
    (ConvZoo, (3, 17, 15)),
    (PoolZoo, (2, 19, 19)),
    (ResCat, (3, 12, 10)),
    (OneExit, (1, 9, 9)),
]


def _small(cls, shape, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(cls(shape[0]), seed)


@pytest.mark.parametrize("encoding", [None, "packed", "rans"], ids=["raw", "packed", "rans"])
@pytest.mark.parametrize("cls,shape", SMALL_NETS, ids=[c.__name__ for c, _ in SMALL_NETS])
def test_small_nets_match_torch(cls, shape, encoding, tmp_path):
    """raw: float32 weights; packed / rans: clustered, indices bit-packed or rANS-coded."""
    kw = {} if encoding is None else {"index_encoding": encoding}
    _check_against_torch(_small(cls, shape), shape, tmp_path, encoding is not None, **kw)


# ------------------------------------------------------------------------ 3. early exit

N_EE = 64  # samples in the early-exit batch


def _sharpen_heads(model: nn.Module, gain: float = 6.0) -> nn.Module:
    """Bigger classifier weights spread the exits' confidences over (1/K, 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(gain)
    return model


def _spread_inputs(shape, n: int, seed: int) -> np.ndarray:
    """Per-sample gain and channel offsets, so that the exits' confidences vary widely."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)) * rng.uniform(0.1, 4.0, (n, 1, 1, 1))
    return (x + rng.standard_normal((n, shape[0], 1, 1))).astype(np.float32)


@pytest.fixture(scope="module")
def ee(tmp_path_factory):
    """A clustered 3-exit ConvZoo: file path, inputs x, torch's logits per exit, the model."""
    shape = (3, 17, 15)
    model = _sharpen_heads(_small(ConvZoo, shape, seed=1))
    x = _spread_inputs(shape, N_EE, seed=1)
    path = tmp_path_factory.mktemp("ee") / "convzoo.escepe"
    _compile(model, x, path, clustered=True)
    return SimpleNamespace(path=path, x=x, want=_torch_exits(model, x), model=model)


def _torch_conf(logits: np.ndarray, policy: str) -> np.ndarray:
    p = torch.softmax(torch.from_numpy(logits), dim=1)
    if policy == "max_softmax":
        return p.max(dim=1).values.numpy()
    h = -(p * torch.log_softmax(torch.from_numpy(logits), dim=1)).sum(dim=1)
    return (1.0 - h / math.log(logits.shape[1])).numpy()


def _safe_threshold(conf: np.ndarray, avoid: list[np.ndarray] = (), q: float = 0.5) -> float:
    """A threshold near quantile q of `conf`, as far as possible from every value of `conf` and
    `avoid` (so that float noise between runtime and torch cannot flip an exit decision)."""
    v = np.sort(conf)
    i = int(q * (len(v) - 2))
    w = max(2, len(v) // 8)
    mids = ((v[:-1] + v[1:]) / 2)[max(0, i - w) : i + w]
    near = np.concatenate([conf, *avoid])
    margins = np.abs(near[None, :] - mids[:, None]).min(axis=1)
    assert margins.max() > 5e-5, "confidences too close together for a safe threshold"
    return float(mids[np.argmax(margins)])


def _expected_exits(confs: list[np.ndarray], thresholds: list[float]) -> np.ndarray:
    """First exit whose confidence >= its threshold, else the last exit."""
    last = len(confs) - 1
    out = np.full(len(confs[0]), last)
    for s in reversed(range(last)):
        out = np.where(confs[s] >= thresholds[s], s, out)
    return out


def _check_prediction(pred, want_logits, confs, expected) -> None:
    expected = np.asarray(expected, np.int64)
    rows = np.arange(len(expected))
    np.testing.assert_array_equal(pred.exit_index, expected)
    chosen = np.stack([want_logits[e][i] for i, e in enumerate(expected)])
    _assert_exits_close([pred.logits], [chosen])
    np.testing.assert_array_equal(pred.labels, chosen.argmax(axis=1))
    np.testing.assert_allclose(pred.confidence, np.stack(confs)[expected, rows], atol=1e-5)
    assert pred.labels.dtype == pred.exit_index.dtype == np.int64


def test_threshold_zero_answers_everything_at_exit0(ee):
    path, x, want = ee.path, ee.x, ee.want
    pred = escepe_rt.load(path, threshold=0.0).predict(x)
    _check_prediction(
        pred, want, [_torch_conf(w, "max_softmax") for w in want], np.zeros(N_EE, np.int64)
    )


def test_threshold_above_one_runs_everything_to_the_last_exit(ee):
    path, x, want = ee.path, ee.x, ee.want
    pred = escepe_rt.load(path, threshold=1.5).predict(x)
    confs = [_torch_conf(w, "max_softmax") for w in want]
    _check_prediction(pred, want, confs, np.full(N_EE, len(want) - 1, np.int64))


def test_unreachable_exit_heads_are_not_computed(ee):
    """A threshold above 1 can never be met (confidences lie in [0, 1]): predict then skips
    that exit's head entirely, and the answer is still the last exit's, bit for bit."""
    model = escepe_rt.load(ee.path, threshold=1.5)
    ex = model._executor
    for s, e in enumerate(ex.spec.exits[:-1]):
        full, body = ex._section_plan(s), ex._body_plan(s)
        produced = {out for _, _, out, _ in body}
        assert e.logits not in produced and len(body) < len(full)
        assert set(ex._live_after[s]) <= produced | {0} | {
            out for t in range(s) for _, _, out, _ in ex._section_plan(t)
        }
    pred = model.predict(ee.x)
    np.testing.assert_array_equal(pred.logits, model.run_all_exits(ee.x)[-1])
    np.testing.assert_array_equal(pred.exit_index, len(ex.spec.exits) - 1)


# Per-exit thresholds: a number, or "mid" = a safe threshold near the median of that exit.
THRESHOLD_PATTERNS = [
    "mid",  # one scalar for every exit
    ["mid", "mid", 0.0],
    [1.5, "mid", 0.3],
    ["mid", 1.5, 1.5],
    [0.0, 1.5, 1.5],
]


@pytest.mark.parametrize("policy", ["max_softmax", "entropy"])
@pytest.mark.parametrize("pattern", THRESHOLD_PATTERNS, ids=str)
def test_early_exit_follows_torch_confidences(ee, pattern, policy):
    path, x, want = ee.path, ee.x, ee.want
    confs = [_torch_conf(w, policy) for w in want]
    if pattern == "mid":
        threshold = _safe_threshold(confs[0], avoid=confs[1:-1])
        per_exit = [threshold] * len(want)
    else:
        per_exit = [_safe_threshold(c) if t == "mid" else t for t, c in zip(pattern, confs)]
        threshold = per_exit
    pred = escepe_rt.load(path, threshold=threshold, policy=policy).predict(x)
    expected = _expected_exits(confs, per_exit)
    if "mid" in pattern:
        assert len(np.unique(expected)) > 1, "the threshold should split the batch"
    _check_prediction(pred, want, confs, expected)


def test_predictions_follow_input_order(ee):
    path, x, want = ee.path, ee.x, ee.want
    confs = [_torch_conf(w, "max_softmax") for w in want]
    model = escepe_rt.load(path, threshold=_safe_threshold(confs[0]))
    perm = np.random.default_rng(2).permutation(N_EE)
    a, b = model.predict(x), model.predict(x[perm])
    assert len(np.unique(a.exit_index)) > 1
    np.testing.assert_array_equal(b.exit_index, a.exit_index[perm])
    np.testing.assert_array_equal(b.labels, a.labels[perm])
    np.testing.assert_allclose(b.logits, a.logits[perm], rtol=0, atol=1e-5)


def test_file_thresholds_and_policy_are_the_defaults(ee, tmp_path):
    x, want = ee.x, ee.want
    confs = [_torch_conf(w, "entropy") for w in want]
    stored = [_safe_threshold(confs[0]), _safe_threshold(confs[1]), 0.25]
    path = tmp_path / "t.escepe"
    export(ee.model, torch.from_numpy(x[:1]), path, thresholds=stored, exit_policy="entropy")
    rt = escepe_rt.load(path)
    np.testing.assert_allclose(rt.thresholds, stored, rtol=1e-6)
    np.testing.assert_allclose([e["stored_threshold"] for e in rt.info["exits"]], stored, 1e-6)
    _check_prediction(rt.predict(x), want, confs, _expected_exits(confs, stored))


def test_lazy_decode_leaves_later_sections_alone(ee):
    path, x = ee.path, ee.x
    model = escepe_rt.load(path, threshold=0.0, decode="lazy")
    assert model.decoded_sections == []
    model.predict(x)
    assert model.decoded_sections == [0]
    escepe_rt.load(path, threshold=1.5).predict(x[:2])  # another model's decoding is its own
    assert model.decoded_sections == [0]
    model.run_all_exits(x[:1])
    assert model.decoded_sections == [0, 1, 2]


def test_eager_decode_decodes_every_section(ee):
    path = ee.path
    assert escepe_rt.load(path, decode="eager").decoded_sections == [0, 1, 2]


def test_big_batch_is_chunked_transparently(ee):
    path = ee.path
    x = _spread_inputs(ee.x.shape[1:], 600, seed=3)
    want = _torch_exits(ee.model, x)
    confs = [_torch_conf(w, "max_softmax") for w in want]
    thresholds = [_safe_threshold(confs[0]), _safe_threshold(confs[1]), 0.0]
    rt = escepe_rt.load(path, threshold=thresholds)
    big = rt.predict(x)
    parts = [rt.predict(x[i : i + 100]) for i in range(0, 600, 100)]
    for field in ("labels", "exit_index"):
        np.testing.assert_array_equal(
            getattr(big, field), np.concatenate([getattr(p, field) for p in parts])
        )
    for field in ("confidence", "logits"):
        got = np.concatenate([getattr(p, field) for p in parts])
        np.testing.assert_allclose(getattr(big, field), got, rtol=0, atol=1e-5)
    assert set(np.unique(big.exit_index)) == {0, 1, 2}
    _check_prediction(big, want, confs, _expected_exits(confs, thresholds))
    _assert_exits_close(rt.run_all_exits(x), want)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": [0.5, 0.5]},
        {"threshold": float("nan")},
        {"policy": "margin"},
        {"decode": "never"},
    ],
    ids=str,
)
def test_bad_load_arguments(ee, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)).rstrip("s")):
        escepe_rt.load(ee.path, **kwargs)


class Confident(nn.Module):
    """2 exits; exit 0 is extremely sure of itself (float32 max-softmax rounds to 1.0)."""

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(16, K)
        self.fc1 = nn.Linear(16, K)

    def forward(self, x):
        f = torch.flatten(x, 1)
        return [self.fc0(f), self.fc1(f)]


def test_uncalibrated_file_runs_every_sample_to_the_last_exit(tmp_path):
    torch.manual_seed(0)
    model = Confident().eval()
    with torch.no_grad():
        model.fc0.weight.mul_(200.0)
    x = _inputs((1, 4, 4), 8)
    assert (_torch_conf(_torch_exits(model, x)[0], "max_softmax") == 1.0).any()
    export(model, torch.from_numpy(x[:1]), tmp_path / "u.escepe")  # thresholds=None
    pred = escepe_rt.load(tmp_path / "u.escepe").predict(x)
    np.testing.assert_array_equal(pred.exit_index, 1)


# --------------------------------------------------------------------- 4. compiler errors


class WithOp(nn.Module):
    """conv -> <op> -> pool -> linear, one exit; `op` is what the compiler must judge."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = nn.GELU() if op == "gelu" else nn.ReLU()
        self.up = nn.Upsample(scale_factor=2) if op == "upsample" else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, K)

    def forward(self, x):
        x = self.conv(x)
        if self.op == "sigmoid":
            x = torch.sigmoid(x)
        elif self.op == "mul":
            x = x * 2
        else:
            x = self.up(self.act(x))
        return [self.fc(torch.flatten(self.pool(x), 1))]


EXAMPLE = torch.zeros(1, 2, 6, 6)

# (op, fx node name, what the message must name)
UNSUPPORTED = [
    ("sigmoid", "sigmoid", "sigmoid"),
    ("gelu", "act", "GELU"),
    ("upsample", "up", "Upsample"),
    ("mul", "mul", "mul"),
]


@pytest.mark.parametrize("op,node,what", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_op_names_node_and_writes_nothing(op, node, what, tmp_path):
    path = tmp_path / "bad.escepe"
    with pytest.raises(UnsupportedOpError) as info:
        export(WithOp(op).eval(), EXAMPLE, path)
    assert f"'{node}'" in str(info.value) and what in str(info.value), str(info.value)
    assert os.listdir(tmp_path) == []  # neither the file nor a temp file


def _good_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.escepe"
    export(WithOp("relu").eval(), EXAMPLE, path)
    return path, path.read_bytes()


@pytest.mark.parametrize(
    "model,kwargs",
    [(WithOp("gelu"), {}), (WithOp("relu"), {"labels": ["a", "b"]})],
    ids=["unsupported", "bad-labels"],
)
def test_failed_export_keeps_the_old_file(model, kwargs, tmp_path):
    path, before = _good_file(tmp_path)
    with pytest.raises(ValueError):
        export(model.eval(), EXAMPLE, path, **kwargs)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
    escepe_rt.load(path)  # still a valid model


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"labels": [str(i) for i in range(K + 1)]}, "labels"),
        ({"labels": ["a"]}, "labels"),
        ({"thresholds": [0.5, 0.5, 0.5]}, "thresholds"),
        ({"thresholds": []}, "thresholds"),
        ({"clusters": [8, 8, 8]}, "clusters"),
        ({"clusters": [8]}, "clusters"),
        ({"clusters": [0, 8]}, "cluster"),
        ({"clusters": 257}, "cluster"),
        ({"input_mean": [0.5]}, "input_mean"),
        ({"input_std": [1.0, 1.0, 1.0, 1.0]}, "input_std"),
        ({"exit_policy": "margin"}, "exit_policy"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, dict) else v,
)
def test_bad_export_arguments_raise_value_error(kwargs, needle, tmp_path):
    model = _small(ResCat, (3, 12, 10))  # 2 exits, K classes, 3 input channels
    with pytest.raises(ValueError, match=needle):
        export(model, torch.zeros(1, 3, 12, 10), tmp_path / "m.escepe", **kwargs)
    assert os.listdir(tmp_path) == []


class ViewByShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, K)

    def forward(self, x):
        y = self.conv(x)
        return [self.fc(y.view(y.shape[0], -1))]


def test_view_by_shape_attribute_compiles(tmp_path):
    torch.manual_seed(0)
    _check_against_torch(ViewByShape().eval(), (2, 6, 6), tmp_path, clustered=False)


class InplaceReluReuse(nn.Module):
    """y feeds an in-place ReLU and is read afterwards: torch sees the rectified y."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, K)

    def forward(self, x):
        y = self.conv(x)
        z = self.relu(y)  # also overwrites y
        return [self.fc(torch.flatten(self.pool(z + y), 1))]


def test_inplace_relu_is_seen_by_later_readers(tmp_path):
    torch.manual_seed(0)
    _check_against_torch(InplaceReluReuse().eval(), (2, 6, 6), tmp_path, clustered=False)


class AliasedInplace(nn.Module):
    """An in-place op changes a tensor that an earlier name or view still refers to."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc0 = nn.Linear(72, K)
        self.fc1 = nn.Linear(72, K)

    def forward(self, x):
        y = self.conv(x)
        if self.case == "iadd":
            skip = y  # the same tensor: `y += ...` changes skip too
            y += self.conv2(y)
            return [self.fc0(torch.flatten(skip, 1)), self.fc1(torch.flatten(y, 1))]
        f = torch.flatten(y, 1)  # a view of y: the in-place ReLU below changes it
        self.relu(y)
        return [self.fc0(f), self.fc1(torch.flatten(y, 1))]


@pytest.mark.parametrize("case", ["iadd", "view"])
def test_inplace_op_on_an_aliased_tensor_is_matched_or_rejected(case, tmp_path):
    torch.manual_seed(0)
    try:
        _check_against_torch(AliasedInplace(case).eval(), (2, 6, 6), tmp_path, clustered=False)
    except UnsupportedOpError:
        pass  # refusing the model is fine too


class LinearOn4D(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, K)

    def forward(self, x):
        return [torch.flatten(self.fc(x), 1)]


class AdaptiveUpsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, stride=3)
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.fc = nn.Linear(18, K)

    def forward(self, x):
        return [self.fc(torch.flatten(self.pool(self.conv(x)), 1))]


@pytest.mark.parametrize("cls,node", [(LinearOn4D, "fc"), (AdaptiveUpsample, "pool")])
def test_unexpressible_module_use_is_an_unsupported_op(cls, node, tmp_path):
    with pytest.raises(UnsupportedOpError, match=f"'{node}'"):
        export(cls().eval(), torch.zeros(1, 2, 6, 6), tmp_path / "m.escepe")


# ---------------------------------------------------------------------- 5. export report


class Tiny(nn.Module):
    """2 exits with MACs easy to count by hand on a (C, 9, 9) input."""

    def __init__(self, c_in: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 4, 3, stride=2, padding=1, bias=False)  # -> (4, 5, 5)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc0 = nn.Linear(4, K)
        self.conv2 = nn.Conv2d(4, 6, (1, 3), padding=(0, 1))  # -> (6, 5, 5)
        self.fc1 = nn.Linear(6, K)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        e0 = self.fc0(torch.flatten(self.pool(x), 1))
        x = F.relu(self.conv2(x))
        return [e0, self.fc1(torch.flatten(self.pool(x), 1))]


TINY_SECTIONS = [["conv1", "fc0"], ["conv2", "fc1"]]


def _conv_linear_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_export_report_of_a_clustered_model(tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(build_model("resnet20", num_classes=7, width=8))
    x = _inputs((3, 32, 32), 1)
    rt, report = _compile(model, x, tmp_path / "r.escepe", clustered=True)
    raw = export(model, torch.from_numpy(x), tmp_path / "raw.escepe")

    assert report.file_bytes == os.path.getsize(tmp_path / "r.escepe")
    assert report.fp32_param_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert report.ratio == report.fp32_param_bytes / report.file_bytes
    assert raw.file_bytes == os.path.getsize(tmp_path / "raw.escepe")
    assert raw.fp32_param_bytes == report.fp32_param_bytes
    assert report.file_bytes < raw.file_bytes / 4  # <= 5-bit indices instead of float32
    assert [s.index for s in report.sections] == [0, 1, 2]
    for s, k in zip(report.sections, KS):
        assert (s.clusters, s.bits, s.exact) == (k, math.ceil(math.log2(k)), True)
    for s in raw.sections:
        assert (s.clusters, s.bits, s.exact) == (None, 32, True)
    total = _conv_linear_weights(model)
    assert sum(s.weights for s in report.sections) == sum(s.weights for s in raw.sections) == total

    info = rt.info
    assert info["file_bytes"] == report.file_bytes
    assert info["fp32_param_bytes"] == report.fp32_param_bytes
    assert info["compression_ratio"] == pytest.approx(report.ratio)
    assert [sec["clusters"] for sec in info["sections"]] == [[k] for k in KS[:3]]
    macs = [e["macs"] for e in info["exits"]]
    assert all(a < b for a, b in zip(macs, macs[1:])), macs


def _set_weights(model: nn.Module, names: list[str], values: list[float], rng) -> None:
    with torch.no_grad():
        for name in names:
            w = getattr(model, name).weight
            w.copy_(torch.from_numpy(rng.choice(values, size=tuple(w.shape)).astype(np.float32)))


def test_few_distinct_weights_are_stored_exactly(tmp_path, caplog):
    model = _small(Tiny, (3, 9, 9))
    rng = np.random.default_rng(0)
    _set_weights(model, TINY_SECTIONS[0], [-0.5, 0.25, 1.0], rng)
    _set_weights(model, TINY_SECTIONS[1], [-1.0, 1.0], rng)
    x = _inputs((3, 9, 9), 7)
    with caplog.at_level(logging.WARNING, logger="escepe.export"):
        report = export(model, torch.from_numpy(x[:1]), tmp_path / "e.escepe", clusters=16)
    assert not caplog.records
    assert [(s.clusters, s.bits, s.exact) for s in report.sections] == [(3, 2, True), (2, 1, True)]
    _assert_exits_close(
        escepe_rt.load(tmp_path / "e.escepe").run_all_exits(x), _torch_exits(model, x)
    )


def test_unclustered_model_is_clustered_at_export_with_a_warning(tmp_path, caplog):
    model = _small(Tiny, (3, 9, 9))
    with caplog.at_level(logging.WARNING, logger="escepe.export"):
        report = export(model, torch.zeros(1, 3, 9, 9), tmp_path / "w.escepe", clusters=[4, 2])
    assert [(s.clusters, s.bits, s.exact) for s in report.sections] == [
        (4, 2, False),
        (2, 1, False),
    ]
    assert any("section 0" in r.getMessage() for r in caplog.records)


def test_macs_by_hand(tmp_path):
    export(_small(Tiny, (3, 9, 9)), torch.zeros(1, 3, 9, 9), tmp_path / "t.escepe")
    info = escepe_rt.load(tmp_path / "t.escepe").info
    conv1 = 4 * 5 * 5 * (3 * 3 * 3)  # Cout * Ho * Wo * (Cin * kh * kw)
    conv2 = 6 * 5 * 5 * (4 * 1 * 3)
    fc0, fc1 = 4 * K, 6 * K
    assert [s["macs"] for s in info["sections"]] == [conv1 + fc0, conv2 + fc1]
    assert [e["macs"] for e in info["exits"]] == [conv1 + fc0, conv1 + fc0 + conv2 + fc1]
    assert [s["weights"] for s in info["sections"]] == [4 * 27 + 4 * K, 6 * 12 + 6 * K]


# ---------------------------------------------------------------------------- 6. inputs

MEAN, STD = [0.2, 0.5, 0.7], [0.3, 0.25, 0.5]


@pytest.fixture(scope="module")
def tiny_rt(tmp_path_factory):
    """Loaded Tiny models: 3 channels with mean/std, 1 channel with mean/std, 1 without."""
    folder = tmp_path_factory.mktemp("tiny")
    out = {}
    for key, c, mean, std in [
        ("rgb", 3, MEAN, STD),
        ("gray", 1, [0.4], [0.2]),
        ("plain", 1, None, None),
    ]:
        path = folder / f"{key}.escepe"
        export(
            _small(Tiny, (c, 9, 9)), torch.zeros(1, c, 9, 9), path, input_mean=mean, input_std=std
        )
        out[key] = escepe_rt.load(path)
    return out


BAD_INPUTS = [
    ("wrong shape", np.zeros((2, 3, 9, 8), np.float32), r"\(N, 3, 9, 9\)"),
    ("channels last", np.zeros((2, 9, 9, 3), np.float32), r"\(N, 3, 9, 9\)"),
    ("no batch axis", np.zeros((3, 9, 9), np.float32), r"\(N, 3, 9, 9\)"),
    ("float64", np.zeros((2, 3, 9, 9), np.float64), "float32.*float64"),
    ("uint8", np.zeros((2, 3, 9, 9), np.uint8), "float32.*uint8.*preprocess"),
    ("nan", np.full((2, 3, 9, 9), np.nan, np.float32), "NaN"),
    ("inf", np.full((2, 3, 9, 9), np.inf, np.float32), "inf"),
    ("list", [[0.0]], "numpy array"),
]


@pytest.mark.parametrize("method", ["predict", "run_all_exits"])
@pytest.mark.parametrize("x,needle", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_value_error(tiny_rt, method, x, needle):
    with pytest.raises(ValueError, match=needle):
        getattr(tiny_rt["rgb"], method)(x)


@pytest.mark.parametrize(
    "key,layout", [("rgb", "NHWC"), ("gray", "NHWC"), ("gray", "NHW"), ("plain", "NHW")]
)
def test_preprocess_normalises_and_transposes(tiny_rt, key, layout):
    model = tiny_rt[key]
    c = model.input_shape[0]
    images = np.random.default_rng(0).integers(0, 256, (4, 9, 9, c), dtype=np.uint8)
    mean = np.asarray(model.spec.input_mean or [0.0] * c, np.float32)
    std = np.asarray(model.spec.input_std or [1.0] * c, np.float32)
    want = ((images / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2)
    got = model.preprocess(images if layout == "NHWC" else images[..., 0])
    assert got.dtype == np.float32 and got.shape == (4, c, 9, 9) and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    model.predict(got)  # accepted as is


@pytest.mark.parametrize(
    "images,needle",
    [
        (np.zeros((2, 9, 9, 3), np.float32), "uint8"),
        (np.zeros((2, 9, 9), np.uint8), r"\(N, 9, 9, 3\)"),
        (np.zeros((2, 3, 9, 9), np.uint8), r"\(N, 9, 9, 3\)"),
    ],
    ids=["float", "NHW for rgb", "NCHW"],
)
def test_preprocess_rejects_bad_images(tiny_rt, images, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_rt["rgb"].preprocess(images)


@pytest.mark.parametrize("method", ["predict", "run_all_exits"])
def test_empty_batch(tiny_rt, method):
    out = getattr(tiny_rt["rgb"], method)(np.zeros((0, 3, 9, 9), np.float32))
    logits = out.logits if method == "predict" else out[-1]
    assert logits.shape == (0, K)
