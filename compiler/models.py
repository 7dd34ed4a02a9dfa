"""Early-exit CNNs for CIFAR-sized (3x32x32) and MNIST-sized (1x28x28) inputs.

Every model here returns a Python ``list`` of logits tensors from ``forward``, one per exit,
shallowest first, the last being the backbone's own classifier. The models are written so that
``torch.fx.symbolic_trace`` sees only a small, fixed op vocabulary that the compiler lowers:

    call_module:   Conv2d, BatchNorm2d, ReLU, ReLU6, AdaptiveAvgPool2d, Flatten, Linear
    call_function: operator.add (residual joins)

No Identity modules, no dropout, no in-place activations, no tensor-dependent control flow. All
branching in ``forward`` depends only on configuration fixed in ``__init__``, so it is unrolled
at trace time.

Shallow exit heads follow "Be Your Own Teacher" (Zhang et al., 2019) as used by ESCEPE: a small
bottleneck that strides down toward the final stage's spatial size and projects up to the final
feature width, so every exit's pooled feature vector has the same dimension as the final one
(needed for feature-hint self-distillation), then AdaptiveAvgPool2d(1) -> Flatten -> Linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = [
    "MODELS",
    "BasicBlock",
    "EarlyExitNet",
    "ExitHead",
    "InvertedResidual",
    "MobileNetEE",
    "PreActBlock",
    "ResNetEE",
    "WideResNetEE",
    "build_model",
    "mobilenet_ee",
    "resnet18_ee",
    "resnet20_ee",
    "resnet56_ee",
    "wide_resnet_ee",
]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
    """Conv (no bias: the BN right after it makes a bias redundant) followed by BN."""
    conv = nn.Conv2d(
        c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False
    )
    return conv, nn.BatchNorm2d(c_out)


def _init_weights(module: nn.Module) -> None:
    """Kaiming (fan_out) for convs as in torchvision's ResNets; BN starts as the identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _count(params) -> int:
    return sum(p.numel() for p in params)


# -----------------------------------------------------------------------------
# building blocks


class BasicBlock(nn.Module):
    """ResNet basic block with option-B (1x1 conv + BN) projection when the shape changes.

    (N, c_in, H, W) -> (N, c_out, H/stride, W/stride)
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3)
        # None rather than nn.Identity so the traced graph has no Identity module to lower.
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + sc)


class PreActBlock(nn.Module):
    """Wide-ResNet pre-activation block: BN -> ReLU -> conv, twice, plus shortcut.

    (N, c_in, H, W) -> (N, c_out, H/stride, W/stride)

    When the shape changes the 1x1 projection reads the *pre-activated* input (as in the
    reference WRN code), so BN1 does not necessarily follow a conv and cannot always be folded.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv1(a)
        out = self.conv2(self.relu2(self.bn2(out)))
        sc = x if self.shortcut is None else self.shortcut(a)
        return out + sc


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand -> depthwise 3x3 -> 1x1 linear project.

    (N, c_in, H, W) -> (N, c_out, H/stride, W/stride)

    The expansion conv is skipped when expand_ratio == 1 (as in MobileNetV2's first block);
    the residual add exists only when stride is 1 and channels match.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = c_in * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        # No activation after the projection: the "linear bottleneck" of MobileNetV2.
        layers += [*_conv_bn(hidden, c_out, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class ExitHead(nn.Module):
    """Shallow exit: bottleneck that downsamples toward the final stage, then a classifier.

    (N, c_in, H, W) -> body -> (N, c_out, H / 2**n_down, W / 2**n_down)
                    -> pool/flatten -> (N, c_out) feature -> fc -> (N, num_classes)

    body = 1x1 reduce (c_in -> c_mid) -> BN -> act,
           n_down x [3x3 stride-2 conv -> BN -> act],
           1x1 up (c_mid -> c_out) -> BN -> act.
    c_out is the backbone's final feature width so feature hints compare like with like.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        num_classes: int,
        n_down: int,
        reduction: int = 2,
        act: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        c_mid = max(c_in // reduction, 8)
        layers: list[nn.Module] = [*_conv_bn(c_in, c_mid, 1), act()]
        for _ in range(n_down):
            layers += [*_conv_bn(c_mid, c_mid, 3, stride=2), act()]
        layers += [*_conv_bn(c_mid, c_out, 1), act()]
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_out, num_classes)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.flatten(self.pool(self.body(x)))  # (N, c_out)
        return self.fc(feat), feat  # (N, num_classes), (N, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


# -----------------------------------------------------------------------------
# shared early-exit skeleton


class EarlyExitNet(nn.Module):
    """stem -> stages[0..S-1] -> final_features -> pool -> flatten -> fc, with shallow exit heads
    tapping the outputs of the stages listed in ``exit_stages`` (1-based, < S).

    Subclasses build ``stem`` (Sequential), ``stages`` (ModuleList), ``final_features``
    (Sequential or None), ``fc`` and call ``_attach_exits``.

    Attributes a compiler can rely on:
        exit_stages: tuple[int, ...]   stages after which a shallow exit sits, ascending
        exit_names:  list[str]         e.g. ["exit1", "exit2", "final"]; output order of forward
        num_exits:   int               len(exit_names)
        feature_dim: int               width of every exit's pooled feature vector
        exit_heads:  nn.ModuleDict     exit name -> ExitHead (shallow exits only)
    """

    stem: nn.Sequential
    stages: nn.ModuleList
    final_features: nn.Sequential | None
    fc: nn.Linear

    def _attach_exits(
        self,
        exits: Sequence[int],
        stage_channels: Sequence[int],
        stage_strides: Sequence[int],
        feature_dim: int,
        num_classes: int,
        head_reduction: int,
        act: type[nn.Module],
    ) -> None:
        n_stages = len(stage_channels)
        exit_stages = tuple(sorted(set(int(e) for e in exits)))
        if len(exit_stages) != len(tuple(exits)) or any(not 1 <= e < n_stages for e in exit_stages):
            raise ValueError(
                f"exits must be distinct stage numbers in 1..{n_stages - 1}, got {tuple(exits)}"
            )
        self.exit_stages = exit_stages
        self.feature_dim = feature_dim
        self.exit_heads = nn.ModuleDict()
        # Plain dict (not a buffer or module): forward consults it at trace time only.
        self._exit_after: dict[int, str] = {}
        for s in exit_stages:
            # Downsample as many times as the remaining stages do, so the head ends at the
            # same spatial size as the final stage.
            n_down = sum(1 for st in stage_strides[s:] if st == 2)
            name = f"exit{s}"
            self.exit_heads[name] = ExitHead(
                stage_channels[s - 1], feature_dim, num_classes, n_down, head_reduction, act
            )
            self._exit_after[s - 1] = name
        self.exit_names = [f"exit{s}" for s in exit_stages] + ["final"]
        self.num_exits = len(self.exit_names)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def _forward_impl(
        self, x: torch.Tensor, with_features: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        x = self.stem(x)  # (N, C0, H, W)
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (N, C_i, H_i, W_i)
            name = self._exit_after.get(i)
            if name is not None:
                lg, ft = self.exit_heads[name].forward_with_features(x)
                logits.append(lg)  # (N, num_classes)
                feats.append(ft)  # (N, feature_dim)
        if self.final_features is not None:
            x = self.final_features(x)
        ft = self.flatten(self.pool(x))  # (N, feature_dim)
        logits.append(self.fc(ft))  # (N, num_classes)
        feats.append(ft)
        return logits, feats

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, in_channels, H, W) -> [ (N, num_classes) ] * num_exits, shallowest first."""
        return self._forward_impl(x, with_features=False)[0]

    def forward_with_features(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits as ``forward``, plus per exit the pooled (N, feature_dim) input of its fc."""
        return self._forward_impl(x, with_features=True)

    def backbone_parameters(self):
        """Everything except the shallow exit heads (the final classifier is backbone)."""
        head_ids = {id(p) for p in self.exit_heads.parameters()}
        return (p for p in self.parameters() if id(p) not in head_ids)

    def param_counts(self) -> dict[str, int]:
        """{"backbone": n, "exit1": n, ..., "total": n}; backbone includes the final fc."""
        counts = {"backbone": _count(self.backbone_parameters())}
        for name, head in self.exit_heads.items():
            counts[name] = _count(head.parameters())
        counts["total"] = _count(self.parameters())
        return counts


# -----------------------------------------------------------------------------
# concrete models


class ResNetEE(EarlyExitNet):
    """CIFAR-style ResNet built from BasicBlocks, stage i having width * 2**i channels.

    stem: 3x3 conv stride 1 (no maxpool) -> BN -> ReLU; stages after the first stride 2.
    ResNet-18: blocks=(2, 2, 2, 2); ResNet-20: (3, 3, 3); ResNet-56: (9, 9, 9).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        exits: Sequence[int] = (1, 2, 3),
        head_reduction: int = 2,
    ):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU())
        channels = [width * 2**i for i in range(len(blocks))]
        strides = [1] + [2] * (len(blocks) - 1)
        stages = []
        c_in = width
        for n, c, s in zip(blocks, channels, strides):
            layers = [BasicBlock(c_in, c, s)] + [BasicBlock(c, c) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.final_features = None
        self.fc = nn.Linear(channels[-1], num_classes)
        self._attach_exits(
            exits, channels, strides, channels[-1], num_classes, head_reduction, nn.ReLU
        )
        _init_weights(self)


class WideResNetEE(EarlyExitNet):
    """WRN-depth-widen (Zagoruyko & Komodakis) with pre-activation blocks.

    Stage widths are width * widen * (1, 2, 4) (width=16 gives the paper's 16k/32k/64k);
    (depth - 4) / 6 blocks per stage; final BN -> ReLU before pooling.
    """

    def __init__(
        self,
        depth: int = 16,
        widen: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        exits: Sequence[int] = (1, 2),
        head_reduction: int = 2,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        # Stem is a bare conv: the first block's BN -> ReLU pre-activates it.
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False))
        channels = [width * widen * m for m in (1, 2, 4)]
        strides = [1, 2, 2]
        stages = []
        c_in = width
        for c, s in zip(channels, strides):
            layers = [PreActBlock(c_in, c, s)] + [PreActBlock(c, c) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.final_features = nn.Sequential(nn.BatchNorm2d(channels[-1]), nn.ReLU())
        self.fc = nn.Linear(channels[-1], num_classes)
        self._attach_exits(
            exits, channels, strides, channels[-1], num_classes, head_reduction, nn.ReLU
        )
        _init_weights(self)


# (expand_ratio, channels at width=32, repeats, first stride) per stage: MobileNetV2's first
# five groups, regrouped into three stages at 32x32 / 16x16 / 8x8 for CIFAR-sized inputs.
_MOBILENET_CFG: list[list[tuple[int, int, int, int]]] = [
    [(1, 16, 1, 1), (6, 24, 2, 1)],
    [(6, 32, 3, 2)],
    [(6, 64, 4, 2), (6, 96, 3, 1)],
]


class MobileNetEE(EarlyExitNet):
    """MobileNetV2-style network, three stages, ReLU6 everywhere.

    stem: 3x3 conv stride 1 -> BN -> ReLU6 with ``width`` channels (32 = MobileNetV2's 1.0x);
    all block channels scale by width / 32. Final: 1x1 conv to 4x the last block width ->
    BN -> ReLU6 -> pool -> fc.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        exits: Sequence[int] = (1, 2),
        head_reduction: int = 1,
    ):
        super().__init__()
        scale = width / 32

        def ch(c: int) -> int:
            return max(4, int(round(c * scale)))

        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU6())
        stages, channels, strides = [], [], []
        c_in = width
        for stage_cfg in _MOBILENET_CFG:
            layers = []
            for t, c, n, s in stage_cfg:
                for j in range(n):
                    layers.append(InvertedResidual(c_in, ch(c), s if j == 0 else 1, t))
                    c_in = ch(c)
            stages.append(nn.Sequential(*layers))
            channels.append(c_in)
            strides.append(stage_cfg[0][3])
        self.stages = nn.ModuleList(stages)
        feature_dim = 4 * c_in
        self.final_features = nn.Sequential(*_conv_bn(c_in, feature_dim, 1), nn.ReLU6())
        self.fc = nn.Linear(feature_dim, num_classes)
        self._attach_exits(
            exits, channels, strides, feature_dim, num_classes, head_reduction, nn.ReLU6
        )
        _init_weights(self)


# -----------------------------------------------------------------------------
# factories


def resnet18_ee(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    exits: Sequence[int] = (1, 2, 3),
    head_reduction: int = 2,
) -> ResNetEE:
    """CIFAR ResNet-18 (11.17M params at width 64, 10 classes) with exits after stages 1-3."""
    return ResNetEE((2, 2, 2, 2), num_classes, in_channels, width, exits, head_reduction)


def resnet20_ee(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 16,
    exits: Sequence[int] = (1, 2),
    head_reduction: int = 1,
) -> ResNetEE:
    """CIFAR ResNet-20 (option-B shortcuts, ~0.27M params) with exits after stages 1-2."""
    return ResNetEE((3, 3, 3), num_classes, in_channels, width, exits, head_reduction)


def resnet56_ee(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 16,
    exits: Sequence[int] = (1, 2),
    head_reduction: int = 1,
) -> ResNetEE:
    """CIFAR ResNet-56 (option-B shortcuts, ~0.86M params) with exits after stages 1-2."""
    return ResNetEE((9, 9, 9), num_classes, in_channels, width, exits, head_reduction)


def mobilenet_ee(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 32,
    exits: Sequence[int] = (1, 2),
    head_reduction: int = 1,
) -> MobileNetEE:
    """MobileNetV2-style CIFAR network with exits after stages 1-2."""
    return MobileNetEE(num_classes, in_channels, width, exits, head_reduction)


def wide_resnet_ee(
    depth: int = 16,
    widen: int = 4,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 16,
    exits: Sequence[int] = (1, 2),
    head_reduction: int = 2,
) -> WideResNetEE:
    """WRN-depth-widen (WRN-16-4: 2.75M params) with exits after stages 1-2."""
    return WideResNetEE(depth, widen, num_classes, in_channels, width, exits, head_reduction)


MODELS = {
    "resnet18": resnet18_ee,
    "resnet20": resnet20_ee,
    "resnet56": resnet56_ee,
    "mobilenet": mobilenet_ee,
    "wrn": wide_resnet_ee,
}


def build_model(name: str, **kwargs) -> EarlyExitNet:
    """Instantiate a registered model by name; kwargs go to its factory."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return factory(**kwargs)
