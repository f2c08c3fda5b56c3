"""The detector's training step without host syncs: CenterNet targets built padded on the CPU, a masked loss.

CPU-only and Ray-free: the data step (:func:`maskmodel.train.detect_loop.collate`) against the per-image
target builder the step used before (kept here verbatim as the reference), and a step that reads nothing
back from its tensors (spied on ``Tensor.item``, ``float()``, ``int()``, ``bool()`` and ``tolist``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from maskmodel.io import storage
from maskmodel.models.detect import centernet, trainable
from maskmodel.train.detect_loop import collate, detector_step


def per_image_targets(boxes: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The per-image builder of main 52b28d6 (``centernet.targets``), verbatim: the reference."""
    stride = centernet.STRIDE
    h, w = shape
    boxes = boxes.float()
    bw, bh = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0), (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / stride - 0.5, (boxes[:, 1] + boxes[:, 3]) / 2 / stride - 0.5
    x, y = torch.round(cx), torch.round(cy)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    x, y, cx, cy, bw, bh = x[inside], y[inside], cx[inside], cy[inside], bw[inside], bh[inside]
    radius = centernet.gaussian_radius(bh / stride, bw / stride).clamp(min=0).floor()
    sigma = (2 * radius + 1) / 6
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    dy, dx = ys - y.view(-1, 1, 1), xs - x.view(-1, 1, 1)
    g = torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma.view(-1, 1, 1) ** 2))
    g = g * ((dx.abs() <= radius.view(-1, 1, 1)) & (dy.abs() <= radius.view(-1, 1, 1)))
    heatmap = g.amax(dim=0, keepdim=True) if len(g) else torch.zeros((1, h, w))
    return {"heatmap": heatmap, "cells": (y * w + x).long(),
            "size": torch.stack([torch.log(bh / stride), torch.log(bw / stride)], dim=1),
            "offset": torch.stack([cy - y, cx - x], dim=1)}


def _random_batch(seed: int, n: int = 12, b: int = 10, side: int = 128):
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, b, 2, generator=g) * (side + 24) - 12  # some centres fall outside the picture
    size = torch.rand(n, b, 2, generator=g) * 70 + 0.5  # tiny (clamped to 1 px) to large
    counts = torch.randint(-1, b + 1, (n,), generator=g)  # -1: an image the epoch could not read
    counts[:3] = torch.tensor([-1, 0, b])
    return torch.cat([corner, corner + size], dim=-1), counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_targets_are_the_per_image_builders(seed):
    boxes, counts = _random_batch(seed)
    images = np.zeros((len(counts), 3, 128, 128), np.uint8)
    batch = collate(images, boxes.numpy(), counts.numpy(), centernet=True)  # the data step, on the CPU
    assert batch["heatmap"].shape == (12, 1, 32, 32) and batch["cells"].shape == (12, 10)
    assert batch["valid"].tolist() == [float(c >= 0) for c in counts.tolist()]
    for i, n in enumerate(counts.tolist()):
        ref = per_image_targets(boxes[i, :max(n, 0)], (32, 32))
        mask = batch["mask"][i]
        assert int(mask.sum()) == len(ref["cells"])
        assert torch.allclose(batch["heatmap"][i], ref["heatmap"], atol=1e-6), i
        assert torch.equal(batch["cells"][i][mask], ref["cells"]), i
        assert torch.allclose(batch["size"][i][mask], ref["size"]) and torch.allclose(batch["offset"][i][mask],
                                                                                       ref["offset"]), i
        assert not batch["size"][i][~mask].any() and not batch["cells"][i][~mask].any()  # padding is zero


def test_masked_loss_leaves_out_padding_and_unread_images():
    boxes, counts = _random_batch(3, n=4)
    counts = torch.tensor([3, -1, 2, 0])
    t = centernet.batch_targets(boxes, counts, (16, 16))
    g = torch.Generator().manual_seed(0)
    outputs = [torch.rand(4, 1, 16, 16, generator=g), torch.randn(4, 2, 16, 16, generator=g),
               torch.randn(4, 2, 16, 16, generator=g), torch.zeros(4, 10, 16, 16)]
    full = centernet.masked_loss(outputs, t)
    keep = [0, 2, 3]  # the same batch without the unread image
    t2 = centernet.batch_targets(boxes[keep], counts[keep], (16, 16))
    without = centernet.masked_loss([o[keep] for o in outputs], t2)
    for k in ("heatmap", "size", "offset"):
        assert torch.allclose(full[k], without[k]), k
    # ... and it is the per-image loss of main: heatmap focal loss and L1 at the centre cells, over the faces.
    made = [per_image_targets(boxes[i, :counts[i]], (16, 16)) for i in keep]
    faces = sum(len(m["cells"]) for m in made)
    focal = centernet.focal_loss(outputs[0][keep], torch.stack([m["heatmap"] for m in made])) / faces
    size = sum((outputs[1][i].reshape(2, -1)[:, m["cells"]].T - m["size"]).abs().sum() for i, m in zip(keep, made))
    assert torch.allclose(full["heatmap"], focal) and torch.allclose(full["size"], size / faces)


@pytest.fixture
def reads(monkeypatch):
    """Every read of a tensor's value back to Python made from maskmodel's code, by caller."""
    seen: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "maskmodel" in caller:
                seen.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


def test_a_centerface_step_reads_nothing_back(reads):
    torch.manual_seed(0)
    net = trainable.initial("centerface", "none", storage.read_bytes).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = np.random.default_rng(0)
    images = g.integers(0, 255, (3, 3, 64, 64), dtype=np.uint8)
    boxes = np.zeros((3, 4, 4), np.float32)
    boxes[0, :2] = [[4, 4, 30, 36], [34, 10, 60, 40]]
    boxes[2, :1] = [[10, 12, 44, 50]]
    batch = collate(images, boxes, np.array([2, -1, 1]), centernet=True)
    reads.clear()  # building the targets on the CPU (the data step) may read what it likes
    before = next(net.parameters()).detach().clone()
    total = torch.zeros(3, dtype=torch.float64)
    for _ in range(3):
        total += detector_step(net, batch, opt, precision="fp32")
    assert reads == [], reads
    assert total[1:].tolist() == [6.0, 3.0] and float(total[0]) > 0  # 2 images learnt from, 1 left out, per step
    assert not torch.equal(before, next(net.parameters()))


def test_bf16_autocast_step_on_the_cpu_trains():
    """The GPU path's precision runs on a CPU too (autocast bf16 there): finite losses, weights move."""
    torch.manual_seed(0)
    net = trainable.initial("centerface", "none", storage.read_bytes).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    boxes = np.zeros((2, 2, 4), np.float32)
    boxes[:, 0] = [8, 8, 40, 44]
    batch = collate(np.full((2, 3, 64, 64), 128, np.uint8), boxes, np.array([1, 1]), centernet=True)
    sums = detector_step(net, batch, opt, precision="bf16")
    assert torch.isfinite(sums).all() and sums[1] == 2


def test_the_step_and_the_classifier_pass_need_no_ray():
    """benchmarks/gpu_check.py runs them on a GPU host without Ray (../shared/GPU.md)."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys\nfrom maskmodel.train.detect_loop import collate, detector_step\n"
            "from maskmodel.train.loop import _run_epoch\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'ray'], 'imports Ray'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": root},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
