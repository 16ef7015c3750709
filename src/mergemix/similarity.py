"""The six embedding-similarity scores of appendix A.4 between a target and a dataset mixture.

For a target embedding set ``T`` and a mixture ``S`` (the union of its datasets' embeddings):

==============  =====================================================  ==========
column          definition                                             better
==============  =====================================================  ==========
avg_max_cos     mean_{x in T} max_{y in S} cos(x, y)          (eq. 8)  higher
avg_min_l2      mean_{x in T} min_{y in S} ||x - y||           (eq. 9)  lower
avg_avg_cos     mean_{x in T} mean_{y in S} cos(x, y)         (eq. 10) higher
avg_avg_l2      mean_{x in T} mean_{y in S} ||x - y||         (eq. 11) lower
max_max_cos     max_{x in T} max_{y in S} cos(x, y)           (eq. 12) higher
min_min_l2      min_{x in T} min_{y in S} ||x - y||           (eq. 13) lower
==============  =====================================================  ==========

All six decompose over the datasets of a mixture, so per-dataset statistics are computed once and
every one of the ``2**N - 1`` mixtures is scored exactly without touching embeddings again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

METRICS: dict[str, str] = {
    "avg_max_cos": "max",
    "avg_min_l2": "min",
    "avg_avg_cos": "max",
    "avg_avg_l2": "min",
    "max_max_cos": "max",
    "min_min_l2": "min",
}
"""Metric name -> whether the selection maximises or minimises it."""


def _pairwise(x: np.ndarray, y: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and L2 distances between rows of x and rows of y (float64)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    yn = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    x2 = (x * x).sum(1)[:, None]
    y2 = (y * y).sum(1)[None, :]
    cos = np.empty((x.shape[0], y.shape[0]))
    l2 = np.empty((x.shape[0], y.shape[0]))
    for s in range(0, x.shape[0], block):
        e = s + block
        cos[s:e] = xn[s:e] @ yn.T
        l2[s:e] = np.sqrt(np.maximum(x2[s:e] + y2 - 2.0 * (x[s:e] @ y.T), 0.0))
    return cos, l2


@dataclass
class DatasetStats:
    """Per-target-sample statistics of one candidate dataset."""

    max_cos: np.ndarray  # [n_target]
    min_l2: np.ndarray
    sum_cos: np.ndarray
    sum_l2: np.ndarray
    count: int


def dataset_stats(target: np.ndarray, candidate: np.ndarray) -> DatasetStats:
    if len(candidate) == 0 or len(target) == 0:
        raise ValueError("similarity needs non-empty target and candidate embedding sets")
    cos, l2 = _pairwise(target, candidate)
    return DatasetStats(cos.max(1), l2.min(1), cos.sum(1), l2.sum(1), candidate.shape[0])


def score_subsets(
    target: np.ndarray, candidates: Mapping[str, np.ndarray], subsets: Sequence[Sequence[str]]
) -> dict[str, np.ndarray]:
    """All six scores for each subset (a list of candidate names). Returns metric -> [n_subsets]."""
    stats = {name: dataset_stats(target, emb) for name, emb in candidates.items()}
    out = {m: np.empty(len(subsets)) for m in METRICS}
    for i, subset in enumerate(subsets):
        st = [stats[n] for n in subset]
        max_cos = np.max([s.max_cos for s in st], axis=0)
        min_l2 = np.min([s.min_l2 for s in st], axis=0)
        count = sum(s.count for s in st)
        out["avg_max_cos"][i] = max_cos.mean()
        out["avg_min_l2"][i] = min_l2.mean()
        out["avg_avg_cos"][i] = (np.sum([s.sum_cos for s in st], axis=0) / count).mean()
        out["avg_avg_l2"][i] = (np.sum([s.sum_l2 for s in st], axis=0) / count).mean()
        out["max_max_cos"][i] = max_cos.max()
        out["min_min_l2"][i] = min_l2.min()
    return out
