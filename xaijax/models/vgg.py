"""VGG (Simonyan & Zisserman, 2015) in ``flax.linen`` with torchvision's layer names.

Layout (module paths, as in ``torchvision.models.vgg``)::

    features      convolutional trunk; its layers are named "0", "1", ... at torchvision's
                  Sequential indices: Conv(3x3, pad 1)[, BatchNorm], ReLU per entry of the
                  configuration, MaxPool2d(2, 2) for every "M"
    avgpool       AdaptiveAvgPool2d(pool_size)
    flatten       Flatten (NHWC order)
    classifier    "0" Linear, "1" ReLU, "2" Dropout, "3" Linear, "4" ReLU, "5" Dropout,
                  "6" Linear

so ``features.29`` is the last ReLU of VGG16 (``features.42`` for VGG16-BN) and
``features.23`` is VGG16's pool4.

Conventions: inputs are NHWC float (N, H, W, 3), at least 32x32 pixels (five 2x2 poolings);
outputs are logits (N, num_classes). Parameters at default settings have torchvision's
shapes transposed: conv kernels HWIO, dense kernels (in, out). The flatten before the
classifier runs over (H, W, C), not torch's (C, H, W): the checkpoint porter permutes the
rows of ``classifier.0``'s kernel using :attr:`VGG.pool_size`.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import flax.linen as nn
import jax

from xaijax.models import layers
from xaijax.models.registry import ArchSpec, register

__all__ = [
    "CFGS",
    "VGG",
    "VGGFeatures",
    "VGGClassifier",
    "last_relu_index",
    "scaled_channels",
]

CfgEntry = Union[int, str]

#: torchvision's configurations: channel counts of the 3x3 convolutions, "M" = 2x2 max-pool.
CFGS: dict[str, tuple[CfgEntry, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}  # fmt: skip


def scaled_channels(c: int, width: float) -> int:
    """Channel count ``c`` scaled by the width multiplier: ``max(1, int(c * width))``."""
    return max(1, int(c * width))


def _check_cfg(cfg: Sequence[CfgEntry]) -> None:
    if len(cfg) == 0:
        raise ValueError("VGG cfg must not be empty")
    for v in cfg:
        if v == "M":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"VGG cfg entries must be positive ints or 'M', got {v!r} in {tuple(cfg)}")


def last_relu_index(cfg: Sequence[CfgEntry], batch_norm: bool = False) -> int:
    """Index (inside ``features``) of the last ReLU of a VGG trunk built from ``cfg``.

    E.g. 29 for VGG16 (``cfg=CFGS["D"]``) and 42 for VGG16-BN.
    """
    _check_cfg(cfg)
    idx, last = 0, -1
    per_conv = 3 if batch_norm else 2
    for v in cfg:
        if v == "M":
            idx += 1
        else:
            idx += per_conv
            last = idx - 1
    if last < 0:
        raise ValueError(f"VGG cfg {tuple(cfg)} has no convolution")
    return last


class VGGFeatures(nn.Module):
    """VGG's convolutional trunk (torchvision's ``features`` Sequential).

    Attributes:
      cfg: channel counts of the 3x3 convolutions with "M" for a 2x2/stride-2 max-pool.
      batch_norm: insert a BatchNorm (eps 1e-5) after every convolution.
      width: channel multiplier; each count ``c`` becomes ``max(1, int(c * width))``.
      ceil_mode: PyTorch's ``ceil_mode`` for the max-pools (TorchRay's Caffe-converted VGG16).
      train: BatchNorm uses batch statistics when True.

    Input NHWC (N, H, W, C_in); output NHWC (N, H / 2**pools, W / 2**pools, C_last).
    """

    cfg: tuple[CfgEntry, ...] = CFGS["D"]
    batch_norm: bool = False
    width: float = 1.0
    ceil_mode: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        idx = 0
        for v in self.cfg:
            if v == "M":
                x = layers.MaxPool2d(2, 2, ceil_mode=self.ceil_mode, name=str(idx))(x)
                idx += 1
                continue
            x = layers.conv(scaled_channels(int(v), self.width), 3, 1, 1, name=str(idx))(x)
            idx += 1
            if self.batch_norm:
                x = layers.batch_norm(self.train, name=str(idx))(x)
                idx += 1
            x = layers.ReLU(name=str(idx))(x)
            idx += 1
        return x


class VGGClassifier(nn.Module):
    """VGG's classifier head (torchvision's ``classifier`` Sequential).

    Input (N, D) flattened features; output (N, num_classes) logits.
    """

    num_classes: int = 1000
    hidden: int = 4096
    dropout: float = 0.5
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.dense(self.hidden, name="0")(x)
        x = layers.ReLU(name="1")(x)
        x = layers.Dropout(self.dropout, train=self.train, name="2")(x)
        x = layers.dense(self.hidden, name="3")(x)
        x = layers.ReLU(name="4")(x)
        x = layers.Dropout(self.dropout, train=self.train, name="5")(x)
        return layers.dense(self.num_classes, name="6")(x)


class VGG(nn.Module):
    """VGG classifier with torchvision's module names.

    Attributes:
      cfg: trunk configuration (see :data:`CFGS`; VGG16 is ``CFGS["D"]``).
      batch_norm: the ``_bn`` variants (BatchNorm after every convolution).
      num_classes: number of logits.
      width: channel multiplier of the trunk (``max(1, int(c * width))``) for tiny variants.
      hidden: width of the two hidden classifier layers (4096 in torchvision).
      pool_size: side of the adaptive average pool before the classifier (7); the
        classifier's input size is ``pool_size**2 * C_last``.
      dropout: dropout rate of the classifier (active only when ``train``).
      ceil_mode: ceil-mode max-pooling (TorchRay's Caffe-converted VGG16 checkpoints).
      train: BatchNorm batch statistics (``mutable=["batch_stats"]``) and active dropout
        (needs a ``dropout`` rng).

    ``__call__(x)``: x NHWC float (N, H, W, 3) with H, W >= 2**(number of pools) (32 for the
    standard configurations) -> logits (N, num_classes).
    """

    cfg: tuple[CfgEntry, ...] = CFGS["D"]
    batch_norm: bool = False
    num_classes: int = 1000
    width: float = 1.0
    hidden: int = 4096
    pool_size: int = 7
    dropout: float = 0.5
    ceil_mode: bool = False
    train: bool = False

    @property
    def cam_layer(self) -> str:
        """Default CAM layer: the last ReLU of ``features`` (``features.29`` for VGG16, ``features.42`` for VGG16-BN)."""
        return f"features.{last_relu_index(self.cfg, self.batch_norm)}"

    @property
    def excitation_layer(self) -> str:
        """Where TorchRay reads Excitation Backprop: the fourth max pool (``features.23`` for VGG16)."""
        idx, pools = 0, 0
        for v in self.cfg:
            if v == "M":
                pools += 1
                if pools == 4:
                    return f"features.{idx}"
                idx += 1
            else:
                idx += 3 if self.batch_norm else 2
        raise ValueError(f"VGG cfg {self.cfg} has fewer than 4 poolings; pass layer= explicitly")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_cfg(self.cfg)
        if self.width <= 0:
            raise ValueError(f"VGG width must be positive, got {self.width}")
        if self.pool_size < 1 or self.hidden < 1 or self.num_classes < 1:
            raise ValueError(
                f"VGG pool_size, hidden and num_classes must be >= 1, got "
                f"{self.pool_size}, {self.hidden}, {self.num_classes}"
            )
        if x.ndim != 4:
            raise ValueError(f"VGG expects an NHWC batch (N, H, W, C), got an array of shape {x.shape}")
        min_side = 2 ** sum(1 for v in self.cfg if v == "M")
        if x.shape[1] < min_side or x.shape[2] < min_side:
            raise ValueError(
                f"VGG with {min_side.bit_length() - 1} poolings needs inputs of at least "
                f"{min_side}x{min_side} pixels, got {x.shape[1]}x{x.shape[2]} (input shape {x.shape}, NHWC)"
            )
        x = VGGFeatures(self.cfg, self.batch_norm, self.width, self.ceil_mode, self.train, name="features")(x)
        x = layers.AdaptiveAvgPool2d(self.pool_size, name="avgpool")(x)
        x = layers.Flatten(name="flatten")(x)
        return VGGClassifier(self.num_classes, self.hidden, self.dropout, self.train, name="classifier")(x)


def _register(name: str, cfg_key: str, batch_norm: bool) -> None:
    cfg = CFGS[cfg_key]
    register(
        ArchSpec(
            name=name,
            family="vgg",
            build=functools.partial(VGG, cfg=cfg, batch_norm=batch_norm),
            input_size=224,
            min_input_size=32,
        )
    )


for _name, _key in (("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E")):
    _register(_name, _key, batch_norm=False)
    _register(_name + "_bn", _key, batch_norm=True)
del _name, _key
