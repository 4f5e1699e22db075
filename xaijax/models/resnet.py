"""ResNet (He et al., 2016; torchvision's v1.5) in ``flax.linen`` with torchvision's names.

Layout (module paths, as in ``torchvision.models.resnet``)::

    conv1 (7x7/2, pad 3, no bias), bn1, relu, maxpool (3x3/2, pad 1)
    layer1 .. layer4   stages; blocks named "0", "1", ...; each block has
                       conv1, bn1, relu1, conv2, bn2, [relu2, conv3, bn3,] [downsample "0" conv
                       1x1/stride, "1" bn], add (residual sum), relu (after the sum)
    avgpool (global), flatten, fc

torchvision's blocks reuse one ``relu`` module; here every ReLU is its own parameter-free
module (``relu1``, ``relu2`` inside the branch, ``relu`` after the residual ``add``), so each
layer name is called exactly once per forward pass. The Bottleneck puts the stride on its
3x3 convolution (torchvision's "v1.5").

Caffe-converted ResNets (TorchRay's VOC/COCO ResNet50, the original Caffe layout, "v1")
differ in three places, each a :class:`ResNet` switch that defaults to torchvision's
behaviour: ``stride_in_1x1`` (the first block of ``layer2``..``layer4`` strides its 1x1
``conv1``; its 3x3 ``conv2`` has stride 1), ``stem_bias`` (``conv1`` of the stem has a bias)
and ``caffe_stem_pool`` (the stem max-pool is 3x3/2, padding 0, ``ceil_mode=True``).

Conventions: inputs NHWC float (N, H, W, 3), outputs logits (N, num_classes). At default
settings the parameters have torchvision's shapes transposed (conv kernels HWIO, the ``fc``
kernel (in, out)). ``layer4`` is the default CAM layer.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Union

import flax.linen as nn
import jax

from xaijax.models import layers as L
from xaijax.models.registry import ArchSpec, register

__all__ = ["BasicBlock", "Bottleneck", "Downsample", "ResLayer", "ResNet"]


def _conv3x3(features: int, stride: int, groups: int, name: str) -> nn.Module:
    """3x3 convolution, padding 1, no bias (grouped when ``groups > 1``)."""
    if groups == 1:
        return L.conv(features, 3, stride, 1, bias=False, name=name)
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        feature_group_count=groups,
        use_bias=False,
        name=name,
    )


class Downsample(nn.Module):
    """Projection shortcut: "0" = conv 1x1/stride (no bias), "1" = BatchNorm."""

    features: int
    stride: int = 1
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = L.conv(self.features, 1, self.stride, 0, bias=False, name="0")(x)
        return L.batch_norm(self.train, name="1")(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Input NHWC (N, H, W, C_in); output (N, ceil(H/stride), ceil(W/stride), planes).
    A ``downsample`` projection is used when ``stride != 1`` or ``C_in != planes``.
    """

    expansion: ClassVar[int] = 1

    planes: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    train: bool = False
    stride_in_1x1: bool = False  # no effect: the stride is already on the first convolution

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.groups != 1 or self.base_width != 64:
            raise ValueError(
                f"BasicBlock supports only groups=1 and width_per_group=64, got "
                f"groups={self.groups}, width_per_group={self.base_width}"
            )
        out_ch = self.planes * self.expansion
        out = L.conv(self.planes, 3, self.stride, 1, bias=False, name="conv1")(x)
        out = L.batch_norm(self.train, name="bn1")(out)
        out = L.ReLU(name="relu1")(out)
        out = L.conv(self.planes, 3, 1, 1, bias=False, name="conv2")(out)
        out = L.batch_norm(self.train, name="bn2")(out)
        identity = x
        if self.stride != 1 or x.shape[-1] != out_ch:
            identity = Downsample(out_ch, self.stride, self.train, name="downsample")(x)
        out = L.Add(name="add")(out, identity)
        return L.ReLU(name="relu")(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with 4x expansion and a residual connection (ResNet-50+).

    The inner width is ``int(planes * base_width / 64) * groups`` (torchvision's rule, so
    ResNeXt / wide ResNets use the same block). Input NHWC (N, H, W, C_in); output
    (N, ceil(H/stride), ceil(W/stride), 4 * planes).

    ``stride_in_1x1=False`` puts the stride on the 3x3 ``conv2`` (torchvision's "v1.5");
    ``True`` puts it on the 1x1 ``conv1`` (the original Caffe "v1", as in TorchRay's
    Caffe-converted ResNet50). The output shape is the same either way.
    """

    expansion: ClassVar[int] = 4

    planes: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    train: bool = False
    stride_in_1x1: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = int(self.planes * (self.base_width / 64.0)) * self.groups
        if inner < 1:
            raise ValueError(
                f"Bottleneck inner width int(planes * width_per_group / 64) * groups is {inner} "
                f"(planes={self.planes}, width_per_group={self.base_width}, groups={self.groups}); it must be >= 1"
            )
        out_ch = self.planes * self.expansion
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        out = L.conv(inner, 1, s1, 0, bias=False, name="conv1")(x)
        out = L.batch_norm(self.train, name="bn1")(out)
        out = L.ReLU(name="relu1")(out)
        out = _conv3x3(inner, s3, self.groups, name="conv2")(out)
        out = L.batch_norm(self.train, name="bn2")(out)
        out = L.ReLU(name="relu2")(out)
        out = L.conv(out_ch, 1, 1, 0, bias=False, name="conv3")(out)
        out = L.batch_norm(self.train, name="bn3")(out)
        identity = x
        if self.stride != 1 or x.shape[-1] != out_ch:
            identity = Downsample(out_ch, self.stride, self.train, name="downsample")(x)
        out = L.Add(name="add")(out, identity)
        return L.ReLU(name="relu")(out)


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResLayer(nn.Module):
    """One ResNet stage (torchvision's ``layerN`` Sequential): blocks named "0", "1", ...

    The first block carries the stride (and the projection shortcut where needed);
    ``stride_in_1x1`` is passed on to every block.
    """

    block: Block
    planes: int
    blocks: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    train: bool = False
    stride_in_1x1: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.blocks):
            x = self.block(
                self.planes,
                stride=self.stride if i == 0 else 1,
                groups=self.groups,
                base_width=self.base_width,
                train=self.train,
                stride_in_1x1=self.stride_in_1x1,
                name=str(i),
            )(x)
        return x


class ResNet(nn.Module):
    """ResNet classifier with torchvision's module names.

    Attributes:
      block: :class:`BasicBlock` or :class:`Bottleneck`.
      layers: number of blocks in ``layer1`` .. ``layer4`` (ResNet-50: ``(3, 4, 6, 3)``).
      num_classes: number of logits.
      width: planes of ``layer1`` and channels of the stem (64 in torchvision); stage ``i``
        has ``width * 2**i`` planes. Small values give tiny variants.
      groups, width_per_group: ResNeXt / wide-ResNet knobs of the Bottleneck (1, 64).
      train: BatchNorm uses batch statistics (``mutable=["batch_stats"]``).
      stride_in_1x1: Bottleneck stride on the 1x1 ``conv1`` instead of the 3x3 ``conv2``
        (Caffe "v1"; no effect on BasicBlock). Default ``False`` (torchvision).
      stem_bias: the stem ``conv1`` has a bias (Caffe). Default ``False`` (torchvision).
      caffe_stem_pool: stem max-pool 3x3/2 with padding 0 and ``ceil_mode=True`` (Caffe)
        instead of 3x3/2 with padding 1 (torchvision). Default ``False``.

    ``__call__(x)``: x NHWC float (N, H, W, 3) -> logits (N, num_classes).
    """

    block: Block = Bottleneck
    layers: tuple[int, ...] = (3, 4, 6, 3)
    num_classes: int = 1000
    width: int = 64
    groups: int = 1
    width_per_group: int = 64
    train: bool = False
    stride_in_1x1: bool = False
    stem_bias: bool = False
    caffe_stem_pool: bool = False

    cam_layer = "layer4"  # default CAM layer
    excitation_layer = "layer3"  # the stride-16 stage, where TorchRay reads Excitation Backprop

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.block not in (BasicBlock, Bottleneck):
            raise ValueError(f"ResNet block must be BasicBlock or Bottleneck, got {self.block!r}")
        if len(self.layers) != 4 or any(int(n) < 1 for n in self.layers):
            raise ValueError(f"ResNet layers must be 4 positive block counts, got {tuple(self.layers)}")
        if self.width < 1 or self.groups < 1 or self.width_per_group < 1 or self.num_classes < 1:
            raise ValueError(
                f"ResNet width, groups, width_per_group and num_classes must be >= 1, got "
                f"{self.width}, {self.groups}, {self.width_per_group}, {self.num_classes}"
            )
        if x.ndim != 4:
            raise ValueError(f"ResNet expects an NHWC batch (N, H, W, C), got an array of shape {x.shape}")
        x = L.conv(self.width, 7, 2, 3, bias=self.stem_bias, name="conv1")(x)
        x = L.batch_norm(self.train, name="bn1")(x)
        x = L.ReLU(name="relu")(x)
        if self.caffe_stem_pool:
            x = L.MaxPool2d(3, 2, 0, ceil_mode=True, name="maxpool")(x)
        else:
            x = L.MaxPool2d(3, 2, 1, name="maxpool")(x)
        for i, n in enumerate(self.layers):
            x = ResLayer(
                self.block,
                self.width * 2**i,
                int(n),
                stride=1 if i == 0 else 2,
                groups=self.groups,
                base_width=self.width_per_group,
                train=self.train,
                stride_in_1x1=self.stride_in_1x1,
                name=f"layer{i + 1}",
            )(x)
        x = L.AdaptiveAvgPool2d(1, name="avgpool")(x)
        x = L.Flatten(name="flatten")(x)
        return L.dense(self.num_classes, name="fc")(x)


_DEPTHS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}

for _name, (_block, _layers) in _DEPTHS.items():
    register(
        ArchSpec(
            name=_name,
            family="resnet",
            build=functools.partial(ResNet, block=_block, layers=_layers),
            input_size=224,
            min_input_size=1,
        )
    )
del _name, _block, _layers
