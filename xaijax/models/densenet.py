"""DenseNet-BC (Huang et al., CVPR 2017) with torchvision's module names.

Layout (NHWC, float32 unless the inputs/variables are float64)::

    features                       DenseFeatures
      conv0   7x7/2, pad 3, no bias            N,H/2,W/2,num_init_features
      norm0   BatchNorm (eps 1e-5)
      relu0   ReLU
      pool0   MaxPool2d 3x3/2, pad 1           N,H/4,W/4,.
      denseblock1                  DenseBlock
        denselayer1 .. denselayerL DenseLayer
          norm1, relu1, conv1 (1x1, bn_size*growth_rate, no bias),
          norm2, relu2, conv2 (3x3, pad 1, growth_rate, no bias),
          [dropout]  only when drop_rate > 0,
          concat     Concat(input, new features)
      transition1                  Transition
        norm, relu, conv (1x1, channels // 2, no bias), pool (AvgPool2d 2x2/2)
      denseblock2, transition2, ..., denseblockB
      norm5   BatchNorm
    relu        ReLU                (torchvision's functional ``F.relu``; default CAM layer)
    avgpool     AdaptiveAvgPool2d(1)
    flatten     Flatten
    classifier  Dense(num_classes)

**Where the concatenation lives.** torchvision's ``_DenseLayer`` concatenates the list of all
previous feature maps at its start, returns only its ``growth_rate`` new channels, and
``_DenseBlock`` concatenates everything once more at its end. Here each dense layer instead
*ends* with a ``Concat`` named ``concat`` that appends its new channels to its input, so a
dense layer's input already is the concatenation of all previous feature maps (in
torchvision's order: block input first, then layer 1, 2, ...). Every layer name is called
exactly once, and the block output is the output of its last layer. Consequences for
addressing layers:

* ``features.denseblockN`` and ``features.transitionN`` outputs equal torchvision's
  (forward-hook) outputs of the same modules;
* ``features.denseblockN.denselayerM`` outputs the concatenated features
  (``input channels + growth_rate``), whereas a torchvision hook on that module sees only the
  new ``growth_rate`` channels, which here are the output of ``...denselayerM.conv2`` (or
  ``...denselayerM.dropout`` when ``drop_rate > 0``).

Parameter names and shapes equal torchvision's at the default settings (conv kernels HWIO,
the classifier kernel (in, out), BatchNorm ``scale``/``bias`` params and ``mean``/``var``
batch statistics), so torchvision checkpoints port key by key. Weights are initialised with
Flax's defaults (ported or trained weights are expected).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax

from xaijax.models import layers
from xaijax.models.registry import ArchSpec, register

__all__ = [
    "DenseLayer",
    "DenseBlock",
    "Transition",
    "DenseFeatures",
    "DenseNet",
    "densenet_min_input_size",
]


def densenet_min_input_size(num_blocks: int) -> int:
    """Smallest input side a DenseNet with ``num_blocks`` dense blocks accepts.

    The stem halves the side twice (conv0 7x7/2 pad 3, pool0 3x3/2 pad 1) and each of the
    ``num_blocks - 1`` transitions halves it again (floor), which must leave at least one
    pixel: the side must be at least ``2 ** (num_blocks + 1) - 3`` (29 for 4 blocks).
    """
    return 2 ** (num_blocks + 1) - 3


class DenseLayer(nn.Module):
    """One bottleneck dense layer: BN-ReLU-conv1x1-BN-ReLU-conv3x3, then concatenation.

    Input N,H,W,C (all previous features of the block); output N,H,W,C+growth_rate: the input
    followed by the ``growth_rate`` new channels (see the module docstring).
    """

    growth_rate: int
    bn_size: int = 4
    drop_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = layers.batch_norm(self.train, name="norm1")(x)
        y = layers.ReLU(name="relu1")(y)
        y = layers.conv(self.bn_size * self.growth_rate, 1, bias=False, name="conv1")(y)
        y = layers.batch_norm(self.train, name="norm2")(y)
        y = layers.ReLU(name="relu2")(y)
        y = layers.conv(self.growth_rate, 3, padding=1, bias=False, name="conv2")(y)
        if self.drop_rate > 0:
            y = layers.Dropout(self.drop_rate, train=self.train, name="dropout")(y)
        return layers.Concat(name="concat")(x, y)


class DenseBlock(nn.Module):
    """``num_layers`` dense layers named ``denselayer1`` ... ; N,H,W,C -> N,H,W,C+L*growth_rate."""

    num_layers: int
    growth_rate: int
    bn_size: int = 4
    drop_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = DenseLayer(
                self.growth_rate,
                self.bn_size,
                self.drop_rate,
                train=self.train,
                name=f"denselayer{i + 1}",
            )(x)
        return x


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2x2: N,H,W,C -> N,floor(H/2),floor(W/2),``features``."""

    features: int
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.batch_norm(self.train, name="norm")(x)
        x = layers.ReLU(name="relu")(x)
        x = layers.conv(self.features, 1, bias=False, name="conv")(x)
        return layers.AvgPool2d(2, 2, name="pool")(x)


class DenseFeatures(nn.Module):
    """torchvision's ``DenseNet.features``: stem, dense blocks, transitions and ``norm5``.

    Input N,H,W,3; output N,H',W',C (before the final ReLU), with H' = H/32 for 4 blocks.
    """

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.conv(self.num_init_features, 7, stride=2, padding=3, bias=False, name="conv0")(x)
        x = layers.batch_norm(self.train, name="norm0")(x)
        x = layers.ReLU(name="relu0")(x)
        x = layers.MaxPool2d(3, 2, 1, name="pool0")(x)
        num_features = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            x = DenseBlock(
                num_layers,
                self.growth_rate,
                self.bn_size,
                self.drop_rate,
                train=self.train,
                name=f"denseblock{i + 1}",
            )(x)
            num_features += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                num_features //= 2
                x = Transition(num_features, train=self.train, name=f"transition{i + 1}")(x)
        return layers.batch_norm(self.train, name="norm5")(x)


class DenseNet(nn.Module):
    """DenseNet-BC classifier with torchvision's structure (see the module docstring).

    Attributes:
      growth_rate: new channels per dense layer (``k`` in the paper); 32 for DenseNet-121.
      block_config: number of dense layers in each block; (6, 12, 24, 16) for DenseNet-121.
      num_init_features: channels of the stem convolution ``conv0``.
      bn_size: bottleneck width factor (``conv1`` has ``bn_size * growth_rate`` channels).
      drop_rate: dropout after each dense layer (0: none, as in torchvision's weights).
      num_classes: number of logits.
      train: BatchNorm uses batch statistics (apply with ``mutable=["batch_stats"]``) and
        dropout is active (needs a ``dropout`` RNG).

    Call: ``x`` NHWC (N, H, W, C), H and W at least ``densenet_min_input_size(len(block_config))``
    (29 for four blocks) -> logits (N, num_classes).
    """

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    num_classes: int = 1000
    train: bool = False

    def _check(self, x: jax.Array) -> None:
        if len(self.block_config) < 1 or any(int(n) < 1 for n in self.block_config):
            raise ValueError(f"block_config must be a non-empty sequence of positive ints, got {self.block_config!r}")
        for field in ("growth_rate", "num_init_features", "bn_size", "num_classes"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field} must be a positive int, got {getattr(self, field)!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if x.ndim != 4:
            raise ValueError(f"x must be an NHWC batch of shape (N, H, W, C); got shape {tuple(x.shape)}")
        need = densenet_min_input_size(len(self.block_config))
        if min(x.shape[1], x.shape[2]) < need:
            raise ValueError(
                f"x is {x.shape[1]}x{x.shape[2]} pixels; a DenseNet with {len(self.block_config)} blocks "
                f"needs at least {need}x{need}"
            )

    cam_layer = "relu"  # default CAM layer (after norm5)

    @property
    def excitation_layer(self) -> str:
        """The second-to-last dense block (stride 16), where Excitation Backprop is read."""
        return f"features.denseblock{max(len(self.block_config) - 1, 1)}"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self._check(x)
        x = DenseFeatures(
            self.growth_rate,
            tuple(self.block_config),
            self.num_init_features,
            self.bn_size,
            self.drop_rate,
            train=self.train,
            name="features",
        )(x)
        x = layers.ReLU(name="relu")(x)
        x = layers.AdaptiveAvgPool2d(1, name="avgpool")(x)
        x = layers.Flatten(name="flatten")(x)
        return layers.dense(self.num_classes, name="classifier")(x)


def _register(name: str, growth_rate: int, block_config: tuple[int, ...], num_init_features: int) -> None:
    register(
        ArchSpec(
            name=name,
            family="densenet",
            build=functools.partial(
                DenseNet,
                growth_rate=growth_rate,
                block_config=block_config,
                num_init_features=num_init_features,
            ),
            input_size=224,
            min_input_size=densenet_min_input_size(len(block_config)),
        )
    )


_register("densenet121", 32, (6, 12, 24, 16), 64)
_register("densenet161", 48, (6, 12, 36, 24), 96)
_register("densenet169", 32, (6, 12, 32, 32), 64)
_register("densenet201", 32, (6, 12, 48, 32), 64)
