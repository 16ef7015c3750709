"""Merge methods over flat parameter vectors, with a registry (in the spirit of mergekit).

A merge method takes the stacked fine-tuned states ``thetas`` (shape ``[k, P]``, one row per
selected model), the pre-trained state ``theta0`` (shape ``[P]``) and keyword options, and returns
the merged state (shape ``[P]``). Everything here is pure tensor math, no I/O.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

MergeFn = Callable[..., torch.Tensor]
MERGE_METHODS: Dict[str, MergeFn] = {}


def register_merge_method(name: str):
    def deco(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = fn
        return fn

    return deco


def get_merge_method(name: str) -> MergeFn:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise KeyError(
            f"unknown merge method {name!r}; registered: {', '.join(sorted(MERGE_METHODS))}"
        ) from None


@register_merge_method("uniform")
def uniform_average(thetas: torch.Tensor, theta0: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (4) of the paper: the plain average of the selected fine-tuned models."""
    return thetas.mean(dim=0)


@register_merge_method("task_arithmetic")
def task_arithmetic(
    thetas: torch.Tensor, theta0: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Task arithmetic: ``theta0 + scale * sum_i (theta_i - theta0)``.

    With ``scale = 1/k`` this equals the uniform average.
    """
    return theta0 + scale * (thetas - theta0).sum(dim=0)


def merge(method: str, thetas: torch.Tensor, theta0: torch.Tensor | None = None, **options) -> torch.Tensor:
    if thetas.ndim != 2 or thetas.shape[0] == 0:
        raise ValueError(f"thetas must have shape [k>=1, P], got {tuple(thetas.shape)}")
    return get_merge_method(method)(thetas, theta0, **options)


def flatten_state(state: Dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """Concatenate the tensors of ``state`` in ``keys`` order into one float32 vector."""
    return torch.cat([state[k].detach().reshape(-1).to(torch.float32) for k in keys])


def unflatten_into(vec: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Copy a flat vector into live parameter tensors, in order, without allocation per tensor."""
    offset = 0
    for p in params:
        n = p.numel()
        p.data.copy_(vec[offset : offset + n].view_as(p))
        offset += n
    if offset != vec.numel():
        raise ValueError(f"flat vector has {vec.numel()} values, parameters need {offset}")
