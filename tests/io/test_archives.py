"""Reading images out of tar and zip archives: members, reasons, damage, bombs. Pure, no Ray."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import zipfile
import zlib

import pytest

from maskmodel.io.archives import (
    Member,
    archive_kind,
    iter_tar,
    iter_zip,
    member_uri,
    split_member_uri,
    zip_index,
)

EXT = ("jpg", "png")


def _tar(members: dict[str, bytes], *, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes], **kw) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", **kw) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _rows(items):
    return [(m.name, m.data, m.error) if isinstance(m, Member) else ("DAMAGE", m.reason) for m in items]


def test_member_paths_parse_back():
    assert member_uri("s3://b/d/x.tar", "cam3/1.jpg") == "s3://b/d/x.tar#cam3/1.jpg"
    assert split_member_uri("s3://b/d/x.tar#cam3/1.jpg") == ("s3://b/d/x.tar", "cam3/1.jpg")
    assert split_member_uri("s3://b/odd#name/x.TGZ#a#b.jpg") == ("s3://b/odd#name/x.TGZ", "a#b.jpg")
    assert split_member_uri("s3://b/photo#1.jpg") == ("s3://b/photo#1.jpg", None)
    assert [archive_kind(u) for u in ("a.tar", "a.TAR.GZ", "a.tgz", "a.zip", "a.jpg")] == ["tar", "tar", "tar", "zip", None]


@pytest.mark.parametrize("gz", [False, True])
def test_tar_members_in_order_non_images_ignored(gz):
    data = _tar({"a/1.jpg": b"one", "a/notes.txt": b"x", "a/2.PNG": b"two", "../up.jpg": b"u", "/abs.jpg": b"a"},
                gz=gz)
    rows = _rows(iter_tar(io.BytesIO(data), extensions=EXT, max_bytes=100))
    assert rows == [("a/1.jpg", b"one", None), ("a/2.PNG", b"two", None),
                    ("../up.jpg", None, "unsafe member path: '..'"), ("/abs.jpg", None, "unsafe member path: absolute")]


def test_tar_limits_skip_and_links():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"big.jpg": b"x" * 50, "ok.jpg": b"fine", "done.jpg": b"seen"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "ok.jpg"
        tar.addfile(link)
    rows = _rows(iter_tar(io.BytesIO(buf.getvalue()), extensions=EXT, max_bytes=10, skip=lambda n: n == "done.jpg"))
    assert rows == [("big.jpg", None, "too large: 50 bytes > 10"), ("ok.jpg", b"fine", None),
                    ("link.jpg", None, "unsupported member: link or device")]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cut", [0.4, 0.66, 0.8])
def test_truncated_tar_keeps_the_members_before_the_damage(gz, cut):
    members = {f"{i}.jpg": random.Random(i).randbytes(3000) for i in range(6)}
    data = _tar(members, gz=gz)
    content = len(data) if gz else 6 * (512 + 3072)  # the members, without the zero padding a plain tar ends with
    rows = _rows(iter_tar(io.BytesIO(data[: int(content * cut)]), extensions=EXT, max_bytes=10_000))
    assert rows[-1] == ("DAMAGE", "truncated archive")
    assert 1 <= len(rows) - 1 < 6 and all(r[2] is None and r[1] == members[r[0]] for r in rows[:-1])


def test_tar_cut_between_members_is_truncated_too():
    one, two = _tar({"a.jpg": b"A" * 512}), _tar({"a.jpg": b"A" * 512, "b.jpg": b"B" * 512})
    assert _rows(iter_tar(io.BytesIO(one), extensions=EXT, max_bytes=10_000)) == [("a.jpg", b"A" * 512, None)]
    cut = two[:1024]  # a's header and data, then nothing: no b, and no end-of-archive block
    assert _rows(iter_tar(io.BytesIO(cut), extensions=EXT, max_bytes=10_000)) == [
        ("a.jpg", b"A" * 512, None), ("DAMAGE", "truncated archive")]


def test_garbage_is_a_corrupt_archive():
    rows = _rows(iter_tar(io.BytesIO(b"this is not a tar file at all" * 40), extensions=EXT, max_bytes=100))
    assert rows[0][0] == "DAMAGE" and rows[0][1].startswith(("corrupt archive", "truncated archive"))


def test_gzip_bomb_stops_the_stream():
    bomb = _tar({f"{i}.jpg": b"\0" * (4 << 20) for i in range(40)})  # 160 MB of zeros: gzip makes it ~160 KB
    rows = _rows(iter_tar(io.BytesIO(gzip.compress(bomb)), extensions=EXT, max_bytes=8 << 20))
    assert rows[-1][0] == "DAMAGE" and "compression ratio" in rows[-1][1] and len(rows) < 40


def test_zip_members_ranges_and_reasons():
    data = _zip({"a/1.jpg": b"one", "a/x.txt": b"t", "a/2.jpg": b"two", "../3.jpg": b"3", "big.jpg": b"b" * 500,
                 "zeros.jpg": b"\0" * 200_000}, compression=zipfile.ZIP_DEFLATED)
    rows = _rows(iter_zip(io.BytesIO(data), extensions=EXT, max_bytes=300_000))
    assert rows[:4] == [("a/1.jpg", b"one", None), ("a/2.jpg", b"two", None),
                        ("../3.jpg", None, "unsafe member path: '..'"), ("big.jpg", b"b" * 500, None)]
    assert rows[4][0] == "zeros.jpg" and rows[4][2].startswith("compression ratio over 100:1")
    assert len(zip_index(io.BytesIO(data))) == 6
    # A range: entries 2..3 of the central directory (the txt member counts as an entry).
    assert _rows(iter_zip(io.BytesIO(data), extensions=EXT, max_bytes=1000, first=2, count=2)) == [
        ("a/2.jpg", b"two", None), ("../3.jpg", None, "unsafe member path: '..'")]


def test_zip_encrypted_corrupt_and_truncated():
    a, b = random.Random(0).randbytes(1000), random.Random(1).randbytes(1000)  # incompressible, like JPEGs
    data = bytearray(_zip({"a.jpg": a, "b.jpg": b}, compression=zipfile.ZIP_DEFLATED))
    # Flag the first member as encrypted in its central-directory entry.
    cd = data.find(b"PK\x01\x02")
    data[cd + 8] |= 0x1
    rows = _rows(iter_zip(io.BytesIO(bytes(data)), extensions=EXT, max_bytes=10_000))
    assert rows[0] == ("a.jpg", None, "encrypted member") and rows[1] == ("b.jpg", b, None)
    plain = bytearray(_zip({"a.jpg": a, "b.jpg": b}, compression=zipfile.ZIP_DEFLATED))
    plain[400:420] = b"\xff" * 20  # inside the first member's compressed data
    rows = _rows(iter_zip(io.BytesIO(bytes(plain)), extensions=EXT, max_bytes=10_000))
    assert rows[0][0] == "a.jpg" and rows[0][2].startswith("corrupt member") and rows[1][2] is None
    cut = _zip({"a.jpg": b"A" * 1000})[:-30]
    assert _rows(iter_zip(io.BytesIO(cut), extensions=EXT, max_bytes=10_000)) == [
        ("DAMAGE", "corrupt archive: no zip central directory (truncated?)")]
    with pytest.raises(ValueError, match="central directory"):
        zip_index(io.BytesIO(cut))


def test_a_storage_failure_mid_stream_is_unreadable_not_corrupt():
    data = _tar({f"{i}.jpg": bytes([i]) * 5000 for i in range(5)})

    class Flaky(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 8000:
                raise ConnectionResetError("peer went away")
            return super().read(n)

    rows = _rows(iter_tar(Flaky(data), extensions=EXT, max_bytes=10_000))
    assert rows[-1] == ("DAMAGE", "unreadable: ConnectionResetError")


def _jpegs(n: int, size: tuple[int, int], name: str) -> dict[str, bytes]:
    """``n`` small distinct JPEGs named ``name.format(i)``."""
    from PIL import Image

    pics = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", size, (30 * i, 10, 10)).save(buf, "JPEG")
        pics[name.format(i)] = buf.getvalue()
    return pics


def test_a_zip_split_into_ranges_is_read_once_member_by_member(tmp_path):
    import numpy as np

    from maskmodel.models.classifier import ModelCard
    from maskmodel.score.loading import load_archive, zip_ranges

    pics = _jpegs(7, (40, 30), "m/{}.jpg")
    uri = str(tmp_path / "a.zip")
    with open(uri, "wb") as f:
        f.write(_zip({**pics, "m/readme.txt": b"x"}))
    ranges = zip_ranges({"path": np.array([uri], dtype=object)}, per_task=3)
    assert list(zip(ranges["first"], ranges["count"])) == [(0, 3), (3, 3), (6, 3)]  # 8 entries, 3 per task
    card = ModelCard(arch="resnet18", classes=("mask", "no_mask"), input_size=16, resize_size=18)
    names = []
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in ranges.items()}
        for batch in load_archive(one, card=card, max_bytes=1 << 20, extensions=("jpg",), rows_per_batch=2):
            assert batch["pixels"].shape[1:] == (3, 16, 16) and len(batch["path"]) <= 2
            names += list(batch["member"])
            assert all(e is None for e in batch["error"]) and set(batch["width"]) == {40}
    assert sorted(names) == sorted(pics)  # every image member once, the text member never


def test_load_archive_skips_scored_members_and_whole_archives(tmp_path):
    import numpy as np

    from maskmodel.io import fetch, objectkeys
    from maskmodel.models.classifier import ModelCard
    from maskmodel.score.loading import load_archive

    pics = _jpegs(3, (20, 20), "{}.jpg")
    uri = str(tmp_path / "a.tar")
    with open(uri, "wb") as f:
        f.write(_tar(pics))
    version = fetch.open_stream(uri)[2]
    card = ModelCard(arch="resnet18", classes=("mask", "no_mask"), input_size=16, resize_size=18)
    batch = {"path": np.array([uri], dtype=object)}

    def members(skip):
        keys = np.sort(objectkeys.object_keys(skip, [version] * len(skip)))
        return [m for b in load_archive(batch, card=card, max_bytes=1 << 20, extensions=("jpg",), skip_keys=keys)
                for m in b["member"]]

    assert members([member_uri(uri, "1.jpg")]) == ["0.jpg", "2.jpg"]  # read again: the scored member is skipped
    assert members([uri]) == []  # the whole archive, unchanged: not read


# --- one row for every object, with one identity per row (issue 20) ---

def _load_rows(uri: str, *, skip: tuple[str, ...] = (), max_bytes: int = 1 << 20) -> list[tuple]:
    """``(path, member, error)`` of every row :func:`load_archive` makes for the archive at ``uri``."""
    import numpy as np

    from maskmodel.io import fetch
    from maskmodel.models.classifier import ModelCard
    from maskmodel.results import incremental
    from maskmodel.score.loading import load_archive, zip_ranges

    card = ModelCard(arch="resnet18", classes=("mask", "no_mask"), input_size=16, resize_size=18)
    version = fetch.open_stream(uri)[2]
    keys = np.sort(incremental.object_keys(list(skip), [version] * len(skip)))
    out = []
    for batch in load_archive(zip_ranges({"path": np.array([uri], dtype=object)}), card=card, max_bytes=max_bytes,
                              extensions=EXT, skip_keys=keys):
        out += list(zip(batch["path"], batch["member"], batch["error"]))
    return out


def _write(tmp_path, name: str, data: bytes) -> str:
    uri = str(tmp_path / name)
    with open(uri, "wb") as f:
        f.write(data)
    return uri


def _tar_entries(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_name_repeated_in_a_tar_or_zip_gets_an_ordinal_from_its_second_occurrence(tmp_path):
    pics = list(_jpegs(4, (20, 20), "{}").values())
    entries = [("a.jpg", pics[0]), ("b.jpg", pics[1]), ("a.jpg", pics[2]), ("a.jpg", pics[3])]
    tar = _write(tmp_path, "dup.tar", _tar_entries(entries))
    assert _load_rows(tar) == [(f"{tar}#a.jpg", "a.jpg", None), (f"{tar}#b.jpg", "b.jpg", None),
                               (f"{tar}#a.jpg#2", "a.jpg", None), (f"{tar}#a.jpg#3", "a.jpg", None)]
    assert split_member_uri(f"{tar}#a.jpg#2") == (tar, "a.jpg#2")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for name, data in entries:
            z.writestr(name, data)
    zp = _write(tmp_path, "dup.zip", buf.getvalue())
    assert _load_rows(zp) == [(f"{zp}#a.jpg", "a.jpg", None), (f"{zp}#b.jpg", "b.jpg", None),
                              (f"{zp}#a.jpg#2", "a.jpg", None), (f"{zp}#a.jpg#3", "a.jpg", None)]
    # Ranges of a zip number names over the whole directory: the second range still says #3.
    rows = _rows(iter_zip(io.BytesIO(buf.getvalue()), extensions=EXT, max_bytes=1 << 20, first=3, count=1))
    assert [m.key for m in iter_zip(io.BytesIO(buf.getvalue()), extensions=EXT, max_bytes=1 << 20, first=3,
                                     count=1)] == ["a.jpg#3"] and rows[0][0] == "a.jpg"


def _unflag_utf8(data: bytes) -> bytes:
    """The zip with the UTF-8 name flag cleared in every local and central header (as Info-ZIP on Linux writes)."""
    out = bytearray(data)
    for sig, at in ((b"PK\x03\x04", 7), (b"PK\x01\x02", 9)):
        i = out.find(sig)
        while i != -1:
            out[i + at] &= ~0x08 & 0xFF
            i = out.find(sig, i + 4)
    return bytes(out)


def test_zip_names_are_read_as_written_utf8_without_the_flag_and_the_unicode_path_field(tmp_path):
    pics = list(_jpegs(3, (20, 20), "{}").values())
    raw = _unflag_utf8(_zip({"café.jpg": pics[0]}))
    assert zipfile.ZipFile(io.BytesIO(raw)).namelist() == ["caf├⌐.jpg"]  # what zipfile alone makes of it
    zp = _write(tmp_path, "linux.zip", raw)
    assert _load_rows(zp) == [(f"{zp}#café.jpg", "café.jpg", None)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for header, unicode, crc_of, data in (("photo_1.jpg", "фото.jpg", b"photo_1.jpg", pics[1]),
                                              ("old.jpg", "stale.jpg", b"renamed.jpg", pics[2])):
            info = zipfile.ZipInfo(header)
            body = b"\x01" + zlib.crc32(crc_of).to_bytes(4, "little") + unicode.encode()
            info.extra = (0x7075).to_bytes(2, "little") + len(body).to_bytes(2, "little") + body
            z.writestr(info, data)
    zp = _write(tmp_path, "infozip.zip", buf.getvalue())
    # The field wins when its CRC matches the header name; a stale one (name changed since) is ignored.
    assert _load_rows(zp) == [(f"{zp}#фото.jpg", "фото.jpg", None), (f"{zp}#old.jpg", "old.jpg", None)]


def test_a_multi_member_gzip_tar_is_read_to_its_end(tmp_path):
    pics = _jpegs(5, (20, 20), "{}.jpg")
    plain = _tar(pics)
    cuts = [0, 1500, 4000, len(plain)]  # three gzip members, cut anywhere (bgzip cuts mid-header too)
    multi = b"".join(gzip.compress(plain[a:b]) for a, b in zip(cuts, cuts[1:]))
    uri = _write(tmp_path, "multi.tar.gz", multi + b"\0" * 64)  # zero padding after the last member is ignored
    assert _load_rows(uri) == [(f"{uri}#{n}", n, None) for n in pics]
    cut = _write(tmp_path, "cut.tar.gz", multi[: len(multi) - 40])
    rows = _load_rows(cut)
    assert rows[-1] == (cut, None, "truncated archive") and all(e is None for _, _, e in rows[:-1])


def test_an_archive_without_image_members_gets_one_row_saying_why(tmp_path):
    inner = _tar(_jpegs(2, (20, 20), "{}.jpg"))
    nested = _write(tmp_path, "outer.tar", _tar({"inner.tar": inner, "notes.txt": b"x"}))
    assert _load_rows(nested) == [(nested, None, "nested archive not read: inner.tar")]
    texts = _write(tmp_path, "texts.tgz", _tar({"a.txt": b"x"}, gz=True))
    assert _load_rows(texts) == [(texts, None, "no image members")]
    zipped = _write(tmp_path, "outer.zip", _zip({"d/": b"", "inner.zip": _zip({"x.jpg": b"x"})}))
    assert _load_rows(zipped) == [(zipped, None, "nested archive not read: inner.zip")]
    empty = _write(tmp_path, "empty.zip", _zip({}))
    assert _load_rows(empty) == [(empty, None, "no image members")]
    # Image members and a nested archive: the members' rows account for the object.
    both = _write(tmp_path, "both.tar", _tar({"inner.tar": inner, **_jpegs(1, (20, 20), "{}.jpg")}))
    assert _load_rows(both) == [(f"{both}#0.jpg", "0.jpg", None)]


def test_rejected_members_are_checked_against_the_skip_list_too(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"../up.jpg": b"u", "big.jpg": b"x" * 5000, "ok.jpg": b"fine"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "ok.jpg"
        tar.addfile(link)
    uri = _write(tmp_path, "rejects.tar", buf.getvalue())
    first = _load_rows(uri, max_bytes=1000)
    assert first == [(f"{uri}#../up.jpg", "../up.jpg", "unsafe member path: '..'"),
                     (f"{uri}#big.jpg", "big.jpg", "too large: 5000 bytes > 1000"),
                     (f"{uri}#ok.jpg", "ok.jpg", "not an image"),
                     (f"{uri}#link.jpg", "link.jpg", "unsupported member: link or device")]
    # Read again (say its last run also had a read failure): every row already written is skipped.
    assert _load_rows(uri, max_bytes=1000, skip=tuple(p for p, _, _ in first)) == []
    zp = _write(tmp_path, "rejects.zip", _encrypt_first(_zip({"secret.jpg": b"s", "big.jpg": b"x" * 5000})))
    rows = _load_rows(zp, max_bytes=1000)
    assert [e for _, _, e in rows] == ["encrypted member", "too large: 5000 bytes > 1000"]
    assert _load_rows(zp, max_bytes=1000, skip=tuple(p for p, _, _ in rows)) == []


def _encrypt_first(zip_bytes: bytes) -> bytes:
    data = bytearray(zip_bytes)
    data[data.find(b"PK\x01\x02") + 8] |= 0x1  # the central directory's "encrypted" flag
    return bytes(data)
