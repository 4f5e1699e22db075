"""Combinators: wrappers that turn any attribution method into another one.

* :func:`smooth` — SmoothGrad / noise tunnel (prefix ``smooth:``);
* :func:`contrast` — the target's map minus the other classes' (prefix ``contrast:``);
* :func:`ucag` — unfold-and-conquer over zoomed patches (prefix ``ucag:``).

Each combinator is a :class:`~xaijax.methods._core.Method` whose ``kind`` is the wrapped
method's, and registers its own name prefix with the method registry.
"""

from xaijax.methods.combinators.contrastive import Contrast, contrast, dual_seed, get_contrast, seed_weights
from xaijax.methods.combinators.smoothing import Smooth, get_smooth, smooth
from xaijax.methods.combinators.unfold_conquer import Ucag, UcagGeometry, get_ucag, ucag

__all__ = [
    "Contrast",
    "contrast",
    "dual_seed",
    "seed_weights",
    "get_contrast",
    "Smooth",
    "smooth",
    "get_smooth",
    "Ucag",
    "UcagGeometry",
    "ucag",
    "get_ucag",
]
