"""Batch scoring: pure steps without Ray, then the pipeline on a real local Ray and the real S3 endpoint."""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import DeltaTable
from PIL import Image

from maskmodel import results
from maskmodel.runtime import testhooks
from maskmodel.config import parse_config
from maskmodel.data.transforms import EvalPreset
from maskmodel.errors import UserError
from maskmodel.io import fetch, objectkeys, storage
from maskmodel.io.decode import decode_image, to_uint8_chw
from maskmodel.models import precision
from maskmodel.models.classifier import ModelCard, build_model, load_model_dir, save_model_dir, state_dict_bytes
from maskmodel.results import delta
from maskmodel.score import inference, loading, pipeline, scoring
from maskmodel.score.scoring import ScoreConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ("mask", "no_mask")


# ----------------------------------------------------------------------------- test data

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def face(kind: int, seed: int, size=(48, 40)) -> Image.Image:
    """A tiny synthetic 'face': class 0 has a bright lower half (a mask), class 1 a bright upper half."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
    half = size[1] // 2
    if kind == 0:
        a[half:, :, 2] = 200
    else:
        a[:half, :, 0] = 200
    return Image.fromarray(a)


def png_claiming(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims ``width x height`` pixels: a decompression bomb."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good_images() -> dict[str, bytes]:
    """Both classes, in every format photos come in (and the modes decode must convert)."""
    out = {}
    for i in range(4):
        out[f"mask/m{i}.jpg"] = encode(face(0, i), "JPEG", quality=90)
        out[f"no_mask/n{i}.jpg"] = encode(face(1, 100 + i), "JPEG", quality=90)
    out["mask/upper.JPEG"] = encode(face(0, 7), "JPEG")
    out["mask/alpha.png"] = encode(face(0, 8).convert("RGBA"), "PNG")
    out["no_mask/gray.png"] = encode(face(1, 9).convert("L"), "PNG")
    out["no_mask/cmyk.jpg"] = encode(face(1, 10).convert("CMYK"), "JPEG")
    out["no_mask/deep.png"] = encode(Image.fromarray(np.asarray(face(1, 11).convert("L"), np.uint16) * 250), "PNG")
    out["mask/pal.gif"] = encode(face(0, 12).convert("P"), "GIF")
    out["mask/w.webp"] = encode(face(0, 13), "WEBP")
    out["no_mask/b.bmp"] = encode(face(1, 14), "BMP")
    out["no_mask/t.TIF"] = encode(face(1, 15), "TIFF")
    return out


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Every bad kind the issue names: bytes and the expected start of the error reason."""
    jpeg = encode(face(0, 99), "JPEG", quality=90)
    return {
        "bad/zero.jpg": (b"", "empty file"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated image"),
        "bad/text.jpg": (b"this is a text file, not a photo\n", "not an image"),
        "bad/odd.png": (encode(Image.new("RGB", (20, 20)), "PPM"), "unsupported format: PPM"),
        "bad/bomb.png": (png_claiming(100_000, 100_000), "too large: 10000000000 pixels"),
        "bad/dot.png": (encode(Image.new("RGB", (1, 1)), "PNG"), "too small: 1x1"),
        "bad/strip.png": (encode(Image.new("L", (20000, 8)), "PNG"), "too large: 20000x8"),
    }


def write_model(uri: str, *, seed: int = 0) -> ModelCard:
    torch.manual_seed(seed)
    model = build_model("resnet18", len(CLASSES))
    return save_model_dir(uri, state_dict_bytes(model),
                          ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37))


@functools.lru_cache(maxsize=4)
def _load(model_uri: str):
    return load_model_dir(model_uri)


def reference_probs(model_uri: str, data: bytes) -> np.ndarray:
    """The model applied directly in-process: decode, EvalPreset, plain fp32 forward, softmax."""
    model, card = _load(model_uri)
    preset = EvalPreset(crop_size=card.input_size, resize_size=card.resize_size, mean=card.mean, std=card.std)
    x = preset(torch.from_numpy(to_uint8_chw(decode_image(data))))[None]
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0].numpy()


def by_path(table: pa.Table) -> dict[str, dict]:
    return {r["path"]: r for r in table.to_pylist()}


# ----------------------------------------------------------------------------- pure steps, no Ray

def test_load_batch_turns_every_bad_kind_into_a_reason(tmp_path):
    root = str(tmp_path)
    objs = {**{k: (v, None) for k, v in list(good_images().items())[:3]}, **bad_images()}
    for name, (data, _) in objs.items():
        storage.write_bytes(storage.join(root, name), data)
    paths = [storage.join(root, n) for n in objs] + [storage.join(root, "gone.jpg")]
    card = ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37)
    out = loading.load_batch({"path": np.array(paths, dtype=object)}, card=card, max_bytes=1 << 20)
    reasons = dict(zip(out["path"], out["error"]))
    for name, (_, expected) in objs.items():
        got = reasons[storage.join(root, name)]
        assert (got is None) if expected is None else got.startswith(expected), (name, got)
    assert reasons[storage.join(root, "gone.jpg")] == "unreadable: not found"
    assert out["pixels"].shape == (len(paths), 3, 32, 32) and out["pixels"].dtype == np.uint8  # uint8 crops
    assert (out["width"][:3] == 48).all() and (out["width"][3:] == -1).all()
    assert all(v for v in out["version"][:3])  # versions looked up, as a manifest needs
    threaded = loading.load_batch({"path": np.array(paths, dtype=object)}, card=card, max_bytes=1 << 20,
                                  decode_threads=4)
    assert all(np.array_equal(threaded[k], out[k]) for k in ("pixels", "width", "height"))
    assert list(threaded["error"]) == list(out["error"]) and list(threaded["path"]) == list(out["path"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_many_reads_in_order_with_listing_versions(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uris = [storage.join(root, f"{i}.bin") for i in range(5)]
    for i, u in enumerate(uris):
        storage.write_bytes(u, bytes([i]) * (10 * i))
    listed = {o.uri: o for o in storage.list_files(root)}
    got = fetch.read_many([*uris, storage.join(root, "gone.bin")], max_bytes=25, concurrency=3)
    assert [g.data for g in got[:3]] == [b"", b"\x01" * 10, b"\x02" * 20]
    assert [(g.data, g.size) for g in got[3:5]] == [(None, 30), (None, 40)]  # over the limit: not downloaded
    assert [g.version for g in got[:5]] == [listed[u].version for u in uris]  # the version a listing reports
    assert isinstance(got[5].error, FileNotFoundError) and got[5].data is None
    heads = fetch.read_many(uris, max_bytes=0, head=True)
    assert [(h.data, h.size, h.version) for h in heads] == [(None, 10 * i, listed[u].version) for i, u in enumerate(uris)]


def test_load_batch_reads_concurrently_with_one_get_per_object(s3_bucket, s3_endpoint, monkeypatch):
    from maskmodel.io.latency_proxy import LatencyProxy

    uris = [f"{s3_bucket}/m/{i:02d}.jpg" for i in range(24)]
    datas = [encode(face(i % 2, i), "JPEG") for i in range(24)]
    for u, d in zip(uris, datas):
        storage.write_bytes(u, d)
    card = ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37)
    with LatencyProxy(s3_endpoint, latency_s=0.05) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)  # every request now pays 50 ms
        # Manifest rows: no version, no size. Their versions must come from the GETs themselves.
        out = loading.load_batch({"path": np.array(uris, dtype=object)}, card=card, max_bytes=1 << 20,
                                   concurrency=16)
    assert list(out["error"]) == [None] * 24 and all(out["version"]) and list(out["size"]) == [len(d) for d in datas]
    assert proxy.requests["GET"] == 24 and proxy.requests["HEAD"] == 0, proxy.requests
    assert proxy.max_in_flight > 4, proxy.max_in_flight  # concurrent, not one object after another


def test_load_batch_drops_already_scored_pairs(tmp_path):
    uri = str(tmp_path / "a.jpg")
    storage.write_bytes(uri, encode(face(0, 1), "JPEG"))
    card = ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37)
    batch = {"path": np.array([uri], dtype=object)}
    version = storage.info(uri).version
    skip = np.sort(objectkeys.object_keys([uri], [version]))
    assert len(loading.load_batch(batch, card=card, max_bytes=1 << 20, skip_keys=skip)["path"]) == 0
    assert len(loading.load_batch(batch, card=card, max_bytes=1 << 20)["path"]) == 1


def test_predictor_in_process_matches_the_model_and_the_schema(tmp_path):
    model_uri = str(tmp_path / "model")
    card = write_model(model_uri)
    datas = [encode(face(i % 2, i), "JPEG") for i in range(5)] + [b""]
    for i, d in enumerate(datas):
        storage.write_bytes(str(tmp_path / f"{i}.jpg"), d)
    batch = loading.load_batch({"path": np.array([str(tmp_path / f"{i}.jpg") for i in range(6)], dtype=object)},
                               card=card, max_bytes=1 << 20)
    table = inference.Predictor(model_uri, run_id="r", precision="fp32")(batch)
    assert table.schema == results.results_schema(CLASSES)
    rows = table.to_pylist()
    for row, data in zip(rows[:5], datas):
        ref = reference_probs(model_uri, data)
        assert row["status"] == "ok" and row["error"] is None and row["model_id"] == card.model_id
        assert np.allclose([row["p_mask"], row["p_no_mask"]], ref, atol=1e-4)
        assert row["label"] == CLASSES[int(ref.argmax())] and abs(row["confidence"] - ref.max()) < 1e-4
    assert rows[5]["status"] == "error" and rows[5]["error"] == "empty file"
    assert rows[5]["label"] is None and rows[5]["p_mask"] is None and rows[5]["width"] is None


def test_device_decode_gives_the_cpu_paths_rows_and_falls_back_image_by_image(tmp_path):
    model_uri = str(tmp_path / "model")
    card = write_model(model_uri)
    good = {f"g{i}.jpg": encode(face(i % 2, i), "JPEG", quality=90) for i in range(4)}
    refused = encode(face(1, 50), "JPEG", quality=75)  # the device decoder will refuse this one
    objs = {**good, "refused.jpg": refused, "cmyk.jpg": good_images()["no_mask/cmyk.jpg"],
            "pic.png": encode(face(0, 60), "PNG"), "cut.jpg": good["g0.jpg"][:300], "text.jpg": b"no picture"}
    paths = []
    for name, data in objs.items():
        paths.append(str(tmp_path / name))
        storage.write_bytes(paths[-1], data)
    batch = {"path": np.array(paths, dtype=object)}
    cpu = loading.load_batch(batch, card=card, max_bytes=1 << 20)
    dev = loading.load_batch(batch, card=card, max_bytes=1 << 20, gpu_decode=True)
    shipped = {os.path.basename(p) for p, e in zip(dev["path"], dev["encoded"]) if e}
    # Complete YCbCr JPEGs with good headers travel compressed; the CMYK JPEG (colour conversion on the CPU),
    # the PNG, the cut-off JPEG and the text file do not.
    assert shipped == {*good, "refused.jpg"} and "pixels" not in dev

    calls = []

    def decoder(tensors, device):  # torchvision's decoder on the CPU, refusing one image as nvJPEG might
        calls.append(len(tensors))
        if any(len(t) == len(refused) for t in tensors):
            raise RuntimeError("nvjpeg: unsupported")
        return inference.torchvision_jpeg_decoder(tensors, device)

    expected = inference.Predictor(model_uri, run_id="r", precision="fp32")(cpu).to_pylist()
    got = inference.Predictor(model_uri, run_id="r", precision="fp32", decoder=decoder)(dev).to_pylist()
    assert calls == [5, 1, 1, 1, 1, 1]  # the batch, then image by image after it was refused
    exact = ["path", "version", "size", "status", "error", "label", "width", "height"]
    assert [{k: r[k] for k in exact} for r in got] == [{k: r[k] for k in exact} for r in expected]
    for a, b in zip(got, expected):
        if a["status"] == "ok":
            assert abs(a["p_mask"] - b["p_mask"]) < 1e-2, (a["path"], a["p_mask"], b["p_mask"])
    reasons = {os.path.basename(r["path"]): r["error"] for r in got}
    assert reasons["cut.jpg"] == "truncated image" and reasons["text.jpg"] == "not an image"
    assert reasons["refused.jpg"] is None  # decoded on the CPU instead


def test_precision_policy(monkeypatch):
    card = ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37)
    verified = ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37,
                         metrics={precision.BF16_AGREEMENT_KEY: 1.0})
    assert precision.resolve_precision("fp32", device="cuda", card=card) == "fp32"
    assert precision.resolve_precision("bf16", device="cpu", card=card) == "bf16"
    assert precision.resolve_precision("auto", device="cuda", card=card) == "bf16"
    assert precision.resolve_precision("auto", device="cpu", card=card) == "fp32"  # not verified
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", device="cpu", card=verified) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", device="cpu", card=verified) == "fp32"


def test_label_agreement_is_a_share():
    torch.manual_seed(0)
    model = build_model("resnet18", 2)
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    share = precision.label_agreement(model, [pixels], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert 0.0 <= share <= 1.0


def test_manifest_paths_resolve_like_a_listing(tmp_path):
    base = str(tmp_path)
    assert pipeline.resolve_manifest_path(base, "a/b.jpg") == os.path.join(base, "a/b.jpg")
    assert pipeline.resolve_manifest_path(base, "/x/y.jpg") == "/x/y.jpg"
    assert pipeline.resolve_manifest_path(base, "file:///x/y.jpg") == "/x/y.jpg"
    assert pipeline.resolve_manifest_path("s3://b/m", "a/b.jpg") == "s3://b/m/a/b.jpg"
    assert pipeline.resolve_manifest_path("s3://b/m", "s3://c/d.jpg ") == "s3://c/d.jpg"


def test_a_small_manifest_is_read_by_the_driver_like_a_listing(tmp_path, monkeypatch):
    images = tmp_path / "images"
    names = sorted(good_images())[:3]
    for name in names:
        storage.write_bytes(str(images / name), good_images()[name])
    model = str(tmp_path / "model")
    write_model(model)
    # Parquet with a version for one entry and a size for none; paths relative and absolute.
    pq.write_table(pa.table({"path": [names[0], str(images / names[1]), names[2]],
                             "version": ["v0", None, None], "note": ["a", "b", "c"]}), str(images / "m.parquet"))
    cfg = ScoreConfig(input=str(images / "m.parquet"), model=model, output=str(tmp_path / "out"))
    plan = scoring.prepare(cfg)
    assert plan.manifest is None and [o.uri for o in plan.objects] == [str(images / n) for n in names]
    assert [(o.version, o.size) for o in plan.objects] == [("v0", None), (None, None), (None, None)]
    assert plan.total == 3
    # --incremental: entries with a version are checked on the driver, the others as they are read.
    monkeypatch.setattr(scoring.incremental, "committed_keys", lambda *a, **k: objectkeys.object_keys(
        [str(images / names[0])], ["v0"]))
    plan = scoring.prepare(dataclasses.replace(cfg, incremental=True))
    assert [o.uri for o in plan.objects] == [str(images / n) for n in names[1:]]
    assert plan.skipped is None and len(plan.skip_keys) == 1 and plan.total is None
    # One sentence for an entry without a path, before any work.
    pq.write_table(pa.table({"path": ["a.jpg", None]}), str(images / "holes.parquet"))
    assert "empty path in row 2" in _door({"input": str(images / "holes.parquet"), "model": model,
                                            "output": str(tmp_path / "out-holes")})
    monkeypatch.setattr(scoring, "MANIFEST_ON_DRIVER_ROWS", 3)  # the bound is inclusive: Parquet rows from its footer
    assert scoring.prepare(cfg).objects is not None
    monkeypatch.setattr(scoring, "MANIFEST_ON_DRIVER_ROWS", 2)  # a large manifest: left to Ray's reader
    plan = scoring.prepare(cfg)
    assert plan.objects is None and plan.manifest == cfg.input and plan.total == 3
    csv_manifest = images / "m.csv"  # a CSV's rows are estimated from its size
    csv_manifest.write_text("path\n" + "".join(f"{n}\n" for n in names))
    monkeypatch.setattr(scoring, "MANIFEST_ON_DRIVER_ROWS", 1 + csv_manifest.stat().st_size // scoring.CSV_ROW_BYTES)
    assert scoring.prepare(dataclasses.replace(cfg, input=str(csv_manifest))).objects is not None
    monkeypatch.setattr(scoring, "MANIFEST_ON_DRIVER_ROWS", 0)
    assert scoring.prepare(dataclasses.replace(cfg, input=str(csv_manifest))).manifest is not None


def test_config_cli_and_validation():
    cfg = parse_config(ScoreConfig, ["--input", "in", "--model", "m", "--output", "o", "--incremental",
                                     "--extensions", "jpg", "png", "--precision", "bf16", "--num-gpus", "0.5"])
    assert cfg.incremental and cfg.extensions == ("jpg", "png") and cfg.precision == "bf16" and cfg.num_gpus == 0.5
    assert cfg.run_id == "" and not cfg.allow_empty
    with pytest.raises(ValueError):
        ScoreConfig(input="i", model="m", output="o", run_id="a/b")
    with pytest.raises(SystemExit):
        parse_config(ScoreConfig, ["--input", "i", "--model", "m", "--output", "o", "--precision", "fp16"])


# ----------------------------------------------------------------------------- door errors (nothing written)

@pytest.fixture
def local_setup(tmp_path):
    images = tmp_path / "images"
    for name, data in list(good_images().items())[:2]:
        storage.write_bytes(str(images / name), data)
    model = str(tmp_path / "model")
    write_model(model)
    return {"input": str(images), "model": model, "output": str(tmp_path / "out"), "tmp": tmp_path}


def _door(s, **over) -> str:
    cfg = ScoreConfig(**{"input": s["input"], "model": s["model"], "output": s["output"], **over})
    with pytest.raises(UserError) as e:
        scoring.prepare(cfg)
    msg = str(e.value)
    assert "\n" not in msg and not os.path.exists(s["output"])
    return msg


def test_door_errors_are_one_sentence_and_write_nothing(local_setup):
    s, tmp = local_setup, local_setup["tmp"]
    assert "does not exist" in _door(s, input=str(tmp / "nope"))
    (tmp / "empty").mkdir()
    assert "No images under" in _door(s, input=str(tmp / "empty")) and "--allow-empty" in _door(
        s, input=str(tmp / "empty"))
    assert "not a model directory" in _door(s, model=str(tmp / "nomodel"))
    bad_model = tmp / "badmodel"
    bad_model.mkdir()
    (bad_model / "model.json").write_text("{not json")
    assert "not valid JSON" in _door(s, model=str(bad_model))
    (bad_model / "model.json").write_text('{"arch": "resnet18"}')
    assert "not a valid model card" in _door(s, model=str(bad_model))
    (tmp / "afile").write_text("x")
    assert str(tmp / "afile") in _door(s, output=str(tmp / "afile" / "out"))
    manifest = tmp / "m.csv"
    manifest.write_text("file\na.jpg\n")
    assert "no 'path' column" in _door(s, input=str(manifest))
    manifest.write_text("path\n")
    assert "lists no images" in _door(s, input=str(manifest))


def test_missing_bucket_is_a_door_error(local_setup, s3_endpoint):
    msg = _door(local_setup, output=f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out")
    assert "does not exist" in msg and "bucket" in msg


def _job(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.score", *args], cwd=REPO, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def test_job_exit_codes_at_the_door(local_setup, s3_bucket):
    s, tmp = local_setup, local_setup["tmp"]
    (tmp / "empty").mkdir()
    base = ["--model", s["model"], "--output", s["output"]]
    empty = _job(["--input", str(tmp / "empty"), *base])
    assert empty.returncode == 2 and empty.stderr.strip().splitlines()[-1].startswith("error: No images under")
    assert not os.path.exists(s["output"])
    # --allow-empty: exit 0 and an empty committed run (no Ray needed for zero images).
    ok = _job(["--input", str(tmp / "empty"), *base, "--allow-empty", "--run-id", "e"])
    assert ok.returncode == 0, ok.stderr
    assert "0 images" in ok.stdout and "_delta_log" in ok.stdout
    assert [r.run_id for r in results.list_commits(s["output"])] == ["e"]
    # Missing credentials for an S3 input: one sentence, exit 2.
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    creds = _job(["--input", s3_bucket + "/images", "--model", s["model"], "--output", s3_bucket + "/out"], env=env)
    assert creds.returncode == 2
    last = creds.stderr.strip().splitlines()[-1]
    assert last.startswith("error: No credentials found") and "Traceback" not in creds.stderr


# ----------------------------------------------------------------------------- the pipeline on Ray + S3

@pytest.fixture(scope="module")
def s3_root(s3_endpoint):
    import s3fs

    name = f"score-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def scored(s3_root, ray_local):
    """The whole collection (good, bad, one deleted between listing and reading) scored from an S3 prefix."""
    images, model = f"{s3_root}/images", f"{s3_root}/model"
    card = write_model(model)
    good, bad = good_images(), bad_images()
    for name, data in {**good, **{k: v for k, (v, _) in bad.items()}}.items():
        storage.write_bytes(storage.join(images, name), data)
    storage.write_bytes(storage.join(images, "bad/deleted.jpg"), good["mask/m0.jpg"])
    storage.write_bytes(storage.join(images, "notes.txt"), b"not listed: wrong extension")
    cfg = ScoreConfig(input=images, model=model, output=f"{s3_root}/out", run_id="night-1", precision="fp32",
                      read_batch=4, batch_size=8, rows_per_file=10)
    plan = scoring.prepare(cfg)
    storage.delete(storage.join(images, "bad/deleted.jpg"))  # gone between listing and reading
    result = scoring.execute(plan)
    return {"cfg": cfg, "card": card, "plan": plan, "result": result, "good": good, "bad": bad,
            "table": results.read_results(cfg.output), "images": images, "root": s3_root}


@pytest.mark.ray
def test_one_committed_row_per_input_object(scored):
    table, plan = scored["table"], scored["plan"]
    listed = [o.uri for o in plan.objects]
    assert len(listed) == len(scored["good"]) + len(scored["bad"]) + 1  # notes.txt is not an image
    assert sorted(table.column("path").to_pylist()) == sorted(listed)
    r = scored["result"]
    assert (r.images, r.ok, r.errors) == (len(listed), len(scored["good"]), len(scored["bad"]) + 1)
    record = results.list_commits(scored["cfg"].output)[0]
    assert len(record.files) == 3  # rolled at --rows-per-file 10
    assert record.raw["counts"]["images"] == len(listed) and record.raw["model_id"] == scored["card"].model_id
    assert record.raw["config"]["run_id"] == "night-1" and record.raw["precision"] == "fp32"


@pytest.mark.ray
def test_statuses_reasons_and_probabilities(scored):
    rows, images, card = by_path(scored["table"]), scored["images"], scored["card"]
    for name, (_, reason) in scored["bad"].items():
        row = rows[storage.join(images, name)]
        assert row["status"] == "error" and row["error"].startswith(reason), (name, row["error"])
        assert row["label"] is None and row["p_mask"] is None
    assert rows[storage.join(images, "bad/deleted.jpg")]["error"] == "unreadable: not found"
    for name, data in scored["good"].items():
        row = rows[storage.join(images, name)]
        ref = reference_probs(scored["cfg"].model, data)
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
        assert abs(row["p_mask"] - ref[0]) < 1e-4 and abs(row["p_no_mask"] - ref[1]) < 1e-4
        assert row["label"] == CLASSES[int(ref.argmax())]
        assert (row["width"], row["height"]) == (48, 40) and row["version"] and row["size"] == len(data)
        assert row["model_id"] == card.model_id and row["run_id"] == "night-1" and row["scored_at"] is not None


@pytest.mark.ray
@pytest.mark.parametrize("read_by", ["driver", "ray"])
def test_manifest_input_gives_the_same_rows(scored, read_by, monkeypatch):
    if read_by == "ray":  # as a manifest over MANIFEST_ON_DRIVER_ROWS is read: streamed by Ray Data's reader
        monkeypatch.setattr(scoring, "MANIFEST_ON_DRIVER_ROWS", 0)
    images, root = scored["images"], scored["root"]
    names = sorted([*scored["good"], *scored["bad"]])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "note"])
    for i, name in enumerate(names):  # relative to the manifest's folder, and absolute URIs, mixed
        w.writerow([name if i % 2 else storage.join(images, name), "x"])
    storage.write_text(storage.join(images, "manifest.csv"), buf.getvalue())
    out = f"{root}/out-manifest-{read_by}"
    cfg = ScoreConfig(input=storage.join(images, "manifest.csv"), model=scored["cfg"].model,
                      output=out, run_id="m", precision="fp32", read_batch=4, batch_size=8)
    plan = scoring.prepare(cfg)
    assert (plan.objects is not None, plan.manifest is not None) == ((True, False) if read_by == "driver" else
                                                                      (False, True))
    res = scoring.execute(plan)
    assert res.images == len(names)
    exact = ["path", "version", "size", "status", "error", "label", "width", "height", "model_id"]
    floats = ["confidence", "p_mask", "p_no_mask"]
    prefix = {p: r for p, r in by_path(scored["table"]).items() if not p.endswith("deleted.jpg")}
    manifest = by_path(results.read_results(out))
    assert manifest.keys() == prefix.keys()
    for p, row in manifest.items():
        assert {c: row[c] for c in exact} == {c: prefix[p][c] for c in exact}
        for c in floats:  # batches group images differently; the kernels may round differently
            assert (row[c] is None and prefix[p][c] is None) or abs(row[c] - prefix[p][c]) < 1e-5


@pytest.mark.ray
def test_query_summary_over_scored_s3_results(scored):
    from maskmodel.results import query

    s = query.summary(scored["cfg"].output).to_pylist()
    assert len(s) == 1 and s[0]["run_id"] == "night-1" and s[0]["images"] == scored["result"].images
    assert s[0]["errors"] == scored["result"].errors and s[0]["model_id"] == scored["card"].model_id
    reasons = query.query(scored["cfg"].output, query.EXAMPLES["errors by reason"]).to_pylist()
    assert sum(r["images"] for r in reasons) == scored["result"].errors


@pytest.mark.ray
def test_scoring_metrics_reach_rays_metrics_endpoint(scored, ray_local):
    import re
    import urllib.request

    node = next(n for n in ray_local.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    result, want = scored["result"], {}
    images = re.compile(r'^ray_maskmodel_score_images_total\{[^}]*run_id="night-1"[^}]*\} (\S+)$', re.M)
    errors = re.compile(r'^ray_maskmodel_score_errors_total\{[^}]*reason="([^"]+)"[^}]*run_id="night-1"[^}]*\} (\S+)$',
                        re.M)
    deadline = time.monotonic() + 60  # Ray's metrics agent exports every 10 s by default
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if (m := images.search(text)) and float(m.group(1)) == result.images:
            want = {reason: float(n) for reason, n in errors.findall(text)}
            if sum(want.values()) == result.errors:
                break
        time.sleep(1)
    assert images.search(text) and float(images.search(text).group(1)) == result.images, text[-3000:]
    kinds = {r["error"].split(":")[0] for r in scored["table"].to_pylist() if r["error"]}
    assert set(want) == kinds and sum(want.values()) == result.errors, want
    # The run's outcome gauges, set once after its commit from its profile.
    gauge = re.compile(r'^ray_maskmodel_run_error_rate\{[^}]*run_id="night-1"[^}]*\} (\S+)$', re.M)
    while not gauge.search(text) and time.monotonic() < deadline + 30:
        time.sleep(1)
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert gauge.search(text), text[-3000:]
    assert float(gauge.search(text).group(1)) == pytest.approx(result.errors / result.images)


@pytest.mark.ray
def test_rerun_replaces_and_incremental_scores_only_new_objects(s3_root, ray_local):
    images, out, model = f"{s3_root}/inc/images", f"{s3_root}/inc/out", f"{s3_root}/inc/model"
    write_model(model)
    for i in range(4):
        storage.write_bytes(f"{images}/a{i}.jpg", encode(face(i % 2, i), "JPEG"))
    cfg = ScoreConfig(input=images, model=model, output=out, run_id="r1", read_batch=2, batch_size=4)
    scoring.score(cfg)
    scoring.score(cfg)  # the same run id again
    table = results.read_results(out)
    assert table.num_rows == 4 and len(set(table.column("path").to_pylist())) == 4
    [r1] = results.list_commits(out)
    assert len({os.path.basename(f.path).split("-", 2)[2] for f in r1.files}) == 1  # one attempt's files: the last
    for i in range(4, 6):
        storage.write_bytes(f"{images}/a{i}.jpg", encode(face(i % 2, i), "JPEG"))
    inc = ScoreConfig(input=images, model=model, output=out, run_id="r2", incremental=True, read_batch=2, batch_size=4)
    res = scoring.score(inc)
    assert (res.images, res.skipped) == (2, 4)
    assert sorted(results.read_results(out, ["r2"]).column("path").to_pylist()) == [f"{images}/a4.jpg",
                                                                                  f"{images}/a5.jpg"]
    res = scoring.score(inc)  # re-running an incremental run replaces it; it does not skip its own rows
    assert res.images == 2
    paths = results.read_results(out).column("path").to_pylist()
    assert len(paths) == 6 and len(set(paths)) == 6
    assert scoring.score(dataclasses.replace(inc, run_id="r3")).images == 0  # nothing new


@pytest.mark.ray
def test_job_console_is_quiet_unless_verbose(tmp_path, ray_local):
    images, model = tmp_path / "images", str(tmp_path / "model")
    write_model(model)
    for i in range(6):
        storage.write_bytes(str(images / f"{i}.jpg"), encode(face(i % 2, i), "JPEG"))
    storage.write_bytes(str(images / "bad.jpg"), b"oops")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    base = ["--input", str(images), "--model", model, "--output", str(tmp_path / "out")]
    quiet = _job([*base, "--run-id", "q"], env=env)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.strip().splitlines()[-1].startswith("7 images: 6 ok, 1 errors")
    assert "scoring q: 7/7 (100%) images" in quiet.stderr and "| 1 errors |" in quiet.stderr
    for noise in ("Execution plan", "Starting execution", "core_worker.cc", "Started a local Ray", "INFO "):
        assert noise not in quiet.stderr.replace("INFO maskmodel", ""), noise
    loud = _job([*base, "--run-id", "v", "--verbose"], env=env)
    assert loud.returncode == 0 and "Execution plan" in loud.stderr


@pytest.mark.ray
def test_killed_driver_leaves_nothing_visible_and_rerun_completes(tmp_path, ray_local):
    images, out, model = tmp_path / "images", str(tmp_path / "out"), str(tmp_path / "model")
    write_model(model)
    n = 12
    for i in range(n):
        storage.write_bytes(str(images / f"{i:02d}.jpg"), encode(face(i % 2, i), "JPEG"))
    args = ["--input", str(images), "--model", model, "--output", out, "--run-id", "k",
            "--read-batch", "2", "--batch-size", "2", "--rows-per-file", "2"]
    # The driver stops after writing its second batch (two closed files) until the test has killed it.
    pause_dir = str(tmp_path / "pause")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           **testhooks.env("score-batch-2", pause_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.score", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_folder = results.run_dir(out, "k")
    try:
        testhooks.wait_paused("score-batch-2", pause_dir, alive=lambda: proc.poll() is None)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-run, after writing some files
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = {f.uri for f in _files(run_folder)}
    assert len([u for u in killed if u.endswith(".parquet")]) == 2  # partial files are there...
    assert results.list_commits(out) == [] and results.read_results(out).num_rows == 0  # ...but invisible
    assert not delta.has_log(out)  # the run died before its commit: for Delta readers there is no table yet
    res = scoring.score(ScoreConfig(input=str(images), model=model, output=out, run_id="k", read_batch=4))
    table = results.read_results(out)
    assert res.images == n and table.num_rows == n and len(set(table.column("path").to_pylist())) == n
    # Every Delta reader counts the re-run's rows only, never the killed attempt's.
    assert DeltaTable(out).to_pyarrow_dataset().count_rows() == n and len(DeltaTable(out).to_pandas()) == n
    [run] = results.list_commits(out)
    committed = {storage.join(out, f.path) for f in run.files}
    assert not committed & killed and {f.uri for f in _files(run_folder)} == committed | killed
    # The killed attempt's files are orphans: a vacuum past their retention removes them, and only them.
    assert delta.vacuum(out, retention_hours=0) == sorted(os.path.relpath(u, out) for u in killed)
    assert {f.uri for f in _files(run_folder)} == committed and results.read_results(out).num_rows == n


def _files(uri: str):
    return storage.list_files(uri) if storage.exists(uri) else []
