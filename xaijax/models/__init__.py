"""The Flax model zoo: VGG, ResNet, DenseNet and Inception-v3 with torchvision names, ViT/DeiT,
BERT with Hugging Face names (:mod:`xaijax.models.bert`: ``bert.build(name, task)``, not in the
image-architecture registry),
and :func:`wrap`, which adapts the user's own model (Flax linen or NNX, Equinox, a plain
function ``apply(params, x) -> logits``) to the ``(module, variables)`` pair every method takes
(:mod:`xaijax.models.adapters`).

``get(name, **overrides)`` builds a registered architecture (``names()`` lists them);
intermediate layers are addressed by torchvision's dotted names through
:mod:`xaijax.models.taps`. Inputs are NHWC float32, normalised with
:func:`xaijax.models.preprocess.normalize` for the weights' convention.
"""

from xaijax.models import densenet, inception, resnet, vgg, vit  # noqa: F401  (register architectures)
from xaijax.models import adapters, bert, detector, layers, preprocess, taps
from xaijax.models.adapters import wrap
from xaijax.models.densenet import DenseNet
from xaijax.models.inception import Inception3
from xaijax.models.init import random_variables
from xaijax.models.registry import ArchSpec, get, names, register, spec
from xaijax.models.resnet import ResNet
from xaijax.models.vgg import VGG

__all__ = [
    "ArchSpec",
    "DenseNet",
    "Inception3",
    "ResNet",
    "VGG",
    "adapters",
    "bert",
    "get",
    "detector",
    "layers",
    "names",
    "preprocess",
    "random_variables",
    "register",
    "spec",
    "taps",
    "wrap",
]
