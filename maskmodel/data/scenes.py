"""Synthetic scenes with boxes: 0 to 4 faces of mixed classes and sizes in a busy, blurred, noisy picture.

The ``scene`` split of :mod:`maskmodel.data.synth`. Each face is a person layer of
:mod:`maskmodel.data.drawing` (a mask style, a plain face or a hard negative: hand,
paper, scarf), scaled so the face is between ``min_face`` (24 px by default)
and a share of the picture that shrinks with the number of faces, rotated by
up to 20 degrees and pasted where its head is wholly inside the picture and
its body hides no earlier face. Every face's box (the face from mid-forehead
to chin and cheek to cheek, ears excluded, as face-detection sets such as
WIDER FACE draw them, through the rotation) comes back in final pixels with
its class and variant, for the COCO annotations ``write_dataset`` writes.

The scene's own class (its folder) follows the photo verdict of
:mod:`maskmodel.alert` (an alert picture when any face is of an alert class):
``no_mask`` scenes hold at least one unmasked face (hard negatives included)
among faces of any class; ``mask_incorrect`` scenes hold at least one mask worn
below the nose or on the chin, among properly masked ones, and no unmasked
face; ``mask`` scenes hold only properly masked faces, or none at all (a
picture with no face raises no alert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from maskmodel.data.drawing import (
    MASK_STYLES,
    SUPERSAMPLE,
    background,
    camera,
    draw_hand,
    draw_mask,
    draw_paper,
    draw_person,
    draw_scarf,
)

MAX_FACES = 4
MIN_FACE = 24  # px across at the picture's own size: the smallest face the scene split holds
# Largest face width as a share of the picture, by number of faces: crowded pictures hold smaller faces.
MAX_SHARE = {1: 0.45, 2: 0.32, 3: 0.26, 4: 0.22}
FACE_SHARE = 0.44  # face width / person-layer width (draw_person: half-width 20-24 of 100 units)
EMPTY_SHARE = 0.15  # share of mask scenes with no face at all
TRIES = 40  # placements tried per face before it is left out


@dataclass(frozen=True)
class SceneFace:
    """One face of a scene: ``box`` (x0, y0, x1, y1) in the picture's pixels, its class and variant."""

    box: tuple[float, float, float, float]
    label: str
    variant: str


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    faces: tuple[SceneFace, ...]
    jpeg_quality: int

    @property
    def variant(self) -> str:
        """The variants of the faces, joined by ``+`` in drawing order, or ``empty``."""
        return "+".join(f.variant for f in self.faces) or "empty"


def face_classes(label: str, rng: np.random.Generator, incorrect_share: float = 0.0) -> list[str]:
    """The classes of a scene's faces, the first one deciding: see the module docstring. Besides the first,
    a face is ``mask_incorrect`` with probability ``incorrect_share`` (in ``no_mask`` and ``mask_incorrect``
    scenes), else ``mask`` or (in ``no_mask`` scenes) ``no_mask`` alike."""
    if label == "mask":
        k = 0 if rng.random() < EMPTY_SHARE else int(rng.integers(1, MAX_FACES + 1))
        return ["mask"] * k
    k = int(rng.integers(1, MAX_FACES + 1))
    others = ("mask", "no_mask") if label == "no_mask" else ("mask", "mask")
    return [label] + ["mask_incorrect" if incorrect_share and rng.random() < incorrect_share
                      else others[int(rng.integers(2))] for _ in range(k - 1)]


def _face_outline(g: dict, layer_px: int) -> np.ndarray:
    """Points (layer pixels) outlining the face: the head ellipse below mid-forehead (``0.75 hy`` above centre)."""
    u, top = layer_px / 100.0, g["cy"] - 0.75 * g["hy"]
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    x, y = 50 + g["hx"] * np.cos(t), g["cy"] + g["hy"] * np.sin(t)
    keep = y >= top
    return np.stack([x[keep], y[keep]], 1) * u


def _rotate_points(pts: np.ndarray, size: tuple[int, int], new_size: tuple[int, int], deg: float) -> np.ndarray:
    """Where points of an image go under ``Image.rotate(deg, expand=True)`` (counter-clockwise, about the centre)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    dx, dy = pts[:, 0] - size[0] / 2, pts[:, 1] - size[1] / 2
    return np.stack([new_size[0] / 2 + dx * c + dy * s, new_size[1] / 2 - dx * s + dy * c], 1)


def _covered(alpha: np.ndarray, at: tuple[int, int], box: np.ndarray) -> float:
    """Share of ``box`` (canvas pixels) that an opaque ``alpha`` layer pasted at ``at`` covers."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    ax0, ay0 = max(x0, at[0]), max(y0, at[1])
    ax1, ay1 = min(x1, at[0] + alpha.shape[1]), min(y1, at[1] + alpha.shape[0])
    if ax1 <= ax0 or ay1 <= ay0:
        return 0.0
    hidden = (alpha[ay0 - at[1]:ay1 - at[1], ax0 - at[0]:ax1 - at[0]] > 0).sum()
    return float(hidden) / max(1, (x1 - x0) * (y1 - y0))


def render_scene(label: str, index: int, rng: np.random.Generator, *, size: int, variant_for,
                 min_face: int = MIN_FACE, incorrect_share: float = 0.0,
                 classes: list[str] | None = None) -> Scene:
    """Scene ``index`` of class ``label``, ``size`` px square, drawn from ``rng`` alone.

    ``variant_for(label, i)`` names the variant of the scene's ``i``-th face
    (the generator's hard-negative sequence; for ``mask_incorrect`` how the mask is worn, ``below_nose`` or
    ``chin``). ``incorrect_share``: see :func:`face_classes`. ``classes``: the faces' classes, first one
    first, instead of :func:`face_classes`'s draw (then ``label`` names only the scene). Faces that cannot be
    placed without hiding another are left out, except the first, which always fits.
    """
    ss = size * SUPERSAMPLE
    canvas = background(ss, rng, busy=True)
    if classes is None:
        classes = face_classes(label, rng, incorrect_share)
    top = max(min_face, MAX_SHARE.get(len(classes), MAX_SHARE[MAX_FACES]) * size)
    placed: list[tuple[np.ndarray, SceneFace]] = []  # (face box in canvas pixels, the face)
    for i, cls in enumerate(classes):
        variant = variant_for(cls, index * MAX_FACES + i)
        width = math.exp(rng.uniform(math.log(min_face), math.log(top)))  # log-uniform: as many small as large
        layer_px = max(8, int(round(width / FACE_SHARE * SUPERSAMPLE)))
        layer = Image.new("RGBA", (layer_px, layer_px), (0, 0, 0, 0))
        g = draw_person(layer, rng)
        if cls == "mask":
            draw_mask(layer, rng, variant, g)
        elif cls == "mask_incorrect":
            draw_mask(layer, rng, MASK_STYLES[int(rng.integers(len(MASK_STYLES)))], g, worn=variant)
        elif variant in ("hand", "paper", "scarf"):
            {"hand": draw_hand, "paper": draw_paper, "scarf": draw_scarf}[variant](layer, rng, g)
        angle = rng.uniform(-20, 20)
        rotated = layer.rotate(angle, resample=Image.BICUBIC, expand=True)
        outline = _rotate_points(_face_outline(g, layer_px), layer.size, rotated.size, angle)
        lo, hi = outline.min(0), outline.max(0)
        alpha = np.asarray(rotated.getchannel("A"))
        for _ in range(TRIES if placed else 1):
            # Anywhere the face is wholly inside the picture (the body may leave it).
            ox = rng.uniform(-lo[0], ss - hi[0]) if hi[0] - lo[0] < ss else -lo[0]
            oy = rng.uniform(-lo[1], ss - hi[1]) if hi[1] - lo[1] < ss else -lo[1]
            at = (int(ox), int(oy))
            if all(_covered(alpha, at, box) <= 0.02 for box, _ in placed):
                break
        else:
            continue  # no room for this face: the scene holds fewer
        canvas.paste(rotated, at, rotated)
        box = np.clip(np.r_[lo + at, hi + at], 0, ss)
        placed.append((box, SceneFace(tuple(float(v) for v in np.round(box / SUPERSAMPLE, 2)), cls, variant)))
    image = camera(canvas.resize((size, size), Image.LANCZOS), rng)
    return Scene(image=image, faces=tuple(f for _, f in placed), jpeg_quality=int(rng.integers(60, 96)))
