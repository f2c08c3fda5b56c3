"""One picture of the synthetic face-mask dataset, drawn from its own seed: a tight crop, a scene, a face cut as the
face stage cuts it, a camera-sized photo. :mod:`maskmodel.data.synth` lays them out as a dataset (splits, sizes,
files) and re-exports every name here; read its docstring for what separates the classes.
"""

from __future__ import annotations

import io
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
from maskmodel.data.scenes import MAX_FACES, Scene, render_scene

SPLITS = ("train", "val", "test", "scene", "detect")  # append only: the index is part of every picture's seed
SCENE_SPLITS = ("scene", "detect")  # pictures of 0-4 faces with their boxes in <split>.coco.json
CLASSES = ("mask", "no_mask", "mask_incorrect")  # append only: the index is part of every picture's seed
INCORRECT = "mask_incorrect"
CUT_SPLITS = ("test",)  # faces cut as the face stage cuts them (render_face_cut), not tight crops
FACE_MARGIN = 0.25  # the face stage's crop margin (maskmodel.models.spec.DetectOptions.margin; a test ties them)
WORN_WRONG = ("below_nose", "chin")  # the variants of mask_incorrect (maskmodel.data.drawing.WORN)
DEFAULT_INCORRECT_SHARE = 1 / 3  # as many mask_incorrect pictures as mask or no_mask ones
HARD_NEGATIVES = ("hand", "paper", "scarf")


def dataset_classes(incorrect_share: float) -> tuple[str, ...]:
    """The classes a dataset holds: all of :data:`CLASSES`, or ``mask`` and ``no_mask`` when the share is 0."""
    return CLASSES if incorrect_share > 0 else CLASSES[:2]


def render_scene_sample(label: str, index: int, *, size: int = 256, seed: int = 0,
                        hard_negative_fraction: float = 0.3, split: str = "scene",
                        incorrect_share: float = DEFAULT_INCORRECT_SHARE) -> Scene:
    """Scene ``index`` of ``label`` (the picture's verdict) of ``split`` (one of :data:`SCENE_SPLITS`), drawn
    from its own seed like :func:`render_sample`; ``incorrect_share``: the chance that a face besides the
    deciding one wears its mask wrong (:func:`maskmodel.data.scenes.face_classes`)."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    if split not in SCENE_SPLITS:
        raise ValueError(f"unknown scene split {split!r}; expected one of {SCENE_SPLITS}")
    rng = np.random.default_rng((seed, SPLITS.index(split), CLASSES.index(label), index))
    return render_scene(label, index, rng, size=size, incorrect_share=incorrect_share,
                        variant_for=lambda cls, i: variant_for(cls, i, rng, hard_negative_fraction))

def variant_for(label: str, index: int, rng: np.random.Generator, hard_negative_fraction: float) -> str:
    """The variant of image ``index``: a mask style for ``mask``; ``plain`` or a hard negative for ``no_mask``;
    how the mask is worn for ``mask_incorrect`` (:data:`WORN_WRONG`, half each)."""
    if label == "mask":
        return MASK_STYLES[int(rng.integers(len(MASK_STYLES)))]
    # A golden-ratio sequence instead of coin flips: every split, however small, gets close to the requested
    # share of hard negatives and all three kinds, and of both ways of wearing a mask wrong; so does any
    # arithmetic subsequence of it (a scene's first faces are indices 0, 4, 8, ...).
    u = ((index + 1) * 0.6180339887498949) % 1.0
    if label == INCORRECT:
        return WORN_WRONG[int(u * len(WORN_WRONG))]
    if u < hard_negative_fraction:
        return HARD_NEGATIVES[min(2, int(3 * u / hard_negative_fraction))]
    return "plain"


@dataclass(frozen=True)
class Sample:
    """One drawn picture: the RGB image, its variant and the JPEG quality it is stored at."""

    image: Image.Image
    variant: str
    jpeg_quality: int

    def jpeg(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, "JPEG", quality=self.jpeg_quality)
        return buf.getvalue()


def render_sample(split: str, label: str, index: int, *, image_size: int = 96, seed: int = 0,
                  hard_negative_fraction: float = 0.3) -> Sample:
    """Draw image ``index`` of ``split``/``label`` (names from :data:`SPLITS` / :data:`CLASSES`).

    The result depends on its arguments only, never on which other images were
    drawn before, so images can be made in any order and in parallel. For
    ``scene`` it draws one face in a busy picture (what :func:`render_photo`
    builds on); the dataset's ``scene`` split is :func:`render_scene_sample`.
    """
    if split not in SPLITS or label not in CLASSES:
        raise ValueError(f"unknown split/class {split!r}/{label!r}; expected one of {SPLITS} / {CLASSES}")
    rng = np.random.default_rng((seed, SPLITS.index(split), CLASSES.index(label), index))
    variant = variant_for(label, index, rng, hard_negative_fraction)
    size, scene = image_size * SUPERSAMPLE, split == "scene"
    canvas = background(size, rng, busy=scene)
    # The layer holds head and shoulders; the head is 0.44 of its width, 0.56 of its height.
    layer_px = int(size * (rng.uniform(0.57, 1.02) if scene else rng.uniform(1.0, 1.45)))
    layer = Image.new("RGBA", (layer_px, layer_px), (0, 0, 0, 0))
    g = draw_person(layer, rng)
    draw = {"hand": draw_hand, "paper": draw_paper, "scarf": draw_scarf}.get(variant)
    if label == "mask":
        draw_mask(layer, rng, variant, g)
    elif label == INCORRECT:
        draw_mask(layer, rng, MASK_STYLES[int(rng.integers(len(MASK_STYLES)))], g, worn=variant)
    elif draw:
        draw(layer, rng, g)
    layer = layer.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC, expand=True)
    if scene:  # anywhere, as long as the head stays in the picture
        cx, cy = rng.uniform(0.22, 0.78, 2) * size
    else:
        cx, cy = (0.5 + rng.uniform(-0.08, 0.08, 2)) * size + np.array([0, 0.05 * size])
    canvas.paste(layer, (int(cx - layer.width / 2), int(cy - layer.height / 2)), layer)
    image = camera(canvas.resize((image_size, image_size), Image.LANCZOS), rng)
    return Sample(image=image, variant=variant, jpeg_quality=int(rng.integers(60, 96)))


def render_face_cut(label: str, index: int, *, scene_size: int = 256, seed: int = 0, split: str = "test",
                    hard_negative_fraction: float = 0.3, incorrect_share: float = DEFAULT_INCORRECT_SHARE,
                    margin: float = FACE_MARGIN) -> Sample:
    """Face ``index`` of class ``label`` of ``split`` as the face stage cuts a found face (drawn from its own seed).

    A busy ``scene_size`` px scene of 1 to 4 faces is drawn like the ``scene`` split's (sizes, crowding, other
    faces' classes, blur and noise), its first face of class ``label``; that face's box is grown by ``margin``
    and clipped (:func:`maskmodel.data.facecrop.crop_boxes`) and cut pixel-aligned outwards
    (:func:`maskmodel.data.facecrop.cut`): the region ``EvalCrop`` resizes at scoring time. The image is that
    region at the scene's resolution (not square: the face box is taller than wide, and clipping at the
    picture's edge makes it narrower); ``variant`` is the face's.
    """
    import torch

    from maskmodel.data.facecrop import crop_boxes, cut

    if split not in SPLITS or label not in CLASSES:
        raise ValueError(f"unknown split/class {split!r}/{label!r}; expected one of {SPLITS} / {CLASSES}")
    rng = np.random.default_rng((seed, SPLITS.index(split), CLASSES.index(label), index))
    pool = dataset_classes(incorrect_share)
    classes = [label] + [pool[int(i)] for i in rng.integers(len(pool), size=int(rng.integers(MAX_FACES)))]
    scene = render_scene(label, index, rng, size=scene_size, incorrect_share=incorrect_share, classes=classes,
                         variant_for=lambda cls, i: variant_for(cls, i, rng, hard_negative_fraction))
    face = scene.faces[0]
    picture = np.asarray(scene.image.convert("RGB"))
    region = crop_boxes(torch.tensor([face.box], dtype=torch.float32), margin, picture.shape[:2])
    chw = cut(picture, region.numpy(), lambda t: t, 0)[0]
    return Sample(image=Image.fromarray(chw.permute(1, 2, 0).numpy()), variant=face.variant,
                  jpeg_quality=scene.jpeg_quality)


def render_photo(label: str, index: int, *, width: int = 1920, height: int = 1080, seed: int = 0,
                 quality: int = 90) -> bytes:
    """A camera-sized JPEG: scene ``index`` of ``label`` drawn at ``height`` px, on a wider busy background.

    For benchmarks and tests of the data path at the sizes users have: with
    sensor noise over the whole frame a 1920x1080 photo encodes to roughly
    250-550 KB at quality 90, like a real camera frame, where a flat drawing
    would compress to a few tens of KB and decode several times faster.
    """
    rng = np.random.default_rng((seed, 99, CLASSES.index(label), index))
    frame = background(width, rng, busy=True).crop((0, 0, width, height))
    frame.paste(render_sample("scene", label, index, image_size=height, seed=seed).image,
                (int(rng.integers(0, max(1, width - height + 1))), 0))
    noisy = np.asarray(frame, dtype=np.float32) + rng.normal(0, rng.uniform(2.5, 4.5), (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
