"""Uniform and weighted averages of the fine-tuned models (no pre-trained state needed).

``uniform`` is Eq. (4) of the Merge to Mix paper; ``weighted`` is ``sum_i w_i theta_i / sum_i w_i``:
a one-hot ``weights`` gives that model exactly, equal weights the uniform average, and a zero
weight leaves a model out (mergekit's ``linear`` with ``normalize: true``).
"""

from __future__ import annotations

from typing import Sequence

from mergemix.lazy import LazyModule

from ._ops import model_weights
from ._options import Option, weights_option

torch = LazyModule("torch")  # imported on first use, not when the workflow reads the config (mergemix.lazy)

UNIFORM_OPTIONS: dict[str, Option] = {}
OPTIONS: dict[str, Option] = {"weights": weights_option()}


def uniform_average(thetas: torch.Tensor, theta0: torch.Tensor | None = None) -> torch.Tensor:
    """The plain average of the rows of ``thetas`` (``theta0`` is not used)."""
    return thetas.mean(dim=0)


def weighted_average(
    thetas: torch.Tensor, theta0: torch.Tensor | None = None, *, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """``sum_i w_i theta_i`` with the weights normalised to sum 1 (``theta0`` is not used)."""
    if weights is None:
        return uniform_average(thetas)
    w = model_weights(weights, thetas)
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {w.tolist()}")
    return (w / w.sum()) @ thetas


def uniform_linear(k: int) -> tuple[float, float]:
    """The uniform average is ``(1/k) * sum(thetas)`` (see ``merging.linear_coefficients``)."""
    return 1.0 / k, 0.0


def weighted_linear(k: int, *, weights: Sequence[float] | None = None) -> tuple[float, float] | None:
    """Equal weights: the uniform average; given weights: not a function of the plain sum (None)."""
    return uniform_linear(k) if weights is None else None
