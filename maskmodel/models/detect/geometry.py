"""Where a photo sits in the detector's input, and from raw candidate boxes to the faces of each photo.

Both halves are architecture-free: a detector's own decoder (e.g.
:func:`maskmodel.models.detect.centerface.decode`) turns its output heads into
candidate boxes in *input* pixels; :func:`letterbox` before it and
:func:`postprocess` after it are shared by every detector.

Coordinates are ``x0, y0, x1, y1`` in pixels, ``x1``/``y1`` exclusive edges
(a box covering pixel columns 0..9 is ``x0=0, x1=10``), as in torchvision.ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.ops import batched_nms, clip_boxes_to_image

from maskmodel.data.facecrop import crop_boxes, grow  # noqa: F401 - grow re-exported: one crop definition
from maskmodel.models.spec import STRIDE, DetectOptions  # noqa: F401 - re-exported: defined torch-free for configs

# Candidates per image kept before NMS: NMS is quadratic in its input, and a
# photo holds far fewer faces than this at any sensible threshold.
PRE_NMS_TOP_K = 1000


@dataclass(frozen=True)
class Placement:
    """One photo in the detector input: scaled by ``(sx, sy)`` to ``(new_w, new_h)`` at the top left, padding after."""

    width: int  # original image, pixels
    height: int
    new_w: int  # the photo's size inside the input
    new_h: int

    @property
    def scale(self) -> tuple[float, float]:
        """Input pixels per original pixel along x and y (equal up to rounding: the aspect ratio is kept)."""
        return self.new_w / self.width, self.new_h / self.height

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(K, 4)`` boxes in input pixels -> original pixels (not clipped)."""
        sx, sy = self.scale
        return boxes / boxes.new_tensor([sx, sy, sx, sy])

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(K, 4)`` boxes in original pixels -> input pixels."""
        sx, sy = self.scale
        return boxes * boxes.new_tensor([sx, sy, sx, sy])


def place(width: int, height: int, input_size: tuple[int, int]) -> Placement:
    """Where a ``width`` x ``height`` photo goes in an ``input_size = (W, H)`` input: as large as fits, aspect kept."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    in_w, in_h = input_size
    r = min(in_w / width, in_h / height)
    return Placement(width, height, max(1, min(in_w, round(width * r))), max(1, min(in_h, round(height * r))))


def _as_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        # torch warns on read-only arrays (np.asarray of a PIL image is one); the copy is what resizing needs anyway.
        image = torch.from_numpy(np.array(image, copy=not image.flags.writeable or not image.flags.c_contiguous))
    t = image
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] != 3:
        raise ValueError(f"each image must be uint8 (H, W, 3) RGB, got {tuple(t.shape)} {t.dtype}")
    return t.permute(2, 0, 1)


def letterbox(images: torch.Tensor | Sequence[np.ndarray | torch.Tensor], input_size: tuple[int, int], *,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[Placement]]:
    """Resize photos into one detector batch without stretching them; zero padding right and below.

    ``images``: a uint8 ``(N, 3, H, W)`` tensor (photos of one size), or a
    sequence of uint8 ``(H, W, 3)`` RGB arrays/tensors of any sizes. Returns a
    float32 ``(N, 3, input_h, input_w)`` batch on ``device`` holding pixel
    values 0..255 (normalisation is the network's business) and each photo's
    :class:`Placement`. Pixels cross to the device as uint8 and are resized there
    (antialiased, so downscaled 4k photos do not alias).
    """
    device = torch.device(device)
    in_w, in_h = input_size
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"a batch must be uint8 (N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        n, _, h, w = images.shape
        p = place(int(w), int(h), input_size)
        out = torch.zeros((n, 3, in_h, in_w), dtype=torch.float32, device=device)
        if n:
            x = images.to(device, non_blocking=True).float()
            out[:, :, :p.new_h, :p.new_w] = TF.resize(x, [p.new_h, p.new_w], antialias=True)
        return out, [p] * n
    chw = [_as_chw(im) for im in images]
    out = torch.zeros((len(chw), 3, in_h, in_w), dtype=torch.float32, device=device)
    placements = []
    for i, t in enumerate(chw):
        p = place(int(t.shape[2]), int(t.shape[1]), input_size)
        x = t.to(device, non_blocking=True).float()
        out[i, :, :p.new_h, :p.new_w] = TF.resize(x, [p.new_h, p.new_w], antialias=True)
        placements.append(p)
    return out, placements


@dataclass(frozen=True)
class Faces:
    """The faces found in one photo, highest detector score first; boxes in ORIGINAL pixels.

    ``boxes``: float32 ``(K, 4)``, the detector's face boxes clipped to the
    image (what evaluation compares with annotated boxes). ``crops``: float32
    ``(K, 4)``, the same boxes grown by the margin and clipped: where to cut each
    face for the classifier. ``scores``: float32 ``(K,)`` in [0, 1]. The counts
    say what was found but not kept: beyond ``max_faces``, smaller than
    ``min_face``, or degenerate (no area left once clipped to the image).
    """

    boxes: np.ndarray
    scores: np.ndarray
    crops: np.ndarray
    dropped_max: int = 0
    dropped_small: int = 0
    dropped_degenerate: int = 0

    def __len__(self) -> int:
        return len(self.scores)


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, image_index: torch.Tensor,
                placements: Sequence[Placement], options: DetectOptions) -> list[Faces]:
    """Candidate boxes of a batch -> the :class:`Faces` of each photo.

    ``boxes``: float ``(M, 4)`` in input pixels, ``scores``: ``(M,)``,
    ``image_index``: int64 ``(M,)`` (which photo of the batch), already above
    the score threshold. In order: non-maximum suppression per photo
    (``torchvision.ops.batched_nms``, photos never suppress each other), back to
    original pixels, clipping to the image (``clip_boxes_to_image``), degenerate
    and too-small boxes dropped and counted, the ``max_faces`` best kept, and
    the crop boxes grown by the margin and clipped again.
    """
    boxes, scores = boxes.float(), scores.float()
    keep = batched_nms(boxes, scores, image_index, options.nms_iou)  # sorted by decreasing score
    boxes, scores, image_index = boxes[keep].cpu(), scores[keep].cpu(), image_index[keep].cpu()
    out = []
    for i, p in enumerate(placements):
        mine = image_index == i
        b, s = clip_boxes_to_image(p.to_original(boxes[mine]), (p.height, p.width)), scores[mine]
        wh = b[:, 2:] - b[:, :2]
        sound = torch.isfinite(b).all(1) & (wh > 0).all(1)
        big = wh.min(1).values >= options.min_face
        ok = sound & big
        b, s = b[ok], s[ok]
        n_max = max(0, len(s) - options.max_faces)
        b, s = b[:options.max_faces], s[:options.max_faces]
        crops = crop_boxes(b, options.margin, (p.height, p.width))  # the one crop definition
        out.append(Faces(boxes=b.numpy().astype(np.float32), scores=s.numpy().astype(np.float32),
                         crops=crops.numpy().astype(np.float32), dropped_max=n_max,
                         dropped_small=int((sound & ~big).sum()), dropped_degenerate=int((~sound).sum())))
    return out
