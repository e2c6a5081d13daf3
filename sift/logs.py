"""The "sift" logger: the library logs, the CLI decides what is shown.

Library modules log to `logging.getLogger("sift....")` and never print; with no configuration
(a Python user of the library) Python shows warnings only. The CLI calls `configure` once: INFO
by default (progress lines and notices on stderr, as the commands always printed them), DEBUG
with -v, WARNING with -q. Results never go through the logger: they go to stdout.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

ROOT = "sift"
_HANDLER_NAME = "sift-cli"


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (a child of "sift", so one setting governs them all)."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def configure(verbosity: int = 0) -> None:
    """Send sift's log to stderr, message only: verbosity < 0 warnings, 0 info, > 0 debug.
    Calling it again replaces the earlier setting (one handler, never two)."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG)
    root.propagate = False


def progress_enabled() -> bool:
    """Progress lines are INFO records: shown when INFO is."""
    return logging.getLogger(ROOT).isEnabledFor(logging.INFO)


@contextlib.contextmanager
def quieted(quiet: bool) -> Iterator[None]:
    """Raise sift's level to WARNING for a call made with quiet=True (the library functions that
    took a `quiet` flag keep it for one release; logging decides everywhere else)."""
    if not quiet:
        yield
        return
    root = logging.getLogger(ROOT)
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
