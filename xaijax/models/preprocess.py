"""Input conventions of the pretrained weights in use, and image loading.

Three conventions exist for the weights xaijax reads:

* ``"torchvision"`` — RGB in [0, 1], then ``(x - mean) / std`` with the ImageNet
  mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). All torchvision ImageNet
  checkpoints.
* ``"caffe"`` — the Caffe convention of the VGG16/ResNet50 models that TorchRay converted
  from the Excitation Backprop release and uses on VOC 2007 / COCO 2014: pixel range
  [0, 255] minus the per-channel mean, no division by a standard deviation. Caffe feeds
  BGR; like TorchRay, the porter flips the first convolution's input channels to RGB, so
  images stay RGB and the mean is given in RGB order, (123.68, 116.779, 103.939).
* ``"none"`` — the images as they are, RGB in [0, 1] (the bundled detector: its first
  BatchNorm absorbs the offset).

Which one a set of loaded weights expects is decided in one place, :func:`convention`: an
explicit choice (``--preprocess``), else what the checkpoint records (``metadata["preprocess"]``),
else ``"caffe"`` for TorchRay's models and ``"torchvision"`` for everything else.

Images are NHWC float32 RGB in [0, 1] before normalisation (or HWC for a single image).

What else a checkpoint records about its input and output — input size, class names, output
activation (softmax or multi-label sigmoid) — is read in one place too, :func:`recorded`:
``xaijax predict`` and ``explain`` use it by default (flags override).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CAFFE_RGB_MEAN",
    "CONVENTIONS",
    "convention",
    "normalize",
    "denormalize",
    "check_images",
    "load_image",
    "imagenet_classes",
    "OUTPUTS",
    "Recorded",
    "recorded",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_RGB_MEAN = (123.68, 116.779, 103.939)

Convention = Literal["torchvision", "caffe", "none"]
#: The preprocessing conventions, by name (see the module docstring).
CONVENTIONS: tuple[str, ...] = ("torchvision", "caffe", "none")


def _checked(value: Any, origin: str) -> str:
    if value not in CONVENTIONS:
        raise ValueError(f"unknown preprocessing convention {value!r} ({origin}); use one of {', '.join(map(repr, CONVENTIONS))}")
    return value


def convention(info: Mapping[str, Any], override: str | None = None) -> str:
    """The preprocessing convention that loaded weights expect: the one decision for every caller.

    Args:
      info: the ``info`` dict of :func:`xaijax.checkpoints.load` (``"source"``, and for native
        files ``"metadata"``: the file's string metadata).
      override: an explicit choice (``--preprocess``); ``None`` decides from ``info``.

    Returns:
      ``override`` if given; else the checkpoint's recorded ``metadata["preprocess"]``; else
      ``"caffe"`` for TorchRay's Caffe-converted models (``info["source"] == "torchray"``); else
      ``"torchvision"``.

    Raises:
      ValueError: ``override`` or the recorded value is not one of :data:`CONVENTIONS` (the
        message says which; an explicit ``override`` takes precedence over a bad record).
    """
    if override is not None:
        return _checked(override, "the explicit preprocessing choice")
    if not isinstance(info, Mapping):
        raise ValueError(f"info must be the dict returned by xaijax.checkpoints.load; got {type(info).__name__}")
    recorded = (info.get("metadata") or {}).get("preprocess")
    if recorded is not None:
        return _checked(recorded, "recorded in the checkpoint's metadata; pass --preprocess to override")
    return "caffe" if info.get("source") == "torchray" else "torchvision"


def check_images(x: jax.Array | np.ndarray, name: str = "images", *, unit_range: bool = False, min_size: int = 1) -> None:
    """Validate an NHWC batch of RGB images and raise a readable error.

    Args:
      x: array of shape (N, H, W, 3), floating dtype.
      name: the argument name used in the message.
      unit_range: also require values in [0, 1] (only checked on concrete arrays).
      min_size: smallest allowed H and W.

    Raises:
      TypeError: non-floating dtype.
      ValueError: wrong rank, channel count, size or range.
    """
    shape = tuple(np.shape(x))
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, H, W, 3) (NHWC, RGB); got shape {shape}")
    dtype = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(
            f"{name} must be floating point (float32, RGB in [0, 1]); got dtype {dtype}."
            + (" Divide uint8 images by 255." if dtype == np.uint8 else "")
        )
    if shape[1] < min_size or shape[2] < min_size:
        raise ValueError(f"{name} must be at least {min_size}x{min_size} pixels; got {shape[1]}x{shape[2]}")
    if unit_range and not isinstance(x, jax.core.Tracer):
        lo, hi = float(np.min(x)), float(np.max(x))
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{name} must hold RGB values in [0, 1] before normalisation; got range [{lo:.3g}, {hi:.3g}]")


def normalize(x: jax.Array, convention: Convention = "torchvision") -> jax.Array:
    """Map RGB images in [0, 1] (NHWC or HWC) to the input a model's weights expect."""
    x = jnp.asarray(x)
    if convention == "torchvision":
        return (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
    if convention == "caffe":
        return x * 255.0 - jnp.asarray(CAFFE_RGB_MEAN, x.dtype)
    if convention == "none":
        return x
    raise ValueError(f"unknown preprocessing convention {convention!r}; use one of {', '.join(map(repr, CONVENTIONS))}")


def denormalize(x: jax.Array, convention: Convention = "torchvision") -> jax.Array:
    """Inverse of :func:`normalize`: model input -> RGB in [0, 1]."""
    x = jnp.asarray(x)
    if convention == "torchvision":
        return x * jnp.asarray(IMAGENET_STD, x.dtype) + jnp.asarray(IMAGENET_MEAN, x.dtype)
    if convention == "caffe":
        return (x + jnp.asarray(CAFFE_RGB_MEAN, x.dtype)) / 255.0
    if convention == "none":
        return x
    raise ValueError(f"unknown preprocessing convention {convention!r}; use one of {', '.join(map(repr, CONVENTIONS))}")


def load_image(path: str | Path, size: int = 224, resize: int | None = None) -> np.ndarray:
    """Read an image file as float32 RGB in [0, 1], shape (size, size, 3).

    The shorter side is resized to ``resize`` (default ``round(size * 256 / 224)``, the
    torchvision evaluation transform; ``resize=size`` keeps the whole of a square image) with
    bilinear filtering, then centre-cropped.

    Decoding follows the bit depth (:func:`xaijax.data._base.decode_rgb`): 8-bit images are divided
    by 255, 16-bit grayscale (``I;16`` PNG/TIFF) by 65535, float images are taken as they are
    when in [0, 1]; an image whose range cannot be known is refused.

    Raises:
      FileNotFoundError: no such file. IsADirectoryError: ``path`` is a directory.
      ValueError: not a readable image, a refused mode or range, or more pixels than PIL's
        decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``); each a one-line message
        naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    from xaijax.data._base import EIGHT_BIT_MODES, CorruptImageError, decode_rgb

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not an image file; pass the image files (e.g. {path}/*.jpg)")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive number of pixels; got {size!r}")
    try:
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"refusing to decode {path}: {e} (PIL's limit PIL.Image.MAX_IMAGE_PIXELS; raise it only for files you trust)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read {path} as an image: {e}") from None
    resize = resize or round(size * 256 / 224)
    if img.mode in EIGHT_BIT_MODES:
        return np.asarray(_resize_crop(img.convert("RGB"), size, resize), dtype=np.float32) / 255.0
    try:
        rgb = decode_rgb(img, str(path))
    except CorruptImageError as e:
        raise ValueError(str(e)) from None
    # full precision: each channel resized and cropped as a 32-bit float image
    chans = [np.asarray(_resize_crop(Image.fromarray(np.ascontiguousarray(rgb[..., c])), size, resize)) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0.0, 1.0).astype(np.float32)


def _resize_crop(img: Any, size: int, resize: int) -> Any:
    """Shorter side to ``resize`` (bilinear, at least ``size``), then the centre ``size`` x ``size``."""
    from PIL import Image

    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


#: Output activations a classifier's logits are read with (:class:`Recorded`).
OUTPUTS: tuple[str, ...] = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What a checkpoint records about the input it expects and the output it gives.

    Attributes:
      input_size: side of the square input the model was trained at (``None``: not recorded;
        use the architecture's natural size).
      whole_image: the model saw whole images resized to ``input_size`` (the synthetic
        benchmark's models): load images with ``resize=input_size`` instead of torchvision's
        resize-to-256-then-crop-224 ratio.
      class_names: the class names in output order (``None``: not recorded).
      output: ``"softmax"`` (one class per image) or ``"sigmoid"`` (multi-label: an independent
        probability per class).
      output_from: where ``output`` comes from (for messages).
    """

    input_size: int | None
    whole_image: bool
    class_names: tuple[str, ...] | None
    output: str
    output_from: str


def _json(meta: Mapping[str, Any], key: str) -> Any:
    import json

    raw = meta.get(key)
    if raw is None or not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def recorded(info: Mapping[str, Any]) -> Recorded:
    """What the ``info`` of :func:`xaijax.checkpoints.load` records; the defaults of ``predict``/``explain``.

    * input size: ``metadata["input_size"]``, else the ``size`` of ``metadata["dataset"]`` (a
      model trained on a dataset of whole images of that size: ``whole_image``);
    * class names: ``metadata["class_names"]`` (a JSON list);
    * output activation: ``metadata["output"]`` (``"softmax"``/``"sigmoid"``), else the training
      loss in ``metadata["train"]`` (``"sigmoid_bce"`` -> sigmoid; softmax/cross-entropy ->
      softmax), else sigmoid for TorchRay's multi-label VOC/COCO models and softmax otherwise.

    Raises:
      ValueError: a recorded value of the wrong type (the message names the metadata key).
    """
    if not isinstance(info, Mapping):
        raise ValueError(f"info must be the dict returned by xaijax.checkpoints.load; got {type(info).__name__}")
    meta = info.get("metadata") or {}
    size, whole = None, False
    if meta.get("input_size") is not None:
        size = _json(meta, "input_size")
        whole = bool(_json(meta, "whole_image") or False)
    else:
        ds = _json(meta, "dataset")
        if isinstance(ds, Mapping) and ds.get("size") is not None:
            size, whole = ds.get("size"), True
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"the checkpoint's metadata records input size {size!r}, not a positive int")
    names = _json(meta, "class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError("the checkpoint's metadata 'class_names' is not a JSON list of strings")
    output, origin = None, ""
    if meta.get("output") is not None:
        output, origin = meta["output"], "the checkpoint's metadata 'output'"
        if output not in OUTPUTS:
            raise ValueError(f"the checkpoint's metadata records output {output!r}; expected one of {', '.join(OUTPUTS)}")
    else:
        train = _json(meta, "train")
        loss = str(train.get("loss", "")).lower() if isinstance(train, Mapping) else ""
        if "sigmoid" in loss or "bce" in loss or "binary" in loss:
            output, origin = "sigmoid", f"trained with loss {loss!r} (recorded in the checkpoint)"
        elif "softmax" in loss or "cross" in loss or loss == "ce":
            output, origin = "softmax", f"trained with loss {loss!r} (recorded in the checkpoint)"
        elif info.get("source") == "torchray":
            output, origin = "sigmoid", "TorchRay's multi-label VOC/COCO model"
        else:
            output, origin = "softmax", "default (the checkpoint records no output activation)"
    return Recorded(size, whole, tuple(names) if names is not None else None, output, origin)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in torchvision's index order."""
    p = Path(__file__).resolve().parent.parent / "data" / "imagenet_classes.txt"
    return p.read_text().splitlines()
