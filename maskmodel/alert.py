"""Which classes raise an alert, and which face decides a photo's verdict: one rule for scoring and evaluation.

Pure Python and numpy, no torch, no Ray. A model has one *compliant* class
(the face wears its mask properly); every other class is an *alert* class
(``no_mask``, ``mask_incorrect``, ...). The model card names them
(``alert_classes`` in ``model.json``, written by ``jobs.train``); a card
written before that field existed gets them by :func:`alert_classes`'s rule, so
old model directories keep working. A photo's verdict is "alert" when any of
its faces' labels is an alert class (:func:`deciding_face`). Scoring,
evaluation, the run profile and the synthetic scenes' folder labels all use
these functions, so "flagged" means the same thing everywhere.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

#: Spellings of the compliant class ("face with a mask worn properly"), compared in lower case.
COMPLIANT_CLASS_NAMES = ("mask", "with_mask", "withmask", "with-mask", "masked", "mask_on", "mask_correct",
                         "mask_worn", "compliant")
#: Spellings of the "face without a mask" class (Kaggle 12K: WithoutMask), compared in lower case: never the
#: compliant class when no spelling of it is present.
NO_MASK_CLASS_NAMES = ("no_mask", "nomask", "without_mask", "withoutmask", "no-mask", "without-mask")


def compliant_class(classes: Sequence[str], named: str = "") -> str:
    """The compliant class of ``classes``: ``named`` when given, else a :data:`COMPLIANT_CLASS_NAMES` spelling
    (any case), else the first class that is not a no-mask spelling.

    Raises :class:`ValueError` for fewer than two classes or a ``named`` class not among ``classes``.
    """
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least two classes to tell compliant from alert, got {list(classes)}")
    if named:
        if named not in classes:
            raise ValueError(f"compliant class {named!r} is not one of the classes {list(classes)}")
        return named
    for c in classes:
        if c.lower() in COMPLIANT_CLASS_NAMES:
            return c
    return next((c for c in classes if c.lower() not in NO_MASK_CLASS_NAMES), classes[0])


def alert_classes(classes: Sequence[str], compliant: str = "") -> tuple[str, ...]:
    """Every class of ``classes`` but the compliant one (:func:`compliant_class`), in class order."""
    keep = compliant_class(classes, compliant)
    return tuple(c for c in classes if c != keep)


def card_alert_classes(classes: Sequence[str], stored: Iterable[str] | None) -> tuple[str, ...]:
    """The alert classes a model card holds (``stored``), or by :func:`alert_classes`'s rule when it holds none
    (a card written before the field existed). Raises :class:`ValueError` when ``stored`` names a class the
    card does not have, or every class."""
    stored = tuple(stored or ())
    if not stored:
        return alert_classes(classes)
    unknown = [c for c in stored if c not in classes]
    if unknown or len(set(stored)) >= len(classes):
        raise ValueError(f"alert classes {list(stored)} must be some, not all, of the classes {list(classes)}")
    return tuple(c for c in classes if c in stored)


def alert_indices(classes: Sequence[str], alerts: Iterable[str]) -> tuple[int, ...]:
    """The columns of ``alerts`` in ``classes`` (a probability row's order)."""
    alerts = set(alerts)
    return tuple(i for i, c in enumerate(classes) if c in alerts)


def deciding_face(probs: np.ndarray | Sequence[Sequence[float]], alert: int | Iterable[int]) -> int | None:
    """Index of the face whose classification is the photo's verdict; ``None`` when there is no face.

    ``probs``: ``(K, C)`` class probabilities of the K faces of one photo;
    ``alert``: the alert classes' columns (one int for one class). If any
    face's label (its argmax) is an alert class, the verdict comes from the face
    most likely to be of its alert class among those (so a group photo with one
    unmasked person is flagged, at that person's confidence); otherwise from
    the most confident face. Ties go to the earlier face (faces come highest
    detector score first).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (faces, classes), got shape {p.shape}")
    if not len(p):
        return None
    cols = [alert] if isinstance(alert, (int, np.integer)) else list(alert)
    label = p.argmax(1)
    alerted = np.flatnonzero(np.isin(label, cols))
    if len(alerted):
        return int(alerted[np.argmax(p[alerted, label[alerted]])])
    return int(np.argmax(p.max(1)))


def is_alert(label: str | None, alerts: Iterable[str]) -> bool:
    """A photo's verdict from its deciding label: alert when it is an alert class; no label (no face found,
    no whole-image fallback) is "no alert"."""
    return label is not None and label in set(alerts)


def row_alert(status: str | None, label: str | None, alert: bool | None, alerts: Iterable[str]) -> bool | None:
    """A result row's verdict: its ``alert`` column; for a row written before that column existed (``alert``
    null on an ok row), :func:`is_alert` of its label. ``None`` for an error (or missing) row."""
    if status != "ok":
        return None
    return bool(alert) if alert is not None else is_alert(label, alerts)


def truth_alert(face_classes: Iterable[str], alerts: Iterable[str]) -> bool:
    """A photo's true verdict: alert when any annotated face is of an alert class (no face: no alert)."""
    alerts = set(alerts)
    return any(c in alerts for c in face_classes)
