"""Face boxes from annotation files: COCO JSON, Pascal VOC XML, YOLO txt in, one record per image out; COCO JSON out.

COCO (``{"images": [...], "annotations": [...], "categories": [...]}``,
``bbox = [x, y, width, height]`` in pixels) is what the synthetic scenes are
written in, and what most tools read. Pascal VOC XML (one ``<annotation>``
file per image, ``<bndbox>`` with 1-based inclusive ``xmin ymin xmax ymax``)
is how the public face-mask detection sets ship. Both become
:class:`ImageBoxes` with ``x0, y0, x1, y1`` float32 boxes in the image's own
pixels (``x1``/``y1`` exclusive, as in torchvision.ops). For VOC that means
``xmin - 1, ymin - 1, xmax, ymax``, the conversion detectron2's
``load_voc_instances`` makes.

Class names: every box keeps the file's own class (``classes``: e.g.
``with_mask``, what evaluation compares the classifier's label with) and a
detection label (``labels``). By default every class maps to ``face``: the
detector finds faces, the classifier decides mask or not. A ``class_map``
(file class -> label, or ``None`` to drop) changes that; classes it does not
name are dropped and counted in ``skipped``.

YOLO (``class cx cy w h`` normalised, one ``.txt`` per photo) is read by
:mod:`maskmodel.data.yolo` into the same records. :func:`read_annotations`
tells the three apart; :func:`check_found` says when the photos are missing.

Image paths in the files are resolved against ``images_root``, by default the
folder of the annotation file (VOC: or a sibling ``images/`` / ``JPEGImages/``),
by the rule every manifest follows (:mod:`maskmodel.io.paths`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.io.paths import entry_folder, resolve_entry

log = logging.getLogger(__name__)

FACE = "face"


def default_class_map(classes: Iterable[str]) -> dict[str, str]:
    """Every class name -> ``face``: public face-mask sets label each face with_mask / without_mask / ..."""
    return {c: FACE for c in classes}


@dataclass(frozen=True)
class ImageBoxes:
    """The annotated boxes of one image.

    ``boxes``: float32 ``(K, 4)`` ``x0, y0, x1, y1`` in pixels, clipped to the
    image; ``classes``: the file's class of each box; ``labels``: its
    detection label after the class map; ``attributes``: per box, any extra
    fields the file holds (COCO ``attributes``, VOC ``difficult``...).
    ``skipped``: boxes of classes the map drops (or COCO crowd regions);
    ``invalid``: boxes with no area inside the image.
    """

    path: str
    width: int
    height: int
    boxes: np.ndarray
    classes: tuple[str, ...]
    labels: tuple[str, ...]
    attributes: tuple[dict[str, Any], ...] = ()
    skipped: int = 0
    invalid: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # per-image fields of the file (COCO images[] extras)

    def __len__(self) -> int:
        return len(self.classes)


def _folder(uri: str) -> str:
    return entry_folder(uri)


def _resolve(root: str, name: str) -> str:
    return resolve_entry(root, name)


def _record(path: str, width: int, height: int, raw: list[tuple[list[float], str, dict]],
            class_map: Mapping[str, str | None] | None, where: str) -> ImageBoxes:
    """Clip, drop and map the raw ``([x0, y0, x1, y1], class, attributes)`` boxes of one image."""
    if width < 1 or height < 1:
        raise UserError(f"{where}: image {path!r} has size {width}x{height}; width and height must be positive.")
    boxes, classes, labels, attrs, skipped, invalid = [], [], [], [], 0, 0
    for box, cls, extra in raw:
        label = FACE if class_map is None else class_map.get(cls)
        if label is None:
            skipped += 1
            continue
        x0, y0, x1, y1 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height), \
            min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)
        if not (x1 > x0 and y1 > y0):
            invalid += 1
            continue
        boxes.append((x0, y0, x1, y1))
        classes.append(cls)
        labels.append(label)
        attrs.append(extra)
    if invalid:
        log.warning("%s: %d box(es) of %s have no area inside the image; dropped", where, invalid, path)
    return ImageBoxes(path=path, width=width, height=height, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                      classes=tuple(classes), labels=tuple(labels), attributes=tuple(attrs), skipped=skipped,
                      invalid=invalid)


def read_coco(uri: str, *, class_map: Mapping[str, str | None] | None = None,
              images_root: str | None = None) -> list[ImageBoxes]:
    """The images of a COCO JSON file, in the file's order, each with its boxes (none: a valid negative).

    Raises :class:`UserError` naming the file when it is not COCO-shaped
    (missing lists or keys, an annotation of an unknown image or category).
    """
    try:
        doc = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{uri!r} is not valid JSON ({e}); expected a COCO annotation file.") from e
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "categories")):
        raise UserError(f"{uri!r} is not a COCO annotation file: it needs \"images\" and \"categories\" lists.")
    root = images_root or _folder(uri)
    try:
        categories = {c["id"]: str(c["name"]) for c in doc["categories"]}
        images = {im["id"]: im for im in doc["images"]}
        per_image: dict[Any, list] = {i: [] for i in images}
        for a in doc.get("annotations") or []:
            if a["image_id"] not in images:
                raise UserError(f"{uri!r}: annotation {a.get('id')!r} refers to image {a['image_id']!r}, which is "
                                f"not in \"images\".")
            if a["category_id"] not in categories:
                raise UserError(f"{uri!r}: annotation {a.get('id')!r} has category {a['category_id']!r}, which is "
                                f"not in \"categories\".")
            x, y, w, h = (float(v) for v in a["bbox"])
            crowd = bool(a.get("iscrowd", 0))
            cls = categories[a["category_id"]]
            # A crowd region is "faces somewhere in here", not one face: never a target, so dropped as unmapped.
            per_image[a["image_id"]].append(([x, y, x + w, y + h], None if crowd else cls,
                                             dict(a.get("attributes") or {})))
        out = []
        for image_id, im in images.items():
            raw = [r for r in per_image[image_id] if r[1] is not None]
            rec = _record(_resolve(root, str(im["file_name"])), int(im["width"]), int(im["height"]), raw,
                          class_map, uri)
            extra = {k: v for k, v in im.items() if k not in ("id", "file_name", "width", "height")}
            out.append(ImageBoxes(**{**rec.__dict__, "skipped": rec.skipped + len(per_image[image_id]) - len(raw),
                                     "extra": extra}))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{uri!r} is not a usable COCO annotation file ({type(e).__name__}: {e}).") from e
    return out


#: Folders next to a VOC xml folder where its photos may sit: Kaggle's ``annotations/`` + ``images/``, Pascal VOC's
#: own ``Annotations/`` + ``JPEGImages/``. Looked in, in this order, after the xml's own folder.
SIBLING_IMAGE_FOLDERS = ("images", "JPEGImages")


def _voc_one(uri: str, class_map: Mapping[str, str | None] | None, images_root: str | None) -> ImageBoxes:
    try:
        root = ET.fromstring(storage.read_bytes(uri))
        if root.tag != "annotation":
            raise ValueError(f"root element is <{root.tag}>, not <annotation>")
        name = root.findtext("filename")
        if not name:
            raise ValueError("no <filename>")
        width, height = int(float(root.findtext("size/width"))), int(float(root.findtext("size/height")))
        raw = []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            attrs = {k: obj.findtext(k) for k in ("difficult", "truncated", "pose") if obj.findtext(k) is not None}
            raw.append(([xmin - 1.0, ymin - 1.0, xmax, ymax], (obj.findtext("name") or "").strip(), attrs))
    except UserError:
        raise
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise UserError(f"{uri!r} is not a usable Pascal VOC annotation ({type(e).__name__}: {e}).") from e
    return _record(_resolve(images_root or _folder(uri), name), width, height, raw, class_map, uri)


class _Listings:
    """Names of the files directly in a folder, listed once per folder (thread-safe enough: a race lists twice)."""

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def has(self, uri: str) -> bool:
        folder = _folder(uri)
        if folder not in self._names:
            self._names[folder] = frozenset(storage.listdir(folder))
        return uri.rstrip("/").rsplit("/", 1)[-1] in self._names[folder]


def _sibling_images(records: list[ImageBoxes], xml_folder: str, listings: _Listings) -> list[ImageBoxes]:
    """Records whose photo is not in ``xml_folder`` moved to the first sibling image folder that holds it."""
    parent = _folder(xml_folder.rstrip("/"))
    out = []
    for r in records:
        if not r.path.startswith(xml_folder.rstrip("/") + "/") or listings.has(r.path):
            out.append(r)
            continue
        rel = r.path[len(xml_folder.rstrip("/")) + 1:]
        for sibling in SIBLING_IMAGE_FOLDERS:
            candidate = _resolve(storage.join(parent, sibling), rel)
            if listings.has(candidate):
                r = ImageBoxes(**{**r.__dict__, "path": candidate})
                break
        out.append(r)
    return out


def read_voc(uri: str, *, class_map: Mapping[str, str | None] | None = None, images_root: str | None = None,
             workers: int = 16) -> list[ImageBoxes]:
    """Pascal VOC XML: one file, or every ``.xml`` under a folder (read concurrently, sorted by file name).

    Each file's ``<filename>`` is resolved against ``images_root`` when given;
    otherwise against the XML file's folder, and where the photo is not there,
    against a sibling folder (:data:`SIBLING_IMAGE_FOLDERS`: ``images/`` as
    public Kaggle sets ship, ``JPEGImages/`` as Pascal VOC does). Raises
    :class:`UserError` naming the first unusable file; whether the photos exist
    is :func:`check_found`'s business.
    """
    if uri.lower().endswith(".xml"):
        files = [uri]
    else:
        files = [f.uri for f in storage.list_files(uri, extensions=("xml",))]
        if not files:
            raise UserError(f"No Pascal VOC .xml files under {uri!r}.")
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        records = list(pool.map(lambda f: _voc_one(f, class_map, images_root), files))
    if images_root:
        return records
    listings, out = _Listings(), []
    for f, r in zip(files, records):
        out.extend(_sibling_images([r], _folder(f), listings))
    return out


def check_found(records: Iterable[ImageBoxes], *, source: str) -> list[str]:
    """The annotated photos of ``records`` that do not exist (their URIs, in order); each folder is listed once.

    Raises :class:`UserError` when none of them exists (the set matches
    nothing), naming the folder looked in, the first missing file and
    ``--images-root``. ``source``: the annotations' URI, for the message.
    """
    records = list(records)
    listings = _Listings()
    missing = [r.path for r in records if not listings.has(r.path)]
    if records and len(missing) == len(records):
        raise UserError(f"None of the {len(records)} photo(s) annotated in {source!r} was found: looked in "
                        f"{_folder(missing[0])!r} for {missing[0].rsplit('/', 1)[-1]!r} (the first); pass "
                        f"--images-root with the folder that holds the photos.")
    if missing:
        log.warning("%d of %d photo(s) annotated in %s not found, e.g. %s", len(missing), len(records), source,
                    missing[0])
    return missing


def read_yolo(uri: str, *, class_map: Mapping[str, str | None] | None = None,
              images_root: str | None = None) -> list[ImageBoxes]:
    """A YOLO folder's photos with their boxes (:func:`maskmodel.data.yolo.read_labels`: layouts, classes file,
    photo sizes from their headers), sorted by label file. Raises :class:`UserError` as that function does."""
    from maskmodel.data.yolo import read_labels

    return [_record(photo, width, height, raw, class_map, label)
            for label, photo, width, height, raw in read_labels(uri, images_root=images_root)]


def annotation_format(uri: str) -> str | None:
    """``"coco"``, ``"voc"`` or ``"yolo"``: what the annotations at ``uri`` are, by its form (``None``: none).

    A ``.json`` file is COCO, an ``.xml`` file or a folder holding ``.xml``
    files VOC, a folder holding ``.txt`` label files and a classes file
    (:data:`maskmodel.data.yolo.CLASS_FILES`) YOLO.
    """
    from maskmodel.data.yolo import find_class_file

    low = uri.lower().rstrip("/")
    if low.endswith(".json"):
        return "coco"
    if low.endswith(".xml"):
        return "voc"
    if low.endswith((".txt", ".csv", ".parquet", ".pq", ".yaml")) or not storage.exists(uri):
        return None
    names = [posixpath.basename(f.uri) for f in storage.list_files(uri, extensions=("xml", "txt"))]
    if any(n.lower().endswith(".xml") for n in names):
        return "voc"
    if any(n.lower().endswith(".txt") for n in names) and find_class_file(uri) is not None:
        return "yolo"
    return None


def read_annotations(uri: str, *, class_map: Mapping[str, str | None] | None = None,
                     images_root: str | None = None) -> list[ImageBoxes]:
    """A COCO ``.json`` file, a VOC ``.xml`` file or folder, or a YOLO folder (:func:`annotation_format`).

    Raises :class:`UserError` when ``uri`` is none of these.
    """
    kind = annotation_format(uri)
    if kind == "coco":
        return read_coco(uri, class_map=class_map, images_root=images_root)
    if kind == "voc":
        return read_voc(uri, class_map=class_map, images_root=images_root)
    if kind == "yolo":
        return read_yolo(uri, class_map=class_map, images_root=images_root)
    raise UserError(f"{uri!r} holds no annotations: expected a COCO .json file, a Pascal VOC .xml file or folder of "
                    f"them, or a YOLO folder (.txt labels and classes.txt, obj.names or data.yaml).")


def write_coco(records: Iterable[ImageBoxes], uri: str, *, categories: Iterable[str] | None = None,
               info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``records`` as a COCO JSON file at ``uri``; returns the document.

    Categories are the records' file classes (``classes``), ids from 1 in
    ``categories`` order (default: sorted). Image paths under the JSON file's
    folder are written relative to it, so the folder can move as a whole; each
    box's ``attributes`` and each image's ``extra`` are kept.
    """
    records = list(records)
    names = list(categories) if categories is not None else sorted({c for r in records for c in r.classes})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    root = _folder(uri).rstrip("/") + "/"
    images, annotations = [], []
    for image_id, r in enumerate(records, start=1):
        name = r.path[len(root):] if r.path.startswith(root) else r.path
        images.append({**r.extra, "id": image_id, "file_name": name, "width": r.width, "height": r.height})
        for (x0, y0, x1, y1), cls, attrs in zip(r.boxes.tolist(), r.classes, r.attributes or ({},) * len(r)):
            if cls not in cat_id:
                raise ValueError(f"class {cls!r} of {r.path} is not among the categories {names}")
            box = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[cls],
                                "bbox": box, "area": round(box[2] * box[3], 2), "iscrowd": 0,
                                **({"attributes": attrs} if attrs else {})})
    doc = {"info": dict(info or {}), "images": images, "annotations": annotations,
           "categories": [{"id": i, "name": n, "supercategory": FACE} for n, i in cat_id.items()]}
    storage.write_text(uri, json.dumps(doc) + "\n")
    return doc
