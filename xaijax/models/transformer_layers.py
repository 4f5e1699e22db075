"""Primitive layers of the vision transformers in the zoo (ViT, DeiT).

As in :mod:`xaijax.models.layers`, every operation a relevance rule or an attention method
may need to see is its own named ``flax.linen`` module, so that
``nn.intercept_methods`` (and :mod:`xaijax.models.taps`) can address it by its dotted path:

* :class:`LayerNorm` — written out (mean, biased variance, ``rsqrt(var + eps)``, scale,
  bias) with torch's parameter roles (``weight`` -> ``scale``); eps 1e-6 as torchvision's
  and timm's ViTs use.
* :class:`GELU` — exact (erf) GELU, torch's ``nn.GELU()`` default.
* :class:`Softmax` — the attention probabilities (AttnLRP's softmax rule, rollout, Chefer).
* :class:`MatMul` — a bilinear product of two *inputs* (``q.k^T * scale`` and
  ``attention.v``), AttnLRP's uniform-split rule; not a layer with weights.
* :class:`SplitHeads` / :class:`MergeHeads` — (N, T, 3D) fused projection -> q, k, v of shape
  (N, heads, T, D/heads), and back; pure reshapes.
* :class:`PatchTokens` — (N, h, w, D) patch embedding -> (N, h*w, D) tokens (row-major grid,
  torch's ``flatten(2).transpose(1, 2)`` order).
* :class:`TokenConcat` — prefix tokens (class / distillation) in front of the patch tokens.
* :class:`SelectToken` — one token (the class token for the head).
* :class:`Average` — the mean of its inputs (a distilled DeiT's two heads).

Text transformers (BERT, :mod:`xaijax.models.bert`) add:

* :class:`Heads` — one projection (N, T, D) -> (N, heads, T, D/heads) (BERT's separate
  query/key/value projections; Hugging Face's ``transpose_for_scores``); a pure reshape.
* :class:`MaskKeys` — the attention mask: attention logits of padded keys replaced by the
  dtype's most negative finite value (``jnp.where``, not an additive ``-inf``), so their
  softmax probabilities are exactly 0; relevance and gradients reach only the kept logits.
* :class:`Tanh` — element-wise ``tanh`` (BERT's pooler activation).

Computation follows the dtype of the inputs and variables (float64 in parity tests).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "LayerNorm",
    "GELU",
    "Tanh",
    "Softmax",
    "MatMul",
    "SplitHeads",
    "Heads",
    "MergeHeads",
    "MaskKeys",
    "PatchTokens",
    "TokenConcat",
    "SelectToken",
    "Average",
]

_HI = jax.lax.Precision.HIGHEST


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm(D, eps)`` over the last axis: params ``scale`` (torch ``weight``), ``bias``.

    ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with the biased variance, as torch.
    """

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
        return xc * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class GELU(nn.Module):
    """Exact GELU ``x * Phi(x)`` (erf form), ``torch.nn.GELU()``'s default; ``approximate`` for tanh."""

    approximate: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=self.approximate)


class Tanh(nn.Module):
    """Element-wise hyperbolic tangent (``torch.nn.Tanh``; BERT's pooler activation)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(x)


class Softmax(nn.Module):
    """Softmax over ``axis`` (the keys, -1): the attention probabilities, rows summing to 1."""

    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.softmax(x, axis=self.axis)


class MatMul(nn.Module):
    """Batched bilinear product of two inputs ``scale * a @ b`` (``b`` transposed on its last two axes when ``transpose_b``).

    ``MatMul(scale=d**-0.5, transpose_b=True)(q, k)`` gives the attention logits (N, heads, T, T);
    ``MatMul()(attn, v)`` the attended values (N, heads, T, D/heads).
    """

    scale: float = 1.0
    transpose_b: bool = False

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        spec = "...ij,...kj->...ik" if self.transpose_b else "...ij,...jk->...ik"
        out = jnp.einsum(spec, a, b, precision=_HI)
        return out * self.scale if self.scale != 1.0 else out


class SplitHeads(nn.Module):
    """(N, T, 3*D) output of a fused q/k/v projection -> ``(q, k, v)``, each (N, heads, T, D/heads).

    The layout of torch's ``in_proj_weight`` and timm's ``qkv``: rows [0, D) are q, [D, 2D) k,
    [2D, 3D) v; within each, head ``h`` owns features [h*D/heads, (h+1)*D/heads).
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        n, t, d3 = x.shape
        d = d3 // 3
        x = x.reshape(n, t, 3, self.num_heads, d // self.num_heads)
        x = jnp.transpose(x, (2, 0, 3, 1, 4))  # 3, N, heads, T, hd
        return x[0], x[1], x[2]


class Heads(nn.Module):
    """(N, T, D) output of one projection (query, key or value) -> (N, heads, T, D/heads).

    Head ``h`` owns features [h*D/heads, (h+1)*D/heads), as Hugging Face's
    ``transpose_for_scores``; :class:`MergeHeads` is its inverse.
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"Heads: feature size {d} is not divisible by num_heads {self.num_heads}")
        return jnp.transpose(x.reshape(n, t, self.num_heads, d // self.num_heads), (0, 2, 1, 3))


class MaskKeys(nn.Module):
    """Attention mask on the logits: ``where(keep > 0, logits, finfo(dtype).min)``.

    ``logits`` (N, heads, T, T) (rows: queries, columns: keys); ``keep`` of a shape that
    broadcasts against them, (N or 1, 1, 1, T): 1 for a real key token, 0 for padding, in the
    logits' float dtype (a float, not a bool, so that it is an ordinary differentiable input
    of the layer whose relevance and gradient are exactly zero). Masked logits become the most
    negative *finite* value, not ``-inf`` and not an additive ``-10000``: their softmax
    probabilities are exactly 0 (``exp`` underflows), a row that is entirely masked stays finite
    (uniform), and the gradient or relevance of a masked logit is exactly 0 (``jnp.where``
    sends the whole cotangent to the kept entries). Hugging Face's BERT adds
    ``finfo(dtype).min`` instead: the same probabilities wherever a row has a real key.
    """

    @nn.compact
    def __call__(self, logits: jax.Array, keep: jax.Array) -> jax.Array:
        return jnp.where(keep > 0, logits, jnp.asarray(jnp.finfo(logits.dtype).min, logits.dtype))


class MergeHeads(nn.Module):
    """(N, heads, T, hd) -> (N, T, heads*hd), heads concatenated as torch does before ``out_proj``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, t, hd = x.shape
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(n, t, h * hd)


class PatchTokens(nn.Module):
    """(N, h, w, D) patch-embedding map -> (N, h*w, D) tokens in row-major grid order."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, d = x.shape
        return x.reshape(n, h * w, d)


class TokenConcat(nn.Module):
    """Concatenate token sequences along the token axis: ``TokenConcat()(cls, patches)``.

    Prefix tokens of shape (1, k, D) are broadcast over the batch of the last argument.
    """

    @nn.compact
    def __call__(self, *xs: jax.Array) -> jax.Array:
        n = xs[-1].shape[0]
        return jnp.concatenate([jnp.broadcast_to(x, (n,) + x.shape[1:]) for x in xs], axis=1)


class SelectToken(nn.Module):
    """(N, T, D) -> (N, D): the token at ``index`` (0: the class token)."""

    index: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x[:, self.index]


class Average(nn.Module):
    """Elementwise mean of its inputs (timm's eval-mode output of a distilled DeiT: both heads averaged)."""

    @nn.compact
    def __call__(self, *xs: jax.Array) -> jax.Array:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out / len(xs)
