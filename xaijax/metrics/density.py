"""Positive and negative map density (UCAG, Hong et al., AAAI 2023, Table 5).

UCAG reports a *positive map density* D+ (higher is better; ResNet50: Grad-CAM 2.33,
CAMERAS 3.20, UCAG 3.89) and a *negative map density* D- (lower is better; 0.86, 0.81,
0.81) of maps relative to the object's bounding box on ImageNet.

Provenance and status of the formula: the authors' public code (KU-HJH/UCAG) has no
density evaluation, and only the abstract and the reported numbers of the paper
(arXiv 2312.14201) could be consulted while this module was written — the formula
below is therefore **xaijax's definition**, chosen to be the relevance-density form of the
outside-inside relevance ratio that the same group used for RAP (Nam et al., AAAI 2020,
after Lapuschkin et al., CVPR 2016), and consistent in scale with the table (a ratio
around 1 for a map that ignores the box, growing as relevance concentrates in it). Check
it against the paper before quoting numbers next to the published ones.

Definition. For a map ``R`` with the baseline ``b``, split ``R+ = max(R - b, 0)`` and
``R- = max(b - R, 0)``. The default baseline is the map's own mean (``baseline="mean"``):
UCAG reports a negative density for Grad-CAM, whose maps are non-negative (ReLU), so its
negative part must be measured against something other than zero; the mean is also the
threshold of the seed's mIoU and ImageNet-segmentation protocols. ``baseline="zero"``
splits by sign, the natural choice for signed relevance (LRP, RAP, RSP). With the object region ``B`` and the
whole image ``Omega``::

    D+ = ( sum_{p in B} R+_p / |B| ) / ( sum_{p in Omega} R+_p / |Omega| )
    D- = ( sum_{p in B} R-_p / |B| ) / ( sum_{p in Omega} R-_p / |Omega| )

i.e. the mean positive (negative) relevance per pixel inside the object relative to the
mean over the image: 1 when relevance is spread uniformly, up to |Omega| / |B| when all of
it lies in the object, 0 when none does. ``reference="outside"`` divides by the mean over
``Omega \\ B`` instead (the inside/outside form of the RAP ratio, inverted so that larger
means more concentrated on the object). A pair whose map has no positive (negative) part,
or whose region is empty (or the whole image, for ``"outside"``), gets NaN for that value;
summaries average the defined values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xaijax.imageops import safe_divide

__all__ = ["map_density", "summarize_density"]


def map_density(
    maps: jax.Array, regions: jax.Array, *, baseline: str = "mean", reference: str = "image"
) -> dict[str, jax.Array]:
    """Positive and negative map density per pair.

    Args:
      maps: (N, H, W) maps at image resolution.
      regions: (N, H, W) bool object regions (box or mask).
      baseline: ``"mean"`` (split at each map's mean, the default) or ``"zero"`` (by sign).
      reference: ``"image"`` (mean over the whole image) or ``"outside"`` (mean outside B).

    Returns:
      ``{"density_pos": (N,), "density_neg": (N,)}`` float32, NaN where undefined.
    """
    maps = jnp.asarray(maps, jnp.float32)
    regions = jnp.asarray(regions, bool)
    if maps.ndim != 3 or maps.shape != regions.shape:
        raise ValueError(f"maps and regions must both be (N, H, W); got {maps.shape} and {regions.shape}")
    if baseline not in ("zero", "mean"):
        raise ValueError(f"baseline must be 'zero' or 'mean'; got {baseline!r}")
    if reference not in ("image", "outside"):
        raise ValueError(f"reference must be 'image' or 'outside'; got {reference!r}")
    b = maps.mean(axis=(1, 2), keepdims=True) if baseline == "mean" else 0.0
    n_in = jnp.sum(regions, axis=(1, 2)).astype(jnp.float32)
    n_all = jnp.float32(maps.shape[1] * maps.shape[2])
    n_ref = n_all if reference == "image" else n_all - n_in
    out = {}
    for name, part in (("density_pos", jnp.maximum(maps - b, 0.0)), ("density_neg", jnp.maximum(b - maps, 0.0))):
        s_in = jnp.sum(jnp.where(regions, part, 0.0), axis=(1, 2))
        s_ref = jnp.sum(part, axis=(1, 2)) if reference == "image" else jnp.sum(jnp.where(regions, 0.0, part), axis=(1, 2))
        ok = (n_in > 0) & (n_ref > 0) & (s_ref > 0)
        mean_in = safe_divide(s_in, n_in)
        mean_ref = safe_divide(s_ref, n_ref)
        out[name] = jnp.where(ok, safe_divide(mean_in, mean_ref), jnp.nan)
    return out


def summarize_density(values: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over pairs of each density, ignoring NaN (undefined) pairs; NaN if none is defined."""
    res = {}
    for k in ("density_pos", "density_neg"):
        v = np.asarray(values[k], np.float64)
        v = v[~np.isnan(v)]
        res[k] = float(v.mean()) if v.size else float("nan")
    return res
