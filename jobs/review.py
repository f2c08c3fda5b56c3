"""Send the faces the model doubts to reviewers, and bring their corrections back as labels.

``export`` picks faces from committed results (least confident first; ``--alerts``; ``--random N``) and
writes Label Studio tasks with pre-annotations, its labelling config, a COCO file and a manifest;
``import`` turns a Label Studio JSON export (or CVAT's COCO) into a COCO annotation set for
``jobs.train --data`` and ``jobs.train_detector`` (docs/review.md)::

    python -m jobs.review export --results s3://bucket/scores --output s3://bucket/review/r1 --least-confident 200
    python -m jobs.review export --results s3://bucket/scores --output review/r1 --alerts --random 50 \\
        --where "scored_at >= '2025-03-01'" --presign 86400 --review-folder s3://bucket/review/r1/images
    python -m jobs.review import --reviewed export.json --exported s3://bucket/review/r1 \\
        --output s3://bucket/labels/set2.json --merge s3://bucket/labels/set1.json

On a cluster (set RAY_AUTH_MODE=token when the cluster has token auth)::

    ray job submit --working-dir . -- python -m jobs.review export --results s3://bucket/scores --output ...
"""

from __future__ import annotations

import sys

from maskmodel.config import parse_config
from maskmodel.errors import UserError
from maskmodel.runtime import cli

COMMANDS = ("export", "import")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__, flush=True)
            return 0
        raise UserError(f"Say what to do first: python -m jobs.review {{{','.join(COMMANDS)}}} ... (got "
                        f"{argv[0] if argv else 'nothing'!r}).")
    command, rest = argv[0], argv[1:]
    if command == "export":
        from maskmodel.study.review import ReviewExportConfig, export_review

        config = parse_config(ReviewExportConfig, rest, prog="python -m jobs.review export", description=__doc__)
        print(export_review(config).summary_line(), flush=True)
    else:
        from maskmodel.study.review_import import ReviewImportConfig, import_review

        config = parse_config(ReviewImportConfig, rest, prog="python -m jobs.review import", description=__doc__)
        print(import_review(config).summary_line(), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
