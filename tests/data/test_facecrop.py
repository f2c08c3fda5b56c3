"""One face-crop definition: a face annotated for training is cut exactly as the face stage cuts it at scoring time.

The scoring side is the product's own: the load step (:func:`maskmodel.score.loading.load_batch`, the photo
decoded once to at most ``max_pixels``), the detector's postprocessing (:func:`maskmodel.models.detect.geometry.
postprocess`: clipping, the margin), the minimum face size in original pixels as :meth:`FaceStage.find` applies it,
and :meth:`FaceStage.cut` with the card's :class:`EvalCrop`. The training side is the data step's callable
(:class:`maskmodel.train.annotated.CutFaces`) fed the same file's bytes and the same boxes in original pixels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from maskmodel.data import facecrop
from maskmodel.data.transforms import EvalCrop
from maskmodel.models.classifier import ModelCard
from maskmodel.models.detect.geometry import Placement, postprocess
from maskmodel.models.spec import DetectOptions
from maskmodel.score.faces import FaceStage
from maskmodel.score.loading import load_batch
from maskmodel.train.annotated import CutFaces

pytestmark = pytest.mark.timeout(60)

CARD = ModelCard(arch="resnet18", classes=("mask", "no_mask"), input_size=32, resize_size=37)
OPTIONS = DetectOptions()


def _photo(width: int, height: int, orientation: int, rng: np.random.Generator) -> bytes:
    """A noisy JPEG stored ``width`` x ``height``; with an EXIF orientation, upright it is another shape."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85, exif=exif.tobytes())
    return buf.getvalue()


def _boxes(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Random faces in an upright ``width`` x ``height`` photo: touching each edge, tiny (some under ``min_face``),
    huge (the whole photo), and anywhere, at fractional pixels."""
    out = [[0, 0, width, height], [0, 0, 9.5, 12.25], [width - 20.3, height - 15.7, width, height],
           [0, height / 3, width / 4, height / 2], [width - 3.5, 0, width, 4.0], [5.2, 6.1, 10.1, 12.9]]
    for _ in range(6):
        w, h = rng.uniform(6, width / 2), rng.uniform(6, height / 2)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        out.append([x0, y0, x0 + w, y0 + h])
    return np.asarray(out, np.float32)


def _scoring_crops(path: str, boxes: np.ndarray, max_pixels: int) -> torch.Tensor:
    """What scoring feeds the classifier for these faces, had the detector found exactly ``boxes``."""
    row = load_batch({"path": [path]}, card=CARD, max_bytes=1 << 26, max_pixels=max_pixels)
    assert row["error"][0] is None
    h, w = int(row["image_h"][0]), int(row["image_w"][0])
    image = np.frombuffer(row["image"][0], np.uint8).reshape(h, w, 3)
    width, height = int(row["width"][0]), int(row["height"][0])
    # The detector sees the decoded picture; its boxes come in the decoded picture's pixels (NMS off: the boxes
    # overlap on purpose, and no detector suppresses an annotated face).
    found = torch.from_numpy(boxes * np.array([w / width, h / height] * 2, np.float32))
    faces = postprocess(found, torch.linspace(0.99, 0.5, len(boxes)), torch.zeros(len(boxes), dtype=torch.int64),
                        [Placement(w, h, w, h)], OPTIONS.but(min_face=0.0, max_faces=1 << 30, nms_iou=1.0))[0]
    # FaceStage.find: back to original pixels, faces under min_face dropped there.
    original = faces.boxes * np.array([width / w, height / h] * 2, np.float32)
    kept = facecrop.big_enough(original, OPTIONS.min_face)
    stage = FaceStage.__new__(FaceStage)  # only its cut, which needs no detector
    stage.crop = EvalCrop(crop_size=CARD.input_size, resize_size=CARD.resize_size)
    return stage.cut(image, faces.crops[kept])


@pytest.mark.parametrize("width,height,orientation,max_pixels", [
    (160, 120, 1, facecrop.DEFAULT_MAX_PIXELS),  # landscape, decoded whole
    (90, 200, 1, facecrop.DEFAULT_MAX_PIXELS),  # portrait
    (200, 120, 6, facecrop.DEFAULT_MAX_PIXELS),  # EXIF-rotated: upright 120 x 200
    (180, 140, 8, 9_000),  # EXIF-rotated and decoded reduced (over --max-pixels)
    (320, 96, 1, 12_000),  # wide, reduced
])
def test_training_crop_equals_scoring_crop(tmp_path, width, height, orientation, max_pixels):
    rng = np.random.default_rng(width * 7 + orientation)
    data = _photo(width, height, orientation, rng)
    path = str(tmp_path / "photo.jpg")
    with open(path, "wb") as f:
        f.write(data)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    boxes = _boxes(*upright, rng)
    scoring = _scoring_crops(path, boxes, max_pixels)

    cutter = CutFaces(EvalCrop(crop_size=CARD.input_size, resize_size=CARD.resize_size), crop_size=CARD.input_size,
                      margin=OPTIONS.margin, min_face=OPTIONS.min_face, max_pixels=max_pixels)
    labels = np.arange(len(boxes)) % 2
    rows = cutter({"uri": np.array([path], object), "data": np.array([data], object), "error": np.array([""], object),
                   "boxes": [boxes.reshape(-1).tolist()], "labels": [labels.tolist()]})

    small = ~facecrop.big_enough(boxes, OPTIONS.min_face)
    assert small.any() and not small.all()  # some faces are left out as too small, alike on both sides
    assert rows["image"].shape == (int((~small).sum()), 3, CARD.input_size, CARD.input_size)
    assert rows["image"].dtype == np.uint8 and (rows["label"] == labels[~small]).all()
    assert torch.equal(torch.from_numpy(rows["image"]), scoring)  # bit for bit


def test_crop_boxes_grow_by_the_margin_and_stay_inside():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]])
    crops = facecrop.crop_boxes(boxes, 0.25, (50, 40))  # (height, width)
    assert crops.tolist() == [[5.0, 10.0, 35.0, 50.0], [0.0, 0.0, 6.25, 6.25]]
    image = np.zeros((50, 40, 3), np.uint8)
    cut = facecrop.cut(image, crops.numpy(), lambda t: t[:, :2, :2], 2)
    assert cut.shape == (2, 3, 2, 2)
    assert facecrop.cut(image, np.zeros((0, 4), np.float32), lambda t: t, 8).shape == (0, 3, 8, 8)


def test_unreadable_photo_is_one_counted_row():
    cutter = CutFaces(EvalCrop(crop_size=16), crop_size=16, margin=0.25, min_face=8, max_pixels=10_000)
    rows = cutter({"uri": np.array(["a.jpg", "b.jpg"], object), "data": np.array([b"garbage", b""], object),
                   "error": np.array(["", "not found"], object), "boxes": [[0, 0, 10, 10], [0, 0, 10, 10]],
                   "labels": [[0], [1]]})
    assert rows["label"].tolist() == [-1, -1] and rows["error"][1] == "not found"
    assert rows["error"][0] and rows["image"].shape == (2, 3, 16, 16)
