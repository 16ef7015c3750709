"""Beam search: forward selection keeping the best ``width`` subsets of each size."""

from __future__ import annotations

from .base import BudgetExhausted, Objective, Option, SearchStrategy, rank_key, register_strategy


@register_strategy
class Beam(SearchStrategy):
    """Forward selection with a beam.

    Level 1 scores every singleton; each next level scores every beam member plus one more
    candidate (duplicates merged, scored in increasing mask order) and keeps the best ``width`` as
    the new beam (ties: fewer members, then smaller mask). The search stops once ``patience`` + 1
    levels in a row fail to beat the best value so far, or after the level of all N candidates.
    All evaluations use the full validation split.

    Cost: N evaluations for level 1, at most width * N per later level. Options: ``width`` (integer >= 1, default 3),
    ``patience`` (integer >= 0, default 1).
    """

    name = "beam"
    options = {
        "width": Option(3, int, lambda v: v >= 1, "an integer >= 1"),
        "patience": Option(1, int, lambda v: v >= 0, "an integer >= 0"),
    }

    def run(self, objective: Objective) -> str:
        n = self.n_candidates
        beam, best, stale = [0], float("-inf"), 0
        try:
            for _ in range(n):
                level = sorted({b | 1 << c for b in beam for c in range(n) if not b >> c & 1})
                values = {m: objective(m) for m in level}
                beam = sorted(level, key=lambda m: rank_key(m, values[m]))[: self.opts["width"]]
                top = values[beam[0]]
                stale = 0 if top > best else stale + 1
                best = max(best, top)
                if stale > self.opts["patience"]:
                    return "converged"
        except BudgetExhausted:
            return "budget exhausted"
        return "all candidates included"
