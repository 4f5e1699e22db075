"""Plain-PyTorch reference DenseNet-BC and Inception-v3 for parity tests (torch only, no torchvision).

Both networks use torchvision's module and parameter names, so their ``state_dict()`` keys are
those of torchvision checkpoints, and expose the same size knobs as the xaijax models:

* :class:`DenseNetRef` — ``growth_rate``, ``block_config``, ``num_init_features``,
  ``bn_size``, ``num_classes``;
* :class:`Inception3Ref` — ``num_classes``, ``transform_input``, ``width`` (every conv's
  channel count ``c`` becomes ``max(1, int(c * width))``) and ``aux_logits`` (build the
  auxiliary head, whose ``AuxLogits.*`` keys the xaijax porter must ignore; it never affects
  eval-mode outputs).

Tensors are NCHW. ``randomize_`` fills every parameter and BatchNorm running statistic with
seeded random values so that parity tests exercise all of them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseNetRef", "Inception3Ref", "randomize_"]


# --------------------------------------------------------------------------------------
# DenseNet-BC
# --------------------------------------------------------------------------------------


class _RefDenseLayer(nn.Module):
    def __init__(self, in_ch: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, mid, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, previous: list[torch.Tensor]) -> torch.Tensor:
        h = torch.cat(previous, dim=1)
        h = self.conv1(self.relu1(self.norm1(h)))
        return self.conv2(self.relu2(self.norm2(h)))


class _RefDenseBlock(nn.Module):
    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _RefDenseLayer(in_ch + i * growth_rate, growth_rate, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.children():
            feats.append(layer(feats))
        return torch.cat(feats, dim=1)


class _RefTransition(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_ch))
        self.add_module("relu", nn.ReLU())
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNetRef(nn.Module):
    """DenseNet-BC (torchvision names: ``features.conv0`` ... ``features.norm5``, ``classifier``)."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU())
        self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        ch = num_init_features
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _RefDenseBlock(n, ch, growth_rate, bn_size))
            ch += n * growth_rate
            if i < len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _RefTransition(ch, ch // 2))
                ch //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(ch))
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.features(x))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.classifier(h)


# --------------------------------------------------------------------------------------
# Inception-v3
# --------------------------------------------------------------------------------------


class BasicConv2dRef(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _scale(width: float):
    return lambda c: max(1, int(c * width))


class _RefA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int, width: float) -> None:
        super().__init__()
        c = _scale(width)
        self.branch1x1 = BasicConv2dRef(in_ch, c(64), 1)
        self.branch5x5_1 = BasicConv2dRef(in_ch, c(48), 1)
        self.branch5x5_2 = BasicConv2dRef(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2dRef(in_ch, c(64), 1)
        self.branch3x3dbl_2 = BasicConv2dRef(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2dRef(c(96), c(96), 3, padding=1)
        self.branch_pool = BasicConv2dRef(in_ch, c(pool_features), 1)
        self.out_channels = c(64) * 2 + c(96) + c(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        p = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([a, b, d, p], 1)


class _RefB(nn.Module):
    def __init__(self, in_ch: int, width: float) -> None:
        super().__init__()
        c = _scale(width)
        self.branch3x3 = BasicConv2dRef(in_ch, c(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2dRef(in_ch, c(64), 1)
        self.branch3x3dbl_2 = BasicConv2dRef(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2dRef(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, d, F.max_pool2d(x, 3, stride=2)], 1)


class _RefC(nn.Module):
    def __init__(self, in_ch: int, channels_7x7: int, width: float) -> None:
        super().__init__()
        c = _scale(width)
        c7 = c(channels_7x7)
        self.branch1x1 = BasicConv2dRef(in_ch, c(192), 1)
        self.branch7x7_1 = BasicConv2dRef(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2dRef(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2dRef(c7, c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2dRef(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2dRef(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2dRef(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2dRef(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2dRef(c7, c(192), (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2dRef(in_ch, c(192), 1)
        self.out_channels = 4 * c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = m(d)
        p = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([a, b, d, p], 1)


class _RefD(nn.Module):
    def __init__(self, in_ch: int, width: float) -> None:
        super().__init__()
        c = _scale(width)
        self.branch3x3_1 = BasicConv2dRef(in_ch, c(192), 1)
        self.branch3x3_2 = BasicConv2dRef(c(192), c(320), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2dRef(in_ch, c(192), 1)
        self.branch7x7x3_2 = BasicConv2dRef(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2dRef(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2dRef(c(192), c(192), 3, stride=2)
        self.out_channels = c(320) + c(192) + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = m(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class _RefE(nn.Module):
    def __init__(self, in_ch: int, width: float) -> None:
        super().__init__()
        c = _scale(width)
        self.branch1x1 = BasicConv2dRef(in_ch, c(320), 1)
        self.branch3x3_1 = BasicConv2dRef(in_ch, c(384), 1)
        self.branch3x3_2a = BasicConv2dRef(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2dRef(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2dRef(in_ch, c(448), 1)
        self.branch3x3dbl_2 = BasicConv2dRef(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2dRef(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2dRef(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2dRef(in_ch, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([a, b, d, p], 1)


class _RefAux(nn.Module):
    """torchvision's training-only auxiliary head (present only for its state-dict keys)."""

    def __init__(self, in_ch: int, num_classes: int, width: float) -> None:
        super().__init__()
        c = _scale(width)
        self.conv0 = BasicConv2dRef(in_ch, c(128), 1)
        self.conv1 = BasicConv2dRef(c(128), c(768), 5)
        self.fc = nn.Linear(c(768), num_classes)


class Inception3Ref(nn.Module):
    """Inception-v3 in eval mode (torchvision names; ``AuxLogits`` built but never used)."""

    def __init__(
        self,
        num_classes: int = 1000,
        transform_input: bool = False,
        width: float = 1.0,
        aux_logits: bool = False,
    ) -> None:
        super().__init__()
        c = _scale(width)
        self.transform_input = transform_input
        self.Conv2d_1a_3x3 = BasicConv2dRef(3, c(32), 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2dRef(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = BasicConv2dRef(c(32), c(64), 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2dRef(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = BasicConv2dRef(c(80), c(192), 3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b = _RefA(c(192), 32, width)
        self.Mixed_5c = _RefA(self.Mixed_5b.out_channels, 64, width)
        self.Mixed_5d = _RefA(self.Mixed_5c.out_channels, 64, width)
        self.Mixed_6a = _RefB(self.Mixed_5d.out_channels, width)
        self.Mixed_6b = _RefC(self.Mixed_6a.out_channels, 128, width)
        self.Mixed_6c = _RefC(self.Mixed_6b.out_channels, 160, width)
        self.Mixed_6d = _RefC(self.Mixed_6c.out_channels, 160, width)
        self.Mixed_6e = _RefC(self.Mixed_6d.out_channels, 192, width)
        if aux_logits:
            self.AuxLogits = _RefAux(self.Mixed_6e.out_channels, num_classes, width)
        self.Mixed_7a = _RefD(self.Mixed_6e.out_channels, width)
        self.Mixed_7b = _RefE(self.Mixed_7a.out_channels, width)
        self.Mixed_7c = _RefE(self.Mixed_7b.out_channels, width)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(self.Mixed_7c.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            x = torch.cat(
                [
                    x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
                    x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
                    x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5,
                ],
                1,
            )
        for name in (
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
            "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
            "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
            "avgpool", "dropout",
        ):
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights and BatchNorm statistics (fan-in scaled, activations stay O(1))."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model
