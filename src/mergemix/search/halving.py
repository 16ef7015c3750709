"""Successive halving: score many subsets on small validation slices, promote the best."""

from __future__ import annotations

from .base import BudgetExhausted, Objective, Option, SearchStrategy, rank_key, register_strategy


def plan_rungs(population: int, eta: int, n_examples: int, min_examples: int, examples: int) -> list[tuple[int, int]]:
    """``(subsets, slice size)`` per rung for a population of ``population`` subsets.

    Rung r keeps ``ceil(population / eta**r)`` subsets, down to the first rung of at most ``eta``;
    each rung spends about ``examples / R`` (R rungs), clamped to ``min_examples .. n_examples``
    per subset; the last rung uses the whole validation split.
    """
    sizes = [population]
    while sizes[-1] > eta:
        sizes.append(-(-population // eta ** len(sizes)))
    per_rung = examples // len(sizes)
    slices = [min(n_examples, max(min_examples, per_rung // size)) for size in sizes[:-1]] + [n_examples]
    return list(zip(sizes, slices))


def plan_cost(plan: list[tuple[int, int]]) -> tuple[int, int]:
    """Charged ``(evaluations, examples)`` of a plan: a rung on the previous rung's slice is cached."""
    evaluations = examples = 0
    previous = None
    for size, slice_ in plan:
        if slice_ != previous:
            evaluations, examples = evaluations + size, examples + size * slice_
        previous = slice_
    return evaluations, examples


@register_strategy
class Halving(SearchStrategy):
    """Successive halving over a population of subsets (cost: validation examples).

    The population is every subset if there are at most ``population`` of them, else a seeded
    uniform sample of ``population`` distinct subsets. Each rung scores its subsets on a slice of
    the validation split (the first m examples of the fixed permutation) and promotes the best
    ``1/eta`` (ties: fewer members, then smaller mask); slices grow as the rungs shrink, and the
    last rung (at most ``eta`` subsets) scores on the whole split. The example budget is spread
    evenly over the rungs (see :func:`plan_rungs`); if the plan does not fit the remaining budget,
    the population is shrunk until it does (with fewer than ``eta`` full evaluations affordable,
    as many subsets as fit are scored fully).

    Cost: ``Budget.examples`` (a full evaluation costs n_examples); an evaluations budget is also
    respected. Options: ``population`` (integer >= 1, default 4096), ``eta`` (integer >= 2,
    default 4), ``min_examples`` (integer >= 1, default 80: the smallest slice; defaults from
    benchmarks/search.py on the wide digits study, where smaller first slices were too noisy).
    """

    name = "halving"
    cost = "examples"
    options = {
        "population": Option(4096, int, lambda v: v >= 1, "an integer >= 1"),
        "eta": Option(4, int, lambda v: v >= 2, "an integer >= 2"),
        "min_examples": Option(80, int, lambda v: v >= 1, "an integer >= 1"),
    }

    def plan(self, objective: Objective) -> list[tuple[int, int]]:
        """The largest population plan (at most ``population`` subsets) that fits the budget left."""
        n, budget, total = objective.n_examples, objective.budget, (1 << self.n_candidates) - 1
        evaluations_left = None if budget.evaluations is None else budget.evaluations - objective.evaluations
        if budget.examples is not None:
            examples_left = budget.examples - objective.examples_used
        else:
            examples_left = (total if evaluations_left is None else evaluations_left) * n
        # the first rung alone costs at least size * min(min_examples, n)
        largest = min(total, self.opts["population"], examples_left // min(self.opts["min_examples"], n))
        for size in range(largest, 0, -1):
            plan = plan_rungs(size, self.opts["eta"], n, self.opts["min_examples"], examples_left)
            evaluations, examples = plan_cost(plan)
            if examples <= examples_left and (evaluations_left is None or evaluations <= evaluations_left):
                return plan
        return []

    def run(self, objective: Objective) -> str:
        import numpy as np

        plan = self.plan(objective)
        if not plan:
            return "budget exhausted"
        total, n = (1 << self.n_candidates) - 1, objective.n_examples
        if plan[0][0] == total:
            survivors = list(range(1, total + 1))
        else:
            rng = np.random.default_rng(self.seed)
            survivors = sorted(int(m) + 1 for m in rng.choice(total, size=plan[0][0], replace=False))
        try:
            for r, (_, slice_) in enumerate(plan):
                values = {m: objective(m, None if slice_ >= n else slice_) for m in survivors}
                if r + 1 < len(plan):
                    ranked = sorted(survivors, key=lambda m: rank_key(m, values[m]))
                    survivors = sorted(ranked[: plan[r + 1][0]])
        except BudgetExhausted:
            return "budget exhausted"
        return "all rungs done"
