"""Greedy forward selection with an optional backward (removal) pass."""

from __future__ import annotations

from .base import BudgetExhausted, Objective, Option, SearchStrategy, rank_key, register_strategy


@register_strategy
class Greedy(SearchStrategy):
    """Forward selection from the empty set, then backward elimination.

    Forward: from the current set S, score S + {c} for every candidate c not in S and move to the
    best if it beats the best value so far by more than ``min_improvement``; else stop. Backward
    (if ``backward``): score S - {c} for every member c (non-empty results only) and take the best
    removal while it improves by more than ``min_improvement``. All evaluations use the full
    validation split.

    Cost: at most N + (N - 1) + ... + 1 = N(N+1)/2 evaluations forward, plus at most |S| per
    backward step (neighbours already scored are cached).
    Options: ``backward`` (bool, default True), ``min_improvement`` (number >= 0, default 0.0).
    """

    name = "greedy"
    options = {
        "backward": Option(True, bool, help="true or false"),
        "min_improvement": Option(0.0, (int, float), lambda v: v >= 0, "a number >= 0"),
    }

    def run(self, objective: Objective) -> str:
        n, eps = self.n_candidates, self.opts["min_improvement"]
        current, best = 0, float("-inf")

        def step(neighbours: list[int]) -> bool:
            """Move to the best neighbour if it improves on ``best``."""
            nonlocal current, best
            if not neighbours:
                return False
            values = {m: objective(m) for m in neighbours}
            mask = min(neighbours, key=lambda m: rank_key(m, values[m]))
            if values[mask] > best + eps:
                current, best = mask, values[mask]
                return True
            return False

        try:
            while step([current | 1 << c for c in range(n) if not current >> c & 1]):
                pass
            while self.opts["backward"] and step(
                [current & ~(1 << c) for c in range(n) if current >> c & 1 and current != 1 << c]
            ):
                pass
        except BudgetExhausted:
            return "budget exhausted"
        return "converged"
