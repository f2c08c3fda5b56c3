"""Which class raises an alert, and which face decides a photo's verdict: one rule for scoring and evaluation.

Pure Python and numpy, no torch, no Ray: :mod:`maskmodel.study.evaluation` (the
alert class is its positive class), the scoring of photos with several faces
and the synthetic scenes' image-level labels all use these two functions, so
"flagged" means the same thing everywhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Names under which datasets commonly spell the "face without a mask" class (Kaggle 12K: WithoutMask).
ALERT_CLASS_NAMES = ("no_mask", "nomask", "without_mask", "withoutmask", "no-mask", "without-mask")


def alert_class(classes: Sequence[str]) -> str:
    """The alert class of ``classes``: a "no mask" spelling if one is present (any case), else the last class.

    Raises :class:`ValueError` for an empty sequence.
    """
    if not classes:
        raise ValueError("no classes to choose the alert class from")
    for c in classes:
        if c.lower() in ALERT_CLASS_NAMES:
            return c
    return classes[-1]


def deciding_face(probs: np.ndarray | Sequence[Sequence[float]], alert_index: int) -> int | None:
    """Index of the face whose classification is the photo's verdict; ``None`` when there is no face.

    ``probs``: ``(K, C)`` class probabilities of the K faces of one photo;
    ``alert_index``: the alert class's column. If any face's label (its
    argmax) is the alert class, the verdict comes from the face most likely to
    be of it among those (so a group photo with one unmasked person is
    flagged, at that person's confidence); otherwise from the most confident
    face. Ties go to the earlier face (faces come highest detector score first).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (faces, classes), got shape {p.shape}")
    if not len(p):
        return None
    alerted = np.flatnonzero(p.argmax(1) == alert_index)
    if len(alerted):
        return int(alerted[np.argmax(p[alerted, alert_index])])
    return int(np.argmax(p.max(1)))
