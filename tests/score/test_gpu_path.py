"""The scoring GPU path's device-independent logic, on the CPU: device identity, decode routing, the device
decoder (injected: torchvision's decoder on the CPU, which like nvJPEG ignores EXIF orientation), the row contract.

CUDA tensors are faked where a test needs one (``FakeTensorMode``: tensors with a device and a shape, no data),
so the branches taken for a GPU run here too. ``benchmarks/gpu_check.py`` runs the same classes on a real GPU.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from maskmodel.io import storage
from maskmodel.models import precision
from maskmodel.models.classifier import ModelCard, build_model, save_model_dir, state_dict_bytes
from maskmodel.score import gpu_decode, inference, loading

CLASSES = ("mask", "no_mask")
CARD = ModelCard(arch="resnet18", classes=CLASSES, input_size=32, resize_size=37)


def jpeg(img: Image.Image, *, orientation: int | None = None, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def picture(seed: int, size=(64, 40)) -> Image.Image:
    """A picture whose halves differ (bright top-left quarter): any rotation or mirror shows in the crop."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    a[: size[1] // 2, : size[0] // 2] = 230
    return Image.fromarray(a)


def nvjpeg_like(tensors, device):
    """torchvision's decoder on the CPU, as nvJPEG behaves: no EXIF orientation."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def write_model(uri: str) -> None:
    torch.manual_seed(0)
    save_model_dir(uri, state_dict_bytes(build_model("resnet18", 2)), CARD)


def load(tmp_path, objs: dict[str, bytes], **kw) -> dict:
    paths = []
    for name, data in objs.items():
        paths.append(str(tmp_path / name))
        storage.write_bytes(paths[-1], data)
    max_bytes = kw.pop("max_bytes", 1 << 20)
    return loading.load_batch({"path": np.array(paths, dtype=object)}, card=CARD, max_bytes=max_bytes, **kw)


class Inputs(torch.nn.Module):
    """The model, recording what it is given (the crops the predictor assembled, in row order)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


# ----------------------------------------------------------------------------- device identity

def test_same_device_compares_type_and_index():
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda:0"), torch.device("cuda:1")
    assert cuda != cuda0  # what the old comparison tripped over
    assert precision.same_device(cuda, cuda0) and precision.same_device("cuda:0", cuda)
    assert not precision.same_device(cuda0, cuda1) and not precision.same_device(cuda0, "cpu")
    assert precision.same_device(torch.device("cpu"), torch.device("cpu", 0))
    assert precision.resolve_device("cuda").index == 0  # no CUDA here: the index a tensor moved to 'cuda' reports


class Reached(Exception):
    """The model was called: everything before it (the move to the device) went through."""


def test_predict_never_pins_a_tensor_already_on_the_device(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    pinned = []
    real_pin = torch.Tensor.pin_memory

    def spy(self, *a, **k):
        pinned.append(self.device)
        if self.device.type != "cpu":
            raise RuntimeError(f"cannot pin a tensor on {self.device}")  # what torch raises on a real GPU
        return self if isinstance(self, torch._subclasses.fake_tensor.FakeTensor) else real_pin(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)

    def model(x):
        assert x.device == torch.device("cuda:0")
        raise Reached

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.warns(UserWarning, match="autocast"):
        on_gpu = torch.zeros(4, 3, 8, 8, dtype=torch.uint8, device="cuda:0")  # as a decoded batch lands
        with pytest.raises(Reached):
            precision.predict(model, on_gpu, mean=(0.5,) * 3, std=(0.5,) * 3, device="cuda", precision="bf16")
        assert pinned == []
        # A host batch bound for the GPU is pinned first (once), then copied without blocking.
        moved = precision.to_device(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "cuda")
        assert pinned == [torch.device("cpu")] and moved.device == torch.device("cuda:0")
        assert precision.to_device(moved, torch.device("cuda")) is moved


# ----------------------------------------------------------------------------- decode routing

def test_device_route_sends_only_what_the_device_decodes_as_the_cpu_does(tmp_path, monkeypatch):
    upright = jpeg(picture(1))
    objs = {
        "upright.jpg": upright,
        "rot90.jpg": jpeg(picture(2), orientation=6),   # a phone portrait: stored landscape, shown portrait
        "rot180.jpg": jpeg(picture(3), orientation=3),
        "mirror.jpg": jpeg(picture(4), orientation=2),
        "tagged_upright.jpg": jpeg(picture(5), orientation=1),
        "cmyk.jpg": jpeg(picture(6).convert("CMYK")),
        "pic.png": (lambda b: (picture(7).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
        "cut.jpg": upright[: len(upright) // 2],
        "big.jpg": jpeg(picture(8, size=(120, 100))),
        "huge.jpg": upright + b"\0" * 3000,  # over --max-image-bytes below: the CPU path's reason, unread
    }
    monkeypatch.setattr(loading, "DEVICE_MAX_PIXELS", 100 * 100, raising=False)  # big.jpg: too large for the device
    cpu = load(tmp_path, objs, max_bytes=len(upright) + 1000)
    dev = load(tmp_path, objs, max_bytes=len(upright) + 1000, gpu_decode=True)
    assert "pixels" not in dev and set(dev) == set(loading.DEVICE_COLUMNS)
    names = [p.rsplit("/", 1)[1] for p in dev["path"]]
    routed = {n for n, e in zip(names, dev["encoded"]) if e}
    assert routed == {"upright.jpg", "tagged_upright.jpg"}
    for k in ("error", "width", "height"):  # the same reasons and (EXIF-rotated) sizes whichever path decodes
        assert list(dev[k]) == list(cpu[k]), k
    assert dict(zip(names, dev["width"]))["rot90.jpg"] == 40  # shown portrait
    for i, n in enumerate(names):
        if dev["encoded"][i]:  # the JPEG as read: no placeholder pixels beside it
            assert dev["data"][i] == objs[n]
        elif dev["error"][i] is None:  # decoded here: exactly the CPU path's crop
            assert np.frombuffer(dev["data"][i], np.uint8).reshape(3, 32, 32).tolist() == cpu["pixels"][i].tolist()
        else:
            assert dev["data"][i] == b""


def test_device_route_keeps_progressive_jpegs_and_suspect_scans_on_the_cpu():
    """nvJPEG decodes progressive JPEGs one at a time with a host sync each, and damaged scan data with a valid
    end marker to garbage marked ok: both are decoded on the CPU, whose row (error or not) they then get."""
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    baseline = jpeg(noisy)

    def damaged(data: bytes, at: float, patch: bytes) -> bytes:
        b = bytearray(data)
        i = int(len(b) * at)
        b[i:i + len(patch)] = patch
        return bytes(b)

    def saved(img, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", **kw)
        return buf.getvalue()

    restart = saved(noisy, quality=90, restart_marker_blocks=4)
    rst3 = restart.find(b"\xff\xd3")
    cases = {
        "baseline": (baseline, True),
        "grey": (jpeg(noisy.convert("L")), True),
        "4:4:4 optimised": (saved(noisy, quality=90, subsampling=0, optimize=True), True),
        "restart markers": (restart, True),
        "trailing zeros": (baseline + b"\0" * 64, True),
        "a second picture after the end (MPO)": (baseline + baseline, True),
        "progressive": (saved(noisy, quality=90, progressive=True), False),
        "end markers inside the scan": (damaged(baseline, 0.5, b"\xff\xd9" * 20), False),
        "random bytes over the scan": (damaged(baseline, 0.5, rng.integers(0, 256, 600, np.uint8).tobytes()), False),
        "a restart marker out of order": (restart[:rst3] + b"\xff\xd5" + restart[rst3 + 2:], False),
        "a restart marker lost": (restart[:rst3] + restart[rst3 + 2:], False),
    }
    for name, (data, device) in cases.items():
        routed = loading.device_route(data)
        assert (routed is not None) == device, (name, gpu_decode.device_scan_problem(data))
        if device:
            assert routed == (160, 120), name
    assert gpu_decode.device_scan_problem(cases["progressive"][0]) == "progressive"


def test_exif_rotated_photos_score_the_same_whichever_path_decodes(tmp_path):
    model_uri = str(tmp_path / "model")
    write_model(model_uri)
    objs = {f"r{o}.jpg": jpeg(picture(10 + o), orientation=o) for o in range(1, 9)}
    objs["plain.jpg"] = jpeg(picture(20))
    cpu = load(tmp_path, objs)
    dev = load(tmp_path, objs, gpu_decode=True)
    a = inference.Predictor(model_uri, run_id="r", precision="fp32")
    b = inference.Predictor(model_uri, run_id="r", precision="fp32", decoder=nvjpeg_like)
    a.model, b.model = Inputs(a.model), Inputs(b.model)
    ra, rb = a(cpu).to_pylist(), b(dev).to_pylist()
    assert [(r["width"], r["height"], r["label"]) for r in rb] == [(r["width"], r["height"], r["label"]) for r in ra]
    # The crops the model saw, row by row: the same picture the same way up (full against reduced decode aside).
    diff = (a.model.seen[0].float() - b.model.seen[0].float()).abs().mean(dim=(1, 2, 3))
    assert (diff < 2).all(), diff


# ----------------------------------------------------------------------------- the device decoder

def scored(tmp_path, datas: list[bytes], decoder) -> tuple[inference.Predictor, list[dict]]:
    """A predictor with ``decoder`` as its device decoder, and its rows for ``datas`` loaded for the GPU."""
    model_uri = str(tmp_path / "model")
    write_model(model_uri)
    pred = inference.Predictor(model_uri, run_id="r", precision="fp32", decoder=decoder)
    return pred, pred(load(tmp_path, {f"{i}.jpg": d for i, d in enumerate(datas)}, gpu_decode=True)).to_pylist()


def test_device_decoding_is_bounded_in_memory(tmp_path, monkeypatch):
    calls = []

    def decoder(tensors, device):
        calls.append(len(tensors))
        return nvjpeg_like(tensors, device)

    monkeypatch.setattr(gpu_decode, "DEVICE_DECODE_BYTES", 3 * 80 * 60 * 3)  # three pictures at once
    _, rows = scored(tmp_path, [jpeg(picture(i, size=(80, 60))) for i in range(8)], decoder)
    assert calls == [3, 3, 2] and all(r["status"] == "ok" for r in rows)
    assert gpu_decode.chunks([(10, 10), (1000, 1000), (10, 10)], 1000) == [[0], [1], [2]]


def test_device_out_of_memory_splits_the_chunk_and_is_never_swallowed(tmp_path, caplog):
    calls = []

    def decoder(tensors, device):  # fits two pictures at a time
        calls.append(len(tensors))
        if len(tensors) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return nvjpeg_like(tensors, device)

    datas = [jpeg(picture(i)) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="maskmodel.score.gpu_decode"):
        pred, rows = scored(tmp_path, datas, decoder)
    assert calls == [4, 2, 2] and all(r["status"] == "ok" for r in rows)
    assert "out of memory" in caplog.text and pred.decode.budget == gpu_decode.DEVICE_DECODE_BYTES // 2
    assert not pred.decode.fallbacks  # nothing went to the CPU

    def never_fits(tensors, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):  # one picture the device cannot hold: the task fails, loudly
        scored(tmp_path, datas[:1], never_fits)


def test_device_failures_are_logged_once_and_counted(tmp_path, caplog, monkeypatch):
    def broken(tensors, device):
        raise RuntimeError("nvjpeg: broken")

    datas = [jpeg(picture(i)) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="maskmodel.score.gpu_decode"):
        pred, rows = scored(tmp_path, datas, broken)
        pred(load(tmp_path, {f"{i}.jpg": d for i, d in enumerate(datas)}, gpu_decode=True))
    assert all(r["status"] == "ok" for r in rows)  # decoded on the CPU instead
    assert caplog.text.count("nvjpeg: broken") == 1  # once per actor and kind of failure, not once per image
    assert pred.decode.fallbacks == {"RuntimeError": 6}
    recorded = []
    dec = gpu_decode.DeviceDecoder(pred.crop, "cpu", decoder=broken, on_fallback=lambda r, n: recorded.append((r, n)))
    monkeypatch.setattr(gpu_decode, "DEVICE_GIVE_UP", 5)
    with caplog.at_level(logging.WARNING, logger="maskmodel.score.gpu_decode"):
        for _ in range(2):
            assert all(isinstance(o, str) for o in dec(datas, [(64, 40)] * 3))
    assert recorded[0] == ("RuntimeError: nvjpeg: broken", 1) and sum(n for _, n in recorded) == 6
    assert not dec.enabled and "decodes on the CPU from now on" in caplog.text
    assert dec(datas[:1], [(64, 40)]) == ["device decoding given up"]  # not even tried


class RecordingStreams:
    """:class:`gpu_decode.DecodeStreams` as a log: the stream current when the decoder runs, what is handed over."""

    def __init__(self, log: list) -> None:
        self.log, self.current = log, "caller"

    def decoding(self):
        import contextlib

        @contextlib.contextmanager
        def on_decode_stream():
            self.current = "decode"
            try:
                yield
            finally:
                self.current = "caller"
        return on_decode_stream()

    def hand_over(self, images) -> None:
        self.log.append(("hand_over", len(images)))


def test_device_decoder_writes_on_its_own_stream_and_hands_over_before_cropping(tmp_path):
    """The race of torchvision's nvJPEG path (see gpu_decode's docstring): every decoder call runs with the
    dedicated decode stream current, and its outputs are handed to the caller's stream before any crop reads them,
    chunk after chunk (a small budget: many chunks, as a 512-photo batch has)."""
    log: list = []
    streams = RecordingStreams(log)

    def decoder(tensors, device):
        log.append(("decode", len(tensors), streams.current))
        return nvjpeg_like(tensors, device)

    crop = inference.EvalCrop(crop_size=32, resize_size=37)

    def logged_crop(x):
        log.append(("crop", len(x), streams.current))
        return crop(x)

    datas = [jpeg(picture(i, size=(80, 60))) for i in range(7)]
    dec = gpu_decode.DeviceDecoder(logged_crop, "cpu", decoder=decoder, budget=2 * 80 * 60 * 3, streams=streams)
    out = dec(datas, [(80, 60)] * 7)
    assert all(isinstance(o, torch.Tensor) and o.shape == (3, 32, 32) for o in out)
    assert log == [("decode", 2, "decode"), ("hand_over", 2), ("crop", 2, "caller")] * 3 + [
        ("decode", 1, "decode"), ("hand_over", 1), ("crop", 1, "caller")]


def test_nvjpeg_allocation_failure_is_out_of_memory(tmp_path):
    """nvJPEG's own allocation failure (status 5) splits the chunk like CUDA's OOM; it never sends a whole chunk
    to the CPU one picture at a time."""
    wrapped = "Error while decoding JPEG images: Failed to decode batch: 5"  # torchvision 0.29's words
    for text in (wrapped, "Error while decoding JPEG images: Failed to get image info: 5",
                 "Failed to synchronize CUDA stream: 2", "CUDA error: out of memory"):
        assert gpu_decode.is_out_of_memory(RuntimeError(text)), text
    for text in ("Error while decoding JPEG images: Failed to decode batch: 6", "Failed to get image info: 3",
                 "Unknown chroma subsampling", "Failed to decode batch: 50"):
        assert not gpu_decode.is_out_of_memory(RuntimeError(text)), text
    calls = []

    def decoder(tensors, device):
        calls.append(len(tensors))
        if len(tensors) > 2:
            raise RuntimeError(wrapped)
        return nvjpeg_like(tensors, device)

    pred, rows = scored(tmp_path, [jpeg(picture(i)) for i in range(4)], decoder)
    assert calls == [4, 2, 2] and all(r["status"] == "ok" for r in rows) and not pred.decode.fallbacks


# ----------------------------------------------------------------------------- the row contract, mixed routes

@pytest.mark.parametrize("device_works", [True, False])
def test_mixed_routes_in_one_batch_keep_the_rows_and_their_order(tmp_path, device_works):
    model_uri = str(tmp_path / "model")
    write_model(model_uri)
    good = jpeg(picture(30))
    refused = jpeg(picture(31), quality=70)  # the device refuses it: decoded on the CPU
    broken = bytearray(jpeg(picture(32)))
    broken[len(broken) // 2: len(broken) // 2 + 40] = b"\xff\xd9" * 20  # complete, but its scan is garbage
    objs = {"a.jpg": good, "b.png": (lambda b: (picture(33).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
            "c.jpg": refused, "d.jpg": b"", "e.jpg": jpeg(picture(34), orientation=8), "f.jpg": jpeg(picture(35)),
            "g.jpg": bytes(broken)}

    def decoder(tensors, device):
        if not device_works or any(len(t) in (len(refused), len(broken)) for t in tensors):
            raise RuntimeError("nvjpeg: unsupported")
        return nvjpeg_like(tensors, device)

    cpu, dev = load(tmp_path, objs), load(tmp_path, objs, gpu_decode=True)
    a = inference.Predictor(model_uri, run_id="r", precision="fp32")
    b = inference.Predictor(model_uri, run_id="r", precision="fp32", decoder=decoder)
    a.model, b.model = Inputs(a.model), Inputs(b.model)
    ra, rb = a(cpu).to_pylist(), b(dev).to_pylist()
    keys = ["path", "status", "error", "label", "width", "height"]
    assert [{k: r[k] for k in keys} for r in rb] == [{k: r[k] for k in keys} for r in ra]
    assert [r["status"] for r in rb] == ["ok", "ok", "ok", "error", "ok", "ok", ra[6]["status"]]
    assert a.model.seen[0].shape == b.model.seen[0].shape
    diff = (a.model.seen[0].float() - b.model.seen[0].float()).abs().mean(dim=(1, 2, 3))
    assert (diff < 2).all(), diff  # every crop in its row's place, whichever path decoded it
    assert b.decode.fallbacks["RuntimeError"] >= 1


def test_gpu_rows_cross_ray_data_and_score_as_the_cpu_rows(tmp_path, ray_local):
    """Load blocks of every mix (all compressed, all crops, errors only) are concatenated by Ray Data into the
    predictor's batches: the ``data`` / ``encoded`` columns survive that, and the rows match the CPU path's."""
    import ray

    model_uri = str(tmp_path / "model")
    write_model(model_uri)
    png = (lambda b: (picture(43).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO())
    objs = {"0.jpg": jpeg(picture(40)), "1.jpg": jpeg(picture(41)), "2.png": png,
            "3.jpg": jpeg(picture(42), orientation=6), "4.jpg": b"", "5.jpg": b"nope", "6.jpg": jpeg(picture(44))}
    paths = []
    for name, data in objs.items():
        paths.append(str(tmp_path / name))
        storage.write_bytes(paths[-1], data)

    def run(gpu_decode: bool) -> list[dict]:
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=4)
        ds = ds.map_batches(loading.load_batch, batch_size=2, batch_format="numpy",
                            fn_kwargs={"card": CARD, "max_bytes": 1 << 20, "gpu_decode": gpu_decode})
        ds = ds.map_batches(inference.Predictor, batch_size=8, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=1),
                            fn_constructor_kwargs={"model_uri": model_uri, "run_id": "r", "precision": "fp32",
                                                   "threads": 1})
        return sorted(ds.take_all(), key=lambda r: r["path"])

    cpu, dev = run(False), run(True)
    keys = ["path", "status", "error", "label", "width", "height"]
    assert [{k: r[k] for k in keys} for r in dev] == [{k: r[k] for k in keys} for r in cpu]
    assert [r["status"] for r in dev] == ["ok", "ok", "ok", "ok", "error", "error", "ok"]
    assert all(abs(a["p_mask"] - b["p_mask"]) < 1e-2 for a, b in zip(dev, cpu) if a["status"] == "ok")


# ----------------------------------------------------------------------------- pipelined forward passes

def test_forward_passes_are_padded_to_a_few_bucket_sizes(tmp_path):
    """The ok rows (and faces) of a batch vary; with cudnn.benchmark every new batch size re-tunes each conv, so
    forward passes are padded to a short list of sizes, and the padding never reaches a row."""
    sizes = {inference.bucket_size(n) for n in range(1, 513)}
    assert sizes == {8, 16, 32, 64, *range(128, 513, 64)}
    assert all(n <= inference.bucket_size(n) <= max(8, n + n // 8, n + 63) for n in range(1, 2000))
    model_uri = str(tmp_path / "model")
    write_model(model_uri)
    objs = {f"{i}.jpg": jpeg(picture(50 + i)) for i in range(5)}
    objs.update({"bad.jpg": b"nope", "empty.jpg": b""})
    batch = load(tmp_path, objs)
    plain = inference.Predictor(model_uri, run_id="r", precision="fp32", pipelined=False)
    padded = inference.Predictor(model_uri, run_id="r", precision="fp32", pipelined=True)
    plain.model, padded.model = Inputs(plain.model), Inputs(padded.model)
    want, got = plain(dict(batch)).to_pylist(), padded(dict(batch)).to_pylist()
    assert [x.shape[0] for x in plain.model.seen] == [5] and [x.shape[0] for x in padded.model.seen] == [8]
    assert [r["status"] for r in got] == [r["status"] for r in want] == ["ok"] * 5 + ["error"] * 2
    assert all(abs(a["p_mask"] - b["p_mask"]) < 1e-5 for a, b in zip(got, want) if a["status"] == "ok")


def test_the_next_part_is_decoded_while_this_part_runs_forward(tmp_path):
    """Pipelined, a batch is cut into parts and part k+1 is gathered (decoded) on the prefetch thread while part
    k's forward runs on the caller's thread; the model is only ever called from the caller's thread."""
    import threading

    decoded_second = threading.Event()
    decode_threads, calls = [], []

    def decoder(tensors, device):
        decode_threads.append(threading.current_thread().name)
        calls.append(len(tensors))
        if len(calls) == 2:
            decoded_second.set()
        return nvjpeg_like(tensors, device)

    class Waits(Inputs):
        def forward(self, x):
            self.threads = getattr(self, "threads", []) + [threading.current_thread().name]
            if len(self.seen) == 0:
                self.overlapped = decoded_second.wait(20)  # part 2 decodes while part 1 is here
            return super().forward(x)

    model_uri = str(tmp_path / "model")
    write_model(model_uri)
    batch = load(tmp_path, {f"{i}.jpg": jpeg(picture(60 + i)) for i in range(6)}, gpu_decode=True)
    pred = inference.Predictor(model_uri, run_id="r", precision="fp32", decoder=decoder, pipelined=True,
                               part_rows=2)
    pred.model = Waits(pred.model)
    rows = pred(dict(batch)).to_pylist()
    assert pred.model.overlapped and calls == [2, 2, 2]
    assert set(decode_threads) != {threading.current_thread().name}
    assert pred.model.threads == [threading.current_thread().name] * 3
    want = inference.Predictor(model_uri, run_id="r", precision="fp32", decoder=nvjpeg_like)(dict(batch)).to_pylist()
    assert [(r["path"], r["label"]) for r in rows] == [(r["path"], r["label"]) for r in want]
    assert all(abs(a["p_mask"] - b["p_mask"]) < 1e-5 for a, b in zip(rows, want))


# ----------------------------------------------------------------------------- GPUs the cluster does not have

def test_zero_gpus_stop_the_run_with_one_sentence_within_the_wait(tmp_path, ray_local):
    """A real local Ray with no GPU, asked for a GPU actor (as a joined cluster without published autoscaler
    limits, given --actors): Ray Data's default waits forever; here the wait ends after --gpu-wait-s."""
    import time

    from maskmodel.errors import UserError
    from maskmodel.score import pipeline, scoring
    from maskmodel.score.plan import ScoreConfig

    write_model(str(tmp_path / "model"))
    for i in range(2):
        storage.write_bytes(str(tmp_path / "in" / f"{i}.jpg"), jpeg(picture(i)))
    cfg = ScoreConfig(input=str(tmp_path / "in"), model=str(tmp_path / "model"), output=str(tmp_path / "out"),
                      faces="none", num_gpus=1, actors=1, gpu_wait_s=3, actor_cpus=1)
    plan = scoring.prepare(cfg)
    context = ray_local.data.DataContext.get_current()
    before = context.wait_for_min_actors_s
    t0 = time.monotonic()
    try:
        ds = pipeline.build_dataset(plan, actors=1, device="cuda", precision="fp32")
        with pytest.raises(UserError, match=r"did not start within --gpu-wait-s 3 s \(the Ray cluster has 0 GPUs\)"):
            list(pipeline.result_batches(ds, cfg, actors=1, device="cuda"))
        assert time.monotonic() - t0 < 60
    finally:
        context.wait_for_min_actors_s = before  # the session's other Ray Data tests keep Ray's default


def test_a_predictor_actor_takes_one_gpu_or_a_share_of_one():
    from maskmodel.score.plan import ScoreConfig

    with pytest.raises(ValueError, match="--num-gpus is per predictor actor, which uses one GPU"):
        ScoreConfig(input="x", model="m", output="o", num_gpus=2)
    assert ScoreConfig(input="x", model="m", output="o", num_gpus=0.5).num_gpus == 0.5


def test_gpu_actor_cpus_are_sized_from_the_gpu_nodes():
    from maskmodel.runtime.resources import gpu_actor_cpus

    def node(cpus, gpus=0, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    assert gpu_actor_cpus(3, [node(26, 1)], 1) == 3  # --actor-cpus wins
    assert gpu_actor_cpus(0, [node(2), node(26, 1)], 1) == 4  # 26 CPUs per GPU: at most 4
    assert gpu_actor_cpus(0, [node(64, 8), node(16, 1)], 1) == 4  # 8 CPUs per GPU: half
    assert gpu_actor_cpus(0, [node(24, 8)], 1) == 1  # 3 CPUs per GPU: 1
    assert gpu_actor_cpus(0, [node(24, 8)], 0.5) == 1
    assert gpu_actor_cpus(0, [node(8), node(26, 1, alive=False)], 1) == 2  # no GPU node up: a default


def test_face_batches_are_bounded_by_decoded_bytes():
    from maskmodel.score.plan import DEFAULT_MAX_PIXELS, FACE_BATCH_BYTES, ScoreConfig

    def cfg(**kw):
        return ScoreConfig(input="x", model="m", output="o", **kw)

    assert cfg(faces="none").predict_batch("cuda") == 512 and cfg(faces="none").predict_batch("cpu") == 64
    gpu_faces = cfg(faces="centerface").predict_batch("cuda")
    assert gpu_faces * 3 * DEFAULT_MAX_PIXELS <= FACE_BATCH_BYTES and gpu_faces >= 64
    frames = cfg(faces="centerface", max_pixels=1920 * 1080).predict_batch("cuda")
    assert frames <= FACE_BATCH_BYTES // (3 * 1920 * 1080)
    assert cfg(faces="centerface", batch_size=300).predict_batch("cuda") == 300  # an explicit size is kept
