"""Decoding at reduced size: what it changes (pixels, slightly) and what it must not (sizes, reasons)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from maskmodel import synth
from maskmodel.decode import DecodeError, decode, to_uint8_chw
from maskmodel.transforms import EvalCrop


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return synth.render_photo("mask", 1)


def test_reduced_jpeg_decode_keeps_the_original_size(photo):
    full, reduced = decode(photo), decode(photo, reduce_to=256)
    assert full.image.size == (1920, 1080) and (full.width, full.height) == (1920, 1080)
    # The smallest DCT scale (1/4 here) whose sides both stay >= 256.
    assert reduced.image.size == (480, 270) and (reduced.width, reduced.height) == (1920, 1080)
    assert decode(photo, reduce_to=1080).image.size == (1920, 1080)  # 1080 // 1080 = 1: no reduction
    assert decode(photo, reduce_to=135).image.size == (240, 135)  # 1/8, libjpeg's smallest scale


def test_exif_rotation_swaps_the_reported_size_on_both_paths(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _jpeg(Image.open(io.BytesIO(photo)), exif=exif.tobytes())
    for kw in ({}, {"reduce_to": 256}):
        d = decode(data, **kw)
        assert (d.width, d.height) == (1080, 1920)
        assert d.image.size[0] < d.image.size[1]


def test_other_formats_decode_at_full_size():
    png = io.BytesIO()
    Image.new("RGB", (1000, 600), (10, 20, 30)).save(png, "PNG")
    d = decode(png.getvalue(), reduce_to=100)
    assert d.image.size == (1000, 600) and (d.width, d.height) == (1000, 600)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"plain text, not a picture", "not an image"),
    (_jpeg(Image.new("RGB", (4, 40))), "too small: 4x40"),
])
def test_reasons_do_not_depend_on_reduction(data, reason):
    for kw in ({}, {"reduce_to": 256}):
        with pytest.raises(DecodeError, match=reason):
            decode(data, **kw)


def test_truncated_jpeg_is_still_truncated_when_reduced(photo):
    for kw in ({}, {"reduce_to": 256}):
        with pytest.raises(DecodeError, match="truncated image"):
            decode(photo[: len(photo) // 2], **kw)


def test_reduced_decode_then_crop_matches_full_decode_then_crop(photo):
    crop = EvalCrop(crop_size=224, resize_size=256)
    full = crop(torch.from_numpy(to_uint8_chw(decode(photo).image))).float()
    reduced = crop(torch.from_numpy(to_uint8_chw(decode(photo, reduce_to=256).image))).float()
    assert full.shape == reduced.shape == (3, 224, 224)
    diff = (full - reduced).abs()
    # DCT-domain downscaling and an antialiased resize differ by a few levels at edges, not in content.
    assert diff.mean() < 3.0 and np.percentile(diff.numpy(), 99) < 25
