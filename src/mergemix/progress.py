"""Progress a person can see: a tqdm bar when stderr is a terminal; job logs get lines instead
(each long step logs done/total, rate and ETA at least every 30 seconds)."""

from __future__ import annotations

import contextlib
import sys


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
