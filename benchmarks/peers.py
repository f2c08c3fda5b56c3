"""Image-classification batch inference against the peers' own benchmark shapes, side by side in one run.

Daft (``benchmarking/ai/image_classification/daft_main.py``) and Ray Data
(``release/nightly_tests/multimodal_inference_benchmarks/image_classification/ray_data_main.py``)
publish the same pipeline: read a Parquet list of image URIs, download, decode,
resize / centre-crop / normalise, ResNet-18, write Parquet. Both shapes are
written out here as their scripts do it (the published scripts read public
buckets on GPU clusters; these read the same local S3 endpoint as ``jobs.score``,
on the CPU), and ``jobs.score`` runs on the same manifest with the same model:
ResNet-18, seeded random weights, 224 px, fp32, batch 64, 1920x1080 photo-like JPEGs
(``maskmodel.data.synth.render_photo``) on a moto S3 server on 127.0.0.1, directly
and through a loopback proxy adding ``--latency-ms`` to every request.

Every run is a fresh process of its own (a fresh local Ray for Ray's shape and
ours; Daft's native runner), at N and ``--scale``·N images. Reported per run:
pipeline img/s (from the start of the pipeline, with Ray or Daft up, to the
output written; for ``jobs.score`` its own summary, Ray up to commit) and
whole-process img/s (process start to exit); then, from the two sizes, each
shape's fixed cost (s) and steady-state rate (img/s), and the timeline of one
``jobs.score`` run (:mod:`maskmodel.runtime.timeline`).

Daft pins ``pyarrow<26`` and this project uses 26, so Daft goes into a folder of
its own, never into the product's environment; the shape runs with that folder
first on its path::

    python -m pip install --no-deps --target benchmarks/.daft daft==0.7.26 pyarrow==25.0.1 tqdm==4.67.3
    PYTHONPATH=. python benchmarks/peers.py                  # N=256 and 1024, 0 and 30 ms (about 15 min on 2 cores)
    PYTHONPATH=. python benchmarks/peers.py --n 64 --shapes ours --timeline   # our timeline only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAFT_DIR = os.path.join(REPO, "benchmarks", ".daft")
DAFT_VERSION = "0.7.26"
DAFT_INSTALL = (f"python -m pip install --no-deps --target benchmarks/.daft daft=={DAFT_VERSION} "
                f"pyarrow==25.0.1 tqdm==4.67.3")
SHAPES = ("ray", "daft", "ours")
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
SIZE, RESIZE, BATCH = 224, 256, 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- pure parts (tested)

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="images of the small run; the large one has scale·N")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--distinct", type=int, default=64, help="distinct photos drawn, repeated under other keys")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 30.0],
                   help="store latencies to run at (0: straight to the S3 server)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    p.add_argument("--timeline", action="store_true", help="print the timeline of every jobs.score run")
    # Internal: one shape's pipeline in this process (how the parent runs each shape in a fresh process).
    p.add_argument("--run-shape", choices=("ray", "daft"), help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n < 1 or args.scale < 2 or args.distinct < 1:
        p.error("--n and --distinct must be >= 1 and --scale >= 2 (two sizes give the fixed cost)")
    return args


@dataclass(frozen=True)
class Cost:
    """A run's cost model from two sizes: ``seconds = fixed_s + images / steady_img_s``."""

    fixed_s: float
    steady_img_s: float


def fixed_cost(n_small: int, s_small: float, n_large: int, s_large: float) -> Cost:
    """Fixed cost (s) and steady-state rate (img/s) of a linear ``seconds(images)`` through two runs.

    Raises ValueError unless ``n_large > n_small`` and the large run took longer.
    """
    if n_large <= n_small or s_large <= s_small:
        raise ValueError(f"need a larger run that takes longer: {n_small} in {s_small:.1f} s, "
                         f"{n_large} in {s_large:.1f} s")
    rate = (n_large - n_small) / (s_large - s_small)
    return Cost(fixed_s=s_small - n_small / rate, steady_img_s=rate)


# ----------------------------------------------------------------------------- the peers' shapes

def _model():
    """ResNet-18, seeded random weights, 2 classes: the same weights in every shape."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, 2)
    return model.eval()


def _transform():
    """The peers' preprocessing: full-size float tensor, resize, centre crop, normalise (torchvision)."""
    from torchvision.transforms import v2

    import torch

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize(RESIZE, antialias=True),
                       v2.CenterCrop(SIZE), v2.Normalize(MEAN, STD)])


class _Classifier:
    """The predictor both shapes use: a batch of normalised ``float32 (3, 224, 224)`` images in, labels out."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.model = _model()

    def labels(self, images) -> list[str]:
        import torch

        with torch.inference_mode():
            x = torch.stack([torch.as_tensor(i) for i in images])
            return [("mask", "no_mask")[k] for k in self.model(x).argmax(1).tolist()]


def run_ray_shape(manifest: str, output: str, endpoint: str) -> float:
    """Ray Data's published shape; returns the pipeline's seconds (Ray up to the output written).

    The download is a batch of concurrent reads (``map_batches``), not Ray's ``download``
    expression: that runs a planning actor of one CPU, which with the predictor's CPU takes
    both CPUs of a 2-core machine and leaves none for the read and download tasks (a hang).
    """
    import io
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pyarrow.fs as pafs
    import ray
    from PIL import Image

    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    host = endpoint.split("://", 1)[1]

    def s3() -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1",
                                 access_key=S3_ENV["AWS_ACCESS_KEY_ID"], secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])

    transform = _transform()

    def download(batch: dict) -> dict:
        fs = s3()

        def get(uri: str) -> bytes:
            with fs.open_input_stream(uri.removeprefix("s3://")) as f:
                return f.read()

        with ThreadPoolExecutor(16) as pool:
            batch["bytes"] = np.array(list(pool.map(get, batch["path"])), dtype=object)
        return batch

    def decode(row: dict) -> dict:
        image = Image.open(io.BytesIO(row.pop("bytes"))).convert("RGB")
        row["image"] = transform(image).numpy()
        return row

    class Predictor(_Classifier):
        def __call__(self, batch: dict) -> dict:
            return {"path": batch["path"], "label": np.array(self.labels(batch["image"]), dtype=object)}

    ds = ray.data.read_parquet(manifest.removeprefix("s3://"), filesystem=s3())
    ds = ds.map_batches(download, batch_size=BATCH)
    ds = ds.map(decode)
    ds = ds.map_batches(Predictor, batch_size=BATCH, compute=ray.data.ActorPoolStrategy(size=1))
    ds.write_parquet(output.removeprefix("s3://"), filesystem=s3())
    return time.perf_counter() - t0


def run_daft_shape(manifest: str, output: str, endpoint: str) -> float:
    """Daft's published shape (native runner); returns the pipeline's seconds (read to the output written)."""
    import daft
    import numpy as np
    from daft import DataType, col
    from daft.functions import decode_image, download
    from daft.io import IOConfig, S3Config

    t0 = time.perf_counter()
    io_config = IOConfig(s3=S3Config(endpoint_url=endpoint, key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                                     access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1"))
    transform = _transform()

    @daft.udf(return_dtype=DataType.string(), batch_size=BATCH, concurrency=1)
    class ResNetModel(_Classifier):
        def __call__(self, images):
            return self.labels(images.to_pylist())

    df = daft.read_parquet(manifest, io_config=io_config)
    df = df.with_column("image", decode_image(download(col("path"), io_config=io_config), mode="RGB"))
    df = df.with_column("norm_image", col("image").apply(
        lambda image: transform(np.asarray(image)).numpy(),
        return_dtype=DataType.tensor(DataType.float32(), shape=(3, SIZE, SIZE))))
    df = df.with_column("label", ResNetModel(col("norm_image")))
    df.select("path", "label").write_parquet(output, io_config=io_config)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the driver

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit("moto server did not start")


def daft_available() -> bool:
    code = "import daft, sys; sys.exit(daft.__version__ != %r)" % DAFT_VERSION
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([DAFT_DIR, REPO, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def run_process(cmd: list[str], endpoint: str, *, daft: bool = False,
                timeline_file: str | None = None) -> tuple[float, str]:
    """Run ``cmd`` against ``endpoint``; returns its whole-process seconds and its stdout. Raises SystemExit on failure."""
    path = [DAFT_DIR] if daft else []
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(S3_ENV, AWS_ENDPOINT_URL_S3=endpoint, RAY_DISABLE_DOCKER_CPU_WARNING="1",
               PYTHONPATH=os.pathsep.join([*path, REPO, os.environ.get("PYTHONPATH", "")]))
    if timeline_file:
        env["MASKMODEL_TIMELINE"] = timeline_file
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return seconds, res.stdout


def faces_flag() -> list[str]:
    """``--faces none`` when this checkout's ``jobs.score`` has a face stage (the peers classify whole images)."""
    res = subprocess.run([sys.executable, "-m", "jobs.score", "--help"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO})
    return ["--faces", "none"] if "--faces" in res.stdout else []


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run_shape:  # a child: one shape's pipeline, its seconds as JSON on stdout
        seconds = (run_ray_shape(args.manifest, args.output, args.endpoint) if args.run_shape == "ray"
                   else run_daft_shape(args.manifest, args.output, args.endpoint))
        print(json.dumps({"pipeline_s": seconds}), flush=True)
        return
    if "daft" in args.shapes and not daft_available():
        raise SystemExit(f"Daft {DAFT_VERSION} is not installed for the benchmark; install it (into a folder of its "
                         f"own, not the product's environment) with:\n    {DAFT_INSTALL}\nor leave it out: "
                         f"--shapes ray ours")

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from maskmodel.runtime import timeline
    from maskmodel.data import synth
    from maskmodel.io import storage
    from maskmodel.io.latency_proxy import LatencyProxy
    from maskmodel.models.classifier import ModelCard, save_model_dir, state_dict_bytes

    faces = faces_flag()
    load_before = os.getloadavg()
    moto, endpoint = start_moto()
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL_S3=endpoint)
    work = tempfile.mkdtemp(prefix="peers-")
    sizes = (args.n, args.scale * args.n)
    rows: dict[tuple[str, float, int], tuple[float, float]] = {}
    timelines: list[tuple[str, list[str]]] = []
    try:
        t0 = time.perf_counter()
        photos = [synth.render_photo(synth.CLASSES[i % 2], i) for i in range(args.distinct)]
        print(f"{args.distinct} distinct 1920x1080 photos drawn in {time.perf_counter() - t0:.0f} s, "
              f"{np.mean([len(x) for x in photos]) / 1e3:.0f} KB each on average", flush=True)
        bucket = "s3://peers-" + uuid.uuid4().hex[:8]
        storage.filesystem(bucket)[0].mkdir(bucket[5:])
        uris = [f"{bucket}/images/{i:06d}.jpg" for i in range(sizes[1])]
        for i, uri in enumerate(uris):
            storage.write_bytes(uri, photos[i % len(photos)])
        manifests = {}
        for n in sizes:
            local = os.path.join(work, f"manifest-{n}.parquet")
            pq.write_table(pa.table({"path": uris[:n]}), local)
            manifests[n] = f"{bucket}/manifest-{n}.parquet"
            storage.write_bytes(manifests[n], open(local, "rb").read())
        model_dir = f"{bucket}/model"
        torch.manual_seed(0)
        card = ModelCard(arch="resnet18", classes=("mask", "no_mask"), input_size=SIZE, resize_size=RESIZE)
        save_model_dir(model_dir, state_dict_bytes(_model()), card)
        print(f"{sizes[1]} objects, manifests and the model written to {bucket}", flush=True)

        for latency in args.latency_ms:
            with LatencyProxy(endpoint, latency_s=latency / 1e3) as proxy:
                url = proxy.url if latency else endpoint
                for n in sizes:
                    for shape in args.shapes:
                        out = f"{bucket}/out/{shape}-{latency:g}-{n}"
                        print(f"running {shape} at {latency:g} ms on {n} images...", flush=True)
                        if shape == "ours":
                            tl = os.path.join(work, f"timeline-{latency:g}-{n}.jsonl")
                            start = time.time()
                            whole, stdout = run_process(
                                [sys.executable, "-m", "jobs.score", "--input", manifests[n], "--model", model_dir,
                                 "--output", out, "--run-id", f"r{n}", "--precision", "fp32",
                                 "--batch-size", str(BATCH), *faces], url, timeline_file=tl)
                            line = next(ln for ln in stdout.splitlines() if " images/s;" in ln)
                            pipeline = n / float(line.split(" images/s;")[0].rsplit(", ", 1)[1])
                            timelines.append((f"jobs.score, {n} images, {latency:g} ms",
                                              timeline.format_timeline(timeline.read(tl), start)))
                        else:
                            whole, stdout = run_process(
                                [sys.executable, __file__, "--run-shape", shape, "--manifest", manifests[n],
                                 "--output", out, "--endpoint", url], url, daft=shape == "daft")
                            # Ray may print to stdout at shutdown, after the result line.
                            pipeline = next(json.loads(ln)["pipeline_s"] for ln in reversed(stdout.splitlines())
                                            if ln.startswith('{"pipeline_s"'))
                        rows[(shape, latency, n)] = (pipeline, whole)
                        print(f"{shape:>5} {latency:>3g} ms {n:>5} images: pipeline {n / pipeline:5.1f} img/s, "
                              f"whole process {n / whole:5.1f} img/s", flush=True)
    finally:
        moto.terminate()
    load_after = os.getloadavg()
    report(args, rows, sizes, load_before, load_after, timelines)


def report(args, rows, sizes, load_before, load_after, timelines) -> None:
    import ray
    import torch

    print(f"\nResNet-18 (random weights) 224 px fp32 batch {BATCH}, CPU ({len(os.sched_getaffinity(0))} cores), "
          f"torch {torch.__version__}, ray {ray.__version__}, daft {DAFT_VERSION}; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    names = {"ray": "Ray's shape", "daft": "Daft's shape", "ours": "jobs.score"}
    shapes = [s for s in SHAPES if s in args.shapes]
    ratios = [("ours", "daft"), ("ours", "ray")]
    ratios = [(a, b) for a, b in ratios if a in shapes and b in shapes]
    head = ["store", "images", "img/s"] + [names[s] for s in shapes] + [f"{names[a]} / {names[b]}" for a, b in ratios]
    print("| " + " | ".join(head) + " |\n|" + "---|" * 3 + "---:|" * (len(head) - 3))
    for latency in args.latency_ms:
        for n in sizes:
            for k, what in ((0, "pipeline"), (1, "whole process")):
                rate = {s: n / rows[(s, latency, n)][k] for s in shapes}
                cells = [f"{rate[s]:.1f}" for s in shapes] + [f"{rate[a] / rate[b]:.2f}" for a, b in ratios]
                print(f"| {latency:g} ms | {n} | {what} | " + " | ".join(cells) + " |")
    print("\nfrom the two sizes (whole process): fixed cost s, steady-state img/s")
    for latency in args.latency_ms:
        for s in shapes:
            try:
                c = fixed_cost(sizes[0], rows[(s, latency, sizes[0])][1], sizes[1], rows[(s, latency, sizes[1])][1])
                print(f"  {latency:g} ms {names[s]:<13} fixed {c.fixed_s:5.1f} s, steady {c.steady_img_s:5.1f} img/s")
            except ValueError as e:
                print(f"  {latency:g} ms {names[s]:<13} {e}")
    if "ours" in shapes and len(args.latency_ms) > 1 and 0 in args.latency_ms:
        slow = max(args.latency_ms)
        for n in sizes:
            print(f"jobs.score {slow:g} ms / 0 ms, {n} images, whole process: "
                  f"{rows[('ours', 0, n)][1] / rows[('ours', slow, n)][1]:.2f}")
    for title, lines in timelines if args.timeline else timelines[:1]:
        print(f"\ntimeline of {title} (s since the process started):")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
