"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

1. Trim: keep each task vector's top ``density`` fraction of entries by magnitude
   (``max(1, int(density * n))`` entries, n the scope's size), zero the rest.
2. Elect: per entry, the sign of the summed (weighted) trimmed deltas, the "mass" rule.
3. Disjoint merge: average over the models whose trimmed delta has the elected sign (zeros do not
   count); ``theta0 + lambda * that``.

The paper trims the whole task vector (``scope: global``, the default); mergekit trims each
parameter tensor (``scope: tensor``, with the tensor sizes from the engine). With weights, the
deltas are weighted before the election and the disjoint mean divides by the agreeing models'
summed weights, as mergekit's ``ties`` does (``normalize: false`` gives its disjoint sum). The
default density 0.2 is the paper's top-20%.
"""

from __future__ import annotations

from typing import Sequence

from mergemix.lazy import LazyModule

from ._ops import combine, model_weights, scope_segments, task_vectors, trim_magnitude
from ._options import Option, density_option, lambda_option, normalize_option, scope_option, weights_option

torch = LazyModule("torch")  # imported on first use, not when the workflow reads the config (mergemix.lazy)

OPTIONS: dict[str, Option] = {
    "density": density_option(0.2, "fraction of each task vector's entries kept, the largest in magnitude"),
    "lambda": lambda_option(),
    "weights": weights_option(),
    "normalize": normalize_option(True, "the summed weights of the models agreeing with the elected sign"),
    "scope": scope_option("trim"),
}


def ties_merge(
    thetas: torch.Tensor,
    theta0: torch.Tensor,
    *,
    density: float = 0.2,
    lambda_: float = 1.0,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    scope: str = "global",
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    deltas = trim_magnitude(task_vectors(thetas, theta0, "ties"), density, scope_segments(scope, segments, "ties"))
    return theta0 + combine(
        deltas, model_weights(weights, thetas), consensus=True, normalize=normalize, lambda_=lambda_
    )
