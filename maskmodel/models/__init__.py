"""The networks: the mask classifier and the face detectors, with the cards that describe them.

Owns: building, saving and loading the classifier's model directory (:mod:`.classifier`: weights +
``model.json``), its forward pass at a precision on a device (:mod:`.precision`), and the face
detectors (:mod:`.detect`: CenterFace, detector directories with ``detector.json``, letterbox, box
decoding and NMS).

May import: :mod:`maskmodel.data` (a card names its preprocessing), :mod:`maskmodel.io` and the
shared pieces; nothing of Ray, results, training, scoring or the study.
"""
