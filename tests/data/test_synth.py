"""The synthetic dataset: counts, determinism, valid images, dataset.json, S3 round trip, the job's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskmodel.data import synth
from maskmodel.errors import UserError
from maskmodel.io import storage
from maskmodel.io.decode import IMAGE_EXTENSIONS, decode_image

REPO = Path(__file__).resolve().parents[2]
N, SIZE = 4, 32  # tiny: the whole file must stay fast on a shared 2-core machine


def _write(out: str, **kwargs) -> dict:
    return synth.write_dataset(synth.DatasetConfig(out=out, **{"n_per_class": N, "image_size": SIZE, **kwargs}))


def _tree(root: str) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    files = storage.list_files(root)
    return {f.uri[len(root):].lstrip("/"): storage.read_bytes(f.uri) for f in files}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("synth") / "faces")
    return out, _write(out)


def test_split_sizes():
    assert synth.split_sizes(4) == {"train": 4, "val": 2, "test": 2, "scene": 2, "detect": 2}
    assert synth.split_sizes(500) == {"train": 500, "val": 125, "test": 125, "scene": 125, "detect": 200}


def test_counts_per_split_and_class(dataset):
    out, record = dataset
    sizes = synth.split_sizes(N)
    for split in synth.SPLITS:
        for label in synth.CLASSES:  # the default share: as many mask_incorrect as mask or no_mask
            files = storage.list_files(storage.join(out, split, label), extensions=IMAGE_EXTENSIONS)
            names = [f.uri.rsplit("/", 1)[-1] for f in files]
            assert names == [f"{i:06d}.jpg" for i in range(sizes[split])]
            assert record["splits"][split][label] == sizes[split]
    assert sorted(storage.listdir(out)) == sorted(synth.OWN_ENTRIES)


def test_mask_incorrect_is_drawn_with_the_configured_share_and_its_coco_class(tmp_path):
    """``--incorrect-share``: the share of each split's pictures in mask_incorrect (variants below_nose and
    chin), scenes whose folder is an alert class hold a face of it, and the COCO boxes carry the class."""
    from maskmodel.alert import alert_classes, truth_alert
    from maskmodel.data.annotations import read_coco

    assert synth.class_sizes(100, 0.2)["train"] == {"mask": 100, "no_mask": 100, "mask_incorrect": 50}
    assert "mask_incorrect" not in synth.class_sizes(100, 0.0)["train"]
    out = str(tmp_path / "faces")
    record = synth.write_dataset(synth.DatasetConfig(out=out, n_per_class=8, image_size=32, incorrect_share=0.2))
    assert record["classes"] == list(synth.CLASSES) and record["incorrect_share"] == 0.2
    for split, counts in record["splits"].items():
        files = storage.list_files(storage.join(out, split, "mask_incorrect"), extensions=IMAGE_EXTENSIONS)
        assert len(files) == counts["mask_incorrect"] == max(1, round(counts["mask"] * 2 * 0.2 / 0.8))
    assert record["variants"]["train"]["below_nose"] + record["variants"]["train"]["chin"] == 4
    alerts = alert_classes(record["classes"])
    assert alerts == ("no_mask", "mask_incorrect")
    for name in (synth.SCENE_ANNOTATIONS, synth.DETECT_ANNOTATIONS):
        coco = storage.read_json(storage.join(out, name))
        assert [c["name"] for c in coco["categories"]] == list(synth.CLASSES)
        scenes = read_coco(storage.join(out, name))
        for s in scenes:  # the folder is an alert class exactly when a face is of one
            folder = s.path.split("/")[-2]
            assert (folder in alerts) == truth_alert(s.classes, alerts), s.path
            assert folder != "mask_incorrect" or ("mask_incorrect" in s.classes and "no_mask" not in s.classes)
        assert any("mask_incorrect" in s.classes for s in scenes)
    two = synth.write_dataset(synth.DatasetConfig(out=str(tmp_path / "two"), n_per_class=2, image_size=32,
                                                  incorrect_share=0.0))
    assert two["classes"] == ["mask", "no_mask"] and not storage.exists(str(tmp_path / "two" / "train" / "mask_incorrect"))


def test_every_image_decodes_at_the_requested_size(dataset):
    out, _ = dataset
    files = storage.list_files(out, extensions=("jpg",))
    assert len(files) == 3 * sum(synth.split_sizes(N).values())
    for f in files:  # scenes have room for several faces: four times the crop size, at least 128
        w, h = decode_image(storage.read_bytes(f.uri)).size
        if "/test/" in f.uri:  # a face of a 128-px scene as the face stage cuts it: its margin, clipped
            assert 24 <= min(w, h) and max(w, h) <= 128, (f.uri, w, h)
        else:
            side = 128 if "/scene/" in f.uri or "/detect/" in f.uri else SIZE
            assert (w, h) == (side, side)


def test_test_faces_are_cut_with_the_face_stages_margin_from_busy_scenes():
    from maskmodel.data.facecrop import crop_boxes
    from maskmodel.models.spec import DetectOptions

    import torch

    assert synth.FACE_MARGIN == DetectOptions().margin  # cut as scoring cuts
    cuts = [synth.render_face_cut(label, i, scene_size=256, seed=3) for label in synth.CLASSES for i in range(4)]
    assert {c.variant for c in cuts} >= {"below_nose", "chin", "plain"}
    sizes = {c.image.size for c in cuts}
    assert len(sizes) > 6 and all(30 <= min(s) and max(s) <= 256 for s in sizes)  # faces of many sizes, not square
    # A box well inside the picture grows by the margin on each side: 1.5 times the face, pixel-aligned outwards.
    grown = crop_boxes(torch.tensor([[100.0, 100.0, 140.0, 150.0]]), synth.FACE_MARGIN, (256, 256))
    assert grown.tolist() == [[90.0, 87.5, 150.0, 162.5]]
    again = synth.render_face_cut("no_mask", 2, scene_size=256, seed=3)
    assert again.jpeg() == cuts[6].jpeg()  # its own seed: the same face whatever was drawn before


def test_dataset_json_records_parameters_and_counts(dataset):
    out, record = dataset
    on_disk = storage.read_json(storage.join(out, "dataset.json"))
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["version"] == synth.VERSION and on_disk["seed"] == 0
    assert (on_disk["image_size"], on_disk["n_per_class"]) == (SIZE, N)
    assert on_disk["classes"] == ["mask", "no_mask", "mask_incorrect"]
    assert on_disk["total"] == sum(sum(c.values()) for c in on_disk["splits"].values())
    for split, variants in on_disk["variants"].items():
        assert sum(variants.values()) == sum(on_disk["splits"][split].values())
    rows = storage.read_text(storage.join(out, "variants.csv")).splitlines()
    assert rows[0] == "path,label,split,variant" and len(rows) == on_disk["total"] + 1
    assert rows[1].startswith("train/mask/000000.jpg,mask,train,")


def test_same_seed_same_bytes_other_seed_other_pictures(dataset, tmp_path):
    out, _ = dataset
    first = _tree(out)
    again = str(tmp_path / "again")
    _write(again, workers=1)  # other order and parallelism, same files
    assert _tree(again) == first
    other = str(tmp_path / "other")
    _write(other, seed=1)
    differ = _tree(other)
    images = [k for k in first if k.endswith(".jpg")]
    assert sum(first[k] != differ[k] for k in images) == len(images)


def test_render_sample_is_independent_of_order():
    a = synth.render_sample("val", "no_mask", 3, image_size=SIZE, seed=7).jpeg()
    synth.render_sample("val", "no_mask", 2, image_size=SIZE, seed=7)
    assert synth.render_sample("val", "no_mask", 3, image_size=SIZE, seed=7).jpeg() == a


def test_hard_negatives_share_and_kinds():
    rng = None  # no_mask variants do not draw from the generator
    variants = [synth.variant_for("no_mask", i, rng, 0.3) for i in range(200)]
    hard = [v for v in variants if v != "plain"]
    assert 0.25 <= len(hard) / len(variants) <= 0.35
    assert set(hard) == set(synth.HARD_NEGATIVES)
    assert {synth.variant_for("no_mask", i, rng, 0.0) for i in range(50)} == {"plain"}


def test_refuses_to_overwrite_unless_asked(dataset, tmp_path):
    out = str(tmp_path / "faces")
    _write(out, n_per_class=8)
    with pytest.raises(UserError, match="--overwrite"):
        _write(out)
    _write(out, overwrite=True)
    # The smaller dataset replaces the larger one: no stale files from the first run.
    assert len(storage.list_files(storage.join(out, "train", "mask"))) == N


@pytest.mark.parametrize("bad", [{"n_per_class": 1}, {"image_size": 16}, {"seed": -1},
                                 {"hard_negative_fraction": 1.5}, {"workers": 0}, {"incorrect_share": 0.9},
                                 {"incorrect_share": -0.1}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        synth.DatasetConfig(out="unused", **bad)


def test_s3_round_trip(s3_bucket, dataset):
    out = f"{s3_bucket}/faces"
    local, record = dataset
    assert _write(out) == record
    remote = _tree(out)
    assert remote == _tree(local)  # same seed, same bytes, wherever it is written
    for key, data in remote.items():
        if key.endswith(".jpg"):
            if not key.startswith("test/"):  # test: faces cut from scenes, sized by the face (test above)
                assert decode_image(data).size == ((128, 128) if key.startswith(("scene/", "detect/"))
                                                   else (SIZE, SIZE))
    assert storage.read_json(storage.join(out, "dataset.json"))["splits"]["scene"] == {"mask": 2, "no_mask": 2,
                                                                                  "mask_incorrect": 2}


def _job(*args: str, log_level: str = "INFO") -> subprocess.CompletedProcess:
    env = {**os.environ, "MASKMODEL_LOG_LEVEL": log_level}
    return subprocess.run([sys.executable, "-m", "jobs.make_dataset", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_job_writes_and_reports(tmp_path):
    out = str(tmp_path / "faces")
    done = _job("--out", out, "--n-per-class", "2", "--image-size", "32", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert out in done.stdout and "scene" in done.stdout and "no_mask 2" in done.stdout
    assert storage.read_json(storage.join(out, "dataset.json"))["seed"] == 3


def _unwritable(tmp_path: Path) -> str:
    blocker = tmp_path / "file"  # a path under a regular file cannot be written, even by root
    blocker.write_text("x")
    return str(blocker / "faces")


@pytest.mark.parametrize("target", ["ftp://host/faces", "s3://no-such-bucket-synth/faces", "unwritable"])
def test_job_bad_target_is_one_line(target, tmp_path, s3_endpoint):
    # WARNING: at INFO, aiobotocore adds "Found credentials in environment variables." before the error line.
    target = _unwritable(tmp_path) if target == "unwritable" else target
    done = _job("--out", target, "--n-per-class", "2", log_level="WARNING")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr


def test_webdataset_shards_hold_the_same_images(tmp_path):
    import io
    import tarfile

    from maskmodel.data import synth

    kw = dict(n_per_class=6, image_size=40, workers=4, incorrect_share=0.0)  # two classes: 12 images a split
    synth.write_dataset(synth.DatasetConfig(out=str(tmp_path / "folders"), **kw))
    record = synth.write_dataset(synth.DatasetConfig(out=str(tmp_path / "wds"), format="webdataset", shard_size=5, **kw))
    assert record["format"] == "webdataset" and record["total"] == 2 * (6 + 3 * 2 + 2)
    shards = sorted(storage.listdir(str(tmp_path / "wds" / "train")))
    assert shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]  # 12 images, 5 per shard
    seen = {}
    for shard in shards:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(str(tmp_path / "wds" / "train" / shard)))) as tar:
            for m in tar.getmembers():
                seen[m.name] = tar.extractfile(m).read()
    assert len([n for n in seen if n.endswith(".jpg")]) == 12 and {seen["mask/000003.cls"], seen["no_mask/000003.cls"]} == {
        b"0\n", b"1\n"}
    for name in ("mask/000003.jpg", "no_mask/000005.jpg"):
        assert seen[name] == storage.read_bytes(str(tmp_path / "folders" / "train" / name))
    again = synth.write_dataset(synth.DatasetConfig(out=str(tmp_path / "wds2"), format="webdataset", shard_size=5, **kw))
    assert again == record and storage.read_bytes(str(tmp_path / "wds2" / "train" / shards[1])) == storage.read_bytes(
        str(tmp_path / "wds" / "train" / shards[1]))
