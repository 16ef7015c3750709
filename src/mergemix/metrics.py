"""Accuracy, logit transform and the paper's correlation with its exclusions. Pure numpy."""

from __future__ import annotations

import numpy as np


def logit(p, eps: float) -> np.ndarray:
    """log(p / (1 - p)), with ``p`` clipped to ``[eps, 1 - eps]`` so 0 and 1 stay finite (``eps``:
    the study's ``analysis.logit_eps``; no default here, so the config's value is always the one used)."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p / (1.0 - p))


def logit_delta(acc, base_acc: float, eps: float) -> np.ndarray:
    """Improvement over the pre-trained model in logit accuracy (section 4.2)."""
    return logit(acc, eps) - logit(base_acc, eps)


def pearson(x, y) -> float:
    """Pearson r; NaN when fewer than 3 points or either side is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"pearson needs equal lengths, got {x.shape} and {y.shape}")
    if x.size < 3:
        return float("nan")
    xc = x - x.mean()
    yc = y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    if denom == 0:
        return float("nan")
    return float(np.clip((xc * yc).sum() / denom, -1.0, 1.0))


def merged_vs_mixture_pearson(sizes, merged_acc, mixture_acc, base_acc: float, eps: float) -> tuple[float, float, int]:
    """Section 4.2: Pearson between merged and mixture-fine-tuned accuracy of one target.

    Single-dataset subsets are excluded (merged and fine-tuned models are the same model there).
    Returns (r on accuracies, r on logit-accuracy deltas over the pre-trained model, points used).
    """
    sizes = np.asarray(sizes)
    keep = sizes >= 2
    m = np.asarray(merged_acc, dtype=np.float64)[keep]
    f = np.asarray(mixture_acc, dtype=np.float64)[keep]
    return (
        pearson(m, f),
        pearson(logit_delta(m, base_acc, eps), logit_delta(f, base_acc, eps)),
        int(keep.sum()),
    )
