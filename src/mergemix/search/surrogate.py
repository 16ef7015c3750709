"""Surrogate-model search: fit a regression of accuracy on subset membership, score its best picks."""

from __future__ import annotations

import math

from .base import BudgetExhausted, Objective, Option, SearchStrategy, rank_key, register_strategy

FULL_POOL_LIMIT = 65536  # score every subset while there are at most this many
SAMPLED_POOL = 20000  # else a random sample of this many ...
FLIPPED_TOP = 10  # ... plus every one-bit flip of this many best evaluated subsets


@register_strategy
class Surrogate(SearchStrategy):
    """Model-based search with a regression surrogate of merged validation accuracy.

    Features of a subset are its N inclusion indicators plus (``pairwise``) all pairwise products.
    The initial design scores every singleton, then seeded random subsets up to ``n_init`` in all.
    Then, until the budget is spent: fit the model (``ridge``: scikit-learn ``Ridge(alpha)``;
    ``gbm``: ``HistGradientBoostingRegressor(random_state=seed)``) on every full evaluation so far,
    predict a candidate pool (every subset if there are at most 65536, else 20000 seeded random
    subsets plus every one-bit flip of the 10 best evaluated ones) and score the ``batch``
    best-predicted unevaluated subsets (ties: fewer members, then smaller mask). Stops early when
    the pool holds no unevaluated subset. All evaluations use the full validation split.

    Cost: evaluations. Options: ``pairwise`` (bool, default True), ``alpha`` (number > 0, default
    1.0), ``model`` ("ridge" or "gbm", default "ridge"), ``n_init`` (None or integer >= 1; default
    None = max(N + 1, 10% of the evaluation budget)), ``batch`` (integer >= 1, default 1).
    """

    name = "surrogate"
    options = {
        "pairwise": Option(True, bool, help="true or false"),
        "alpha": Option(1.0, (int, float), lambda v: v > 0, "a number > 0"),
        "model": Option("ridge", str, lambda v: v in ("ridge", "gbm"), "'ridge' or 'gbm'"),
        "n_init": Option(None, (int, type(None)), lambda v: v >= 1, "null or an integer >= 1"),
        "batch": Option(1, int, lambda v: v >= 1, "an integer >= 1"),
    }

    def features(self, masks):
        """Inclusion indicators (and their pairwise products) of an int64 array of masks."""
        import numpy as np

        n = self.n_candidates
        bits = ((masks[:, None] >> np.arange(n)) & 1).astype(np.float32)
        if not self.opts["pairwise"]:
            return bits
        i, j = np.triu_indices(n, 1)
        return np.hstack([bits, bits[:, i] * bits[:, j]])

    def model(self):
        if self.opts["model"] == "gbm":
            from sklearn.ensemble import HistGradientBoostingRegressor

            return HistGradientBoostingRegressor(random_state=self.seed)
        from sklearn.linear_model import Ridge

        return Ridge(alpha=self.opts["alpha"])

    def initial_design(self, objective: Objective, rng) -> list[int]:
        """Every singleton, then distinct seeded random subsets up to ``n_init`` in all."""
        n, total, budget = self.n_candidates, (1 << self.n_candidates) - 1, objective.budget
        n_init = self.opts["n_init"]
        if n_init is None:
            if budget.evaluations is not None:
                affordable = budget.evaluations
            elif budget.examples is not None:
                affordable = budget.examples // objective.n_examples
            else:
                affordable = total
            n_init = max(n + 1, math.ceil(0.1 * affordable))
        design = [1 << i for i in range(n)]
        chosen = set(design)
        while len(design) < min(n_init, total):
            mask = int(rng.integers(1, total + 1))
            if mask not in chosen:
                chosen.add(mask)
                design.append(mask)
        return design

    def run(self, objective: Objective) -> str:
        import numpy as np

        rng = np.random.default_rng(self.seed)
        n, total, n_full = self.n_candidates, (1 << self.n_candidates) - 1, objective.n_examples
        whole = np.arange(1, total + 1, dtype=np.int64) if total <= FULL_POOL_LIMIT else None
        whole_x = None if whole is None else self.features(whole)
        try:
            for mask in self.initial_design(objective, rng):
                objective(mask)
            while True:
                done = [r for r in objective.records if r.examples == n_full]
                done.sort(key=lambda r: rank_key(r.mask, r.value))
                seen = np.array([r.mask for r in done], dtype=np.int64)
                model = self.model().fit(self.features(seen), [r.value for r in done])
                if whole is not None:
                    pool, pool_x = whole, whole_x
                else:
                    flips = np.array([r.mask ^ 1 << c for r in done[:FLIPPED_TOP] for c in range(n)])
                    pool = np.union1d(rng.integers(1, total + 1, size=SAMPLED_POOL), flips[flips > 0])
                    pool_x = self.features(pool)
                fresh = np.flatnonzero(~np.isin(pool, seen))
                if not fresh.size:
                    return "all subsets evaluated" if whole is not None else "candidate pool exhausted"
                predicted = model.predict(pool_x)[fresh]
                sizes = pool_x[fresh, :n].sum(axis=1)
                for i in np.lexsort((pool[fresh], sizes, -predicted))[: self.opts["batch"]]:
                    objective(int(pool[fresh[i]]))
        except BudgetExhausted:
            return "budget exhausted"
