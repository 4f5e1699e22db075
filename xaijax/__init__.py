"""xaijax: explainable AI for JAX.

Subpackages:
  models       Flax VGG / ResNet / DenseNet / Inception-v3 with torchvision names
  checkpoints  safe PyTorch checkpoint reading, porting, native save/load
  methods      attribution methods and their registry
  viz          heatmaps, overlays, PNG writing

Conventions: images are NHWC float32; a method is called as
``method(model, variables, x, target) -> (N, H, W) maps``.
"""

from xaijax import checkpoints, data, methods, models, viz

__version__ = "0.1.0"
__all__ = ["checkpoints", "data", "methods", "models", "viz", "__version__"]
