"""xaijax: explainable AI for JAX.

Subpackages:
  models       Flax VGG / ResNet / DenseNet / Inception-v3 with torchvision names
  checkpoints  safe PyTorch checkpoint reading, porting, native save/load
  propagation  relevance rules as custom VJPs, composites, the engine
  methods      attribution methods and their registry
  metrics      pointing game, mIoU and the metric registry
  data         the record format and the synthetic benchmark
  viz          heatmaps, overlays, PNG writing

Conventions: images are NHWC float32; a method is called as
``method(model, variables, x, target) -> (N, H, W) maps``.
"""

from xaijax import checkpoints, data, methods, metrics, models, propagation, viz

__version__ = "0.1.0"
__all__ = ["checkpoints", "data", "methods", "metrics", "models", "propagation", "viz", "__version__"]
