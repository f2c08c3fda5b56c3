"""Issue 31: inputs from public bug reports that must give a row with the right pixels or the right reason.

Pure functions (decode, archives, listing): no Ray, no model.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from maskmodel.io import archives
from maskmodel.io.decode import DecodeError, decode, probe


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.NEAREST)


# ----------------------------------------------------------------------------- limits are not verdicts

def test_a_jpeg_over_the_pixel_limit_decodes_reduced(monkeypatch):
    # A 108-megapixel phone photo against Pillow's ~89 MP limit, scaled down 100x to keep the test fast.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    data = _save(_photo(1200, 900), "JPEG", quality=80)            # 1.08 MP: over the limit (warning zone)
    d = decode(data, max_pixels=300_000)
    assert (d.width, d.height) == (1200, 900)
    assert d.image.width * d.image.height <= 300_000
    assert decode(data, reduce_to=224).image.size == (300, 225)    # the crop path's DCT scaling
    assert probe(data)[1:3] == (1200, 900)                        # headers alone are no bomb
    huge = _save(_photo(1600, 1600), "JPEG", quality=80)           # 2.56 MP: over twice the limit (error zone)
    assert decode(huge, max_pixels=300_000).image.size[0] <= 548


def test_only_a_picture_without_a_reduced_decode_is_refused_over_the_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(DecodeError, match=r"^too large: 1440000 pixels, over the decompression-bomb limit"):
        decode(_save(_photo(1200, 1200), "PNG"), max_pixels=300_000)
    with pytest.raises(DecodeError, match=r"^too large: 1080000 pixels"):   # asked for at full size
        decode(_save(_photo(1200, 900), "JPEG"))


@pytest.mark.parametrize("compressed", [True, False])
def test_a_png_with_an_oversized_text_chunk_decodes(compressed):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=compressed)
    info.add_text("Small", "kept")
    img = _photo(64, 48)
    data = _save(img, "PNG", pnginfo=info)
    d = decode(data)
    assert np.array_equal(np.asarray(d.image), np.asarray(img))


def test_text_past_the_text_memory_limit_is_dropped(monkeypatch):
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 1000)
    info = PngImagePlugin.PngInfo()
    for k in range(5):
        info.add_text(f"k{k}", "y" * 400)
    img = _photo(32, 32)
    assert np.array_equal(np.asarray(decode(_save(img, "PNG", pnginfo=info)).image), np.asarray(img))


# ----------------------------------------------------------------------------- one alpha rule

def _alpha_variants() -> dict[str, bytes]:
    """One picture (a grey square, its left half transparent) saved in every mode that can say so."""
    grey = np.full((16, 16), 90, np.uint8)
    grey[:, :8] = 7                                         # the colour a tRNS chunk names transparent
    alpha = np.where(grey == 7, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    palette = Image.fromarray(grey, "L").convert("P")
    out = {
        "L+tRNS": _save(Image.fromarray(grey, "L"), "PNG", transparency=7),
        "RGB+tRNS": _save(Image.fromarray(rgb, "RGB"), "PNG", transparency=(7, 7, 7)),
        "P": _save(palette, "PNG", transparency=palette.getpixel((0, 0))),
        "LA": _save(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"),
        "RGBA": _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
        "I;16+tRNS": _save(Image.fromarray(grey.astype(np.uint16) * 257), "PNG", transparency=7 * 257),
    }
    return out


def test_every_mode_composites_transparency_on_the_same_background():
    pictures = {name: np.asarray(decode(data).image) for name, data in _alpha_variants().items()}
    for name, arr in pictures.items():
        assert (arr[:, :8] == 255).all(), f"{name}: transparent area is not white"
        assert (arr[:, 8:] == 90).all(), f"{name}: opaque area changed"


# ----------------------------------------------------------------------------- reasons that name the cause

def _zip_with_method(method: int) -> bytes:
    """A zip whose one member claims ``method`` (the bytes are not valid data for it: the reason must come first)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a.jpg", b"\xff\xd8\xff" + b"x" * 100)
    data = bytearray(buf.getvalue())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 8:local + 10] = method.to_bytes(2, "little")
    data[central + 10:central + 12] = method.to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize("method, name", [(9, "Deflate64"), (93, "zstd"), (98, "PPMd"), (6, "Implode")])
def test_an_unsupported_zip_compression_is_named(method, name):
    rows = list(archives.iter_zip(io.BytesIO(_zip_with_method(method)), extensions=("jpg",), max_bytes=1 << 20))
    assert [(r.name, r.error) for r in rows] == [("a.jpg", f"unsupported compression: {name}")]
