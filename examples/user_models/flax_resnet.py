"""A ResNet written the Flax way (as in Flax's ImageNet example): functional ``nn.relu``,
``nn.max_pool`` and ``jnp.mean`` inside ``__call__``, BatchNorm switched by ``train``.

Explaining it needs nothing but its variables: ``model, variables = xaijax.wrap(model,
variables)`` returns them as they are. The blocks are named torchvision-style (``layer1.0``,
..., ``layer4.0``) so that CAMs address a stage as ``layer4.0``.

    xaijax explain --model examples.user_models.flax_resnet:make --method grad-cam \
        --param layer=layer4.0 image.png
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ResNetBlock(nn.Module):
    """Two 3x3 convolutions and a residual connection (projected when the shape changes)."""

    filters: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm()(y)
        if x.shape != y.shape:
            x = self.norm(name="norm_proj")(self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-v1.5 body; NHWC images in, logits (N, num_classes) out."""

    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 64
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides, name=f"layer{i + 1}.{j}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def make(size: int = 32, num_classes: int = 10, seed: int = 0) -> dict[str, Any]:
    """A tiny randomly initialised ResNet ([1, 1, 1, 1] blocks, 8 filters) in eval mode, with
    what ``xaijax explain --model`` needs to feed it (``input_size``, ``preprocess``)."""
    model = ResNet(stage_sizes=(1, 1, 1, 1), num_classes=num_classes, num_filters=8)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    return {
        "model": model,
        "variables": variables,
        "input_size": size,
        "preprocess": "torchvision",
        "whole_image": True,
        "class_names": [f"class {i}" for i in range(num_classes)],
    }
