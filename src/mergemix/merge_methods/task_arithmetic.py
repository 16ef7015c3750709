"""Task arithmetic (Ilharco et al. 2023): ``theta0 + lambda * sum_i w_i (theta_i - theta0)``.

``lambda`` (alias ``scale``, the name mergemix used first) defaults to 1 and the weights to 1, so
the default adds the task vectors; ``lambda = 1/k`` (or ``normalize: true``, which divides by
``sum_i w_i``) gives the uniform average. This is mergekit's ``task_arithmetic``.
"""

from __future__ import annotations

from typing import Sequence

from mergemix.lazy import LazyModule

from ._ops import combine, model_weights, task_vectors
from ._options import Option, lambda_option, normalize_option, weights_option

torch = LazyModule("torch")  # imported on first use, not when the workflow reads the config (mergemix.lazy)

OPTIONS: dict[str, Option] = {
    "lambda": lambda_option(),
    "scale": Option(
        None,
        float,
        "a number > 0",
        lambda v: v > 0,
        "another spelling of lambda",
        alias_of="lambda",
        from_target=lambda v: v,
        default_doc="that of lambda, 1.0",
    ),
    "weights": weights_option(),
    "normalize": normalize_option(False, "the sum of the weights"),
}


def task_arithmetic(
    thetas: torch.Tensor,
    theta0: torch.Tensor,
    *,
    lambda_: float = 1.0,
    weights: Sequence[float] | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    deltas = task_vectors(thetas, theta0, "task_arithmetic")
    return theta0 + combine(
        deltas, model_weights(weights, thetas), consensus=False, normalize=normalize, lambda_=lambda_
    )


def task_arithmetic_linear(
    k: int, *, lambda_: float = 1.0, weights: Sequence[float] | None = None, normalize: bool = False
) -> tuple[float, float] | None:
    """``(a, b)`` with the merged state ``a * sum(thetas) + b * theta0`` (equal weights), else None."""
    if weights is not None:
        return None
    a = lambda_ / k if normalize else lambda_
    return a, 1.0 - a * k
