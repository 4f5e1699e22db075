"""Vision Transformers in ``flax.linen``: torchvision's ViT and timm's DeiT, with their names.

:class:`VisionTransformer` (``torchvision.models.vision_transformer``)::

    conv_proj                 patch embedding, Conv(p x p, stride p)
    tokens                    (N, h, w, D) -> (N, h*w, D)
    class_token               parameter (1, 1, D); concat (class token first)
    encoder                   pos_embedding (1, 1 + h*w, D) parameter, pos_add,
      layers.encoder_layer_N  ln_1, self_attention, add_1, ln_2, mlp ("0" Linear, "1" GELU,
                              "3" Linear), add_2
      ln                      final LayerNorm
    select                    the class token
    heads.head                Linear

:class:`DeiT` (timm's ``VisionTransformer`` / ``VisionTransformerDistilled``)::

    patch_embed.proj, patch_embed.tokens, cls_token [, dist_token], concat, pos_embed, pos_add,
    blocks.N (norm1, attn, add_1, norm2, mlp (fc1, act, fc2), add_2), norm,
    select -> head [, select_dist -> head_dist, head_mean (the average of both heads, as timm
    does in eval mode)]

Attention (``self_attention`` / ``attn``) is written out as named modules so that rules and
attention methods can intercept each step: the fused projection (``in_proj`` in torchvision,
whose ``in_proj_weight`` / ``in_proj_bias`` it holds, ``qkv`` in timm), ``split`` (q, k, v,
each (N, heads, T, D/heads)), ``qk`` (the bilinear product ``q.k^T / sqrt(D/heads)``),
``attn`` (the softmax: attention probabilities (N, heads, T, T), rows sum to 1), ``av``
(``attention.v``), ``merge`` (heads concatenated) and the output projection (``out_proj`` /
``proj``). So ``encoder.layers.encoder_layer_3.self_attention.attn`` (ViT) and
``blocks.3.attn.attn`` (DeiT) are the probabilities of block 3; the block names themselves
give its output tokens (N, T, D). Dropout and stochastic depth (identity in eval mode) are
left out.

Conventions: inputs NHWC float (N, image_size, image_size, 3) -- exactly the size the
position embedding was made for; another size needs a model built with that
``image_size`` and the checkpoint's position embedding resampled
(:func:`xaijax.checkpoints.vit_mapping.resample_pos_embed`, which the porter applies). Outputs
are logits (N, num_classes). LayerNorm eps is 1e-6 (torchvision's and timm's ViTs), GELU is
exact (erf).

CAM layer (``cam_layer``): the output of the last block's first LayerNorm, the input of its
attention path (``encoder.layers.encoder_layer_{L-1}.ln_1`` / ``blocks.{L-1}.norm1``), tokens
(N, prefix + h*w, D); pytorch-grad-cam gives the same advice for ViTs. Not the last block's
output: the head reads only the class token (after the final LayerNorm, which acts on each
token separately), so the gradient of every logit with respect to the last block's *patch*
tokens is exactly zero and Grad-CAM there is an all-zero map. At ``ln_1``/``norm1`` the patch
tokens still reach the class token through the last attention (as keys and values), so their
gradients are not zero. CAM methods turn tokens into a (h, w) grid themselves
(:func:`xaijax.methods._core.token_grid`: the ``num_prefix_tokens`` prefix tokens dropped,
the patch tokens reshaped to ``grid_size`` x ``grid_size``); no model declares an
``excitation_layer`` (Excitation Backprop is defined for ReLU networks only).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from xaijax.models import layers as L
from xaijax.models import transformer_layers as T
from xaijax.models.registry import ArchSpec, register

__all__ = ["SelfAttention", "MLPBlock", "EncoderBlock", "Encoder", "VisionTransformer", "DeiT", "LAYOUT_NAMES"]

#: Module names of one encoder block in each layout.
LAYOUT_NAMES: dict[str, dict[str, str]] = {
    "torchvision": dict(norm1="ln_1", attn="self_attention", norm2="ln_2", qkv="in_proj", proj="out_proj", fc1="0", act="1", fc2="3"),
    "timm": dict(norm1="norm1", attn="attn", norm2="norm2", qkv="qkv", proj="proj", fc1="fc1", act="act", fc2="fc2"),
}


class SelfAttention(nn.Module):
    """Multi-head self-attention written out step by step (see the module docstring).

    Input and output (N, T, D); ``D`` must be divisible by ``num_heads``.
    """

    num_heads: int
    qkv_name: str = "in_proj"
    proj_name: str = "out_proj"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"hidden_dim {d} is not divisible by num_heads {self.num_heads}")
        hd = d // self.num_heads
        qkv = L.dense(3 * d, name=self.qkv_name)(x)
        q, k, v = T.SplitHeads(self.num_heads, name="split")(qkv)
        logits = T.MatMul(scale=float(hd) ** -0.5, transpose_b=True, name="qk")(q, k)
        attn = T.Softmax(name="attn")(logits)
        out = T.MatMul(name="av")(attn, v)
        out = T.MergeHeads(name="merge")(out)
        return L.dense(d, name=self.proj_name)(out)


class MLPBlock(nn.Module):
    """Linear(D -> mlp_dim), exact GELU, Linear(mlp_dim -> D), with the layout's names."""

    mlp_dim: int
    layout: str = "torchvision"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = LAYOUT_NAMES[self.layout]
        d = x.shape[-1]
        x = L.dense(self.mlp_dim, name=n["fc1"])(x)
        x = T.GELU(name=n["act"])(x)
        return L.dense(d, name=n["fc2"])(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``y + mlp(norm2(y))``."""

    num_heads: int
    mlp_dim: int
    layout: str = "torchvision"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = LAYOUT_NAMES[self.layout]
        h = T.LayerNorm(self.eps, name=n["norm1"])(x)
        h = SelfAttention(self.num_heads, n["qkv"], n["proj"], name=n["attn"])(h)
        x = L.Add(name="add_1")(x, h)
        h = T.LayerNorm(self.eps, name=n["norm2"])(x)
        h = MLPBlock(self.mlp_dim, self.layout, name="mlp")(h)
        return L.Add(name="add_2")(x, h)


class _Blocks(nn.Module):
    """The stack of blocks; child names ``{prefix}{i}`` (``encoder_layer_3`` / ``3``)."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    layout: str = "torchvision"
    prefix: str = ""
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.layout, self.eps, name=f"{self.prefix}{i}")(x)
        return x


class Encoder(nn.Module):
    """torchvision's ``encoder``: ``pos_embedding`` added (``pos_add``), ``layers``, final ``ln``."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:], jnp.float32)
        x = L.Add(name="pos_add")(x, pos)
        x = _Blocks(self.num_layers, self.num_heads, self.mlp_dim, "torchvision", "encoder_layer_", self.eps, name="layers")(x)
        return T.LayerNorm(self.eps, name="ln")(x)


class _Heads(nn.Module):
    """torchvision's ``heads`` Sequential holding one Linear ``head``."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return L.dense(self.num_classes, name="head")(x)


class _PatchEmbed(nn.Module):
    """timm's ``patch_embed``: ``proj`` convolution, then ``tokens`` (flattened grid)."""

    hidden_dim: int
    patch_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = L.conv(self.hidden_dim, self.patch_size, self.patch_size, 0, name="proj")(x)
        return T.PatchTokens(name="tokens")(x)


def _check(model: nn.Module, x: jax.Array) -> None:
    cls = type(model).__name__
    if x.ndim != 4:
        raise ValueError(f"{cls} expects an NHWC batch (N, H, W, C), got an array of shape {x.shape}")
    for k in ("image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim", "num_classes"):
        if int(getattr(model, k)) < 1:
            raise ValueError(f"{cls} {k} must be >= 1, got {getattr(model, k)}")
    if model.image_size % model.patch_size:
        raise ValueError(f"{cls} image_size {model.image_size} is not a multiple of patch_size {model.patch_size}")
    if model.hidden_dim % model.num_heads:
        raise ValueError(f"{cls} hidden_dim {model.hidden_dim} is not divisible by num_heads {model.num_heads}")
    if x.shape[1] != model.image_size or x.shape[2] != model.image_size:
        raise ValueError(
            f"{cls} was built for {model.image_size}x{model.image_size} inputs (its position embedding has "
            f"{model.grid_size}x{model.grid_size} patches), got {x.shape[1]}x{x.shape[2]} (input shape {x.shape}, NHWC). "
            f"Resize the image, or build the model with image_size={x.shape[1]} (square inputs, a multiple of "
            f"patch_size={model.patch_size}) and port the checkpoint again: its position embedding is then resampled "
            "(xaijax.checkpoints.vit_mapping.resample_pos_embed, bicubic on the grid, as timm)"
        )


class _ViTFacts:
    """Properties shared by both layouts (mixed into the linen modules); each layout names its
    blocks with ``_block_name`` (formatted with the block index), its attention softmax with
    ``_attention_suffix`` and its first LayerNorm (the CAM layer) with ``_cam_suffix`` inside a
    block."""

    _block_name: ClassVar[str]
    _attention_suffix: ClassVar[str]
    _cam_suffix: ClassVar[str]

    @property
    def block_layers(self) -> tuple[str, ...]:
        """Names of the blocks (their outputs are the tokens, (N, T, D))."""
        return tuple(self._block_name.format(i) for i in range(self.num_layers))

    @property
    def attention_layers(self) -> tuple[str, ...]:
        """Names of the softmax modules: the attention probabilities (N, heads, T, T) of each block."""
        return tuple(f"{b}.{self._attention_suffix}" for b in self.block_layers)

    @property
    def cam_layer(self) -> str:
        """Default CAM layer: the last block's first LayerNorm (``ln_1`` / ``norm1``), tokens
        (N, T, D); see the module docstring for why not the block's output (zero gradients on
        the patch tokens there). CAM methods reshape the tokens to the patch grid."""
        return f"{self.block_layers[-1]}.{self._cam_suffix}"

    @property
    def grid_size(self) -> int:
        """Patches per side: ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image: prefix tokens plus ``grid_size**2`` patches."""
        return self.num_prefix_tokens + self.grid_size**2


class VisionTransformer(_ViTFacts, nn.Module):
    """torchvision's ViT (``vit_b_16`` etc.) with its module and parameter names.

    Attributes:
      image_size: input side in pixels (the position embedding has ``(image_size/patch)**2 + 1`` rows).
      patch_size: side of the square patches (the ``conv_proj`` kernel and stride).
      num_layers, num_heads, hidden_dim, mlp_dim: depth and widths (ViT-B: 12, 12, 768, 3072).
      num_classes: logits.
      eps: LayerNorm epsilon (1e-6).

    ``__call__(x)``: NHWC (N, image_size, image_size, 3) -> logits (N, num_classes).
    """

    family: ClassVar[str] = "vit"
    num_prefix_tokens: ClassVar[int] = 1
    _block_name: ClassVar[str] = "encoder.layers.encoder_layer_{}"
    _attention_suffix: ClassVar[str] = "self_attention.attn"
    _cam_suffix: ClassVar[str] = "ln_1"

    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    num_classes: int = 1000
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check(self, x)
        x = L.conv(self.hidden_dim, self.patch_size, self.patch_size, 0, name="conv_proj")(x)
        x = T.PatchTokens(name="tokens")(x)
        cls = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32)
        x = T.TokenConcat(name="concat")(cls, x)
        x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.eps, name="encoder")(x)
        x = T.SelectToken(0, name="select")(x)
        return _Heads(self.num_classes, name="heads")(x)


class DeiT(_ViTFacts, nn.Module):
    """timm's DeiT (``deit_*_patch16_224``; ``distilled``: ``deit_*_distilled_patch16_224``) with timm's names.

    Attributes as :class:`VisionTransformer` (defaults: DeiT-tiny, 12 layers, 3 heads, 192 wide,
    MLP 768) plus ``distilled``: a second prefix token ``dist_token`` and head ``head_dist``;
    the output is the average of ``head`` (class token) and ``head_dist`` (distillation
    token), timm's eval-mode output.
    """

    family: ClassVar[str] = "deit"
    _block_name: ClassVar[str] = "blocks.{}"
    _attention_suffix: ClassVar[str] = "attn.attn"
    _cam_suffix: ClassVar[str] = "norm1"

    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 3
    hidden_dim: int = 192
    mlp_dim: int = 768
    num_classes: int = 1000
    distilled: bool = False
    eps: float = 1e-6

    @property
    def num_prefix_tokens(self) -> int:
        """1, or 2 for distilled models (class and distillation tokens, in that order)."""
        return 2 if self.distilled else 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check(self, x)
        x = _PatchEmbed(self.hidden_dim, self.patch_size, name="patch_embed")(x)
        init = nn.initializers.normal(0.02)
        prefix = [self.param("cls_token", init, (1, 1, self.hidden_dim), jnp.float32)]
        if self.distilled:
            prefix.append(self.param("dist_token", init, (1, 1, self.hidden_dim), jnp.float32))
        x = T.TokenConcat(name="concat")(*prefix, x)
        pos = self.param("pos_embed", init, (1,) + x.shape[1:], jnp.float32)
        x = L.Add(name="pos_add")(x, pos)
        x = _Blocks(self.num_layers, self.num_heads, self.mlp_dim, "timm", "", self.eps, name="blocks")(x)
        x = T.LayerNorm(self.eps, name="norm")(x)
        out = L.dense(self.num_classes, name="head")(T.SelectToken(0, name="select")(x))
        if not self.distilled:
            return out
        out_dist = L.dense(self.num_classes, name="head_dist")(T.SelectToken(1, name="select_dist")(x))
        return T.Average(name="head_mean")(out, out_dist)


def _register(name: str, family: str, cls: type, **kw) -> None:
    register(
        ArchSpec(
            name=name,
            family=family,
            build=functools.partial(cls, **kw),
            input_size=int(kw.get("image_size", 224)),
            min_input_size=int(kw["patch_size"]),
        )
    )


_register("vit_b_16", "vit", VisionTransformer, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
_register("vit_b_32", "vit", VisionTransformer, patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
_register("vit_l_16", "vit", VisionTransformer, patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096)
for _size, (_d, _h) in {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}.items():
    for _dist in (False, True):
        _register(
            f"deit_{_size}{'_distilled' if _dist else ''}_patch16_224",
            "deit",
            DeiT,
            patch_size=16,
            num_layers=12,
            num_heads=_h,
            hidden_dim=_d,
            mlp_dim=4 * _d,
            distilled=_dist,
        )
del _size, _d, _h, _dist
