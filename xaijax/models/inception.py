"""Inception-v3 (Szegedy et al., CVPR 2016) with torchvision's module names.

Layout (NHWC; sizes for a 299x299 input and ``width=1``)::

    Conv2d_1a_3x3   BasicConv2d 3x3/2            N,149,149,32
    Conv2d_2a_3x3   BasicConv2d 3x3              N,147,147,32
    Conv2d_2b_3x3   BasicConv2d 3x3, pad 1       N,147,147,64
    maxpool1        MaxPool2d 3x3/2              N,73,73,64
    Conv2d_3b_1x1   BasicConv2d 1x1              N,73,73,80
    Conv2d_4a_3x3   BasicConv2d 3x3              N,71,71,192
    maxpool2        MaxPool2d 3x3/2              N,35,35,192
    Mixed_5b/5c/5d  InceptionA                   N,35,35,256/288/288
    Mixed_6a        InceptionB                   N,17,17,768
    Mixed_6b..6e    InceptionC                   N,17,17,768
    Mixed_7a        InceptionD                   N,8,8,1280
    Mixed_7b/7c     InceptionE                   N,8,8,2048   (default CAM layer Mixed_7c)
    avgpool         AdaptiveAvgPool2d(1)         N,1,1,2048
    dropout         Dropout (rate ``dropout_rate``, identity unless ``train``)
    flatten         Flatten                      N,2048
    fc              Dense(num_classes)

``BasicConv2d`` is ``conv`` (no bias) -> ``bn`` (BatchNorm, eps 1e-3) -> ``relu``. Inside the
mixed blocks the branch convolutions carry torchvision's names (``branch1x1``,
``branch5x5_1``, ``branch3x3dbl_2``, ``branch7x7x3_4``, ``branch_pool``, ...). The operations
torchvision calls functionally are named modules here:

* ``pool``: the pooling of the pool branch: in InceptionA/C/E a 3x3/1 average pool with
  padding 1 that counts the padded zeros (torch's default), whose output feeds the
  ``branch_pool`` convolution; in InceptionB/D a 3x3/2 max pool that is the branch itself;
* ``concat``: the channel concatenation of the branches (torchvision's order);
* in InceptionE also ``branch3x3_concat`` and ``branch3x3dbl_concat``, the concatenations of
  the two (1x3, 3x1) halves of the 3x3 and double-3x3 branches.

**No auxiliary classifier.** This is the eval-mode network: torchvision's ``AuxLogits`` head
only produces an output in training mode and does not influence the main logits, so it is
not built; the checkpoint porter ignores ``AuxLogits.*`` keys.

``transform_input=True`` reproduces torchvision's input re-normalisation (for Google's
original weights, which expect inputs scaled to [-1, 1]): channel ``c`` of an
ImageNet-normalised input becomes ``x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5`` with
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). It is an elementwise affine map
applied before ``Conv2d_1a_3x3`` (not a named layer).

``width`` multiplies every channel count ``c`` of every convolution to ``max(1, int(c * width))``
(for tiny test variants); at ``width=1`` the parameter shapes equal torchvision's (conv
kernels HWIO, ``fc`` kernel (in, out), BatchNorm ``scale``/``bias`` params and
``mean``/``var`` batch statistics). Weights are initialised with Flax's defaults.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.models import layers
from xaijax.models.registry import ArchSpec, register

__all__ = [
    "BasicConv2d",
    "InceptionA",
    "InceptionB",
    "InceptionC",
    "InceptionD",
    "InceptionE",
    "Inception3",
    "scaled_channels",
    "MIN_INPUT_SIZE",
]

MIN_INPUT_SIZE = 75
"""Smallest input side Inception-v3 accepts (``Mixed_7a`` then sees a 3x3 map)."""

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

Int2 = int | tuple[int, int]


def scaled_channels(c: int, width: float) -> int:
    """Channel count ``c`` scaled by the ``width`` multiplier: ``max(1, int(c * width))``."""
    return max(1, int(c * width))


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, named ``conv``, ``bn``, ``relu``."""

    features: int
    kernel: Int2
    stride: Int2 = 1
    padding: Int2 = 0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.conv(self.features, self.kernel, self.stride, self.padding, bias=False, name="conv")(x)
        x = layers.batch_norm(self.train, eps=1e-3, name="bn")(x)
        return layers.ReLU(name="relu")(x)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (``pool_features``); size kept.

    Output channels ``64 + 64 + 96 + pool_features`` (each scaled by ``width``).
    """

    pool_features: int
    width: float = 1.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(scaled_channels, width=self.width)
        conv = functools.partial(BasicConv2d, train=self.train)
        b1 = conv(c(64), 1, name="branch1x1")(x)
        b5 = conv(c(48), 1, name="branch5x5_1")(x)
        b5 = conv(c(64), 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(c(64), 1, name="branch3x3dbl_1")(x)
        b3 = conv(c(96), 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(c(96), 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = layers.AvgPool2d(3, 1, 1, name="pool")(x)
        bp = conv(c(self.pool_features), 1, name="branch_pool")(bp)
        return layers.Concat(name="concat")(b1, b5, b3, bp)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2.

    Output channels ``384 + 96`` (scaled) plus the input channels.
    """

    width: float = 1.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(scaled_channels, width=self.width)
        conv = functools.partial(BasicConv2d, train=self.train)
        b3 = conv(c(384), 3, stride=2, name="branch3x3")(x)
        bd = conv(c(64), 1, name="branch3x3dbl_1")(x)
        bd = conv(c(96), 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(c(96), 3, stride=2, name="branch3x3dbl_3")(bd)
        bp = layers.MaxPool2d(3, 2, name="pool")(x)
        return layers.Concat(name="concat")(b3, bd, bp)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``channels_7x7`` inner width); size kept.

    Output channels ``4 * 192`` (scaled).
    """

    channels_7x7: int
    width: float = 1.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(scaled_channels, width=self.width)
        conv = functools.partial(BasicConv2d, train=self.train)
        c7 = c(self.channels_7x7)
        b1 = conv(c(192), 1, name="branch1x1")(x)
        b7 = conv(c7, 1, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(c(192), (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(c(192), (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = layers.AvgPool2d(3, 1, 1, name="pool")(x)
        bp = conv(c(192), 1, name="branch_pool")(bp)
        return layers.Concat(name="concat")(b1, b7, bd, bp)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2.

    Output channels ``320 + 192`` (scaled) plus the input channels.
    """

    width: float = 1.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(scaled_channels, width=self.width)
        conv = functools.partial(BasicConv2d, train=self.train)
        b3 = conv(c(192), 1, name="branch3x3_1")(x)
        b3 = conv(c(320), 3, stride=2, name="branch3x3_2")(b3)
        b7 = conv(c(192), 1, name="branch7x7x3_1")(x)
        b7 = conv(c(192), (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(c(192), (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(c(192), 3, stride=2, name="branch7x7x3_4")(b7)
        bp = layers.MaxPool2d(3, 2, name="pool")(x)
        return layers.Concat(name="concat")(b3, b7, bp)


class InceptionE(nn.Module):
    """8x8 block with expanded (1x3 and 3x1 side by side) filter banks; size kept.

    Output channels ``320 + 2*384 + 2*384 + 192`` (scaled).
    """

    width: float = 1.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(scaled_channels, width=self.width)
        conv = functools.partial(BasicConv2d, train=self.train)
        b1 = conv(c(320), 1, name="branch1x1")(x)
        b3 = conv(c(384), 1, name="branch3x3_1")(x)
        b3 = layers.Concat(name="branch3x3_concat")(
            conv(c(384), (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            conv(c(384), (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        )
        bd = conv(c(448), 1, name="branch3x3dbl_1")(x)
        bd = conv(c(384), 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = layers.Concat(name="branch3x3dbl_concat")(
            conv(c(384), (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            conv(c(384), (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        )
        bp = layers.AvgPool2d(3, 1, 1, name="pool")(x)
        bp = conv(c(192), 1, name="branch_pool")(bp)
        return layers.Concat(name="concat")(b1, b3, bd, bp)


class Inception3(nn.Module):
    """Inception-v3 classifier with torchvision's structure (see the module docstring).

    Attributes:
      num_classes: number of logits.
      train: BatchNorm uses batch statistics (apply with ``mutable=["batch_stats"]``) and
        dropout is active (needs a ``dropout`` RNG).
      transform_input: apply torchvision's re-normalisation of ImageNet-normalised inputs to
        the [-1, 1] convention of Google's weights (``True`` for torchvision's pretrained
        ``inception_v3``).
      width: channel multiplier for every convolution (``max(1, int(c * width))``).
      dropout_rate: rate of the ``dropout`` layer before ``fc`` (torchvision's ``dropout``).

    Call: ``x`` NHWC (N, H, W, 3) with H, W >= 75 -> logits (N, num_classes).
    """

    num_classes: int = 1000
    train: bool = False
    transform_input: bool = False
    width: float = 1.0
    dropout_rate: float = 0.5

    def _check(self, x: jax.Array) -> None:
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width!r}")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if x.ndim != 4:
            raise ValueError(f"x must be an NHWC batch of shape (N, H, W, 3); got shape {tuple(x.shape)}")
        if self.transform_input and x.shape[-1] != 3:
            raise ValueError(f"transform_input=True needs 3 (RGB) channels in x, got shape {tuple(x.shape)}")
        if min(x.shape[1], x.shape[2]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"x is {x.shape[1]}x{x.shape[2]} pixels; Inception-v3 needs at least "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"
            )

    def _transform(self, x: jax.Array) -> jax.Array:
        # torchvision: x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5, with Python-float constants.
        chans = [x[..., i : i + 1] * (_STD[i] / 0.5) + (_MEAN[i] - 0.5) / 0.5 for i in range(3)]
        return jnp.concatenate(chans, axis=-1)

    cam_layer = "Mixed_7c"  # default CAM layer
    excitation_layer = "Mixed_6e"  # the stride-16 stage, where Excitation Backprop is read

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self._check(x)
        if self.transform_input:
            x = self._transform(x)
        c = functools.partial(scaled_channels, width=self.width)
        conv = functools.partial(BasicConv2d, train=self.train)
        w = dict(width=self.width, train=self.train)
        x = conv(c(32), 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = conv(c(32), 3, name="Conv2d_2a_3x3")(x)
        x = conv(c(64), 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = layers.MaxPool2d(3, 2, name="maxpool1")(x)
        x = conv(c(80), 1, name="Conv2d_3b_1x1")(x)
        x = conv(c(192), 3, name="Conv2d_4a_3x3")(x)
        x = layers.MaxPool2d(3, 2, name="maxpool2")(x)
        x = InceptionA(32, **w, name="Mixed_5b")(x)
        x = InceptionA(64, **w, name="Mixed_5c")(x)
        x = InceptionA(64, **w, name="Mixed_5d")(x)
        x = InceptionB(**w, name="Mixed_6a")(x)
        x = InceptionC(128, **w, name="Mixed_6b")(x)
        x = InceptionC(160, **w, name="Mixed_6c")(x)
        x = InceptionC(160, **w, name="Mixed_6d")(x)
        x = InceptionC(192, **w, name="Mixed_6e")(x)
        x = InceptionD(**w, name="Mixed_7a")(x)
        x = InceptionE(**w, name="Mixed_7b")(x)
        x = InceptionE(**w, name="Mixed_7c")(x)
        x = layers.AdaptiveAvgPool2d(1, name="avgpool")(x)
        x = layers.Dropout(self.dropout_rate, train=self.train, name="dropout")(x)
        x = layers.Flatten(name="flatten")(x)
        return layers.dense(self.num_classes, name="fc")(x)


register(
    ArchSpec(
        name="inception_v3",
        family="inception",
        build=Inception3,
        input_size=299,
        min_input_size=MIN_INPUT_SIZE,
    )
)
