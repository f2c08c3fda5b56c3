"""YOLO (Darknet / Ultralytics) face boxes: a folder of ``.txt`` label files in, each photo's raw boxes out.

:func:`maskmodel.data.annotations.read_yolo` turns what :func:`read_labels` finds into
:class:`~maskmodel.data.annotations.ImageBoxes`, like the COCO and VOC readers.

Each photo has a ``.txt`` of the same stem, one line per box:
``class cx cy w h``, the class an index into the class names, the box centre
and size normalised by the photo's width and height (a segment's polygon,
``class x1 y1 x2 y2 ...``, counts as its bounding box). The class names come
from the first classes file found in the folder or its parent
(:data:`CLASS_FILES`: ``classes.txt`` and ``obj.names`` one name per line,
``data.yaml``'s ``names`` list or ``{index: name}`` mapping). The photo sits
next to its ``.txt``, or in the Ultralytics layout under ``images/`` where the
``.txt`` is under ``labels/`` (``images/train/a.jpg`` for
``labels/train/a.txt``), or under ``images_root`` at the ``.txt``'s relative
path. Its size is read from its header with Pillow (no decode), upright after
EXIF rotation, the pixels the boxes are in.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.io.decode import IMAGE_EXTENSIONS, ORIENTATION_TAG

log = logging.getLogger(__name__)

#: Files that name the classes, looked for in the labels folder, then its parent.
CLASS_FILES = ("classes.txt", "obj.names", "data.yaml", "dataset.yaml")


def find_class_file(uri: str) -> str | None:
    """The URI of the classes file for the YOLO folder ``uri`` (:data:`CLASS_FILES`), or ``None``."""
    base = uri.rstrip("/")
    for folder in (base, base.rsplit("/", 1)[0] if "/" in base else base):
        names = set(storage.listdir(folder))
        for name in CLASS_FILES:
            if name in names:
                return storage.join(folder, name)
    return None


def read_class_names(uri: str) -> list[str]:
    """Class names in index order from a classes file; :class:`UserError` when it names none."""
    text = storage.read_text(uri)
    if uri.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            names = (yaml.safe_load(text) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as e:
            raise UserError(f"{uri!r} is not a usable YOLO data.yaml ({type(e).__name__}).") from e
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=int)]
        out = [str(n) for n in names or []]
    else:
        out = [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise UserError(f"{uri!r} names no classes; a YOLO classes file holds one name per line (data.yaml: names).")
    return out


def _photo_size(uri: str) -> tuple[int, int]:
    """``(width, height)`` of a photo from its header, upright after EXIF rotation."""
    from PIL import Image

    fs, path = storage.filesystem(uri)
    with storage.storage_errors(uri, "read"), fs.open(path, "rb") as f, Image.open(f) as im:
        width, height = im.size
        if im.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8):  # a quarter turn: the upright photo is transposed
            width, height = height, width
    return width, height


def _boxes(uri: str, text: str, names: list[str], width: int, height: int) -> list[tuple[list[float], str, dict]]:
    raw = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            index, values = int(float(parts[0])), [float(v) for v in parts[1:]]
            if len(values) == 4:
                cx, cy, w, h = values
                x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            elif len(values) >= 6 and len(values) % 2 == 0:  # a segment: its polygon's bounding box
                x0, x1, y0, y1 = min(values[::2]), max(values[::2]), min(values[1::2]), max(values[1::2])
            else:
                raise ValueError(f"{len(values)} numbers after the class")
            cls = names[index]
        except (ValueError, IndexError) as e:
            raise UserError(f"{uri!r} line {n} is not a YOLO box 'class cx cy w h' with a class among "
                            f"{len(names)} ({e}).") from e
        raw.append(([x0 * width, y0 * height, x1 * width, y1 * height], cls, {}))
    return raw


def _photo_index(uris: list[str]) -> dict[str, str]:
    """Photo URI by its stem's URI (extension dropped), over ``uris``."""
    exts = tuple(f".{e}" for e in IMAGE_EXTENSIONS)
    return {u.rsplit(".", 1)[0]: u for u in uris if u.lower().endswith(exts)}


def _candidates(label: str, root: str, images_root: str | None) -> list[str]:
    """Stems (URIs without extension) where the photo of ``label`` may be, in the order looked at."""
    stem = label[:-4]
    if images_root:
        return [storage.join(images_root, stem[len(root.rstrip("/")) + 1:]),
                storage.join(images_root, posixpath.basename(stem))]
    out = [stem]
    parts = stem.split("/")
    for i in range(len(parts) - 2, -1, -1):  # the last labels/ folder of the path -> images/
        if parts[i] == "labels":
            out.append("/".join(parts[:i] + ["images"] + parts[i + 1:]))
            break
    return out


#: One photo of a YOLO set: ``(label file URI, photo URI, width, height, [([x0, y0, x1, y1], class, {}), ...])``.
Labelled = tuple[str, str, int, int, list[tuple[list[float], str, dict[str, Any]]]]


def read_labels(uri: str, *, images_root: str | None = None, workers: int = 16) -> list[Labelled]:
    """Every YOLO label file under the folder ``uri`` whose photo was found, by label file name, boxes in pixels.

    ``uri``: the dataset folder (``images/`` + ``labels/`` inside), the labels
    folder, or a folder of photos and ``.txt`` files side by side. A label file
    whose photo is not found, or whose photo's header is unreadable, is left out
    and counted in a warning. Raises
    :class:`UserError` when there is no classes file, no label file, a line
    that is not a box of a known class, or when no photo is found at all
    (naming the folder looked in and the first missing photo).
    """
    class_file = find_class_file(uri)
    if class_file is None:
        raise UserError(f"{uri!r} has no YOLO classes file ({', '.join(CLASS_FILES)}) in it or its parent folder.")
    names = read_class_names(class_file)
    skip = {posixpath.basename(class_file)} | {"classes.txt"}
    files = storage.list_files(uri)
    labels = [f.uri for f in files if f.uri.lower().endswith(".txt") and posixpath.basename(f.uri) not in skip]
    if not labels:
        raise UserError(f"No YOLO .txt label files under {uri!r}.")
    photo_uris = [f.uri for f in files]
    base = uri.rstrip("/")
    if images_root:
        photo_uris = [f.uri for f in storage.list_files(images_root)]
    elif base.rsplit("/", 1)[-1] == "labels":
        sibling = storage.join(base.rsplit("/", 1)[0], "images")
        photo_uris += [f.uri for f in storage.list_files(sibling)] if storage.exists(sibling) else []
    photos = _photo_index(photo_uris)
    found, missing = [], []
    for label in labels:
        tried = _candidates(label, uri, images_root)
        photo = next((photos[s] for s in tried if s in photos), None)
        (found if photo else missing).append((label, photo or tried[-1]))
    if not found:
        raise UserError(f"None of the {len(labels)} YOLO label file(s) under {uri!r} has its photo: looked in "
                        f"{posixpath.dirname(missing[0][1])!r} for {posixpath.basename(missing[0][1])!r}.<jpg|png|...> "
                        f"(the first); pass --images-root with the folder that holds the photos.")
    if missing:
        log.warning("%d of %d YOLO label file(s) under %s have no photo and are left out, e.g. %s", len(missing),
                    len(labels), uri, missing[0][0])

    def one(pair: tuple[str, str]) -> Labelled | None:
        label, photo = pair
        try:
            width, height = _photo_size(photo)
        except (OSError, ValueError, SyntaxError, UserError) as e:  # an unreadable photo is counted, not fatal
            log.warning("%s: cannot read the size of %s (%s); left out", label, photo, type(e).__name__)
            return None
        return label, photo, width, height, _boxes(label, storage.read_text(label), names, width, height)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(found)))) as pool:
        return [r for r in pool.map(one, found) if r is not None]


__all__ = ["CLASS_FILES", "Labelled", "find_class_file", "read_class_names", "read_labels"]
