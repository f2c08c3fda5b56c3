"""A procedurally drawn face-mask dataset: the built-in data when no photos are reachable.

What separates the classes. ``mask``: a face wearing a surgical mask (pale,
horizontal pleats), an N95-like rounded cup (centre seam, sometimes a valve) or
a cloth mask (solid or patterned, sometimes skin-coloured). A mask always covers
nose *and* mouth, follows the face outline from just below the eyes to under
the chin, and is held by ear loops or head straps. ``no_mask``: the same kind of
faces with the mouth visible, and, as hard negatives (``hard_negative_fraction``
of them, 30 % by default: the original model's stated failure modes), the lower
face covered by something that is not a mask: a skin-coloured hand with fingers
and a wrist, a rectangular sheet of paper held by its corners with no straps, or
a scarf wrapped below the chin that leaves the mouth visible. So "something
covers the mouth" is not enough: a model has to tell a mask's shape, texture
and straps from skin, fingers and straight paper edges. Everything else (skin
tone, hair, eyes, glasses, beard, position, scale, rotation, lighting,
background, blur, JPEG quality) is drawn from the same distributions for both
classes, so it carries no label.

Layout: ``<out>/<split>/<class>/<index:06d>.jpg`` with ``train``
(``n_per_class`` images per class), ``val``, ``test`` and ``scene``
(``max(2, round(n/4))`` each). ``train``/``val``/``test`` are tight face crops;
``scene`` shows a small face (25-45 % of the width) anywhere in a busy picture.
``dataset.json`` records the generator's parameters and the counts;
``variants.csv`` gives each file's variant (``surgical``, ``n95``, ``cloth``,
``plain``, ``hand``, ``paper``, ``scarf``) to break accuracy down by failure mode.

Determinism: image ``i`` of a split and class is drawn from
``numpy.random.default_rng((seed, split_index, class_index, i))`` alone, so a
seed gives byte-identical files whatever the order or parallelism of generation.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from maskmodel import storage
from maskmodel.config import field
from maskmodel.errors import UserError

log = logging.getLogger(__name__)

VERSION = 1  # bump whenever a seed would draw different pictures
SPLITS = ("train", "val", "test", "scene")
CLASSES = ("mask", "no_mask")
MASK_STYLES = ("surgical", "n95", "cloth")
HARD_NEGATIVES = ("hand", "paper", "scarf")
OWN_ENTRIES = (*SPLITS, "dataset.json", "variants.csv")
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at any size

SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 128), (198, 134, 96), (160, 104, 70), (120, 76, 50), (86, 56, 38)]
HAIR = [(20, 16, 14), (60, 40, 25), (110, 75, 40), (185, 145, 85), (205, 195, 175), (140, 60, 30)]
IRIS = [(70, 45, 25), (40, 30, 20), (70, 110, 150), (80, 110, 70)]
SURGICAL = [(150, 200, 230), (236, 240, 245), (160, 215, 190), (45, 47, 52), (240, 185, 205)]
N95 = [(238, 238, 232), (214, 214, 208), (245, 238, 215), (222, 230, 236)]
PAPER = [(250, 250, 246), (246, 239, 218), (255, 243, 150), (228, 238, 250)]


@dataclass(frozen=True)
class DatasetConfig:
    """Everything that decides what ``jobs.make_dataset`` writes, and where."""

    out: str = field(help="where to write the dataset tree: a local path or a URI such as s3://bucket/faces")
    n_per_class: int = field(500, help="train images per class; val, test and scene get max(2, round(N/4)) each")
    image_size: int = field(96, help="side of the square images in pixels")
    seed: int = field(0, help="random seed; the same seed writes byte-identical files")
    hard_negative_fraction: float = field(0.3, help="share of no_mask images whose face is covered by a hand, "
                                                    "paper or scarf")
    workers: int = field(16, help="threads drawing and writing images (writes to object storage are I/O bound)")
    overwrite: bool = field(False, help="replace a dataset already at --out (only its own folders and files)")

    def __post_init__(self) -> None:
        if self.n_per_class < 2:
            raise ValueError(f"n_per_class must be at least 2, got {self.n_per_class}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 32 and 1024 pixels, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be zero or positive, got {self.seed}")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise ValueError(f"hard_negative_fraction must be between 0 and 1, got {self.hard_negative_fraction}")
        if not 1 <= self.workers <= 256:
            raise ValueError(f"workers must be between 1 and 256, got {self.workers}")


def split_sizes(n_per_class: int) -> dict[str, int]:
    """Images per class in each split: ``n_per_class`` in train, ``max(2, round(n/4))`` in the others."""
    small = max(2, round(n_per_class / 4))
    return {"train": n_per_class, "val": small, "test": small, "scene": small}


def variant_for(label: str, index: int, rng: np.random.Generator, hard_negative_fraction: float) -> str:
    """The variant of image ``index``: a mask style for ``mask``; ``plain`` or a hard negative for ``no_mask``."""
    if label == "mask":
        return MASK_STYLES[int(rng.integers(len(MASK_STYLES)))]
    # A golden-ratio sequence instead of coin flips: every split, however small,
    # gets close to the requested share of hard negatives and all three kinds.
    u = ((index + 1) * 0.6180339887498949) % 1.0
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


# ---- drawing in face units: a person layer is 100 x 100 units, head centred at (50, 45) --------------------

def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 32) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))


def _capsule(x0: float, y0: float, x1: float, y1: float, r: float) -> list[tuple[float, float]]:
    """A stadium between two points: fingers, wrists, straps."""
    a = math.atan2(y1 - y0, x1 - x0)
    half = np.linspace(-math.pi / 2, math.pi / 2, 9)
    return ([(x1 + r * math.cos(a + t), y1 + r * math.sin(a + t)) for t in half]
            + [(x0 + r * math.cos(a + math.pi + t), y0 + r * math.sin(a + math.pi + t)) for t in half])


def _rotate(pts: list, cx: float, cy: float, deg: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def _mix(a: tuple, b: tuple, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _jitter(rng: np.random.Generator, colour: tuple, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


class _Pen:
    """ImageDraw in face units; ``flip`` mirrors x so one-sided things (a hand) can come from either side."""

    def __init__(self, img: Image.Image, flip: bool = False):
        self.draw, self.u, self.flip = ImageDraw.Draw(img), img.width / 100.0, flip

    def _px(self, pts) -> list[tuple[float, float]]:
        return [((100 - x if self.flip else x) * self.u, y * self.u) for x, y in pts]

    def poly(self, pts, fill) -> None:
        self.draw.polygon(self._px(pts), fill=fill)

    def line(self, pts, fill, width: float) -> None:
        self.draw.line(self._px(pts), fill=fill, width=max(1, round(width * self.u)), joint="curve")


def _pattern(size: tuple[int, int], rng: np.random.Generator, base: tuple | None = None) -> Image.Image:
    """A fabric: solid, stripes, dots or checks, in ``base`` or a random colour (cloth masks and scarves)."""
    base = base or tuple(int(c) for c in rng.integers(20, 236, 3))
    other = _mix(base, tuple(int(c) for c in rng.integers(0, 256, 3)), 0.7)
    img = Image.new("RGB", size, base)
    d, w, h = ImageDraw.Draw(img), size[0], size[1]
    step = max(4, int(w * rng.uniform(0.04, 0.09)))
    kind = rng.integers(4)
    for k in range(-h, w + h, step) if kind else []:
        if kind == 1:
            d.line([(k, 0), (k + h * 0.4, h)], fill=other, width=max(1, step // 3))
        elif kind == 2:
            for y in range(step // 2, h, step):
                d.ellipse([k - step / 5, y - step / 5, k + step / 5, y + step / 5], fill=other)
        else:
            d.line([(k, 0), (k, h)], fill=other, width=step // 2)
            d.line([(0, k), (w, k)], fill=other, width=step // 2)
    return img


def _fill(layer: Image.Image, pts, fabric: Image.Image) -> None:
    alpha = Image.new("L", layer.size, 0)
    _Pen(alpha).poly(pts, 255)
    layer.paste(fabric.convert("RGBA"), mask=alpha)


def _draw_person(layer: Image.Image, rng: np.random.Generator) -> dict:
    """Shoulders, neck, hair, head and face; returns the landmarks that coverings are placed by."""
    p = _Pen(layer)
    skin, hair = _jitter(rng, SKIN[rng.integers(len(SKIN))], 10), _jitter(rng, HAIR[rng.integers(len(HAIR))], 10)
    dark = _mix(skin, (0, 0, 0), 0.25)
    hx, hy, cy = rng.uniform(20, 24), rng.uniform(26, 30), 45.0
    w = lambda y: hx * math.sqrt(max(0.0, 1 - ((y - cy) / hy) ** 2))  # noqa: E731  half-width of the face at y
    g = dict(skin=skin, hx=hx, hy=hy, cy=cy, eye=cy - 0.12 * hy, nose=cy + 0.3 * hy, mouth=cy + 0.56 * hy,
             chin=cy + hy, w=w)
    style = rng.choice(["short", "long", "buzz", "none"], p=[0.45, 0.3, 0.15, 0.1])
    p.poly(_ellipse(50, 114, rng.uniform(36, 46), 30), tuple(int(c) for c in rng.integers(0, 256, 3)))  # shirt
    if style == "long":
        p.poly(_ellipse(50, cy + 6, hx * 1.3, hy * 1.15), hair)
    p.poly(_capsule(50, cy + hy * 0.5, 50, 92, hx * 0.42), dark)  # neck
    for s in (-1, 1):
        p.poly(_ellipse(50 + s * hx, cy + 3, 3.5, 6), _mix(skin, (0, 0, 0), 0.1))  # ears
    p.poly(_ellipse(50, cy, hx, hy), skin)
    if style != "none":
        reach = 0.12 if style == "buzz" else -0.1  # below the temples: hair covers the sides of the head
        t = np.linspace(math.pi + reach, 2 * math.pi - reach, 16)
        top = [(50 + 1.07 * hx * math.cos(a), cy + 1.08 * hy * math.sin(a)) for a in t]
        line = cy - hy * rng.uniform(0.4, 0.6)
        fringe = [(x, line + rng.uniform(-2, 2)) for x in np.linspace(50 + hx * 0.9, 50 - hx * 0.9, 6)]
        p.poly(top + fringe, hair if style != "buzz" else _mix(hair, skin, 0.45))
    if rng.random() < 0.15:  # beard and moustache, in both classes so a dark jaw is no clue
        ys = np.linspace(g["nose"], g["chin"], 8)
        p.poly([(50 - w(y), y) for y in ys] + [(50 + w(y), y) for y in ys[::-1]], _mix(hair, skin, 0.2))
    ex, eye = rng.uniform(8, 10), g["eye"]
    for s in (-1, 1):
        p.line([(50 + s * (ex - 4), eye - 5), (50 + s * (ex + 4), eye - 5.5 - rng.uniform(0, 1.5))], hair, 1.3)
        p.poly(_ellipse(50 + s * ex, eye, 3.6, 2.0), (245, 245, 240))
        p.poly(_ellipse(50 + s * ex, eye, 1.7, 1.7), IRIS[rng.integers(len(IRIS))])
        p.poly(_ellipse(50 + s * ex, eye, 0.8, 0.8), (10, 10, 10))
        p.line(_ellipse(50 + s * ex, eye, 3.7, 2.1, 16)[8:] + [(50 + s * ex + 3.7, eye)], dark, 0.5)
    if rng.random() < 0.2:  # glasses
        frame = tuple(int(c) for c in rng.integers(0, 120, 3))
        for s in (-1, 1):
            p.line(_ellipse(50 + s * ex, eye, 5, 4, 20) + [(50 + s * ex + 5, eye)], frame, 0.8)
            p.line([(50 + s * (ex + 5), eye), (50 + s * hx, eye + 1)], frame, 0.8)
        p.line([(50 - ex + 5, eye), (50 + ex - 5, eye)], frame, 0.8)
    nose, m, mw, lips = g["nose"], g["mouth"], rng.uniform(5, 7.5), _mix(skin, (175, 55, 60), 0.55)
    p.poly([(50, eye + 1), (47, nose), (53, nose)], _mix(skin, dark, 0.5))
    for s in (-1, 1):
        p.poly(_ellipse(50 + s * 1.6, nose, 1.0, 0.6), _mix(skin, (0, 0, 0), 0.5))  # nostrils
    if (kind := rng.integers(3)) == 0:  # closed
        p.line([(50 - mw, m), (50, m + 0.6), (50 + mw, m)], lips, 2.2)
        p.line([(50 - mw, m), (50 + mw, m)], _mix(lips, (0, 0, 0), 0.5), 0.6)
    elif kind == 1:  # smile
        p.poly([(50 - mw, m - 1)] + [(50 + mw * math.cos(a), m - 1 + 4 * math.sin(a))
                                     for a in np.linspace(math.pi, 0, 10)], lips)
    else:  # open, teeth showing
        p.poly(_ellipse(50, m, mw, 3), lips)
        p.poly(_ellipse(50, m, mw - 1.2, 2), (60, 20, 25))
        p.poly([(50 - mw + 2, m - 1.8), (50 + mw - 2, m - 1.8), (50 + mw - 2.5, m - 0.7), (50 - mw + 2.5, m - 0.7)],
               (240, 240, 235))
    return g


def _draw_mask(layer: Image.Image, rng: np.random.Generator, style: str, g: dict) -> None:
    """A mask over nose and mouth, from just below the eyes to under the chin, with loops or straps."""
    p, w, hx, cy = _Pen(layer), g["w"], g["hx"], g["cy"]
    top, bottom, m = g["eye"] + rng.uniform(3.5, 5.5), g["chin"] + rng.uniform(2, 5), g["mouth"]
    side = max(w(m), 14) + rng.uniform(1.5, 3.5)
    outline = ([(50 - w(top) + 1, top), (50, top - 2.5), (50 + w(top) - 1, top)]
               + [(50 + side, y) for y in np.linspace(top + 5, m + 4, 4)]
               + [(50 + side * math.cos(a), m + 4 + (bottom - m - 4) * math.sin(a))
                  for a in np.linspace(0, math.pi, 12)]
               + [(50 - side, y) for y in np.linspace(m + 4, top + 5, 4)])
    if style == "surgical":
        colour = _jitter(rng, SURGICAL[rng.integers(len(SURGICAL))], 8)
        p.poly(outline, colour)
        fold = _mix(colour, (0, 0, 0), 0.28)
        for y in np.linspace(top + 4, m + 5, 3):
            p.line([(50 - side + 1, y), (50, y + 1.2), (50 + side - 1, y)], fold, 0.9)
        p.line(outline[:3], _mix(colour, (255, 255, 255), 0.5), 1.0)  # nose wire band
        loops = _mix(colour, (255, 255, 255), 0.6)
    elif style == "n95":
        colour = _jitter(rng, N95[rng.integers(len(N95))], 6)
        cup_y, ry = (top + bottom) / 2 + 1, (bottom - top) / 2 + 1
        p.poly(_ellipse(50, cup_y, side + 1, ry, 40), colour)
        p.line([(50, cup_y - ry + 1), (50, cup_y + ry - 1)], _mix(colour, (0, 0, 0), 0.25), 0.8)
        p.line([(50 - side + 2, cup_y - 1), (50, cup_y + 2), (50 + side - 2, cup_y - 1)],
               _mix(colour, (0, 0, 0), 0.12), 0.6)
        if rng.random() < 0.4:  # exhalation valve
            vx = 50 + rng.choice([-1, 1]) * side * 0.45
            p.poly(_ellipse(vx, cup_y + 3, 4.5, 4.5), _mix(colour, (80, 80, 90), 0.5))
            p.poly(_ellipse(vx, cup_y + 3, 2.5, 2.5), _mix(colour, (0, 0, 0), 0.55))
        strap = [(250, 210, 60), (60, 110, 200), (235, 235, 235)][rng.integers(3)]
        for s in (-1, 1):  # head straps run past the face outline, over the ears
            p.line([(50 + s * (side - 1), cup_y - ry * 0.5), (50 + s * (hx + 4), cy - 9)], strap, 1.6)
            p.line([(50 + s * (side - 1), cup_y + ry * 0.45), (50 + s * (hx + 2), g["chin"] + 3)], strap, 1.6)
        return
    else:  # cloth; skin-toned ones stop "skin colour over the mouth" from meaning no mask.
        # Beige, not the wearer's own tone: a mask the colour of the face would be invisible, not hard.
        tones = [c for c in SKIN if sum(abs(x - y) for x, y in zip(c, g["skin"])) > 90]
        skin_like = _jitter(rng, tones[rng.integers(len(tones))], 10) if rng.random() < 0.25 else None
        fabric = _pattern(layer.size, rng, skin_like)
        _fill(layer, outline, fabric)
        loops, seam = fabric.getpixel((0, 0)), _mix(fabric.getpixel((0, 0)), (0, 0, 0), 0.3)
        p.line(outline + [outline[0]], seam, 0.7)
        p.line([(50, top - 2.5), (50, bottom)], seam, 0.6)
    for s in (-1, 1):  # ear loops from the mask's corners to the ear
        p.line([(50 + s * (w(top) - 1), top), (50 + s * (hx + 1), cy - 2), (50 + s * (hx + 1.5), cy + 6),
                (50 + s * side, m + 3)], loops, 1.1)


def _draw_hand(layer: Image.Image, rng: np.random.Generator, g: dict) -> None:
    """A hand over the mouth: palm on one side, four fingers across, thumb, wrist leaving the picture."""
    p = _Pen(layer, flip=bool(rng.random() < 0.5))
    skin, hx = _jitter(rng, g["skin"], 8), g["hx"]
    y0, tilt = g["mouth"] - rng.uniform(2, 9), rng.uniform(-20, 15)
    px, py = 50 + hx * 0.75, y0 + 7
    parts = [_capsule(px + 3, py + 4, px + 22, 112, 8.5), _ellipse(px, py, 10, 11),
             _capsule(px - 4, py + 6, px - 14, py + 12, 2.8)]  # wrist, palm, thumb
    lengths = rng.uniform(0.85, 1.0) * np.array([0.8, 0.98, 1.0, 0.9]) * hx * 1.35  # index to little finger
    tips = [(px - 3 - length, y0 + i * 5.0) for i, length in enumerate(lengths)]
    parts += [_capsule(px - 3, y0 + i * 4.6, *tip, 2.3) for i, tip in enumerate(tips)]
    for part in parts:
        part = _rotate(part, px, py, tilt)
        p.poly(part, skin)
        p.line(part + [part[0]], _mix(skin, (0, 0, 0), 0.3), 0.4)
    for x, y in _rotate(tips, px, py, tilt):  # nails
        p.poly(_ellipse(x + 1.4, y, 1.2, 1.4), _mix(skin, (255, 235, 230), 0.45))


def _draw_paper(layer: Image.Image, rng: np.random.Generator, g: dict) -> None:
    """A rectangular sheet in front of the lower face, held at its bottom corners; straight edges, no straps."""
    p = _Pen(layer)
    top, w, h = g["mouth"] - rng.uniform(4, 11), rng.uniform(46, 64), rng.uniform(28, 42)
    cx, tilt = 50 + rng.uniform(-5, 5), rng.uniform(-12, 12)
    colour = _jitter(rng, PAPER[rng.integers(len(PAPER))], 5)
    rot = lambda pts: _rotate(pts, cx, top + h / 2, tilt)  # noqa: E731
    p.poly(rot([(cx - w / 2, top), (cx + w / 2, top), (cx + w / 2, top + h), (cx - w / 2, top + h)]), colour)
    ink = _mix(colour, (40, 40, 60), rng.uniform(0.3, 0.7))
    for y in np.arange(top + 5, top + h - 3, rng.uniform(3, 5)):  # a few lines of "text"
        x = cx - w / 2 + 5
        while x < cx + w / 2 - 8:
            word = rng.uniform(3, 9)
            p.line(rot([(x, y), (min(x + word, cx + w / 2 - 5), y)]), ink, 0.7)
            x += word + 2
    for s in (-1, 1):  # thumbs over the bottom corners
        x = cx + s * (w / 2 - rng.uniform(3, 8))
        thumb = rot(_capsule(x, top + h + 5, x + s * 1.5, top + h - 5, 2.8))
        p.poly(thumb, g["skin"])
        p.line(thumb + [thumb[0]], _mix(g["skin"], (0, 0, 0), 0.3), 0.4)


def _draw_scarf(layer: Image.Image, rng: np.random.Generator, g: dict) -> None:
    """A scarf wrapped round the neck below the chin, the mouth left visible, sometimes with a hanging end."""
    hx, top = g["hx"], g["chin"] + rng.uniform(-4, 2)
    wrap = ([(50 - hx - 5, top + 3), (50, top), (50 + hx + 5, top + 3)]
            + [(50 + hx + 9, top + 12), (50, top + rng.uniform(17, 22)), (50 - hx - 9, top + 12)])
    fabric = _pattern(layer.size, rng)
    _fill(layer, wrap, fabric)
    if rng.random() < 0.6:
        x = 50 + rng.uniform(-hx, hx) * 0.6
        _fill(layer, [(x - 6, top + 10), (x + 6, top + 10), (x + 8, 101), (x - 5, 101)], fabric)
    fold = _mix(fabric.getpixel((0, 0)), (0, 0, 0), 0.35)
    for y in (top + 5, top + 9, top + 13):
        _Pen(layer).line([(50 - hx - 4, y), (50, y + 2), (50 + hx + 4, y)], fold, 0.7)


# ---- backgrounds, composition and camera effects -----------------------------------------------------------

def _background(size: int, rng: np.random.Generator, busy: bool) -> Image.Image:
    colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    kind = "cluttered" if busy else rng.choice(["flat", "gradient", "cluttered"])
    if kind == "gradient":
        a, b, ang = np.array(colour()), np.array(colour()), rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / size
        t = np.clip((xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang) + 0.5, 0, 1)[..., None]
        return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8), "RGB")
    img = Image.new("RGB", (size, size), colour())
    d = ImageDraw.Draw(img)
    for _ in range(0 if kind == "flat" else int(rng.integers(40, 90) if busy else rng.integers(12, 40))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * size, y0 + rng.uniform(0.05, 0.5) * size
        if (shape := rng.integers(3)) < 2:
            (d.rectangle if shape == 0 else d.ellipse)([x0, y0, x1, y1], fill=colour())
        else:
            d.line([(x0, y0), (x1, y1)], fill=colour(), width=int(rng.integers(1, max(2, size // 30))))
    return img


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Directional light, exposure, colour cast, sensor noise and blur: what separates a photo from a drawing."""
    arr, n = np.asarray(img, dtype=np.float32), img.width
    ang, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.4)
    yy, xx = np.mgrid[0:n, 0:n] / n - 0.5
    light = 1 + strength * 2 * (xx * math.cos(ang) + yy * math.sin(ang))
    arr = arr * light[..., None] * rng.uniform(0.7, 1.2) * rng.uniform(0.9, 1.1, 3)
    arr = arr + rng.normal(0, rng.uniform(0, 6), arr.shape)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.4:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * n / 96))
    return out


def render_sample(split: str, label: str, index: int, *, image_size: int = 96, seed: int = 0,
                  hard_negative_fraction: float = 0.3) -> Sample:
    """Draw image ``index`` of ``split``/``label`` (names from :data:`SPLITS` / :data:`CLASSES`).

    The result depends on its arguments only, never on which other images were
    drawn before, so images can be made in any order and in parallel.
    """
    if split not in SPLITS or label not in CLASSES:
        raise ValueError(f"unknown split/class {split!r}/{label!r}; expected one of {SPLITS} / {CLASSES}")
    rng = np.random.default_rng((seed, SPLITS.index(split), CLASSES.index(label), index))
    variant = variant_for(label, index, rng, hard_negative_fraction)
    size, scene = image_size * SUPERSAMPLE, split == "scene"
    canvas = _background(size, rng, busy=scene)
    # The layer holds head and shoulders; the head is 0.44 of its width, 0.56 of its height.
    layer_px = int(size * (rng.uniform(0.57, 1.02) if scene else rng.uniform(1.0, 1.45)))
    layer = Image.new("RGBA", (layer_px, layer_px), (0, 0, 0, 0))
    g = _draw_person(layer, rng)
    draw = {"hand": _draw_hand, "paper": _draw_paper, "scarf": _draw_scarf}.get(variant)
    if label == "mask":
        _draw_mask(layer, rng, variant, g)
    elif draw:
        draw(layer, rng, g)
    layer = layer.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC, expand=True)
    if scene:  # anywhere, as long as the head stays in the picture
        cx, cy = rng.uniform(0.22, 0.78, 2) * size
    else:
        cx, cy = (0.5 + rng.uniform(-0.08, 0.08, 2)) * size + np.array([0, 0.05 * size])
    canvas.paste(layer, (int(cx - layer.width / 2), int(cy - layer.height / 2)), layer)
    image = _camera(canvas.resize((image_size, image_size), Image.LANCZOS), rng)
    return Sample(image=image, variant=variant, jpeg_quality=int(rng.integers(60, 96)))


def write_dataset(config: DatasetConfig) -> dict:
    """Draw the whole dataset and write it under ``config.out``; returns what ``dataset.json`` holds.

    Refuses (:class:`UserError`) to write over an earlier dataset there unless
    ``config.overwrite``, which deletes only this generator's own entries
    (:data:`OWN_ENTRIES`). ``dataset.json`` is written last, so its presence
    marks a complete dataset. Storage failures surface as :class:`UserError`.
    """
    existing = sorted(set(storage.listdir(config.out)) & set(OWN_ENTRIES))
    if existing and not config.overwrite:
        raise UserError(f"{config.out!r} already holds a dataset ({', '.join(existing)}); "
                        f"pass --overwrite to replace it or choose another --out.")
    for name in existing:
        storage.delete(storage.join(config.out, name))
    sizes, started, done = split_sizes(config.n_per_class), time.monotonic(), itertools.count(1)
    files = [(s, c, f"{s}/{c}/{i:06d}.jpg") for s in SPLITS for c in CLASSES for i in range(sizes[s])]

    def make(split: str, label: str, path: str) -> str:
        sample = render_sample(split, label, int(path[-10:-4]), image_size=config.image_size, seed=config.seed,
                               hard_negative_fraction=config.hard_negative_fraction)
        storage.write_bytes(storage.join(config.out, split, label, path[-10:]), sample.jpeg())
        if (n := next(done)) % max(1, len(files) // 10) == 0:  # count() is atomic under the GIL
            log.info("%d/%d images written", n, len(files))
        return sample.variant

    # Threads, not processes: object-store writes wait on the network, and
    # Pillow releases the GIL while resizing, blurring and encoding.
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        futures = [pool.submit(make, *f) for f in files]
        try:
            variants = [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    rows = [(path, label, split, v) for (split, label, path), v in zip(files, variants)]
    storage.write_text(storage.join(config.out, "variants.csv"),
                       "path,label,split,variant\n" + "".join(",".join(r) + "\n" for r in rows))
    # Only what decides the pictures: the same seed gives the same file wherever it is written.
    record = {"generator": "maskmodel.synth", "version": VERSION, "seed": config.seed,
              "image_size": config.image_size, "n_per_class": config.n_per_class,
              "hard_negative_fraction": config.hard_negative_fraction, "classes": list(CLASSES),
              "splits": {s: {c: sizes[s] for c in CLASSES} for s in SPLITS},
              "variants": {s: dict(sorted(Counter(r[3] for r in rows if r[2] == s).items())) for s in SPLITS},
              "total": len(rows), "layout": "<split>/<class>/<index:06d>.jpg"}
    storage.write_json(storage.join(config.out, "dataset.json"), record)
    log.info("wrote %d images to %s in %.1f s", len(rows), config.out, time.monotonic() - started)
    return record
