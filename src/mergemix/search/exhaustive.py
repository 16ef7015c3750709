"""Exhaustive search: every subset, in increasing mask order, until the budget stops it."""

from __future__ import annotations

from .base import BudgetExhausted, Objective, SearchStrategy, register_strategy


@register_strategy
class Exhaustive(SearchStrategy):
    """Scores masks ``1 .. 2**N - 1`` in increasing order on the full validation split.

    Cost: one evaluation per subset (``2**N - 1`` in all). Options: none.
    """

    name = "exhaustive"

    def run(self, objective: Objective) -> str:
        try:
            for mask in range(1, 1 << self.n_candidates):
                objective(mask)
        except BudgetExhausted:
            return "budget exhausted"
        return "all subsets evaluated"
