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


# ----------------------------------------------------------------------------- every object a row or a counted skip

def test_hidden_files_and_extension_left_outs_are_counted_not_lost(tmp_path):
    from maskmodel.io import storage
    from maskmodel.score.scoring import ScoreResult

    jpeg = _save(_photo(32, 32), "JPEG")
    for rel in ("a.jpg", "sub/b.JPG", ".thumbs/t.jpg", ".dotfile.jpg", "._IMG_0001.jpg", "sub/.git/x.jpg",
                "notes.txt", "sub/c.heic"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(jpeg)
    objects, left = storage.list_objects(str(tmp_path), extensions=("jpg",))
    assert [o.uri.rsplit("/", 1)[1] for o in objects] == ["a.jpg", "b.JPG"]
    assert (left.hidden, left.extension, left.total) == (4, 2, 6)
    line = ScoreResult("r1", "file:///out", 2, 2, 0, None, 1.0, left).summary_line()
    assert "6 files left out (4 hidden, 2 not of --extensions)" in line


def _alpha_picture(rng: np.random.Generator, mode: str) -> tuple[bytes, np.ndarray]:
    """A random picture with a transparent region, saved in ``mode``; and the pixels every mode must decode to."""
    h, w = int(rng.integers(8, 24)), int(rng.integers(8, 24))
    grey = rng.integers(20, 240, (h, w)).astype(np.uint8)
    grey[grey == 7] = 8
    clear = rng.random((h, w)) < 0.3
    grey[clear] = 7
    expected = np.repeat(np.where(clear, 255, grey)[..., None], 3, axis=2)
    alpha = np.where(clear, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if mode == "L+tRNS":
        return _save(Image.fromarray(grey, "L"), "PNG", transparency=7), expected
    if mode == "RGB+tRNS":
        return _save(Image.fromarray(rgb, "RGB"), "PNG", transparency=(7, 7, 7)), expected
    if mode == "LA":
        return _save(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"), expected
    if mode == "RGBA":
        return _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), expected
    if mode == "I;16+tRNS":
        return _save(Image.fromarray(grey.astype(np.uint16) * 257), "PNG", transparency=7 * 257), expected
    palette = Image.fromarray(grey, "L").convert("P")
    index = palette.getpalette()[::3].index(7) if clear.any() else 0
    return _save(palette, "PNG", transparency=index), expected


def _broken_archive(rng: np.random.Generator) -> tuple[str, bytes, int]:
    """An archive with a broken header somewhere; ``(suffix, bytes, image members before the break)``."""
    import tarfile

    members = [(f"m{i}.jpg", _save(_photo(16, 16), "JPEG")) for i in range(int(rng.integers(1, 4)))]
    kind = ["cut-tar", "junk-tar-header", "zip-no-directory", "zip-bad-local-header"][int(rng.integers(4))]
    if kind in ("cut-tar", "junk-tar-header"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        end = sum(512 + -(-len(d) // 512) * 512 for _, d in members)  # where the end-of-archive block starts
        keep = end + int(rng.integers(-400, 500))  # inside the last member, or inside the end block
        if kind == "junk-tar-header":  # the second member's header (or the end block) overwritten
            at = 512 + -(-len(members[0][1]) // 512) * 512
            return ".tar", data[:at] + bytes(rng.integers(1, 256, 512, dtype=np.uint8)) + data[at + 512:], -1
        return ".tar", data[:keep], -1
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    data = buf.getvalue()
    if kind == "zip-no-directory":
        return ".zip", data[:data.find(b"PK\x01\x02")], 0
    bad = bytearray(data)
    bad[0:4] = b"XXXX"  # the first member's local header
    return ".zip", bytes(bad), len(members)


@pytest.mark.parametrize("seed", range(24))
def test_generated_collections_give_one_row_per_object(tmp_path, seed):
    """Hidden files, broken archive headers and mixed alpha modes: every listed object gives its rows, every
    other file is a counted skip; pictures saved in different alpha modes decode to the same pixels."""
    from maskmodel.io import storage
    from maskmodel.models.classifier import ModelCard
    from maskmodel.score.loading import load_archive, load_batch

    rng = np.random.default_rng(seed)
    card = ModelCard(arch="resnet18", classes=("mask", "no_mask"), input_size=16, resize_size=18)
    written, pixels, archives_made = 0, {}, {}
    modes = ["L+tRNS", "RGB+tRNS", "P", "LA", "RGBA", "I;16+tRNS"]
    for i in range(int(rng.integers(3, 9))):
        what = rng.random()
        if what < 0.5:
            data, expected = _alpha_picture(rng, modes[int(rng.integers(len(modes)))])
            rel = f"d{i % 2}/p{i}.png"
            pixels[rel] = expected
        elif what < 0.7:
            suffix, data, _ = _broken_archive(rng)
            rel = f"a{i}{suffix}"
            archives_made[rel] = True
        else:
            rel = [f".thumbs/t{i}.png", f"._p{i}.png", f"d0/.p{i}.png", f"notes{i}.txt"][int(rng.integers(4))]
            data = b"\x00\x05\x16\x07" + bytes(40)  # AppleDouble-like bytes: never an image
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
        written += 1
    objects, left = storage.list_objects(str(tmp_path), extensions=("png", "tar", "zip"))
    assert len(objects) + left.total == written  # every file: listed or counted
    assert len(objects) == len(pixels) + len(archives_made)
    loose = [o.uri for o in objects if not o.uri.endswith((".tar", ".zip"))]
    rows = load_batch({"path": np.array(loose, dtype=object)}, card=card, max_bytes=1 << 20, max_pixels=1 << 20)
    assert sorted(rows["path"].tolist()) == sorted(loose)  # one row each
    for path, err, img, w, h in zip(rows["path"], rows["error"], rows["image"], rows["image_w"], rows["image_h"]):
        rel = path[len(str(tmp_path)) + 1:]
        assert err is None, (rel, err)
        assert np.array_equal(np.frombuffer(img, np.uint8).reshape(h, w, 3), pixels[rel]), rel
    for rel in archives_made:
        uri = str(tmp_path / rel)
        got = [r for b in load_archive({"path": np.array([uri], dtype=object)}, card=card, max_bytes=1 << 20,
                                       extensions=("jpg",)) for r in b["path"].tolist()]
        assert got and len(got) == len(set(got)), (rel, got)  # at least the archive's own row, no key twice
        errors = [e for b in load_archive({"path": np.array([uri], dtype=object)}, card=card, max_bytes=1 << 20,
                                          extensions=("jpg",)) for e in b["error"].tolist() if e]
        assert errors, (rel, got)  # the break says so in a row


def test_a_tar_with_junk_where_a_header_belongs_says_so_in_a_row():
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("a.jpg", "b.jpg", "c.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 100
            tar.addfile(info, io.BytesIO(b"x" * 100))
    data = bytearray(buf.getvalue())
    data[1024:1536] = b"\x01" * 512  # b.jpg's header: c.jpg cannot be reached
    rows = list(archives.iter_tar(io.BytesIO(bytes(data)), extensions=("jpg",), max_bytes=1 << 20))
    assert [r.name for r in rows if isinstance(r, archives.Member)] == ["a.jpg"]
    assert [r.reason for r in rows if isinstance(r, archives.Damage)] == [
        "corrupt archive: tar header at byte 1024: invalid header"]
