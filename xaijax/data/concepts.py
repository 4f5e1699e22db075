"""Per-pixel concept masks of the synthetic benchmark, for neuron-concept dissection.

Network Dissection (Bau et al., CVPR 2017) and Compositional Explanations of Neurons (Mu &
Andreas, NeurIPS 2020) score a unit against *concepts*: named per-pixel masks. This module
derives them from the scene description of :class:`~xaijax.data.synthetic.SyntheticScenes`
without changing the generator, its images or its records (the bundled weights were
trained on them):

==============  =====================================================================
category        concepts (for the default 12 classes)
==============  =====================================================================
``object``      the 12 classes ``disc``, ``square``, ... ``arrow``. A class *is* its
                shape, so there is no separate shape category.
``color``       the hue names ``red`` (0 deg), ``orange`` (28), ``yellow`` (55),
                ``green`` (120), ``cyan`` (185), ``blue`` (225), ``purple`` (270),
                ``magenta`` (310): each object's drawn primary colour
                (:attr:`ObjectSpec.rgb`) converted to HSV, named by the nearest band
                centre (the generator jitters hue by at most 8 deg inside a band).
``texture``     ``solid``, ``stripes``, ``checker``, ``dots`` (:attr:`ObjectSpec.texture`).
``region``      ``distractor`` (visible pixels of the neutral-coloured distractor
                polygons and scribbles) and ``background`` (everything else).
==============  =====================================================================

Every pixel of an object's *visible* mask (``Record.masks``) carries that object's class,
colour and texture; the visible masks are disjoint, so a pixel has at most one object.
Pixels outside all objects are ``distractor`` or ``background`` (a partition of the image).

Distractors are not part of :class:`~xaijax.data.synthetic.Scene`, so they are
reconstructed by *replaying* the generator's random stream: the record's generator is
``np.random.default_rng([seed, split_id, index])``; the background is drawn first, then the
number of distractors, then each distractor. Replaying these calls (the generator's own
private ``_background`` / ``_draw_distractor`` methods) on the same stream reproduces the
distractors exactly. Each one is drawn twice from a copied generator state, onto a canvas
of zeros and of ones: ``ones - zeros = 1 - alpha`` recovers its anti-aliased coverage
``alpha`` exactly up to float rounding, and the distractor's mask is ``alpha > 1/2`` (the
generator's own mask convention for objects), minus the full masks of all objects (drawn
later, on top).

Masks can be reduced to a coarser ``mask_size`` (Broden stores segmentations at half the
image resolution) by nearest-neighbour sampling of pixel centres.

The compact form used by :mod:`xaijax.features.dissect` is a label stack
``(L, M, N)`` int32 with values ``concept index + 1`` (0 = no concept in this layer); for
the synthetic scenes ``L = 3`` (object/region, colour, texture).
"""

from __future__ import annotations

import colorsys
import dataclasses
from collections.abc import Sequence

import numpy as np

from xaijax.data._base import check_indices
from xaijax.data.synthetic import CLASS_STYLES, SPLITS, Scene, SyntheticScenes

__all__ = [
    "COLOR_NAMES",
    "TEXTURE_NAMES",
    "SyntheticConcepts",
    "color_name",
    "concept_labels",
    "concept_masks",
    "distractor_mask",
    "labels_to_masks",
    "synthetic_concepts",
]

#: hue band centre (degrees) -> colour name, for every hue the generator uses.
COLOR_NAMES: dict[float, str] = {
    0.0: "red",
    28.0: "orange",
    55.0: "yellow",
    120.0: "green",
    185.0: "cyan",
    225.0: "blue",
    270.0: "purple",
    310.0: "magenta",
}
TEXTURE_NAMES: tuple[str, ...] = ("solid", "stripes", "checker", "dots")


def color_name(rgb: Sequence[float]) -> str:
    """Name of the hue band nearest (on the circle) to the hue of ``rgb`` (values in [0, 1])."""
    h = colorsys.rgb_to_hsv(*(float(c) for c in rgb))[0] * 360.0
    centres = np.array(list(COLOR_NAMES))
    d = np.abs((h - centres + 180.0) % 360.0 - 180.0)
    return COLOR_NAMES[float(centres[int(np.argmin(d))])]


def synthetic_concepts(scenes: SyntheticScenes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(names, categories)`` of the concepts of ``scenes`` (see the module docstring).

    Order: the classes in use, the colours of the classes in use (by hue), the textures in
    use, then ``distractor`` and ``background``.
    """
    styles = CLASS_STYLES[: scenes.num_classes]
    names = [s.name for s in styles]
    cats = ["object"] * len(names)
    hues = sorted({s.hue for s in styles})
    names += [COLOR_NAMES[h] for h in hues]
    cats += ["color"] * len(hues)
    textures = [t for t in TEXTURE_NAMES if any(s.texture == t for s in styles)]
    names += textures
    cats += ["texture"] * len(textures)
    names += ["distractor", "background"]
    cats += ["region", "region"]
    return tuple(names), tuple(cats)


def _check_index(scenes: SyntheticScenes, split: str, index: int) -> None:
    n = scenes.split_size(split)  # validates split
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < n:
        raise ValueError(f"index: expected an integer in [0, {n}) for split {split!r}, got {index!r}")


def distractor_mask(scenes: SyntheticScenes, split: str, index: int) -> np.ndarray:
    """(H, W) bool: pixels where a distractor's anti-aliased coverage exceeds 1/2.

    Objects are *not* removed here (see :func:`concept_labels`). Reconstructed by replaying
    the record's random stream (module docstring); relies on the generator's private drawing
    methods, so it is tested against the generated images.
    """
    _check_index(scenes, split, index)
    size = scenes.size
    rng = np.random.default_rng([int(scenes.seed), SPLITS[split], int(index)])
    scenes._background(rng)  # consume exactly the background's draws
    out = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(0, scenes.max_distractors + 1))):
        state = rng.bit_generator.state
        zeros = np.zeros((size, size, 3), np.float32)
        scenes._draw_distractor(rng, zeros)  # advances rng as the generator did
        twin = np.random.Generator(type(rng.bit_generator)())
        twin.bit_generator.state = state
        ones = np.ones((size, size, 3), np.float32)
        scenes._draw_distractor(twin, ones)
        alpha = 1.0 - (ones[..., 0].astype(np.float64) - zeros[..., 0])
        out |= alpha > 0.5
    return out


def concept_labels(
    scenes: SyntheticScenes, split: str, index: int, scene: Scene | None = None
) -> np.ndarray:
    """(3, H, W) int32 label stack of record ``index`` of ``split``: concept index + 1, 0 = none.

    Layer 0: the object's class, else ``distractor`` / ``background``; layer 1: the object's
    colour; layer 2: its texture (0 outside objects). Concept indices follow
    :func:`synthetic_concepts`. ``scene`` may pass an already generated
    ``scenes.scene(split, index)`` to avoid generating it twice.
    """
    _check_index(scenes, split, index)
    if scene is None:
        scene = scenes.scene(split, index)
    names, _ = synthetic_concepts(scenes)
    pos = {n: i + 1 for i, n in enumerate(names)}
    rec = scene.record
    size = scenes.size
    k = rec.num_objects
    # per-pixel visible object (0 = none, j + 1 = object j); visible masks are disjoint
    obj = np.zeros((size, size), np.int32)
    for j in range(k):
        obj[rec.masks[j]] = j + 1
    table = np.zeros((k + 1, 3), np.int32)
    for j, spec in enumerate(scene.objects):
        table[j + 1] = (
            pos[CLASS_STYLES[spec.label].name],
            pos[color_name(spec.rgb)],
            pos[spec.texture],
        )
    labels = table[obj].transpose(2, 0, 1).copy()  # (3, H, W)
    covered = np.any(scene.full_masks, axis=0) if k else np.zeros((size, size), bool)
    dis = distractor_mask(scenes, split, index) & ~covered
    free = obj == 0
    labels[0][free & dis] = pos["distractor"]
    labels[0][free & ~dis] = pos["background"]
    return labels


def _nearest_rows(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel centre for a nearest-neighbour resize n_in -> n_out."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)


def labels_to_masks(labels: np.ndarray, num_concepts: int) -> np.ndarray:
    """(L, M, N) label stack (concept index + 1, 0 = none) -> (num_concepts, M, N) bool masks."""
    labels = np.asarray(labels)
    out = np.zeros((num_concepts + 1,) + labels.shape[1:], bool)
    for layer in labels:
        np.put_along_axis(out, layer[None].astype(np.intp), True, axis=0)  # sets out[layer[p], p]
    return out[1:]


def concept_masks(
    scenes: SyntheticScenes, split: str, index: int, mask_size: int | None = None
) -> tuple[tuple[str, ...], np.ndarray]:
    """``(names, masks)``: every concept of record ``index`` as (C, M, M) bool masks.

    ``M = mask_size`` (default: the image size); coarser masks sample pixel centres.
    """
    names, _ = synthetic_concepts(scenes)
    labels = concept_labels(scenes, split, index)
    if mask_size is not None and mask_size != scenes.size:
        r = _nearest_rows(mask_size, scenes.size)
        labels = labels[:, r][:, :, r]
    return names, labels_to_masks(labels, len(names))


@dataclasses.dataclass(frozen=True)
class SyntheticConcepts:
    """A dissection dataset over records ``[start, start + count)`` of one synthetic split.

    The interface shared with :class:`xaijax.data.broden.BrodenDataset`:
    ``concept_names``, ``concept_categories``, ``num_layers``, ``mask_shape``, ``len()``,
    ``load(indices) -> (images (n, H, W, 3) float32 in [0, 1], labels (n, L, M, N) int32)``
    and ``images(indices)``.

    Attributes:
      scenes: the benchmark configuration (default: the one the bundled models used).
      split: "train", "val" or "test".
      start, count: the records used (``count=None``: to the end of the split).
      mask_size: concept-mask side ``M`` (default: the image size).
    """

    scenes: SyntheticScenes = dataclasses.field(default_factory=SyntheticScenes)
    split: str = "test"
    start: int = 0
    count: int | None = None
    mask_size: int | None = None

    def __post_init__(self) -> None:
        total = self.scenes.split_size(self.split)
        if not isinstance(self.start, (int, np.integer)) or not 0 <= self.start <= total:
            raise ValueError(f"start: expected an integer in [0, {total}], got {self.start!r}")
        if self.count is not None and (
            not isinstance(self.count, (int, np.integer)) or self.count < 0 or self.start + self.count > total
        ):
            raise ValueError(
                f"count: expected an integer with start + count <= {total} (split {self.split!r}), got {self.count!r}"
            )
        if self.mask_size is not None and (not isinstance(self.mask_size, (int, np.integer)) or self.mask_size < 1):
            raise ValueError(f"mask_size: expected a positive integer, got {self.mask_size!r}")

    @property
    def concept_names(self) -> tuple[str, ...]:
        return synthetic_concepts(self.scenes)[0]

    @property
    def concept_categories(self) -> tuple[str, ...]:
        return synthetic_concepts(self.scenes)[1]

    @property
    def num_layers(self) -> int:
        return 3

    @property
    def mask_shape(self) -> tuple[int, int]:
        m = self.mask_size or self.scenes.size
        return (int(m), int(m))

    def __len__(self) -> int:
        total = self.scenes.split_size(self.split)
        return int(total - self.start if self.count is None else self.count)

    def _check(self, indices: Sequence[int]) -> list[int]:
        return check_indices(indices, len(self))

    def image_id(self, i: int) -> str:
        return f"synthetic-s{self.scenes.seed}-{self.split}-{self.start + self._check([i])[0]:06d}"

    def images(self, indices: Sequence[int]) -> np.ndarray:
        """(n, H, W, 3) float32 RGB in [0, 1] of dataset items ``indices``."""
        idx = self._check(indices)
        s = self.scenes.size
        if not idx:
            return np.zeros((0, s, s, 3), np.float32)
        return np.stack([self.scenes.record(self.split, self.start + i).image for i in idx])

    def load(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Images (n, H, W, 3) float32 and label stacks (n, 3, M, M) int32 of items ``indices``."""
        idx = self._check(indices)
        s = self.scenes.size
        m = self.mask_shape[0]
        r = _nearest_rows(m, s) if m != s else None
        imgs, labs = [], []
        for i in idx:
            scene = self.scenes.scene(self.split, self.start + i)
            lab = concept_labels(self.scenes, self.split, self.start + i, scene=scene)
            if r is not None:
                lab = lab[:, r][:, :, r]
            imgs.append(scene.record.image)
            labs.append(lab)
        if not idx:
            return np.zeros((0, s, s, 3), np.float32), np.zeros((0, 3, m, m), np.int32)
        return np.stack(imgs), np.stack(labs)
