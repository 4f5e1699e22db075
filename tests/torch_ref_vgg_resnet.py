"""Plain-PyTorch reference VGG and ResNet for parity tests (test-only; needs torch).

Written from the architecture descriptions, with torchvision's module and parameter names
(``features.0.weight``, ``layer1.0.downsample.1.running_var``, ...) so that their state dicts
have exactly the keys and shapes of ``torchvision.models.vgg*`` / ``resnet*`` at default
settings. Size knobs mirror the flax zoo: VGG ``width`` (channel multiplier, floor
``max(1, int(c * width))``), ``hidden``, ``pool_size``; ResNet ``width`` (stem / layer1
planes), ``groups``, ``width_per_group``. Tensors are NCHW, as torch expects.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

CfgEntry = Union[int, str]


def _scaled(c: int, width: float) -> int:
    return max(1, int(c * width))


class TorchVGG(nn.Module):
    """VGG: ``features`` (conv3x3/pad1 [+BN] + ReLU per int, 2x2 max-pool per "M"),
    ``avgpool`` (adaptive to ``pool_size``), ``classifier`` (Linear, ReLU, Dropout) x2 + Linear."""

    def __init__(
        self,
        cfg: Sequence[CfgEntry],
        batch_norm: bool = False,
        num_classes: int = 1000,
        width: float = 1.0,
        hidden: int = 4096,
        pool_size: int = 7,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c_in = 3
        for v in cfg:
            if v == "M":
                mods.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            c_out = _scaled(int(v), width)
            mods.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if batch_norm:
                mods.append(nn.BatchNorm2d(c_out))
            mods.append(nn.ReLU())
            c_in = c_out
        self.features = nn.Sequential(*mods)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(c_in * pool_size * pool_size, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class TorchBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock needs groups=1, width_per_group=64")
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        inner = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(c_in, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=groups, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    """ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages (stride 1, 2, 2, 2), global pool, fc."""

    def __init__(
        self,
        block: type[TorchBasicBlock] | type[TorchBottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        width: int = 64,
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = width
        for i, n in enumerate(layers):
            planes, stride = width * 2**i, (1 if i == 0 else 2)
            c_out = planes * block.expansion
            down = None
            if stride != 1 or c_in != c_out:
                down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            blocks = [block(c_in, planes, stride, down, groups, width_per_group)]
            blocks += [block(c_out, planes, 1, None, groups, width_per_group) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm buffer random values (in place), then ``.eval()``.

    Weights ~ N(0, 1/fan_in) scaled so activations neither vanish nor explode; BN scale in
    [0.5, 1.5], bias ~ N(0, 0.1), running mean ~ N(0, 0.1), running var in [0.5, 1.5].
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()
