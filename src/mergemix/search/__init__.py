"""Budgeted search for the best subset of candidate datasets.

Exhaustive search scores all ``2**N - 1`` subsets; the strategies here (``strategy_names()``)
search within a budget of evaluations or of validation examples. They are pure: they see only an
:class:`Objective` wrapping the expensive score function, are deterministic for a seed and never
charge the same ``(mask, examples)`` twice. Built-in strategies load lazily, on the first lookup of
their name, so importing this package imports neither optuna, scikit-learn nor torch; other packages
add strategies through the entry-point group ``mergemix.search_strategies`` (see
:mod:`mergemix.plugins`).
"""

from .base import (
    STRATEGIES,
    Budget,
    BudgetExhausted,
    Evaluation,
    Objective,
    Option,
    SearchResult,
    SearchStrategy,
    check_options,
    get_strategy,
    make_budget,
    register_strategy,
    run_search,
    strategy_names,
)

__all__ = [
    "STRATEGIES",
    "Budget",
    "BudgetExhausted",
    "Evaluation",
    "Objective",
    "Option",
    "SearchResult",
    "SearchStrategy",
    "check_options",
    "get_strategy",
    "make_budget",
    "register_strategy",
    "run_search",
    "strategy_names",
]
