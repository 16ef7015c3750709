"""DARE-TIES: DARE's random drop and rescale, then TIES's sign election and disjoint mean.

As mergekit's ``dare_ties``: no magnitude trim (the drop is the sparsification); the elected sign
is that of the summed weighted dropped deltas. ``normalize: true`` (the default here) divides by
the agreeing models' summed weights (the disjoint mean of TIES); mergekit's default is false.
The options and their defaults are DARE's (``dare.dare_options``).
"""

from __future__ import annotations

from functools import partial

from ._options import Option
from .dare import dare_merge, dare_options

OPTIONS: dict[str, Option] = dare_options("the summed weights of the models agreeing with the elected sign")

dare_ties_merge = partial(dare_merge, sign_election=True)
