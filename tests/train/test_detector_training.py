"""The face detector's training: box-aware augmentation, weights, bad input, and Ray Train runs end to end.

Ray tests run on the real local Ray (``ray_local``), one of them with data and outputs on the moto S3 server.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from maskmodel.data.annotations import ImageBoxes, write_coco
from maskmodel.data.boxes import MAX_BOXES, DecodeBoxes, pack_boxes, train_transform
from maskmodel.data.synth import render_scene_sample
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.models.detect import load_detector, read_card
from maskmodel.models.detect import centerface, centernet, trainable, zoo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(weights="none", image_size=128, batch_size=4, cpus_per_worker=0.5, lr=0.002)
# CenterFace from its packaged weights (the default), as the demo trains it.
FINE_TUNE = dict(image_size=128, batch_size=4, cpus_per_worker=0.5)


def write_scenes(root: str, n: int, *, size: int = 128, seed: int = 0, name: str = "faces.coco.json") -> str:
    """``n`` synthetic scenes (0-4 drawn faces each) as JPEGs under ``root`` and their COCO file; returns its URI."""
    records = []
    for i in range(n):
        sc = render_scene_sample(("mask", "no_mask")[i % 2], i, size=size, seed=seed, incorrect_share=0.0)
        buf = io.BytesIO()
        sc.image.save(buf, format="JPEG", quality=90)
        path = storage.join(root, "images", f"{i:03d}.jpg")
        storage.write_bytes(path, buf.getvalue())
        records.append(ImageBoxes(path=path, width=size, height=size,
                                  boxes=np.asarray([f.box for f in sc.faces], np.float32).reshape(-1, 4),
                                  classes=tuple(f.label for f in sc.faces), labels=tuple("face" for _ in sc.faces)))
    uri = storage.join(root, name)
    write_coco(records, uri, categories=("mask", "no_mask"))
    return uri


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# --- Ray-free -------------------------------------------------------------------------------------------------

def test_boxes_follow_the_pixels_through_augmentation_and_letterbox():
    """A white square on black at a known box stays inside its box after zoom-out, IoU crop, flip and letterbox."""
    a = np.zeros((120, 200, 3), np.uint8)
    a[30:70, 120:160] = 255
    box = np.array([[120, 30, 160, 70]], np.float32)
    decode = DecodeBoxes(size=96, augment=train_transform(), seed=0)
    inside, seen = [], 0
    for _ in range(25):
        image, boxes, n = decode.one(_jpeg(a), box)
        assert image.shape == (3, 96, 96) and boxes.shape == (MAX_BOXES, 4)
        if n == 0:
            continue  # an IoU crop may cut the square off entirely; it is then dropped, not kept misplaced
        seen += 1
        x0, y0, x1, y1 = np.round(boxes[0]).astype(int)
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        patch = image[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1].astype(float)
        inside.append(patch.mean(axis=(1, 2)).max())  # photometric jitter changes colours, not where they are
    assert seen >= 15
    assert np.median(inside) > 150


def test_validation_decode_is_the_scoring_letterbox():
    """Without augmentation a 200x100 photo lands at the top left, scaled by 0.48, boxes with it."""
    a = np.zeros((100, 200, 3), np.uint8)
    image, boxes, n = DecodeBoxes(size=96).one(_jpeg(a), np.array([[20, 10, 60, 50]], np.float32))
    assert n == 1
    np.testing.assert_allclose(boxes[0], [9.6, 4.8, 28.8, 24.0], atol=1e-4)
    assert image[:, 48:].max() == 0  # padding below


def test_an_unreadable_image_is_left_out_not_fatal():
    good = _jpeg(np.full((64, 64, 3), 90, np.uint8))
    out = DecodeBoxes(size=64)({"uri": np.array(["a", "b"], dtype=object),
                                "data": np.array([good, b"\xff\xd8\xff junk"], dtype=object),
                                "boxes": np.array([pack_boxes(np.zeros((0, 4))), pack_boxes(np.zeros((0, 4)))],
                                                  dtype=object)})
    assert out["n_boxes"].tolist() == [0, -1]


def test_coco_weights_offline_are_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: it must download
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: the download fails here, always
    # urllib keeps the first opener it builds, proxies included: this test's dead proxy must not outlive it
    # (the S3 fixture's readiness probe, started later in the session, would be sent there too).
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(UserError, match="Could not download torchvision's COCO weights.*--weights none") as e:
        zoo.initial("ssdlite320_mobilenet_v3_large", "coco", storage.read_bytes)
    assert "\n" not in str(e.value)


def test_weights_uri_loads_a_state_dict_and_refuses_a_foreign_one(tmp_path):
    torch.manual_seed(1)
    net = zoo.build("ssdlite320_mobilenet_v3_large")
    path = tmp_path / "w.pt"
    torch.save(net.model.state_dict(), path)  # the bare torchvision model's keys are accepted too
    again = zoo.initial("ssdlite320_mobilenet_v3_large", str(path), storage.read_bytes)
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="holds no tensor"):
        zoo.initial("ssdlite320_mobilenet_v3_large", str(tmp_path / "other.pt"), storage.read_bytes)
    (tmp_path / "text.pt").write_text("not a tensor file")
    with pytest.raises(UserError, match="is not a torch state dict"):
        zoo.initial("ssdlite320_mobilenet_v3_large", str(tmp_path / "text.pt"), storage.read_bytes)


def test_bad_input_is_one_sentence_and_exit_2(tmp_path):
    """No face boxes, unknown --weights file, missing annotations: exit 2 with one line, before Ray starts."""
    coco = tmp_path / "empty.coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
                                "annotations": [], "categories": [{"id": 1, "name": "face"}]}))
    scenes = write_scenes(str(tmp_path / "scenes"), 6)
    cases = [
        (["--data", str(coco)], "no face box"),
        (["--data", scenes, "--val-data", scenes, "--weights", str(tmp_path / "nope.pt")], "nope.pt"),
        (["--data", str(tmp_path / "missing.json")], "do not exist"),
        (["--data", scenes, "--class-map", "mask=-,no_mask=-,mask_incorrect=-"],
         "no face box once --class-map drops mask, no_mask, mask_incorrect"),
        (["--data", scenes, "--face-classes", "helmet"], "--face-classes was replaced by --class-map"),
        (["--data", scenes, "--val-data", scenes, "--arch", "ssdlite320_mobilenet_v3_large", "--weights",
          str(coco)], "is not a torch state dict"),
    ]
    # The cases are independent jobs, each mostly Python's start-up and imports: run them all at once.
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.train_detector", *args, "--output",
                               str(tmp_path / f"out{i}"), *([] if "--weights" in args else ["--weights", "none"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i, (args, _) in enumerate(cases)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        runs = [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for (args, words), r in zip(cases, runs):
        # A flag's own error is argparse's (usage, then "prog: error: ..."), the rest the job's ("error: ...").
        err = [line for line in r.stderr.splitlines() if line.startswith("error:") or ": error: " in line]
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert len(err) == 1 and words in err[0], (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr


def test_an_exported_zoo_detector_loads_and_detects(tmp_path):
    """A state dict of the adapter, saved with a card, runs through load_detector's FaceDetector interface."""
    from maskmodel.models.detect.card import DetectorCard
    from maskmodel.models.detect.detector import save_detector

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(zoo.build("fasterrcnn_mobilenet_v3_large_320_fpn").state_dict(), buf)
    save_detector(str(tmp_path / "det"), buf.getvalue(), DetectorCard(
        architecture="fasterrcnn_mobilenet_v3_large_320_fpn", weights="model.pt", sha256="", model_id="facedet-x",
        input_size=(128, 128), score_threshold=0.0))
    det = load_detector(str(tmp_path / "det"))
    faces = det.detect([np.zeros((100, 150, 3), np.uint8), np.zeros((60, 60, 3), np.uint8)])
    assert len(faces) == 2 and det.model_id == "facedet-x"
    for f in faces:
        assert f.boxes.dtype == np.float32 and f.boxes.shape[1] == 4 and len(f.scores) == len(f.boxes)


def test_centernet_targets_decode_back_to_their_boxes():
    """Targets written where the network's heads would be, decoded by CenterFace's own rule, give the boxes back."""
    boxes = torch.tensor([[10.0, 12.0, 40.0, 50.0], [70.5, 20.25, 100.0, 44.0]])
    t = centernet.targets(boxes, (32, 32))
    hm = t["heatmap"]
    assert hm.shape == (1, 32, 32) and float(hm.max()) == 1.0 and int((hm == 1).sum()) == 2
    assert sorted(torch.nonzero(hm[0].flatten() == 1).flatten().tolist()) == sorted(t["cells"].tolist())
    scale, offset = torch.zeros(1, 2, 32 * 32), torch.zeros(1, 2, 32 * 32)
    scale[0][:, t["cells"]], offset[0][:, t["cells"]] = t["size"].T, t["offset"].T
    out = (hm[None], scale.view(1, 2, 32, 32), offset.view(1, 2, 32, 32), torch.zeros(1, 10, 32, 32))
    got, scores, _ = centerface.decode(out, input_size=(128, 128), threshold=0.99, top_k=10)
    order = got[:, 0].argsort()
    assert torch.allclose(got[order], boxes, atol=1e-4) and torch.all(scores == 1)
    assert (t["offset"].abs() <= 0.5).all()  # the centre's cell is the nearest one
    empty = centernet.targets(torch.zeros(0, 4), (8, 8))
    assert float(empty["heatmap"].sum()) == 0 and len(empty["cells"]) == 0


def test_centernet_loss_is_lowest_at_the_truth_and_reaches_every_head():
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 48.0]]), torch.zeros(0, 4)]
    made = [centernet.targets(b, (16, 16)) for b in boxes]
    truth = torch.stack([m["heatmap"] for m in made])
    scale, offset = torch.zeros(2, 2, 16, 16), torch.zeros(2, 2, 16, 16)
    cell = int(made[0]["cells"][0])
    scale[0].view(2, -1)[:, cell], offset[0].view(2, -1)[:, cell] = made[0]["size"][0], made[0]["offset"][0]
    at_truth = centernet.loss((truth, scale, offset, torch.zeros(2, 10, 16, 16)), boxes)
    assert float(at_truth["size"]) == 0 and float(at_truth["offset"]) < 1e-6
    outputs = [torch.full((2, 1, 16, 16), 0.5, requires_grad=True), torch.zeros(2, 2, 16, 16, requires_grad=True),
               torch.zeros(2, 2, 16, 16, requires_grad=True), torch.zeros(2, 10, 16, 16, requires_grad=True)]
    guess = centernet.loss(outputs, boxes)
    assert float(guess["heatmap"].detach()) > 10 * float(at_truth["heatmap"]) and float(guess["size"].detach()) > 0
    sum(guess.values()).backward()
    assert all(o.grad is not None for o in outputs)  # the landmark head too (weight 0): DDP needs every gradient


def test_centerface_weights_keywords_and_state_round_trip(tmp_path):
    """pretrained = the packaged network, none = fresh weights, coco refused, an exported state dict loads back."""
    packaged = trainable.initial("centerface", "pretrained", storage.read_bytes)
    fresh = trainable.initial("centerface", "none", storage.read_bytes)
    key = next(k for k, v in packaged.state_dict().items() if v.dtype.is_floating_point and v.numel() > 100)
    assert not torch.equal(packaged.state_dict()[key], fresh.state_dict()[key])
    with pytest.raises(UserError, match="no COCO weights"):
        trainable.initial("centerface", "coco", storage.read_bytes)
    path = tmp_path / "model.pt"
    torch.save(trainable.export_state("centerface", fresh.state_dict()), path)  # what a detector directory holds
    again = trainable.initial("centerface", str(path), storage.read_bytes)
    assert torch.equal(again.state_dict()[key], fresh.state_dict()[key])
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a state dict of CenterFace"):
        trainable.initial("centerface", str(tmp_path / "other.pt"), storage.read_bytes)


def test_every_trainable_detector_takes_boxes_per_image_and_returns_losses():
    images = torch.rand(2, 3, 128, 128) * 255
    boxes = [torch.tensor([[10.0, 10.0, 50.0, 60.0]]), torch.zeros(0, 4)]  # a face, and a valid negative
    for arch in ("centerface", "ssdlite320_mobilenet_v3_large"):
        net = trainable.initial(arch, "none", storage.read_bytes).train()
        losses = net(images, boxes)
        assert losses and all(torch.isfinite(v) for v in losses.values()), arch
        sum(losses.values()).backward()
        net.eval()
        with torch.inference_mode():
            b, s, i = trainable.decode(arch)(net(images), input_size=(128, 128), threshold=0.0, top_k=5)
        assert b.shape[1] == 4 and len(b) == len(s) == len(i), arch


def test_an_epoch_logs_progress_with_step_total_rate_loss_and_eta(caplog):
    """Inside an epoch rank 0 logs step/total, images/s, the running loss and the ETA every ~30 s (issue 27: five
    minutes of silence); the sums are read back only for a line. A fake clock: 10 s per step."""
    from maskmodel.train.engine import run_pass
    from maskmodel.train.progress import StepProgress, steps_per_worker

    assert steps_per_worker(101, world=2, batch_size=8) == 7 and steps_per_worker(0, world=1, batch_size=8) is None
    now = [0.0]
    progress = StepProgress("epoch 1/3", total_steps=6, world=2, every_s=30.0, clock=lambda: now[0])

    def step(i, batch):
        now[0] += 10.0
        return torch.tensor([2.0 * (i + 1) * 4, 4.0, 0.0], dtype=torch.float64)  # loss i+1 on 4 images

    with caplog.at_level("INFO", logger="maskmodel.train.progress"):
        totals, _ = run_pass(range(6), step, size=3, device=torch.device("cpu"), progress=progress)
    lines = [r.getMessage() for r in caplog.records]
    # 3 steps (30 s) in: 12 images of this worker, 2 workers -> 0.8 img/s; mean loss (2+4+6)/3; 3 steps left
    assert lines == ["epoch 1/3 step 3/6 | 0.8 img/s | loss 4.0000 | ETA 30s",
                     "epoch 1/3 step 6/6 | 0.8 img/s | loss 7.0000 | ETA 0s"], lines
    assert totals.tolist() == [2.0 * 21 * 4, 24.0, 0.0]
    every = StepProgress("epoch 1/1", total_steps=None, every_s=0, clock=lambda: 0.0)  # --progress-s 0
    assert every.update(1, torch.zeros(3)) == "epoch 1/1 step 1 | 0.0 img/s | loss n/a"


def test_the_initial_weights_are_epoch_0_and_the_default_size_matches_the_face_stage(tmp_path, caplog):
    """Epoch 0: the detector's initial (pretrained) weights evaluated before any step, logged, in metrics.csv and
    the curves, so 'did fine-tuning help?' has an answer; --image-size defaults to the long side of the face
    stage's default input (640 x 384)."""
    from maskmodel.models.spec import DetectOptions
    from maskmodel.train.config import DetectTrainConfig
    from maskmodel.train.detect_loop import DetectorTask
    from maskmodel.train.detection import METRIC_COLUMNS, PANELS
    from maskmodel.train.engine import Worker, _before_training

    assert DetectTrainConfig(data="a.json", output=str(tmp_path / "o")).image_size == max(DetectOptions().input_size)
    assert DetectorTask.evaluate_before_training is True
    cfg = {"arch": "centerface", "epochs": 3, "stall_s": 0, "score_threshold": 0.35, "output": str(tmp_path),
           "columns": METRIC_COLUMNS, "panels": PANELS, "skipped": {"train": 1, "val": 0}}
    task = DetectorTask(cfg)
    val = {"ap50": 0.61, "ap": 0.3, "recall": 0.7, "precision": 0.9, "faces": 45, "images": 12, "skipped": 2}
    task.evaluate = lambda w, net, shard, watchdog: val  # what _evaluate returns; the pass itself is the Ray test's
    w = Worker(cfg=cfg, rank=0, world=1, device=torch.device("cpu"), precision="fp32")
    with caplog.at_level("INFO", logger="maskmodel.train.engine"):
        row = _before_training(task, w, torch.nn.Identity(), None, 0)
    assert (row["epoch"], row["train_loss"], row["val_ap50"], row["val_recall"], row["val_images"]) == \
        (0, None, 0.61, 0.7, 12)
    assert (row["skipped_train"], row["skipped_val"]) == (1, 2)
    assert ("epoch 0/3 (the initial weights, before training)  train loss n/a | val AP50 0.610 AP 0.300 recall 0.700 "
            "precision 0.900 at 0.35") in [r.getMessage() for r in caplog.records]
    first = _metrics(str(tmp_path))[0]
    assert (first["epoch"], first["train_loss"], first["val_ap50"]) == ("0", "", "0.61")
    Image.open(io.BytesIO(storage.read_bytes(storage.join(str(tmp_path), "curves.png")))).verify()


# --- Ray Train -----------------------------------------------------------------------------------------------

def _metrics(output: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(storage.join(output, "metrics.csv")))))


@pytest.mark.timeout(420)
@pytest.mark.ray
def test_trains_resumes_and_exports_a_detector_that_loads(ray_local, tmp_path):
    from maskmodel.data.annotations import read_coco
    from maskmodel.train.detection import DetectTrainConfig, train_detector

    data = write_scenes(str(tmp_path / "data"), 24)
    out = str(tmp_path / "run")
    # Validation on the training scenes: a short run checks the loop, the loss, resume and export.
    common = dict(data=data, val_data=data, output=out, augment=False, **FINE_TUNE)  # CenterFace, pretrained
    assert sum(len(r) for r in read_coco(data)) == 45
    first = train_detector(DetectTrainConfig(epochs=3, **common))
    assert first.epochs_run == 3
    res = train_detector(DetectTrainConfig(epochs=6, **common))  # same --output: resumes at epoch 4
    rows = _metrics(out)
    assert [int(r["epoch"]) for r in rows] == list(range(0, 7))  # epoch 0: the pretrained weights, evaluated once
    assert rows[0]["train_loss"] == "" and float(rows[0]["val_ap50"]) == res.before_training["val_ap50"]
    assert storage.read_json(storage.join(out, "report.json"))["before_training"] == res.before_training
    assert {int(r["attempt"]) for r in rows[4:]} == {1}  # the second submission continued the first
    assert float(rows[-1]["train_loss"]) < 0.7 * float(rows[1]["train_loss"])
    # The epoch's evaluation ran over every picture and face, and fine-tuning learnt the drawn faces.
    assert all(0.0 <= float(r["val_ap50"]) <= 1.0 and int(r["val_faces"]) == 45 for r in rows)
    assert max(float(r["val_ap50"]) for r in rows[1:]) > 0.5, [r["val_ap50"] for r in rows]
    assert float(rows[4]["lr"]) > 0  # the resubmission's longer cosine schedule, not the old one's final 0
    card = read_card(res.model_dir)
    assert card.architecture == "centerface" and card.input_size == (128, 128) and card.score_threshold == 0.35
    assert card.model_id == res.model_id and card.metrics["val_ap50"] == pytest.approx(res.metrics["val_ap50"])
    det = load_detector(res.model_dir)  # what jobs.score --faces <dir> loads
    for r in read_coco(data)[:4]:
        faces = det.detect([np.asarray(Image.open(r.path).convert("RGB"))], options=det.options(score_threshold=0.0))[0]
        assert len(faces) > 0 and faces.boxes.shape == (len(faces), 4)
        assert (faces.boxes >= 0).all() and (faces.boxes <= 128).all()
    for png in ("curves.png", "augmented_samples.png", "detections.png"):
        Image.open(io.BytesIO(storage.read_bytes(storage.join(out, png)))).verify()
    assert storage.read_json(storage.join(out, "report.json"))["model_id"] == res.model_id
    # What the face stage of jobs.score makes of the directory: every scene's faces found by this detector.
    from maskmodel.results import read_results
    from maskmodel.score.scoring import ScoreConfig, score
    from tests.score.test_scoring import write_model

    write_model(str(tmp_path / "classifier"))
    score(ScoreConfig(input=str(tmp_path / "data" / "images"), model=str(tmp_path / "classifier"),
                      output=str(tmp_path / "scores"), run_id="scenes", faces=res.model_dir, precision="fp32"))
    rows = read_results(str(tmp_path / "scores")).to_pylist()
    assert len(rows) == 24 and {r["status"] for r in rows} == {"ok"}
    assert {r["detector"] for r in rows if r["faces_found"]} == {res.model_id}
    assert sum(r["faces_found"] for r in rows) >= 0.5 * 45


@pytest.mark.ray
def test_two_workers_on_s3_count_every_val_image_once(ray_local, s3_bucket, tmp_path):
    from maskmodel.train.detection import DetectTrainConfig, train_detector

    data = write_scenes(s3_bucket + "/scenes", 14)
    storage.write_bytes(s3_bucket + "/scenes/images/000.jpg", b"\xff\xd8\xff broken")  # 1 of 14: over 1 %
    with pytest.raises(UserError, match="unreadable"):
        train_detector(DetectTrainConfig(data=data, output=s3_bucket + "/bad", epochs=1, num_workers=2,
                                         val_fraction=0.4, **TINY))
    res = train_detector(DetectTrainConfig(data=data, output=s3_bucket + "/run", epochs=1, num_workers=2,
                                           val_fraction=0.4, max_unreadable=0.2, **TINY))
    rows = _metrics(s3_bucket + "/run")
    cfg = storage.read_json(s3_bucket + "/run/train_config.json")
    val_images = cfg["counts"]["val"]["images"]
    assert int(rows[0]["val_images"]) + int(rows[0]["skipped_val"]) == val_images
    assert int(rows[0]["skipped_train"]) + int(rows[0]["skipped_val"]) == 1
    det = load_detector(res.model_dir)
    assert det.detect([np.zeros((128, 128, 3), np.uint8)])[0].boxes.shape[1] == 4


def test_a_lone_image_sits_the_step_out_and_workers_get_two_images_each():
    """BatchNorm in train mode raises on one value per channel (SSDlite pools pictures to 1x1): an epoch's last
    batch of one image must not reach the model, and the config refuses per-worker batches under two."""
    from maskmodel.train.detect_loop import train_epoch
    from maskmodel.train.detection import DetectTrainConfig

    class Pooled(torch.nn.Module):  # the shape of the failure: features pooled to 1x1, then BatchNorm
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.seen = []

        def forward(self, images, targets):
            self.seen.append(len(images))
            x = self.bn(torch.nn.functional.adaptive_avg_pool2d(self.conv(images / 255), 1))
            return {"loss": x.pow(2).mean()}

    class Shard:
        def iter_torch_batches(self, **_):
            for n in (2, 1):  # a full batch, then the epoch's remainder
                yield {"image": torch.zeros(n, 3, 16, 16, dtype=torch.uint8),
                       "boxes": torch.tensor([[[1.0, 1.0, 8.0, 8.0]]]).repeat(n, 1, 1),
                       "n_boxes": torch.ones(n, dtype=torch.int64)}

    class Beat:
        def beat(self):
            pass

    model = Pooled()
    out = train_epoch(model, Shard(), device="cpu", batch_size=2,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.01), watchdog=Beat())
    assert model.seen == [2] and out["images"] == 2 and out["skipped"] == 0
    with pytest.raises(ValueError, match="fewer than 2 images per step"):
        DetectTrainConfig(data="d", output="o", batch_size=3, num_workers=2)
