"""The load step of scoring, on CPUs: objects and archive members in, uint8 crops (or JPEG bytes) out.

Plain functions, no Ray. :func:`load_batch` reads a batch of loose objects
concurrently (one request each, the version from the response), decodes JPEGs
at the reduced size the model needs and crops them to ``uint8 (N, 3, S, S)``;
with GPU decoding it checks the headers of each JPEG and passes the compressed
bytes of those the device decodes exactly as the CPU would (:func:`device_route`)
on, and the crops of the rest.
:func:`load_archive` streams one tar, or reads a range of one zip's members,
and yields the same columns for every image member. Every failure is a reason
in its row: nothing is dropped, and one bad object never stops the job.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from maskmodel.data.facecrop import decode_photo
from maskmodel.data.transforms import EvalCrop, preprocess_image
from maskmodel.errors import UserError
from maskmodel.io import archives, fetch, objectkeys
from maskmodel.io.decode import DecodeError, probe, too_large_bytes
from maskmodel.io.fetch import read_error_reason
from maskmodel.models.classifier import ModelCard
from maskmodel.score.gpu_decode import device_scan_problem

#: The columns of a load batch with CPU decoding: ``pixels`` is ``uint8 (N, 3, S, S)``.
COLUMNS = ("path", "version", "size", "error", "width", "height", "pixels", "archive", "member")
#: The columns of a load batch with GPU decoding: no ``pixels``; ``data`` (bytes) is the compressed JPEG where
#: ``encoded`` is true (decoded on the predictor's device), else the row's ``uint8 (3, S, S)`` crop, C order
#: (decoded here), or empty for an error row. Nothing is shipped twice, and no placeholder pixels.
DEVICE_COLUMNS = ("path", "version", "size", "error", "width", "height", "data", "encoded", "archive", "member")
#: The columns of a load batch with a face stage: ``image`` (bytes) is the row's whole picture, decoded once,
#: ``uint8 (image_h, image_w, 3)`` RGB C order, at most ``max_pixels`` (``width``/``height`` stay the original's;
#: empty for an error row). The predictor finds the faces in it and cuts their crops from it.
FACE_COLUMNS = ("path", "version", "size", "error", "width", "height", "image", "image_w", "image_h", "archive",
                "member")
ZIP_MEMBERS_PER_TASK = 256  # a zip's central-directory entries per load task: big zips spread over the cluster


#: Formats the GPU path decodes (nvJPEG); everything else is decoded on the CPU in the load step.
GPU_FORMATS = ("JPEG",)
#: Pillow modes of the JPEGs sent to the GPU: YCbCr (Pillow's RGB) and greyscale. CMYK / YCCK (Adobe) JPEGs
#: need the CPU's colour conversion.
GPU_MODES = ("RGB", "L")
#: Largest JPEG (pixels) sent to the GPU. nvJPEG decodes at full size, where libjpeg decodes at 1/8 scale when
#: the model needs that little, so a huge picture costs the device far more than it costs a CPU.
DEVICE_MAX_PIXELS = 50_000_000


def device_route(data: bytes, *, max_bytes: int | None = None) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG the device decodes as the CPU would; ``None``: decode it on the CPU.

    The device gets a baseline-colour (YCbCr or grey) JPEG that is complete
    (:func:`maskmodel.io.decode.probe` checks the stream reaches its end marker), upright (nvJPEG ignores the EXIF orientation, so
    a rotated or mirrored phone photo would be scored sideways), at most
    :data:`DEVICE_MAX_PIXELS`, baseline in one scan, and whose scan data shows
    no damage (:func:`maskmodel.score.gpu_decode.device_scan_problem`: progressive
    JPEGs and suspect scans go to the CPU). Raises :class:`DecodeError` for what
    the headers reveal (the CPU path's reasons).
    """
    p = probe(data, max_bytes=max_bytes)
    if (p.format in GPU_FORMATS and p.mode in GPU_MODES and p.orientation == 1
            and p.width * p.height <= DEVICE_MAX_PIXELS and device_scan_problem(data) is None):
        return p.width, p.height
    return None


def decode_reason(error: Exception) -> str:
    """The results table's reason for an image that failed to decode: a :class:`DecodeError`'s own text, else
    ``undecodable: <exception type>`` (one odd file must never stop the job). The CPU path and the GPU path's
    CPU fallback both use it, so a row's reason never depends on where it was decoded."""
    return str(error) if isinstance(error, DecodeError) else f"undecodable: {type(error).__name__}"


def column(batch: dict[str, Any], name: str, n: int) -> list[Any]:
    """A column as a list with None for missing values; Ray may hand an all-null column over as NaN floats."""
    if name not in batch:
        return [None] * n
    return [None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else v for v in batch[name]]


class _Rows:
    """Load-step rows as they are made: each object or member decoded and cropped (or routed to the GPU) on add."""

    def __init__(self, card: ModelCard, *, max_bytes: int, gpu_decode: bool, max_pixels: int | None = None) -> None:
        self.crop = EvalCrop(crop_size=card.input_size, resize_size=card.resize_size)
        self.max_bytes, self.gpu_decode, self.max_pixels = max_bytes, gpu_decode and not max_pixels, max_pixels
        self.shape = (3, card.input_size, card.input_size)
        self.zero = np.zeros(self.shape, dtype=np.uint8)
        names = FACE_COLUMNS if max_pixels else DEVICE_COLUMNS if self.gpu_decode else COLUMNS
        self.cols: dict[str, list[Any]] = {c: [] for c in names}

    def __len__(self) -> int:
        return len(self.cols["path"])

    def prepare(self, data: bytes | None, error: str | None = None) -> tuple[Any, ...]:
        """``(pixels, width, height, encoded, error)`` of one object's bytes, ``pixels`` being the crop, or the
        compressed bytes where ``encoded``; thread-safe (Pillow and torch release the GIL while decoding)."""
        pixels, width, height, encoded = None, -1, -1, False
        if error is None and data is not None and self.max_pixels:
            try:  # the whole picture, once, for the detector and the face crops alike
                d = decode_photo(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
                pixels, width, height = np.asarray(d.image, dtype=np.uint8), d.width, d.height
            except Exception as e:  # noqa: BLE001 - one odd file must never stop the job
                error = decode_reason(e)
            return pixels, width, height, encoded, error
        if error is None and data is not None:
            try:
                size = device_route(data, max_bytes=self.max_bytes) if self.gpu_decode else None
                if size is not None:
                    pixels, (width, height), encoded = data, size, True
                else:
                    pixels, width, height = preprocess_image(data, self.crop, max_bytes=self.max_bytes)
            except Exception as e:  # noqa: BLE001 - one odd file must never stop the job
                error = decode_reason(e)
        return pixels, width, height, encoded, error

    def add(self, path: str, version: str | None, size: int | None, *, data: bytes | None = None,
            error: str | None = None, archive: str | None = None, member: str | None = None,
            prepared: tuple[Any, ...] | None = None) -> None:
        pixels, width, height, encoded, error = prepared or self.prepare(data, error)
        if self.max_pixels:
            value = {"image": b"" if pixels is None else pixels.tobytes(),
                     "image_w": 0 if pixels is None else pixels.shape[1],
                     "image_h": 0 if pixels is None else pixels.shape[0]}
        elif self.gpu_decode:
            value = {"data": b"" if pixels is None else pixels if encoded else pixels.tobytes(), "encoded": encoded}
        else:
            value = {"pixels": self.zero if pixels is None else pixels}
        for name, v in (("path", path), ("version", version), ("size", size), ("error", error),
                        ("width", width), ("height", height), ("archive", archive), ("member", member),
                        *value.items()):
            self.cols[name].append(v)

    def take(self) -> dict[str, np.ndarray]:
        """The rows so far as a batch (and start over): :data:`DEVICE_COLUMNS` with GPU decoding, else
        :data:`COLUMNS`."""
        c, k = self.cols, len(self)
        out = {name: np.array(c[name], dtype=object) for name in ("path", "version", "size", "error", "archive",
                                                                 "member")}
        out["width"], out["height"] = np.array(c["width"], np.int32), np.array(c["height"], np.int32)
        if self.max_pixels:
            out["image"] = np.array(c["image"], dtype=object)
            out["image_w"], out["image_h"] = np.array(c["image_w"], np.int32), np.array(c["image_h"], np.int32)
        elif self.gpu_decode:
            out["data"], out["encoded"] = np.array(c["data"], dtype=object), np.array(c["encoded"], dtype=bool)
        else:
            out["pixels"] = np.stack(c["pixels"]) if k else np.zeros((0, *self.shape), np.uint8)
        self.cols = {name: [] for name in self.cols}
        return out


def load_batch(batch: dict[str, Any], *, card: ModelCard, max_bytes: int, skip_keys: np.ndarray | None = None,
               gpu_decode: bool = False, concurrency: int = 32, decode_threads: int = 1,
               max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """Read, decode and crop a batch of loose objects (columns ``path`` [, ``version``, ``size``]).

    Returns :data:`COLUMNS` (``pixels`` is ``uint8 (N, 3, S, S)``; ``archive``
    and ``member`` are empty for loose objects) or, with ``gpu_decode``,
    :data:`DEVICE_COLUMNS`: the compressed bytes of the JPEGs :func:`device_route`
    sends to the predictor's GPU, the crops of the rest. A failing object keeps
    its row with ``error`` set (zero or empty pixels, width -1). Objects
    are read ``concurrency`` at a time, one request each; the row's version
    and size come from that read. Objects whose ``(path, version)`` is in
    ``skip_keys`` are dropped (for objects of unknown version, one HEAD
    each first, so a skipped object is never downloaded). ``decode_threads``
    decode at once: where the load step runs inside a predictor actor, the
    actor's cores are idle while it loads, so it uses all of them.
    ``max_pixels`` (a face stage follows): :data:`FACE_COLUMNS` instead, each
    picture decoded whole, once, to at most that many pixels.
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    versions, sizes = column(batch, "version", n), column(batch, "size", n)
    keep = list(range(n))
    if skip_keys is not None and len(skip_keys):
        unknown = [i for i in keep if versions[i] is None]
        for i, got in zip(unknown, fetch.read_many([paths[i] for i in unknown], max_bytes=0, head=True,
                                                   concurrency=concurrency)):
            versions[i] = got.version
        seen = objectkeys.contains(skip_keys, objectkeys.object_keys(paths, versions))
        keep = [i for i in keep if versions[i] is None or not seen[i]]
    rows = _Rows(card, max_bytes=max_bytes, gpu_decode=gpu_decode, max_pixels=max_pixels)
    fetched = fetch.read_many([paths[i] for i in keep], max_bytes=max_bytes, concurrency=concurrency)
    failed = [read_error_reason(g.error) if g.error is not None else
              too_large_bytes(int(g.size or 0), max_bytes) if g.data is None else None for g in fetched]
    jobs = [(g.data, e) for g, e in zip(fetched, failed)]
    if decode_threads > 1 and len(jobs) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(decode_threads, len(jobs))) as pool:
            prepared = list(pool.map(lambda job: rows.prepare(*job), jobs))
    else:
        prepared = [rows.prepare(*job) for job in jobs]
    for i, got, ready in zip(keep, fetched, prepared):
        version, size = got.version or versions[i], got.size if got.size is not None else sizes[i]
        rows.add(paths[i], version, size, prepared=ready)
    return rows.take()


def zip_ranges(batch: dict[str, Any], *, per_task: int = ZIP_MEMBERS_PER_TASK) -> dict[str, np.ndarray]:
    """Archive rows to load tasks: each zip becomes ranges of ``per_task`` central-directory entries; a tar stays whole.

    Adds ``first`` and ``count`` (``-1``: to the end). A zip whose directory
    cannot be read stays one row; loading it then reports why.
    """
    out: dict[str, list[Any]] = {"path": [], "version": [], "size": [], "first": [], "count": []}
    n = len(batch["path"])
    versions, sizes = column(batch, "version", n), column(batch, "size", n)
    for path, version, size in zip((str(p) for p in batch["path"]), versions, sizes):
        spans = [(0, -1)]
        if archives.archive_kind(path) == "zip":
            try:
                f, size, version = fetch.open_ranged(path, block_size=1 << 20)
                with f:
                    entries = len(archives.zip_index(f))
                spans = [(k, per_task) for k in range(0, max(entries, 1), per_task)]
            except (UserError, ValueError):
                pass
        for first, count in spans:
            for name, value in (("path", path), ("version", version), ("size", size), ("first", first),
                                ("count", count)):
                out[name].append(value)
    return {k: np.array(v, dtype=np.int64 if k in ("first", "count") else object) for k, v in out.items()}


def load_archive(batch: dict[str, Any], *, card: ModelCard, max_bytes: int, extensions: Sequence[str],
                 skip_keys: np.ndarray | None = None, gpu_decode: bool = False, rows_per_batch: int = 32,
                 max_ratio: float = archives.DEFAULT_MAX_RATIO,
                 max_pixels: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Rows for the image members of each archive (or zip range) in ``batch``, ``rows_per_batch`` at a time.

    A member's row: ``path`` ``<archive>#<member>``, the archive's version, the
    member's size, ``archive`` and the member's name in ``member`` (``path``
    holds its key: :func:`maskmodel.io.archives.member_key`). A tar is read
    front to back through one request; a zip range by ranged reads in large
    blocks. An archive that breaks part-way gets one more row, for the archive
    itself, with the reason; one that cannot be read at all, or holds no image
    member, gets that row only. A whole archive whose ``(archive, version)``
    is in ``skip_keys`` is skipped, as is each member (rejected ones too)
    whose ``(path, version)`` is. ``max_pixels``: as in :func:`load_batch`.
    """
    rows = _Rows(card, max_bytes=max_bytes, gpu_decode=gpu_decode, max_pixels=max_pixels)
    n = len(batch["path"])
    firsts, counts = column(batch, "first", n), column(batch, "count", n)
    for path, first, count in zip((str(p) for p in batch["path"]), firsts, counts):
        kind = archives.archive_kind(path)
        try:
            f, size, version = (fetch.open_stream(path) if kind == "tar" else
                                fetch.open_ranged(path))
        except UserError as e:
            rows.add(path, None, None, error=read_error_reason(e.__cause__ or e), archive=path)
            continue
        has = (lambda key_paths: objectkeys.contains(skip_keys, objectkeys.object_keys(key_paths, [version] * len(key_paths)))
               ) if skip_keys is not None and len(skip_keys) else None
        if has is not None and has([path])[0]:
            f.close()
            continue

        def skip(key: str) -> bool:  # every member, rejected ones too: a re-read archive adds no row twice
            return has is not None and bool(has([archives.member_uri(path, key)])[0])

        with f:
            common = dict(extensions=extensions, max_bytes=max_bytes, max_ratio=max_ratio, skip=skip)
            items = (archives.iter_tar(f, **common) if kind == "tar" else
                     archives.iter_zip(f, first=int(first or 0), count=None if count in (None, -1) else int(count),
                                       **common))
            for item in items:
                if isinstance(item, archives.Damage):
                    rows.add(path, version, size, error=item.reason, archive=path)
                else:
                    rows.add(archives.member_uri(path, item.key), version, item.size, data=item.data,
                             error=item.error, archive=path, member=item.name)
                if len(rows) >= rows_per_batch:
                    yield rows.take()
    if len(rows):
        yield rows.take()
