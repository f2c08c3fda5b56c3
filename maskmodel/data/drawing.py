"""Drawing primitives for the synthetic faces of :mod:`maskmodel.data.synth`.

Everything is drawn in face units: a person layer is 100 x 100 units with the
head centred at (50, 45), so the same code draws a tight crop or a small face
in a scene. Each function takes the numpy generator it draws from and nothing
global, which keeps every image reproducible from its own seed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at any size

SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 128), (198, 134, 96), (160, 104, 70), (120, 76, 50), (86, 56, 38)]
HAIR = [(20, 16, 14), (60, 40, 25), (110, 75, 40), (185, 145, 85), (205, 195, 175), (140, 60, 30)]
IRIS = [(70, 45, 25), (40, 30, 20), (70, 110, 150), (80, 110, 70)]
SURGICAL = [(150, 200, 230), (236, 240, 245), (160, 215, 190), (45, 47, 52), (240, 185, 205)]
N95 = [(238, 238, 232), (214, 214, 208), (245, 238, 215), (222, 230, 236)]
PAPER = [(250, 250, 246), (246, 239, 218), (255, 243, 150), (228, 238, 250)]


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


def draw_person(layer: Image.Image, rng: np.random.Generator) -> dict:
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


#: The styles :func:`draw_mask` draws.
MASK_STYLES = ("surgical", "n95", "cloth")
#: How a mask can be worn: properly (over nose and mouth), and the two ways of ``mask_incorrect``.
WORN = ("properly", "below_nose", "chin")


def draw_mask(layer: Image.Image, rng: np.random.Generator, style: str, g: dict, *, worn: str = "properly") -> None:
    """A mask with loops or straps: ``worn`` properly, from just below the eyes to under the chin over nose and
    mouth; ``below_nose``, its top edge under the nose tip (nostrils and nose visible, mouth covered); or on the
    ``chin``, its top edge under the lips (nose and mouth visible). Raises :class:`ValueError` for another
    ``worn``."""
    if worn not in WORN:
        raise ValueError(f"unknown way of wearing a mask {worn!r}; expected one of {WORN}")
    p, w, hx, cy = _Pen(layer), g["w"], g["hx"], g["cy"]
    top, bottom, m = g["eye"] + rng.uniform(3.5, 5.5), g["chin"] + rng.uniform(2, 5), g["mouth"]
    if worn == "below_nose":
        top = g["nose"] + rng.uniform(1.5, 3.0)
    elif worn == "chin":
        top = m + rng.uniform(3.0, 4.5)
        m = top + 1.0  # no straight sides to speak of: the mask is a cup around the chin
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


def draw_hand(layer: Image.Image, rng: np.random.Generator, g: dict) -> None:
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


def draw_paper(layer: Image.Image, rng: np.random.Generator, g: dict) -> None:
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


def draw_scarf(layer: Image.Image, rng: np.random.Generator, g: dict) -> None:
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

def background(size: int, rng: np.random.Generator, busy: bool) -> Image.Image:
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


def camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
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
