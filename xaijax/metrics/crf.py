"""Dense-CRF refinement of thresholded maps (the segmentation table's "+ CRF" rows).

The RSP paper reports ImageNet-segmentation mIoU for Grad-CAM and RSP with and without a
fully connected CRF (Kraehenbuehl & Koltun, NeurIPS 2011), the refinement DeepLab made
standard for weakly supervised segmentation. :class:`DenseCRF` runs it on one image:

* **Unary** from the thresholded map (foreground where the map is above its threshold): each
  pixel's label is trusted with probability ``gt_prob`` (``-log gt_prob`` for its label,
  ``-log((1 - gt_prob))`` for the other; pydensecrf's ``unary_from_labels`` with
  ``zero_unsure=False``).
* **Pairwise**: a Gaussian smoothness kernel (``gaussian_sxy`` px, weight
  ``gaussian_compat``) and a bilateral appearance kernel (``bilateral_sxy`` px,
  ``bilateral_srgb`` intensity levels of the 0-255 RGB image, weight ``bilateral_compat``),
  Potts compatibility.
* ``iterations`` mean-field steps; the refined foreground is the label of larger marginal.

Defaults are the values of pydensecrf's and DeepLab's common setting (``sxy=3, compat=3``;
``sxy=80, srgb=13, compat=10``; 10 iterations; ``gt_prob=0.7``). The CRF runs on the host
(C++ through the ``pydensecrf2`` binding, the optional ``crf`` extra: ``pip install
"xaijax[crf]"``); it is not a JAX function.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DenseCRF", "CRF_INSTALL_HINT", "require_densecrf"]

CRF_INSTALL_HINT = (
    "dense-CRF refinement needs the pydensecrf2 package (Kraehenbuehl's dense CRF): "
    'pip install "xaijax[crf]"  (or: pip install pydensecrf2)'
)


def require_densecrf() -> None:
    """Raise ``ImportError`` with the install hint unless the dense-CRF binding is importable."""
    _densecrf()


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_labels
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(CRF_INSTALL_HINT) from e
    return dcrf, unary_from_labels


@dataclasses.dataclass(frozen=True)
class DenseCRF:
    """Fully connected CRF refinement of a binary foreground mask (see the module docstring).

    Attributes:
      gt_prob: confidence in the thresholded map's label, in (0.5, 1).
      iterations: mean-field iterations (>= 1).
      gaussian_sxy, gaussian_compat: spatial std (px) and weight of the smoothness kernel.
      bilateral_sxy, bilateral_srgb, bilateral_compat: spatial std (px), colour std (0-255
        levels) and weight of the appearance kernel.
    """

    gt_prob: float = 0.7
    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0

    def __post_init__(self) -> None:
        if not 0.5 < float(self.gt_prob) < 1.0:
            raise ValueError(f"crf: gt_prob must lie in (0.5, 1), got {self.gt_prob!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"crf: iterations must be a positive int, got {self.iterations!r}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"crf: {name} must be positive, got {getattr(self, name)!r}")
        for name in ("gaussian_compat", "bilateral_compat"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"crf: {name} must be >= 0, got {getattr(self, name)!r}")

    def __call__(self, image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """Refined foreground (H, W) bool of ``image`` (H, W, 3) and a foreground mask (H, W).

        ``image``: RGB, uint8 0-255 (floats in [0, 1] are scaled to 0-255). Batches: call it
        per image (:meth:`refine_batch`).
        """
        dcrf, unary_from_labels = _densecrf()
        img = np.asarray(image)
        fg = np.asarray(foreground, bool)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"crf: image must be RGB of shape (H, W, 3); got {img.shape}")
        if fg.shape != img.shape[:2]:
            raise ValueError(f"crf: foreground {fg.shape} and image {img.shape[:2]} must have the same (H, W)")
        if img.dtype != np.uint8:
            f = img.astype(np.float64)
            if f.min() < 0 or f.max() > 1:
                raise ValueError("crf: a float image must have values in [0, 1] (or pass uint8 0-255)")
            img = np.round(f * 255.0).astype(np.uint8)
        h, w = fg.shape
        crf = dcrf.DenseCRF2D(w, h, 2)
        crf.setUnaryEnergy(unary_from_labels(fg.astype(np.int32), 2, gt_prob=float(self.gt_prob), zero_unsure=False))
        crf.addPairwiseGaussian(sxy=float(self.gaussian_sxy), compat=float(self.gaussian_compat))
        crf.addPairwiseBilateral(
            sxy=float(self.bilateral_sxy),
            srgb=float(self.bilateral_srgb),
            rgbim=np.ascontiguousarray(img),
            compat=float(self.bilateral_compat),
        )
        q = np.asarray(crf.inference(int(self.iterations))).reshape(2, h, w)
        return q[1] > q[0]

    def refine_batch(self, images: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """(N, H, W) refined masks of ``images`` (N, H, W, 3) and masks (N, H, W)."""
        images, foreground = np.asarray(images), np.asarray(foreground, bool)
        if images.shape[:1] != foreground.shape[:1]:
            raise ValueError(f"crf: {images.shape[0]} images but {foreground.shape[0]} masks")
        return np.stack([self(i, f) for i, f in zip(images, foreground)]) if len(images) else foreground.copy()
