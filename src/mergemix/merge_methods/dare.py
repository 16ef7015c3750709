"""DARE (Yu et al. 2023), linear: drop and rescale each task vector, then combine them linearly.

Each delta entry is dropped with probability ``p = 1 - density`` and the kept ones are divided by
``1 - p`` (``rescale: inverse``, the paper; ``l1`` is mergekit >= 0.1's norm-matching rescale), so
the expected task vector is unchanged. The drop is seeded (``seed``; each model's mask depends on
the seed and the model's index among the candidates, see ``_ops.drop_random``), so reruns are
identical. Then ``theta0 + lambda * sum_i w_i dropped_i / sum_i w_i``: with ``normalize: true``
(the default here) the dropped task vectors are averaged, so ``density: 1`` is the uniform average
of the paper; ``normalize: false`` is mergekit's ``dare_linear`` default (a task-arithmetic sum).
"""

from __future__ import annotations

from typing import Sequence

from mergemix.lazy import LazyModule

from ._ops import combine, drop_random, model_weights, scope_segments, task_vectors
from ._options import (
    Option,
    density_option,
    lambda_option,
    normalize_option,
    p_option,
    rescale_option,
    scope_option,
    seed_option,
    weights_option,
)

torch = LazyModule("torch")  # imported on first use, not when the workflow reads the config (mergemix.lazy)


def dare_options(normalize_divisor: str) -> dict[str, Option]:
    """The options of ``dare`` and ``dare_ties`` (they differ only in what normalize divides by)."""
    return {
        "density": density_option(0.5, "probability of keeping each task-vector entry (1 - p)"),
        "p": p_option(),
        "seed": seed_option(),
        "lambda": lambda_option(),
        "weights": weights_option(),
        "normalize": normalize_option(True, normalize_divisor),
        "rescale": rescale_option(),
        "scope": scope_option("the L1 norm of rescale: l1 is taken"),
    }


OPTIONS: dict[str, Option] = dare_options("the sum of the weights")


def dare_merge(
    thetas: torch.Tensor,
    theta0: torch.Tensor,
    *,
    density: float = 0.5,
    seed: int = 0,
    lambda_: float = 1.0,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    rescale: str = "inverse",
    scope: str = "global",
    segments: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
    sign_election: bool = False,
) -> torch.Tensor:
    """DARE; with ``sign_election`` (not a user option: see ``dare_ties``), DARE-TIES."""
    method = "dare_ties" if sign_election else "dare"
    segs = scope_segments(scope, segments, method) if rescale == "l1" else None  # only l1 has a scope
    deltas = drop_random(task_vectors(thetas, theta0, method), density, seed, rows, rescale, segs)
    w = model_weights(weights, thetas)
    return theta0 + combine(deltas, w, consensus=sign_election, normalize=normalize, lambda_=lambda_)
