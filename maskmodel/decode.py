"""Turning the bytes of one image file into an RGB picture, or a reason why not.

Pure functions, no Ray: the scoring and training pipelines both call
:func:`decode_image` per object inside their own try/except, so one bad file
becomes a row with a reason instead of a crash.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Formats photos come in; anything else Pillow happens to open (PSD, ICO, PDF
# previews...) is reported as unsupported rather than guessed at.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
ORIENTATION_TAG = 0x0112  # EXIF
MIN_SIDE = 8  # pixels; smaller images carry no face to classify
# Longest side accepted (WebP's own limit). Checked from the header, before
# decoding, so a 60000x10 strip cannot make a worker allocate a huge resize.
MAX_SIDE = 16383

# Truncated files must fail, not decode into grey half-pictures.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(ValueError):
    """The object is not a usable image; ``str(err)`` is a short reason for the results table."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's own I;16 -> RGB conversion clips to 255; scale instead.
        arr = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16).astype(np.float64)
        top = 65535.0 if mode != "I" else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = ((arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, as a viewer would show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def too_large_bytes(size: int, max_bytes: int) -> str:
    """The reason recorded for an object over the byte limit (shared with the readers that skip it unread)."""
    return f"too large: {size} bytes > {max_bytes}"


class Decoded(NamedTuple):
    """A decoded picture and the size of the original (after EXIF rotation), which ``reduce_to`` may exceed."""

    image: Image.Image
    width: int
    height: int


@contextlib.contextmanager
def _reasons() -> Iterator[None]:
    """Turn whatever Pillow raises while opening or decoding into a :class:`DecodeError` with a short reason."""
    try:
        with warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS Pillow only warns; a scoring service treats
            # that as a bomb too (Pillow itself raises at twice the limit).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise DecodeError(f"too large: {pixels.group(1) + ' pixels' if pixels else 'image'}, "
                          f"over the decompression-bomb limit") from e
    except UnidentifiedImageError as e:
        raise DecodeError("not an image") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        if "truncated" in msg.lower() or isinstance(e, EOFError) or "broken data stream" in msg.lower():
            raise DecodeError("truncated image") from e
        raise DecodeError(f"undecodable: {msg}"[:200]) from e


def _open(data: bytes, *, min_side: int, max_side: int, max_bytes: int | None) -> Image.Image:
    """Open ``data`` (headers only) and check everything the headers tell; call inside :func:`_reasons`."""
    if not data:
        raise DecodeError("empty file")
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError(too_large_bytes(len(data), max_bytes))
    img = Image.open(io.BytesIO(data))
    if img.format not in SUPPORTED_FORMATS:
        raise DecodeError(f"unsupported format: {img.format}")
    w, h = img.size
    if max(w, h) > max_side:
        raise DecodeError(f"too large: {w}x{h}")
    if w < min_side or h < min_side:
        raise DecodeError(f"too small: {w}x{h}")
    return img


class Probed(NamedTuple):
    """What :func:`probe` reads from the headers: the size is after EXIF rotation; ``orientation`` is the EXIF
    value (1, upright, when absent); ``mode`` is Pillow's (``RGB`` for a YCbCr JPEG, ``L``, ``CMYK``...)."""

    format: str
    width: int
    height: int
    mode: str = "RGB"
    orientation: int = 1


def probe(data: bytes, *, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE,
          max_bytes: int | None = None) -> Probed:
    """Format, size (after EXIF rotation), mode and EXIF orientation from the headers alone; nothing is decoded.

    Raises :class:`DecodeError` for everything the headers reveal (see
    :func:`decode`); a file whose pixel data is damaged passes and fails later,
    when it is decoded.
    """
    with _reasons():
        img = _open(data, min_side=min_side, max_side=max_side, max_bytes=max_bytes)
        w, h = img.size
        orientation = img.getexif().get(ORIENTATION_TAG)
        orientation = orientation if orientation in range(1, 9) else 1  # a broken tag: viewers show it upright
        if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
            w, h = h, w
        return Probed(str(img.format), w, h, img.mode, orientation)


def decode(data: bytes, *, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE, max_bytes: int | None = None,
           reduce_to: int | None = None) -> Decoded:
    """Decode ``data`` to an RGB picture with EXIF orientation applied, plus the original's size.

    ``reduce_to``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or
    1/8 of each side, done inside libjpeg, so the skipped pixels are never
    computed) whose sides are both still at least ``reduce_to`` pixels; other
    formats decode at full size. A camera's 1920x1080 frame needed at a short
    side of 256 decodes at 480x270: 1/16 of the pixels. The caller resizes to
    the exact size it needs; ``width``/``height`` are always the original's.

    Raises :class:`DecodeError` with a short reason: ``empty file``,
    ``not an image``, ``unsupported format: X``, ``truncated image``,
    ``too large: ...`` (over ``max_bytes``, a side over ``max_side``, or
    Pillow's decompression-bomb limit), ``too small: WxH`` or ``undecodable: ...``.
    Every check uses the original size, so ``reduce_to`` changes no reason.
    """
    with _reasons():
        img = _open(data, min_side=min_side, max_side=max_side, max_bytes=max_bytes)
        w, h = img.size
        if reduce_to and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (reduce_to, reduce_to))
        reduced = img.size
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.size != reduced:  # EXIF rotated it by 90 degrees: so is the original
        w, h = h, w
    return Decoded(_to_rgb(img), w, h)


def decode_image(data: bytes, *, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE,
                 max_bytes: int | None = None) -> Image.Image:
    """:func:`decode` at full size, the picture only."""
    return decode(data, min_side=min_side, max_side=max_side, max_bytes=max_bytes).image


def to_uint8_chw(img: Image.Image) -> np.ndarray:
    """An RGB picture as a ``uint8`` array of shape ``(3, H, W)``."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
