"""Progress of a training on stderr: a bar on a terminal, a log line at each quarter on a pipe."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from sift.logs import get_logger

log = get_logger("sift.train")


def stderr_progress(label: str) -> Callable[[int, int, float], None]:
    """A tqdm bar on a terminal; on a pipe or log, a line at 25 % steps."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar: dict[str, Any] = {}

        def update(step: int, total: int, loss: float) -> None:
            if "bar" not in bar or step == 1:  # a new bar per run of the loop (SISA stages run several)
                bar["bar"] = tqdm(total=total, desc=label, file=sys.stderr, leave=False, unit="step")
            bar["bar"].update(1)
            bar["bar"].set_postfix(loss=f"{loss:.3f}")
            if step == total:
                bar["bar"].close()

        return update

    def report(step: int, total: int, loss: float) -> None:
        if total >= 20 and step < total and step % (total // 4) == 0:
            log.info(f"{label}: step {step}/{total} loss {loss:.4f}")

    return report
