"""Attention-based explanations of transformers: vision (ViT, DeiT) and text (BERT).

Every method here reads the attention probabilities ``A_l`` (N, heads, T, T) of the blocks
``l = 0 .. L-1`` of a vision transformer (rows: the attending token, columns: the attended
token; rows sum to 1), combines them into a token-to-token matrix ``R`` (N, T, T), and takes
the *class-token row over the patch tokens*: ``R[:, 0, P:]`` with ``P`` the number of prefix
tokens (1; 2 for a distilled DeiT, whose class and distillation tokens are both dropped),
reshaped row-major to the ``(g, g)`` token grid and upsampled bilinearly to the input size
(:func:`xaijax.imageops.resize`, PyTorch's ``bilinear``, ``align_corners=False``).
:meth:`~xaijax.methods.Method.layer_map` gives the ``(N, g, g)`` grid before upsampling.
Maps are not normalised; their dtype is the input's (float64 in, float64 out).

Text transformers (a model declaring ``sequence_model = True``, e.g.
:class:`xaijax.models.bert.BertForSequenceClassification`, explained in the *explanation
view* ``x`` = word embeddings (N, T, 1, D)): the class-token row is taken over **all** ``T``
tokens, ``R[:, 0, :]`` — BERT's ``[CLS]`` (token 0) is a token of the sentence and is kept
(its own entry includes the identity of the residual / ``R = I`` terms), nothing is dropped —
laid out as the (T, 1) grid of :func:`xaijax.methods._core.token_grid`; the grid already has
the input's size, so there is no upsampling: ``layer_map`` and ``__call__`` both give
(N, T, 1). Padded tokens (attention mask 0) are never attended to (their attention
probabilities are exactly 0), so their entries of the class-token row are exactly 0 for
``raw-attention``, ``attention-rollout``, ``generic-attention`` and ``chefer-lrp``.
:func:`xaijax.methods.text.explain_tokens` runs these methods one sentence at a time with the
sentence's attention mask.

What a model must provide (the zoo's :class:`~xaijax.models.vit.VisionTransformer` and
:class:`~xaijax.models.vit.DeiT` do): ``attention_layers`` (the dotted names of the softmax
modules whose outputs are the attention probabilities of each block, first block first),
``num_prefix_tokens`` and ``grid_size`` (patches per side) — or, for a text transformer,
``attention_layers`` and ``sequence_model = True``. A model without ``attention_layers``
raises :class:`~xaijax.methods.NotApplicable` ("needs a vision transformer or a text
transformer").

* ``raw-attention``: the attention of one block (default the last), fused over heads (mean).
* ``attention-rollout`` (Abnar & Zuidema, ACL 2020): per block
  ``A_hat = (1 - r) fuse_heads(A) + r I`` (residual weight ``r = 0.5``; head fusion mean,
  max or min), rows re-normalised to sum to 1; ``R = A_hat_{L-1} ... A_hat_{s+1} A_hat_s``
  from block ``s = start_layer`` (default 0) up.
* ``attention-flow`` (Abnar & Zuidema 2020): the layered attention graph has a node per
  token and layer (``L - s + 1`` layers of ``T`` nodes); the edge from token ``j`` of layer
  ``l`` to token ``i`` of layer ``l + 1`` has capacity ``A_hat_l[i, j]`` (the same residual
  matrices as rollout). The map of patch token ``j`` is the value of the maximum flow from
  input node ``j`` to the class token of the top layer. Computed exactly in JAX by
  Edmonds-Karp (shortest augmenting paths found by breadth-first search) on the layered
  residual graph, with ``lax.while_loop`` — jittable and vmappable, no host loop. Each
  augmentation sets the bottleneck residual to exactly zero, so the float computation
  terminates like the exact algorithm (at most ``O(V E)`` augmentations). The cost grows
  quickly with the token count: one max-flow problem per patch token, each with up to
  ``(L+1) T`` nodes and ``L T^2`` edges (as in the authors' own networkx implementation,
  attention flow is much slower than rollout); ``chunk`` patch tokens are solved at once
  (``lax.map`` over chunks, ``vmap`` within).
* ``generic-attention`` (Chefer, Gur & Wolf, ICCV 2021, "Generic attention-model
  explainability", self-attention rule): ``R = I``; for each block
  ``A_bar = mean_heads((dS/dA * A)^+)`` and ``R <- R + A_bar R``. ``S = sum(seed * logits)``
  (the target logit for class indices); the gradients w.r.t. every block's attention
  probabilities come from one backward pass (:func:`xaijax.methods.layer_gradients`).
* ``chefer-lrp`` (Chefer, Gur & Wolf, CVPR 2021, "Transformer interpretability beyond
  attention visualization"): the same accumulation with the LRP relevance ``R_A`` arriving at
  each block's attention probabilities instead of ``A``:
  ``A_bar = mean_heads((dS/dA * R_A)^+)``. ``R_A`` is read from one relevance pass
  (:func:`xaijax.propagation.relevance_trace`) with the ``composite`` given as a
  hyperparameter, seeded, as in the authors' code, with the one-hot target itself (the seed,
  not ``seed * logits``). The default composite ``"alpha1-beta0"`` has the authors' rule on
  the linear layers (alpha = 1, beta = 0) and the engine's default rules on the
  transformer layers (see :mod:`xaijax.propagation.composites`: the bilinear products split
  relevance half and half between their factors, as the authors' code halves the z-rule
  relevance of ``attention.v`` and ``q.k``). Where the authors' code (``layers_ours.py`` of
  ``hila-chefer/Transformer-Explainability``) differs: relevance passes LayerNorm, softmax and
  GELU unchanged, residual additions use a z-rule re-normalised per branch, linear layers
  ignore their bias and the patch embedding uses z^B; pass a :class:`Composite` with those
  rules to follow it more closely (no built-in composite reproduces it exactly yet).

``raw-attention``, ``attention-rollout`` and ``attention-flow`` do not depend on the target
(they explain the class token, whatever the class); the target is still range-checked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xaijax import imageops
from xaijax.methods._core import Method, NotApplicable, as_seed, check_inputs, layer_gradients, token_grid, validate_positive_int
from xaijax.methods.registry import register
from xaijax.models import taps
from xaijax.propagation.composites import Composite
from xaijax.propagation.engine import relevance_trace

__all__ = [
    "HEAD_FUSIONS",
    "attention_layers",
    "attention_probabilities",
    "fuse_heads",
    "residual_attention",
    "rollout",
    "accumulate_relevance",
    "class_token_grid",
    "layered_max_flow",
    "AttentionMethod",
    "RawAttention",
    "AttentionRollout",
    "AttentionFlow",
    "GenericAttention",
    "CheferLRP",
]

#: Ways to combine the heads of a block's attention (``mean`` is Abnar & Zuidema's default).
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")

_HI = jax.lax.Precision.HIGHEST


def attention_layers(model: nn.Module, method: str = "this attention method") -> tuple[str, ...]:
    """The names of a transformer's attention softmax modules (its ``attention_layers``).

    Raises:
      NotApplicable: the model is not a transformer (it declares no ``attention_layers``).
    """
    layers = getattr(model, "attention_layers", None)
    if not (isinstance(layers, (tuple, list)) and layers and all(isinstance(n, str) for n in layers)):
        raise NotApplicable(
            f"{method} needs a vision transformer or a text transformer (BERT): a model with the attribute "
            f"'attention_layers' (the dotted "
            f"names of the softmax modules whose outputs are the attention probabilities (N, heads, T, T) of "
            f"each block); {type(model).__name__} has none"
        )
    return tuple(layers)


def _check_attention(name: str, a: jax.Array) -> None:
    if a.ndim != 4 or a.shape[2] != a.shape[3]:
        raise ValueError(
            f"attention layer {name!r} must output attention probabilities (N, heads, T, T); its output has shape {a.shape}"
        )


def attention_probabilities(
    model: nn.Module, variables: Mapping[str, Any], x: jax.Array, method: str = "attention probabilities"
) -> tuple[jax.Array, ...]:
    """The attention probabilities of every block, each (N, heads, T, T), first block first.

    One forward pass (:func:`xaijax.models.taps.forward`). ``x``: NHWC batch.

    Raises:
      NotApplicable: not a transformer (no ``attention_layers``).
    """
    names = attention_layers(model, method)
    check_inputs(x)
    _, acts = taps.forward(model, variables, x, capture=names)
    for name in names:
        _check_attention(name, acts[name])
    return tuple(acts[n] for n in names)


def fuse_heads(a: jax.Array, how: str = "mean") -> jax.Array:
    """(N, heads, T, T) -> (N, T, T): mean, max or min over the heads."""
    if how == "mean":
        return a.mean(1)
    if how == "max":
        return a.max(1)
    if how == "min":
        return a.min(1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {how!r}")


def residual_attention(a: jax.Array, head_fusion: str = "mean", residual: float = 0.5) -> jax.Array:
    """Abnar & Zuidema's residual-aware attention of one block, (N, heads, T, T) -> (N, T, T).

    ``(1 - residual) * fuse_heads(a) + residual * I``, each row divided by its sum (rows sum to 1).
    """
    f = fuse_heads(a, head_fusion)
    eye = jnp.eye(f.shape[-1], dtype=f.dtype)
    m = (1.0 - residual) * f + residual * eye
    return m / m.sum(-1, keepdims=True)


def rollout(attentions: Sequence[jax.Array], head_fusion: str = "mean", residual: float = 0.5) -> jax.Array:
    """Attention rollout ``A_hat_{L-1} ... A_hat_0`` (N, T, T) of per-block probabilities (N, heads, T, T).

    ``A_hat`` is :func:`residual_attention`; the product of row-stochastic matrices is
    row-stochastic (every row sums to 1).
    """
    if not attentions:
        raise ValueError("rollout needs the attention of at least one block")
    joint = None
    for a in attentions:
        m = residual_attention(a, head_fusion, residual)
        joint = m if joint is None else jnp.einsum("nij,njk->nik", m, joint, precision=_HI)
    return joint


def accumulate_relevance(maps: Sequence[jax.Array]) -> jax.Array:
    """Chefer et al.'s self-attention update: ``R = I``, then ``R <- R + A_bar R`` for each (N, T, T) map in order."""
    if not maps:
        raise ValueError("accumulate_relevance needs the map of at least one block")
    n, t, _ = maps[0].shape
    r = jnp.broadcast_to(jnp.eye(t, dtype=maps[0].dtype), (n, t, t))
    for m in maps:
        r = r + jnp.einsum("nij,njk->nik", m, r, precision=_HI)
    return r


def class_token_grid(model: nn.Module, r: jax.Array, layer: str = "attention") -> jax.Array:
    """(N, T, T) token matrix -> the class token's row (token 0) as a map.

    Vision transformers: (N, g, g), over the patch tokens, prefix tokens dropped and the
    patches laid out on the model's grid (:func:`xaijax.methods._core.token_grid`:
    ``num_prefix_tokens`` and ``grid_size``). Sequence models (``sequence_model = True``,
    text): (N, T, 1), over all T tokens, the class token itself included."""
    return token_grid(model, r[:, 0, :, None], layer)[..., 0]


def _first_block(names: tuple[str, ...], start_layer: int, method: str) -> tuple[str, ...]:
    if start_layer >= len(names):
        raise ValueError(
            f"{method}: start_layer {start_layer} is out of range for a model with {len(names)} blocks (0..{len(names) - 1})"
        )
    return names[start_layer:]


def _attention_gradients(
    method: str, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any, start_layer: int
) -> tuple[tuple[str, ...], dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
    """``(names, attention, gradients, logits)``: the attention probabilities of the blocks from
    ``start_layer`` on and the target score's gradients there, from one pass (checked shapes)."""
    names = _first_block(attention_layers(model, method), start_layer, method)
    acts, grads, out = layer_gradients(model, variables, x, target, names)
    for name in names:
        _check_attention(name, acts[name])
    return names, acts, grads, out


def _validate_start_layer(owner: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{owner}: start_layer must be an int >= 0 (the first block used), got {value!r}")


def _validate_fusion(owner: str, head_fusion: Any, residual: Any) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"{owner}: head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if isinstance(residual, bool) or not isinstance(residual, (int, float, np.floating, np.integer)) or not 0.0 <= residual <= 1.0:
        raise ValueError(f"{owner}: residual must be a number in [0, 1] (the weight of the identity), got {residual!r}")


# ------------------------------------------------------------------------ attention flow


def _bfs(rf: jax.Array, rb: jax.Array, source: jax.Array, sink: int):
    """Breadth-first search from (layer 0, ``source``) in the layered residual graph.

    ``rf[l, i, j]``: residual of the edge (layer l, token j) -> (layer l+1, token i);
    ``rb[l, i, j]``: residual of the edge (layer l+1, token i) -> (layer l, token j).
    Returns ``(sink reached, parent direction (L+1, T), parent token (L+1, T))``; direction
    +1: reached from the layer below, -1: from the layer above.
    """
    nl, t, _ = rf.shape
    vis = jnp.zeros((nl + 1, t), bool).at[0, source].set(True)
    pdir = jnp.zeros((nl + 1, t), jnp.int32)
    ptok = jnp.zeros((nl + 1, t), jnp.int32)
    zrow = jnp.zeros((1, t), bool)
    zidx = jnp.zeros((1, t), jnp.int32)

    def cond(s):
        vis, front, _, _ = s
        return front.any() & ~vis[nl, sink]

    def body(s):
        vis, front, pdir, ptok = s
        up = front[:-1, None, :] & (rf > 0)  # (L, i, j): (l, j) -> (l+1, i)
        down = front[1:, :, None] & (rb > 0)  # (L, i, j): (l+1, i) -> (l, j)
        reach_up = jnp.concatenate([zrow, up.any(-1)])
        par_up = jnp.concatenate([zidx, jnp.argmax(up, -1).astype(jnp.int32)])
        reach_down = jnp.concatenate([down.any(-2), zrow])
        par_down = jnp.concatenate([jnp.argmax(down, -2).astype(jnp.int32), zidx])
        new = (reach_up | reach_down) & ~vis
        pdir = jnp.where(new, jnp.where(reach_up, 1, -1), pdir)
        ptok = jnp.where(new, jnp.where(reach_up, par_up, par_down), ptok)
        return vis | new, new, pdir, ptok

    vis, _, pdir, ptok = jax.lax.while_loop(cond, body, (vis, vis, pdir, ptok))
    return vis[nl, sink], pdir, ptok


def _augment(rf, rb, pdir, ptok, found, source, sink: int):
    """Push the bottleneck along the BFS path from the sink back to the source.

    Does nothing when ``found`` is false (under ``vmap`` the loop body also runs for samples
    whose search has ended: the walk then stops at once, at the sink without a parent).
    """
    nl = rf.shape[0]
    mask0 = jnp.zeros(rf.shape, bool)

    def cond(s):
        l, i, _, _ = s
        return ~((l == 0) & (i == source)) & (pdir[l, i] != 0) & found

    def body(s):
        l, i, mf, mb = s
        d = pdir[l, i]
        p = ptok[l, i]
        lu = jnp.maximum(l - 1, 0)
        ld = jnp.minimum(l, nl - 1)
        mf = mf.at[lu, i, p].set(mf[lu, i, p] | (d == 1))  # up edge (l-1, p) -> (l, i)
        mb = mb.at[ld, p, i].set(mb[ld, p, i] | (d == -1))  # down edge (l+1, p) -> (l, i)
        return jnp.where(d == 1, l - 1, l + 1), p, mf, mb

    _, _, mf, mb = jax.lax.while_loop(cond, body, (jnp.asarray(nl), jnp.asarray(sink, jnp.int32), mask0, mask0))
    inf = jnp.asarray(jnp.inf, rf.dtype)
    b = jnp.minimum(jnp.where(mf, rf, inf).min(), jnp.where(mb, rb, inf).min())
    b = jnp.where(found, b, jnp.zeros_like(b))
    rf = jnp.where(mf, rf - b, jnp.where(mb, rf + b, rf))
    rb = jnp.where(mb, rb - b, jnp.where(mf, rb + b, rb))
    return rf, rb, b


def layered_max_flow(capacity: jax.Array, source: Any, sink: int = 0) -> jax.Array:
    """Maximum flow from (layer 0, token ``source``) to (layer L, token ``sink``) of a layered graph.

    Args:
      capacity: (L, T, T); ``capacity[l, i, j] >= 0`` is the capacity of the edge from token
        ``j`` of layer ``l`` to token ``i`` of layer ``l + 1`` (an attention matrix's
        orientation: row = attending token).
      source: token index at layer 0 (an int or a traced int scalar: vmappable).
      sink: token index at layer L.

    Returns:
      the flow value (a scalar of the capacity's dtype). Exact Edmonds-Karp in
      ``lax.while_loop`` s (see the module docstring).
    """
    cap = jnp.asarray(capacity)
    if cap.ndim != 3 or cap.shape[1] != cap.shape[2]:
        raise ValueError(f"capacity must have shape (L, T, T); got {cap.shape}")
    source = jnp.asarray(source, jnp.int32)
    rf0 = jnp.maximum(cap, 0)

    def body(s):  # one search and, if it reached the sink, one augmentation
        rf, rb, total, _ = s
        found, pdir, ptok = _bfs(rf, rb, source, sink)
        rf, rb, b = _augment(rf, rb, pdir, ptok, found, source, sink)
        return rf, rb, total + b, found

    # the first search runs inside the loop: with the all-zero reverse residuals as a constant
    # outside it, XLA would spend seconds constant-folding that search
    init = (rf0, jnp.zeros_like(rf0), jnp.zeros((), rf0.dtype), jnp.asarray(True))
    return jax.lax.while_loop(lambda s: s[3], body, init)[2]


# ------------------------------------------------------------------------------ methods


class AttentionMethod(Method):
    """Base of the attention family: :meth:`layer_map` gives the (N, g, g) token-grid map,
    ``__call__`` upsamples it bilinearly to the input size (N, H, W), in the input's dtype.
    For a sequence model (text, input (N, T, 1, D)) the map is (N, T, 1) and is returned as is."""

    kind = "attribution"
    has_layer_map = True

    def __call__(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, H, W) map for ``x`` (N, H, W, C)."""
        check_inputs(x)
        grid = self.layer_map(model, variables, x, target)
        return imageops.resize(grid, x.shape[1:3]).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RawAttention(AttentionMethod):
    """Raw attention: one block's attention, fused over heads, class-token row over the patches.

    Attributes:
      block: index of the block (Python indexing; default -1, the last).
      head_fusion: ``"mean"`` (default), ``"max"`` or ``"min"`` over the heads.
    """

    block: int = -1
    head_fusion: str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, (int, np.integer)):
            raise ValueError(f"raw-attention: block must be an int (block index, -1: the last), got {self.block!r}")
        _validate_fusion("raw-attention", self.head_fusion, 0.0)

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, g, g) attention of the class token to the patch tokens."""
        layers = attention_layers(model, "raw-attention")
        n = len(layers)
        if not -n <= self.block < n:
            raise ValueError(f"raw-attention: block {self.block} is out of range for a model with {n} blocks")
        check_inputs(x)
        name = layers[self.block]
        _, acts = taps.forward(model, variables, x, capture=[name])
        _check_attention(name, acts[name])
        return class_token_grid(model, fuse_heads(acts[name], self.head_fusion), name).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionRollout(AttentionMethod):
    """Attention rollout (Abnar & Zuidema 2020); see the module docstring.

    Attributes:
      head_fusion: ``"mean"`` (default), ``"max"`` or ``"min"`` over the heads.
      residual: weight ``r`` of the identity in ``(1 - r) A + r I`` (default 0.5).
      start_layer: first block of the product (default 0).
    """

    head_fusion: str = "mean"
    residual: float = 0.5
    start_layer: int = 0

    def __post_init__(self) -> None:
        _validate_fusion("attention-rollout", self.head_fusion, self.residual)
        _validate_start_layer("attention-rollout", self.start_layer)

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, g, g) class-token row of the rollout over the patch tokens."""
        names = _first_block(attention_layers(model, "attention-rollout"), self.start_layer, "attention-rollout")
        atts = attention_probabilities(model, variables, x, "attention-rollout")
        s = self.start_layer
        r = rollout(atts[s:], self.head_fusion, self.residual)
        return class_token_grid(model, r, names[-1]).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionFlow(AttentionMethod):
    """Attention flow (Abnar & Zuidema 2020): max flow in the layered attention graph.

    Exact (Edmonds-Karp) and traced (``lax.while_loop``): jittable and vmappable, but far
    more expensive than rollout (see the module docstring).

    Attributes:
      head_fusion, residual, start_layer: the residual attention graph, as :class:`AttentionRollout`.
      chunk: patch tokens whose max-flow problems run together (``lax.map`` over chunks,
        ``vmap`` inside; default 16).
    """

    head_fusion: str = "mean"
    residual: float = 0.5
    start_layer: int = 0
    chunk: int = 16

    def __post_init__(self) -> None:
        _validate_fusion("attention-flow", self.head_fusion, self.residual)
        _validate_start_layer("attention-flow", self.start_layer)
        validate_positive_int("attention-flow", "chunk", self.chunk)

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, g, g) max-flow value from each patch token to the top layer's class token."""
        names = _first_block(attention_layers(model, "attention-flow"), self.start_layer, "attention-flow")
        atts = attention_probabilities(model, variables, x, "attention-flow")
        s = self.start_layer
        cap = jnp.stack([residual_attention(a, self.head_fusion, self.residual) for a in atts[s:]], axis=1)  # (N, L, T, T)
        sources = jnp.arange(cap.shape[-1], dtype=jnp.int32)  # every token (the prefix tokens are dropped below)
        chunk = min(int(self.chunk), int(sources.shape[0]))

        def one_image(c):
            return jax.lax.map(lambda src: layered_max_flow(c, src, 0), sources, batch_size=chunk)

        flows = jax.vmap(one_image)(cap)  # (N, T): flow from each token of the input layer
        return token_grid(model, flows[..., None], names[-1])[..., 0].astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class GenericAttention(AttentionMethod):
    """Generic attention explainability (Chefer et al., ICCV 2021), self-attention rule.

    ``R = I``; per block ``R <- R + mean_heads((dS/dA * A)^+) R``; class-token row over the
    patch tokens.

    Attributes:
      start_layer: first block accumulated (default 0: all, as the authors).
    """

    start_layer: int = 0

    def __post_init__(self) -> None:
        _validate_start_layer("generic-attention", self.start_layer)

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, g, g) class-token row of ``R`` over the patch tokens."""
        names, acts, grads, _ = _attention_gradients("generic-attention", model, variables, x, target, self.start_layer)
        maps = [jax.nn.relu(grads[n] * acts[n]).mean(1) for n in names]
        return class_token_grid(model, accumulate_relevance(maps), names[-1]).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class CheferLRP(AttentionMethod):
    """Transformer attribution of Chefer et al. (CVPR 2021): gradient-weighted LRP relevance of the attention.

    ``R = I``; per block ``R <- R + mean_heads((dS/dA * R_A)^+) R`` with ``R_A`` the relevance
    arriving at the block's attention probabilities, from one relevance pass with
    ``composite`` seeded by the one-hot target (see the module docstring).

    Attributes:
      composite: a :class:`~xaijax.propagation.Composite` or a built-in composite name
        (default ``"alpha1-beta0"``, the authors' rule on linear layers; the transformer layers
        without weights take the engine's default rules for their kinds; see the module
        docstring for where that differs from the authors' code).
      start_layer: first block accumulated (default 0).
    """

    composite: Any = "alpha1-beta0"
    start_layer: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.composite, (str, Composite)):
            raise TypeError(f"chefer-lrp: composite must be a Composite or a built-in composite name, got {self.composite!r}")
        _validate_start_layer("chefer-lrp", self.start_layer)

    def layer_map(self, model: nn.Module, variables: Mapping[str, Any], x: jax.Array, target: Any) -> jax.Array:
        """(N, g, g) class-token row of ``R`` over the patch tokens."""
        names, _, grads, out = _attention_gradients("chefer-lrp", model, variables, x, target, self.start_layer)
        seed = as_seed(target, out.shape[-1], out.shape[0], out.dtype)
        _, trace = relevance_trace(model, variables, x, seed, self.composite)
        missing = [n for n in names if n not in trace]
        if missing:
            raise ValueError(f"chefer-lrp: the relevance pass of composite {self.composite!r} reports no relevance at {missing}")
        maps = [jax.nn.relu(grads[n] * trace[n].output).mean(1) for n in names]
        return class_token_grid(model, accumulate_relevance(maps), names[-1]).astype(x.dtype)


register("raw-attention", RawAttention, "Raw attention: the last block's class-token attention to the patches (ViT/DeiT/BERT)")
register("attention-rollout", AttentionRollout, "Attention rollout (Abnar & Zuidema 2020): residual-aware attention multiplied over blocks (ViT/DeiT/BERT)")
register("attention-flow", AttentionFlow, "Attention flow (Abnar & Zuidema 2020): exact max flow in the layered attention graph (ViT/DeiT/BERT; slow)")
register("generic-attention", GenericAttention, "Generic attention explainability (Chefer et al. ICCV 2021): gradient-weighted attention, accumulated (ViT/DeiT/BERT)")
register("chefer-lrp", CheferLRP, "Transformer attribution (Chefer et al. CVPR 2021): gradient-weighted LRP relevance of the attention (ViT/DeiT/BERT)")
