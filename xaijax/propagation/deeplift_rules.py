"""DeepLIFT's rules (Shrikumar et al., ICML 2017; Captum's ``DeepLift``) for the propagation engine.

How the rules see the reference
-------------------------------
DeepLIFT needs, at every nonlinearity, the layer's input and output on the input ``x`` *and*
on the reference ``x0``. The engine runs the ordinary forward pass of a **paired batch**
``[x; x0]`` (2N samples: the inputs, then their references, sample ``i`` paired with sample
``N + i``), exactly as Captum does with its forward pre-hook. Every rule here receives the
layer's paired input/output and splits it in two halves: nothing else in the engine changes,
and a rule couples only sample ``i`` with its own reference ``N + i``. The backward pass
starts from the seed on *both* halves (Captum's ``forward_fn`` selects the target of the
input and of the reference); the cotangent that reaches the input half is DeepLIFT's
multiplier ``m``, and the attribution is ``(x - x0) * m`` (:mod:`xaijax.methods.deeplift`).

Rules
-----
:class:`Rescale`         element-wise nonlinearities (ReLU, GELU, sigmoid, tanh, ...): the incoming
                         multiplier times ``(y - y0) / (x - x0)``, the same value on both halves;
                         where ``|x - x0| < eps`` the ordinary gradient of each half (Captum's
                         ``nonlinear`` with ``eps = 1e-10``).
:class:`RescaleMaxPool`  max pooling (Captum's ``maxpool``): with ``m = max(y, y0)``, the input
                         half's winners receive ``g (m - y0)`` and the reference half's winners
                         ``g (y - m)``; the two scatters are added and divided by ``x - x0``
                         (both halves get the result); ordinary gradient where ``|x - x0| <
                         eps``. Winners are the first maximal entry of a window (torch's
                         indices). With overlapping windows (ResNet's 3x3/2 stem pool) the
                         scatter *adds* the contributions of windows that share a winner (the
                         pooling's own VJP), where torch's ``max_unpool2d`` keeps one of them;
                         adding is what keeps ``sum(attribution) == f(x) - f(x0)``.
:class:`~xaijax.propagation.rules.Vjp`  every linear layer (convolution, dense, BatchNorm in
                         eval mode, average pooling, residual sums, concatenation, flatten,
                         dropout): the ordinary gradient, which is DeepLIFT's multiplier of a
                         linear map.

:func:`deeplift` is the composite. Transformer layers (LayerNorm, softmax, attention
products) have no rule here: :mod:`xaijax.methods.deeplift` refuses those models (Captum lets
unsupported modules fall back to their gradient, which silently breaks summation-to-delta;
its softmax rule also subtracts a mean over the whole paired batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xaijax.propagation.composites import Composite
from xaijax.propagation.rules import Rule, Vjp, _check_number

__all__ = ["Rescale", "RescaleMaxPool", "deeplift", "LINEAR_KINDS", "NONLINEAR_KINDS", "UNSUPPORTED_KINDS"]

Array = jax.Array

#: layer kinds whose DeepLIFT multiplier is the ordinary gradient
LINEAR_KINDS = ("batchnorm", "avgpool", "add", "concat", "reshape", "dropout", "identity", "rearrange", "average")
#: layer kinds that get a rescale rule
NONLINEAR_KINDS = ("relu", "activation", "maxpool")
#: transformer layer kinds without a DeepLIFT rule (the method refuses such models)
UNSUPPORTED_KINDS = ("layernorm", "softmax", "matmul")


def _halves(a: Array, name: str) -> tuple[Array, Array]:
    n2 = a.shape[0]
    if n2 % 2:
        raise ValueError(f"DeepLIFT rules need a paired batch [x; x0] (even size); layer {name!r} got a batch of {n2}")
    return a[: n2 // 2], a[n2 // 2 :]


def _both(a: Array) -> Array:
    return jnp.concatenate([a, a], axis=0)


def _check_single(rule: Rule, name: str, in_shapes, out_shape, same: bool) -> None:
    if len(in_shapes) != 1:
        raise ValueError(f"rule {rule!r} handles single-input layers; layer {name!r} has {len(in_shapes)} inputs")
    if same and tuple(in_shapes[0]) != tuple(out_shape):
        raise ValueError(f"rule {rule!r} needs an element-wise layer; layer {name!r} maps {tuple(in_shapes[0])} to {tuple(out_shape)}")


@dataclasses.dataclass(frozen=True)
class Rescale(Rule):
    """DeepLIFT's rescale rule for an element-wise nonlinearity ``y = f(x)`` on a paired batch.

    ``R_in = R * (y - y0) / (x - x0)`` (the difference of the input and reference halves,
    used on both halves); where ``|x - x0| < eps``, the ordinary gradient ``R * f'(.)`` of
    each half (Captum: ``eps = 1e-10``).
    """

    eps: float = 1e-10

    def __post_init__(self) -> None:
        _check_number("Rescale eps", self.eps)

    def check(self, name, kind, in_shapes, out_shape):
        _check_single(self, name, in_shapes, out_shape, same=True)

    def backward(self, layer, xs, out, R):
        x = xs[0]
        xa, xr = _halves(x, layer.name)
        ya, yr = _halves(out, layer.name)
        dx, dy = _both(xa - xr), _both(ya - yr)
        R = R.astype(out.dtype)
        _, pull = jax.vjp(layer.fn, x)
        grad = pull(R)[0]
        small = jnp.abs(dx) < self.eps
        return (jnp.where(small, grad, R * dy / jnp.where(small, 1, dx)).astype(x.dtype),)


@dataclasses.dataclass(frozen=True)
class RescaleMaxPool(Rule):
    """Captum's DeepLIFT rule for max pooling on a paired batch (see the module docstring)."""

    eps: float = 1e-10

    def __post_init__(self) -> None:
        _check_number("RescaleMaxPool eps", self.eps)

    def check(self, name, kind, in_shapes, out_shape):
        _check_single(self, name, in_shapes, out_shape, same=False)

    def backward(self, layer, xs, out, R):
        x = xs[0]
        xa, xr = _halves(x, layer.name)
        ya, yr = _halves(out, layer.name)
        R = R.astype(out.dtype)
        ra, rr = _halves(R, layer.name)
        top = jnp.maximum(ya, yr)
        _, pull = jax.vjp(layer.fn, x)  # scatter to each half's first maximal entries
        scattered = pull(jnp.concatenate([ra * (top - yr), rr * (ya - top)], axis=0))[0]
        sa, sr = _halves(scattered, layer.name)
        delta = _both(sa + sr)
        dx = _both(xa - xr)
        grad = pull(R)[0]
        small = jnp.abs(dx) < self.eps
        return (jnp.where(small, grad, delta / jnp.where(small, 1, dx)).astype(x.dtype),)


def deeplift(eps: float = 1e-10) -> Composite:
    """The DeepLIFT (rescale) composite: :class:`Rescale` on ReLU and element-wise activations,
    :class:`RescaleMaxPool` on max pooling, the ordinary gradient (:class:`Vjp`) on convolutions,
    dense layers and every linear layer kind. BatchNorm is not folded (its gradient is the
    folded layer's). Run it on a paired batch ``[x; x0]`` (see the module docstring)."""
    grad = Vjp()
    kinds = {k: grad for k in LINEAR_KINDS}
    kinds.update(relu=Rescale(eps), activation=Rescale(eps), maxpool=RescaleMaxPool(eps))
    return Composite(conv=grad, dense=grad, kinds=kinds, canonize=False)
