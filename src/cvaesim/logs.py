"""Send a rule's output to its log file, and its final error to the terminal too."""

from __future__ import annotations

import logging
import os
import sys
import traceback


def log_to_file(path: str) -> None:
    """Redirect stdout, stderr (Python's and the process's own, which TensorFlow's C++ code writes to)
    and the ``logging`` module to ``path``.

    An uncaught exception goes to the log with its traceback, and its one-line message to
    the terminal as well, so a user sees what went wrong without opening the log.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    handle = open(path, "w", buffering=1)
    for descriptor in (1, 2):
        os.dup2(handle.fileno(), descriptor)
    sys.stdout = sys.stderr = handle
    logging.basicConfig(level=logging.INFO, stream=handle, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # TensorFlow logs a line per epoch through absl ("Sharding callback duration"); keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)

    def report(kind, error, trace):
        traceback.print_exception(kind, error, trace, file=handle)
        handle.flush()
        print(f"{kind.__name__}: {error}", file=terminal)

    sys.excepthook = report
