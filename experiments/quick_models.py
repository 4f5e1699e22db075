"""The tiny model variants the benchmarks' ``--quick`` runs use (one home for them).

The structure of VGG16 / ResNet50 at a fraction of the width, for ``xaijax.models.get(arch,
**QUICK_MODELS[arch])``. Benchmarks import this module with ``experiments/`` on ``sys.path``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QUICK_MODELS"]

QUICK_MODELS: dict[str, dict[str, Any]] = {
    "vgg16": dict(width=1 / 16, hidden=16, pool_size=1, num_classes=10),
    "resnet50": dict(width=4, layers=(1, 1, 1, 1), num_classes=10),
}
