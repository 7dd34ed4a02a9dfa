"""Shape, traceability and parameter-count checks for compiler.models (kept small for CPU CI)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from compiler.models import (
    MODELS,
    build_model,
    mobilenet_ee,
    resnet18_ee,
    resnet20_ee,
    resnet56_ee,
    wide_resnet_ee,
)

# Smallest widths that still exercise every block type; keeps the whole file well under 30 s.
SMALL = {
    "resnet18": {"width": 8},
    "resnet20": {"width": 8},
    "resnet56": {"width": 4},
    "mobilenet": {"width": 8},
    "wrn": {"width": 4, "widen": 2},
}
INPUTS = [(1, 28), (3, 32)]

# The op vocabulary the compiler lowers; anything else in a traced graph is a contract break.
ALLOWED_MODULES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Linear,
    nn.Flatten,
)
ALLOWED_FUNCTIONS = {operator.add, torch.cat, torch.flatten}


def _small(name: str, in_channels: int, num_classes: int = 7, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, **SMALL[name], **kw)
    # eval: BN uses running stats, so outputs are deterministic and batch-independent.
    return model.eval()


@pytest.mark.parametrize("in_channels,size", INPUTS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_trace_and_features(name, in_channels, size):
    model = _small(name, in_channels)
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = model(x)
        assert isinstance(out, list)
        assert len(out) == model.num_exits == len(model.exit_names)
        assert model.exit_names[-1] == "final"
        for logits in out:
            assert logits.shape == (2, 7)
            assert torch.isfinite(logits).all()

        gm = fx.symbolic_trace(model)
        traced = gm(x)
        assert isinstance(traced, list) and len(traced) == len(out)
        for a, b in zip(out, traced):
            assert torch.equal(a, b)

        logits, feats = model.forward_with_features(x)
        assert len(logits) == len(feats) == model.num_exits
        for a, b in zip(out, logits):
            assert torch.equal(a, b)
        for f in feats:
            assert f.shape == (2, model.feature_dim)

    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            assert isinstance(mod, ALLOWED_MODULES), (node.target, type(mod))
            assert not getattr(mod, "inplace", False), node.target
        elif node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS, node.target
        else:
            assert node.op in ("placeholder", "output", "get_attr"), node.op


def test_exits_configurable():
    x = torch.randn(1, 3, 32, 32)
    static = resnet18_ee(width=8, exits=()).eval()
    assert static.exit_names == ["final"]
    assert len(static(x)) == 1
    full = resnet18_ee(width=8, exits=(1, 2, 3)).eval()
    assert full.exit_names == ["exit1", "exit2", "exit3", "final"]
    assert len(full(x)) == 4
    partial = resnet18_ee(width=8, exits=(3, 1)).eval()
    assert partial.exit_names == ["exit1", "exit3", "final"]
    assert len(fx.symbolic_trace(partial)(x)) == 3
    # The final stage has no shallow exit (its exit is the backbone classifier).
    for bad in [(0,), (4,), (1, 1)]:
        with pytest.raises(ValueError):
            resnet18_ee(width=8, exits=bad)
    with pytest.raises(ValueError):
        resnet20_ee(width=8, exits=(3,))


def test_heads_do_not_change_backbone():
    static = resnet18_ee(width=8, exits=()).param_counts()
    full = resnet18_ee(width=8).param_counts()
    assert static["backbone"] == static["total"] == full["backbone"]
    assert full["total"] == full["backbone"] + sum(full[f"exit{s}"] for s in (1, 2, 3))


def test_resnet18_param_count():
    counts = resnet18_ee(width=64).param_counts()
    # kuangliu/pytorch-cifar ResNet18: 11,173,962 parameters with a 10-class fc.
    assert abs(counts["backbone"] - 11_173_962) / 11_173_962 < 0.01
    # Shallow heads should stay a small fraction of the backbone.
    assert counts["total"] - counts["backbone"] < 0.1 * counts["backbone"]


def test_cifar_resnet_param_counts():
    # He et al. (2016) Table 6: ResNet-20 0.27M, ResNet-56 0.85M (option-A shortcuts; option B
    # adds ~2.7k projection parameters, well inside 1%).
    assert abs(resnet20_ee().param_counts()["backbone"] - 0.27e6) / 0.27e6 < 0.01
    assert abs(resnet56_ee().param_counts()["backbone"] - 0.85e6) / 0.85e6 < 0.01


def test_wrn_param_count():
    # Zagoruyko & Komodakis: WRN-16-4 has 2.7M parameters (2,748,890 for 10 classes).
    assert abs(wide_resnet_ee(depth=16, widen=4).param_counts()["backbone"] - 2.75e6) < 0.01e6
    with pytest.raises(ValueError):
        wide_resnet_ee(depth=15)


def test_mobilenet_residuals_present():
    gm = fx.symbolic_trace(mobilenet_ee(width=8))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    # 3-stage config: stage1 1 add, stage2 2 adds, stage3 3 + 2 adds.
    assert len(adds) == 8
    depthwise = [m for m in gm.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("vgg16")
