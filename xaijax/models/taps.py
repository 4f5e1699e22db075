"""Named access to intermediate layers of any zoo model.

A layer is addressed by the dotted path of its module, the torchvision name
(``features.29``, ``layer4``, ``layer4.2.relu``, ``denseblock4``, ``Mixed_7c``).
Two operations cover what CAM methods and rules need:

* :func:`forward` returns the model output together with the outputs of chosen layers;
* the same call can *add* a given array to chosen layer outputs, so the gradient of the
  output with respect to that array (taken at zero) is the gradient with respect to the
  layer's activation — the pure-JAX replacement for PyTorch's backward hooks.

Everything here is traceable: use it inside ``jax.jit``/``jax.vmap``/``jax.grad``.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax

__all__ = ["module_name", "forward", "layer_names", "check_layers"]


def module_name(module: nn.Module) -> str:
    """Dotted torchvision-style path of a bound module (``""`` for the root)."""
    return ".".join(module.path)


def forward(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    capture: Sequence[str] = (),
    add: Mapping[str, jax.Array] | None = None,
    **apply_kwargs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run ``model`` on ``x`` (NHWC) and return ``(output, {layer: activation})``.

    Args:
      model: a zoo model (any ``flax.linen`` module whose layers are named submodules).
      variables: its variables (``params`` and, for BatchNorm models, ``batch_stats``).
      x: input batch, NHWC.
      capture: dotted layer names whose outputs are returned (after any ``add``).
      add: ``{layer: array}`` added to those layers' outputs (same shape as the output).
      apply_kwargs: forwarded to ``model.apply``.

    Raises:
      ValueError: if a requested layer is not called during the forward pass.
    """
    add = dict(add or {})
    wanted = set(capture) | set(add)
    captured: dict[str, jax.Array] = {}
    active: set[str] = set()  # modules being called: a subclass calling super().__call__ is one call

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not wanted:
            return next_fun(*args, **kwargs)
        name = module_name(context.module)
        if name in active:
            return next_fun(*args, **kwargs)
        active.add(name)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.discard(name)
        if name in wanted:
            if name in captured:
                raise ValueError(f"layer {name!r} is called more than once; it cannot be tapped")
            if name in add:
                out = out + add[name]
            captured[name] = out
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x, **apply_kwargs)
    missing = wanted - set(captured)
    if missing:
        _raise_unknown(sorted(missing), layer_names(model, variables, x))
    return out, {k: captured[k] for k in capture}


def layer_names(model: nn.Module, variables: Mapping[str, Any], x: jax.Array) -> list[str]:
    """Dotted names of every module called in a forward pass on ``x``, in call order.

    Only shapes are traced (``jax.eval_shape``), so this is cheap even for large models.
    """
    names: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            name = module_name(context.module)
            if name and name not in names:
                names.append(name)
        return next_fun(*args, **kwargs)

    def run(v, xx):
        with nn.intercept_methods(interceptor):
            return model.apply(v, xx)

    jax.eval_shape(run, variables, x)
    return names


def check_layers(model: nn.Module, variables: Mapping[str, Any], x: jax.Array, layers: Sequence[str]) -> None:
    """Raise a readable ``ValueError`` if any of ``layers`` is not a layer of ``model``."""
    known = layer_names(model, variables, x)
    missing = [l for l in layers if l not in known]
    if missing:
        _raise_unknown(missing, known)


def _raise_unknown(missing: Sequence[str], known: Sequence[str]) -> None:
    hints = []
    for m in missing:
        close = difflib.get_close_matches(m, known, n=3)
        hints.append(f"{m!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    raise ValueError(
        "unknown layer name(s): " + "; ".join(hints) + f". The model has {len(known)} named layers, e.g. "
        + ", ".join(repr(k) for k in known[:: max(1, len(known) // 8)][:8])
    )
