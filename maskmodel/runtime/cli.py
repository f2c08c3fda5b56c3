"""What every ``jobs/`` entrypoint shares: logging set-up and the user-error exit."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from maskmodel.console import LOG_LEVEL_ENV
from maskmodel.errors import UserError
from maskmodel.runtime.raysession import filter_stderr, shutdown_ray

log = logging.getLogger("maskmodel")

EXIT_USER_ERROR = 2
#: ``jobs.score --check`` / ``jobs.report --check``: the run was committed (or reported) but a drift check failed.
EXIT_CHECK_FAILED = 3
VERBOSE_FLAG = "--verbose"


def configure_logging(level: str | None = None) -> None:
    """One concise format for all maskmodel loggers; ``MASKMODEL_LOG_LEVEL`` overrides the level.

    Ray's own INFO logs stay off the console unless the level is DEBUG (see :mod:`maskmodel.console`).
    """
    level = level or os.environ.get(LOG_LEVEL_ENV, "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    # botocore announces where it found credentials at INFO; that is noise before a one-line error.
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[[], int | None]) -> None:
    """Run ``main`` and exit: a :class:`UserError` becomes one line on stderr and exit code 2.

    ``--verbose`` (every job's parser accepts it) sets ``MASKMODEL_LOG_LEVEL=DEBUG`` first, so the
    job, its Ray workers and any job it starts show Ray's own INFO logs again.
    """
    if VERBOSE_FLAG in sys.argv[1:]:
        os.environ[LOG_LEVEL_ENV] = "DEBUG"
    filter_stderr()
    configure_logging()
    try:
        code = main()
        shutdown_ray()  # the work is done: stop a local Ray now rather than in Ray's slower exit hook
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(code or 0)
