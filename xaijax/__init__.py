"""xaijax: explainable AI for JAX.

Subpackages:
  models       Flax VGG / ResNet / DenseNet / Inception-v3 with torchvision names
  checkpoints  safe PyTorch checkpoint reading, porting, native save/load
  propagation  relevance rules as custom VJPs, composites, the engine
  methods      attribution methods and their registry
  metrics      pointing game, mIoU, energy pointing, deletion/insertion, region insertion,
               map density, sanity checks, and the metric registries
  data         the record format, the synthetic benchmark, VOC / COCO / ImageNet loaders
  evaluation   ``xaijax eval``: resumable, data-parallel experiments and their tables
  features     feature visualisation (natural pre-images) and neuron-concept dissection
  viz          heatmaps, overlays, PNG writing

Conventions: images are NHWC float32; a method is called as
``method(model, variables, x, target) -> (N, H, W) maps``.

Your own model: ``model, variables = xaijax.wrap(my_model[, params])`` adapts a Flax linen or
NNX module, an Equinox module or a function ``apply(params, x) -> logits`` (N, K) to that pair
(:func:`xaijax.models.adapters.wrap`; docs/your_model.md).
"""

from xaijax import checkpoints, data, evaluation, features, methods, metrics, models, propagation, viz
from xaijax.models.adapters import wrap

__version__ = "0.1.0"
__all__ = ["checkpoints", "data", "evaluation", "features", "methods", "metrics", "models", "propagation", "viz", "wrap", "__version__"]
