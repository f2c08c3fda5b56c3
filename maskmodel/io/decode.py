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
import zlib
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

# Formats photos come in; anything else Pillow happens to open (PSD, ICO, PDF
# previews...) is reported as unsupported rather than guessed at.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
ORIENTATION_TAG = 0x0112  # EXIF
MIN_SIDE = 8  # pixels; smaller images carry no face to classify
# Longest side accepted (WebP's own limit). Checked from the header, before
# decoding, so a 60000x10 strip cannot make a worker allocate a huge resize.
MAX_SIDE = 16383
#: Default bound on the pixels of one decoded photo with faces (scoring's --max-pixels, and training from annotated
#: photos, which cuts faces from the same decode): a 1080p frame (2.1 MP) decodes whole; a 12 MP phone photo decodes
#: at half its sides (3 MP, inside libjpeg).
DEFAULT_MAX_PIXELS = 4_000_000

# Truncated files must fail, not decode into grey half-pictures (and a zero-padded one, which Pillow
# decodes without complaint, fails in check_stream). Never flipped: it is process-wide.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(ValueError):
    """The object is not a usable image; ``str(err)`` is a short reason for the results table."""


#: The background every transparent pixel is composited on, whatever the mode that carries the transparency
#: (an alpha channel, a palette's, or one transparent colour): white, as a viewer shows it.
BACKGROUND = 255


def _transparent_colour(img: Image.Image) -> np.ndarray | None:
    """``bool (H, W)``: the pixels of the one transparent colour an L, RGB or 16-bit grey picture may name (PNG's
    tRNS chunk; Pillow's ``info["transparency"]``), or ``None`` when it names none."""
    value = img.info.get("transparency")
    if value is None or img.mode not in ("L", "RGB", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        return None
    arr = np.asarray(img)
    if img.mode == "RGB":
        if not isinstance(value, tuple) or len(value) != 3:
            return None
        return (arr == np.asarray(value, dtype=arr.dtype)).all(axis=-1)
    return arr == value if isinstance(value, int) else None


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB; every kind of transparency composited on :data:`BACKGROUND` (one rule for every mode)."""
    clear = _transparent_colour(img)
    rgb = _opaque_rgb(img)
    if clear is not None and clear.any():
        out = np.array(rgb)
        out[clear] = BACKGROUND
        rgb = Image.fromarray(out, mode="RGB")
    return rgb


def _opaque_rgb(img: Image.Image) -> Image.Image:
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
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
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


# Major brands of an ISO-BMFF ``ftyp`` box (HEIF/HEIC phone photos, often renamed .jpg): named, not "not an image".
_HEIF_BRANDS = {b"heic": "HEIF", b"heix": "HEIF", b"heim": "HEIF", b"heis": "HEIF", b"hevc": "HEIF",
                b"hevx": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
# JPEG start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC): they carry precision and size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_stream(data: bytes) -> None:
    """Check a JPEG's frame header and that its main scan ends (JPEG and MPO).

    Walks the marker segments from SOI to the first start-of-scan of the main
    image (so an EXIF thumbnail's own SOS/EOI, inside APP1, is skipped) and
    requires an end-of-image marker after it. Data after that marker (motion
    photos, MPO's second picture, trailing junk) is fine; a partial download,
    cut or padded with zeros to its full length, lacks it (entropy-coded data
    cannot contain FF D9), or ends (in zeros) before its scan. A stream too
    garbled to walk is left to Pillow.
    """
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            if not data[i:].strip(b"\0"):  # zero padding where the next marker should be
                raise DecodeError("truncated image")
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF and i + 9 <= n:
            bits = data[i + 4]
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if bits != 8:
                raise DecodeError(f"unsupported format: {bits}-bit JPEG")
            if not w or not h:  # Pillow does not open these at all
                raise DecodeError(f"too small: {w}x{h}")
        if marker == 0xDA:
            if data.find(b"\xff\xd9", i + 2 + length) == -1:
                raise DecodeError("truncated image")
            return
        i += 2 + length
    raise DecodeError("truncated image")  # the stream ends before its scan does


_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"iCCP"})


def _text_size(ctype: bytes, body: bytes) -> int | None:
    """Expanded size of a PNG text (or ICC profile) chunk's value; ``None`` when it expands past
    ``PngImagePlugin.MAX_TEXT_CHUNK`` (Pillow refuses the whole file then). A chunk too garbled to
    measure is left to Pillow (size 0)."""
    limit = PngImagePlugin.MAX_TEXT_CHUNK
    key_end = body.find(b"\0")
    if key_end < 0:
        return 0
    value = body[key_end + 1:]
    if ctype == b"tEXt":
        return len(value)
    if ctype == b"iTXt":
        if len(value) < 2 or not value[0]:  # not compressed
            return len(value)
        rest = value[2:].split(b"\0", 2)  # language, translated keyword, text
        if len(rest) < 3:
            return 0
        value = b"\0" + rest[2]
    z = zlib.decompressobj()
    try:
        expanded = z.decompress(value[1:], limit)
    except zlib.error:
        return 0
    return None if z.unconsumed_tail else len(expanded)


def _png_stream(data: bytes) -> bytes:
    """Check a PNG's chunks; returns ``data`` less any ancillary chunk whose CRC is wrong or that is over Pillow's limits.

    libpng and browsers treat a bad CRC in an ancillary chunk (iCCP, tEXt...;
    lowercase first letter) as a warning and show the picture; Pillow refuses
    the file unless the process-wide ``LOAD_TRUNCATED_IMAGES`` is set, which
    would also let truncated files through. So the chunk is dropped here, and
    so is a text or ICC chunk that expands past ``PngImagePlugin.MAX_TEXT_CHUNK``
    or takes the text past ``MAX_TEXT_MEMORY`` (limits that protect memory, not
    verdicts on the picture: :func:`_text_size`). The stream must reach IEND
    (bytes after it are ignored): a partial download, cut or zero-padded, does not.
    """
    n, pos, drop, text = len(data), 8, [], 0
    if n >= 24 and data[12:16] == b"IHDR":
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if not w or not h:  # Pillow does not open these at all
            raise DecodeError(f"too small: {w}x{h}")
    while True:
        if pos + 12 > n:
            raise DecodeError("truncated image")
        length, ctype = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if not ctype.isalpha() or end > n:  # zero padding or a cut inside a chunk
            raise DecodeError("truncated image")
        if ctype == b"IEND":
            break
        stored_crc = int.from_bytes(data[end - 4:end], "big")
        if ctype[0] & 0x20 and zlib.crc32(memoryview(data)[pos + 4:end - 4]) != stored_crc:  # ancillary, bad
            drop.append((pos, end))
        elif ctype in _TEXT_CHUNKS:
            size = _text_size(ctype, data[pos + 8:end - 4])
            if size is None or (ctype != b"iCCP" and text + size > PngImagePlugin.MAX_TEXT_MEMORY):
                drop.append((pos, end))
            elif ctype != b"iCCP":
                text += size
        pos = end
    if not drop:
        return data
    kept, start = [], 0
    for a, b in drop:
        kept.append(data[start:a])
        start = b
    return b"".join(kept) + data[start:]


def check_stream(data: bytes) -> bytes:
    """What the container says before Pillow opens it: a precise :class:`DecodeError`, or the bytes to open.

    HEIF/AVIF (by their ``ftyp`` box) are ``unsupported format``; a JPEG of
    other than 8-bit samples is ``unsupported format: N-bit JPEG``; a zero
    side is ``too small: WxH``; a JPEG, PNG or WebP stream that does not reach
    its end (cut, or zero-padded to full length) is ``truncated image``. PNG
    ancillary chunks with a bad CRC are dropped (see :func:`_png_stream`).
    Formats without an end marker (BMP, TIFF, pixel data inside WebP) cannot
    tell zero padding from pixels. The one strictness check of both paths:
    :func:`probe` (GPU path) and :func:`decode` (CPU path) call it.
    """
    if data[4:8] == b"ftyp" and (kind := _HEIF_BRANDS.get(data[8:12])):
        raise DecodeError(f"unsupported format: {kind}")
    if data[:3] == b"\xff\xd8\xff":
        _jpeg_stream(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_stream(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        raise DecodeError("truncated image")
    return data


def _open(data: bytes, *, min_side: int, max_side: int, max_bytes: int | None) -> Image.Image:
    """Open ``data`` (headers only) and check everything the headers tell; call inside :func:`_reasons`."""
    if not data:
        raise DecodeError("empty file")
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError(too_large_bytes(len(data), max_bytes))
    data = check_stream(data)
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        if data[:3] != b"\xff\xd8\xff":
            raise  # no reduced decode exists for it: the whole picture would be allocated
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale inside libjpeg (draft): the limit applies to the pixels
        # decoded (checked in decode), not to the header's size. The same parser, without Image.open's check.
        img = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
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
           reduce_to: int | None = None, max_pixels: int | None = None) -> Decoded:
    """Decode ``data`` to an RGB picture with EXIF orientation applied, plus the original's size.

    ``reduce_to``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or
    1/8 of each side, done inside libjpeg, so the skipped pixels are never
    computed) whose sides are both still at least ``reduce_to`` pixels; other
    formats decode at full size. A camera's 1920x1080 frame needed at a short
    side of 256 decodes at 480x270: 1/16 of the pixels. The caller resizes to
    the exact size it needs; ``width``/``height`` are always the original's.

    Raises :class:`DecodeError` with a short reason: ``empty file``,
    ``not an image``, ``unsupported format: X`` (``HEIF``, ``12-bit JPEG``...),
    ``truncated image`` (see :func:`check_stream`), ``too large: ...`` (over
    ``max_bytes``, a side over ``max_side``, or Pillow's decompression-bomb
    limit), ``too small: WxH`` or ``undecodable: ...``.
    Every check uses the original size, so ``reduce_to`` changes no reason,
    except the bomb limit: it protects memory, so for a JPEG it applies to
    the pixels decoded. A JPEG over it decodes reduced when ``reduce_to`` or
    ``max_pixels`` asks for few enough pixels (``too large: N pixels, over the
    decompression-bomb limit even reduced`` otherwise); other formats have no
    reduced decode and are refused from the header. Transparency of any kind
    is composited on white (:data:`BACKGROUND`).

    ``max_pixels`` (instead of ``reduce_to``): the picture is decoded as large
    as possible with at most this many pixels: a JPEG at the largest DCT scale
    that fits (never allocating the full size), then anything still over it
    resized down (aspect kept). A 16k x 16k JPEG at ``max_pixels=4e6`` decodes
    at 1/8 (2048 x 2048) and is resized to 2000 x 2000.
    """
    with _reasons():
        img = _open(data, min_side=min_side, max_side=max_side, max_bytes=max_bytes)
        w, h = img.size
        if max_pixels and w * h > max_pixels and img.format in ("JPEG", "MPO"):
            scale = next((k for k in (1, 2, 4, 8) if (w // k) * (h // k) <= max_pixels), 8)
            reduce_to = -(-min(w, h) // scale)  # draft picks the smallest scale keeping both sides >= this
        if reduce_to and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (reduce_to, reduce_to))
        reduced = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and reduced[0] * reduced[1] > limit:  # only a JPEG opened past the limit gets here
            raise DecodeError(f"too large: {w * h} pixels, over the decompression-bomb limit even reduced")
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.size != reduced:  # EXIF rotated it by 90 degrees: so is the original
        w, h = h, w
    img = _to_rgb(img)
    if max_pixels and img.width * img.height > max_pixels:
        r = (max_pixels / (img.width * img.height)) ** 0.5
        img = img.resize((max(1, int(img.width * r)), max(1, int(img.height * r))), Image.BILINEAR,
                         reducing_gap=2.0)
    return Decoded(img, w, h)


def decode_image(data: bytes, *, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE,
                 max_bytes: int | None = None) -> Image.Image:
    """:func:`decode` at full size, the picture only."""
    return decode(data, min_side=min_side, max_side=max_side, max_bytes=max_bytes).image


def to_uint8_chw(img: Image.Image) -> np.ndarray:
    """An RGB picture as a ``uint8`` array of shape ``(3, H, W)``."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
