"""Progress a person can see: a tqdm bar when stderr is a terminal; job logs get lines instead
(each long step logs done/total, rate and ETA at least every 30 seconds)."""

from __future__ import annotations

import contextlib
import sys
import time


class LogEvery:
    """When a long step should log its next line: at most every ``seconds`` (30: ``tail -f`` on a
    job log answers "how long still"), and always at the last item; with the rate and the ETA.
    ``first``: whether the first item logs at once (else the first line comes after ``seconds``)."""

    def __init__(self, seconds: float = 30.0, first: bool = True):
        self.seconds = seconds
        self.t0 = time.time()
        self.last = 0.0 if first else self.t0

    def due(self, done: int, total: int) -> bool:
        now = time.time()
        if now - self.last >= self.seconds or done >= total:
            self.last = now
            return True
        return False

    def rate_eta(self, done: int, total: int) -> tuple[float, float]:
        """Items per second so far, and the seconds the rest will take at that rate."""
        rate = done / max(time.time() - self.t0, 1e-9)
        return rate, (total - done) / rate if total and rate > 0 else float("nan")


def progress_bar(stack: contextlib.ExitStack, total: int, done: int = 0, name: str = "", unit: str = "it"):
    """A tqdm bar entered on ``stack`` when stderr is a terminal (log lines printed above it), else
    None: a Slurm log or a redirected stderr gets the log lines only."""
    isatty = getattr(sys.stderr, "isatty", None)
    if not (isatty and isatty()):
        return None
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = stack.enter_context(
        tqdm(total=total, initial=done, desc=name or None, unit=unit, leave=False, dynamic_ncols=True)
    )
    stack.enter_context(logging_redirect_tqdm())
    return bar
