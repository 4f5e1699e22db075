"""A CNN written with Flax NNX (the API Flax's documentation teaches first).

``xaijax.wrap(model)`` splits it with ``nnx.split`` and merges it inside the traced call;
every submodule's output is a layer named by its attribute path (``conv1``, ``conv2``,
``blocks.0``, ``fc``). Call ``model.eval()`` first: a model in training mode is refused.

    xaijax explain --model examples.user_models.nnx_cnn:make --size 32 --method grad-cam \
        --param layer=conv2 image.png
"""

from __future__ import annotations

import jax
from flax import nnx


class CNN(nnx.Module):
    """conv-BN-relu, conv-relu, 2x2 average pool, a list of 1x1-conv blocks, global mean, linear."""

    def __init__(self, num_classes: int = 10, width: int = 16, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.blocks = nnx.List([nnx.Conv(width, width, (1, 1), rngs=rngs) for _ in range(2)])
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.fc = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        for block in self.blocks:
            x = x + nnx.relu(block(x))
        return self.fc(self.dropout(x.mean(axis=(1, 2))))


def make(num_classes: int = 10, seed: int = 0) -> CNN:
    """A randomly initialised CNN in eval mode (BatchNorm on running statistics, no dropout)."""
    model = CNN(num_classes, rngs=nnx.Rngs(seed))
    model.eval()
    return model
