"""The search contract: budgets, the cached objective, the strategy base class and its registry.

The registry (:data:`STRATEGIES`, a :class:`mergemix.plugins.Registry`) lists the built-ins of
:data:`BUILTIN_STRATEGIES`, imported on the first lookup of their name, and the strategies other
packages declare in the entry-point group ``mergemix.search_strategies``.

A strategy searches the non-empty subsets of ``n_candidates`` datasets (bitmasks ``1 .. 2**N - 1``)
for the one with the highest merged-model validation accuracy. It sees only an :class:`Objective`:
a caching, budget-charging wrapper around the expensive ``score(mask, examples)`` callable. Pure
Python: no models, files or torch here.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, ClassVar, TypeVar

from mergemix.plugins import GROUPS, PluginError, Registry, describe_entry_point

Score = Callable[[int, int | None], float | tuple[float, dict]]
"""``score(mask, examples)``: validation accuracy of subset ``mask`` on the first ``examples``
examples of the fixed validation permutation (``None``: all of them), optionally with a
JSON-serialisable info dict: ``(accuracy, info)``."""

OPTION_PREFIX = "merge_eval.strategy_options"


class BudgetExhausted(Exception):
    """Raised by :class:`Objective` when a new (uncached) evaluation would exceed the budget."""


@dataclass(frozen=True)
class Budget:
    """Limits on the charged (uncached) calls of an :class:`Objective`; ``None`` means no limit."""

    evaluations: int | None = None  # max number of charged calls
    examples: int | None = None  # max total examples over charged calls (a full call costs n_examples)


def make_budget(budget: int | float | None, n_candidates: int, n_examples: int, cost: str) -> Budget:
    """Config ``budget`` -> :class:`Budget`.

    ``budget`` is ``None`` (all ``2**N - 1`` subsets), an int >= 1 (evaluations, capped at
    ``2**N - 1``) or a float in (0, 1] (that fraction of ``2**N - 1``, rounded up, at least 1).
    ``cost == "evaluations"`` gives ``Budget(evaluations=B)``; ``cost == "examples"`` gives
    ``Budget(examples=B * n_examples)``, the same number of full-validation equivalents.
    """
    total = (1 << n_candidates) - 1
    if budget is None:
        b = total
    elif isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1:
        b = min(budget, total)
    elif isinstance(budget, float) and 0.0 < budget <= 1.0:
        b = max(1, math.ceil(round(budget * total, 9)))
    else:
        raise ValueError(f"budget must be None, an integer >= 1 or a fraction in (0, 1], got {budget!r}")
    if cost == "evaluations":
        return Budget(evaluations=b)
    if cost == "examples":
        return Budget(examples=b * n_examples)
    raise ValueError(f"cost must be 'evaluations' or 'examples', got {cost!r}")


@dataclass
class Evaluation:
    """One charged call of the objective."""

    order: int  # evaluation index: 0, 1, 2, ... in the order charged calls happened (or given)
    mask: int
    examples: int  # examples used (n_examples for a full evaluation)
    value: float
    info: dict = field(default_factory=dict)


def popcount(mask: int) -> int:
    return bin(mask).count("1")


def rank_key(mask: int, value: float) -> tuple[float, int, int]:
    """Sort key putting the best first: higher value, then fewer members, then smaller mask."""
    return (-value, popcount(mask), mask)


class Objective:
    """Caching, budget-charging wrapper around a :data:`Score` callable.

    Each ``(mask, examples)`` pair is scored at most once: a repeated call returns the cached value
    and costs nothing. A new call that would exceed ``budget`` raises :class:`BudgetExhausted`
    before ``score`` runs.
    """

    def __init__(
        self,
        score: Score,
        n_candidates: int,
        n_examples: int,
        budget: Budget,
        on_evaluation: Callable[[Evaluation, Objective], None] | None = None,
    ):
        if n_candidates < 1 or n_examples < 1:
            raise ValueError(f"need n_candidates >= 1 and n_examples >= 1, got {n_candidates}, {n_examples}")
        self.score = score
        self.n_candidates = n_candidates
        self.n_examples = n_examples
        self.budget = budget
        self.on_evaluation = on_evaluation
        self.records: list[Evaluation] = []
        self.evaluations = 0
        self.examples_used = 0
        self._cache: dict[tuple[int, int], Evaluation] = {}
        self._next_order = 0

    def _key(self, mask: int, examples: int | None) -> tuple[int, int]:
        if isinstance(mask, bool) or not isinstance(mask, int) or not 1 <= mask < 1 << self.n_candidates:
            raise ValueError(
                f"mask {mask!r} is not a non-empty subset of {self.n_candidates} candidates "
                f"(1 <= mask < 2**{self.n_candidates})"
            )
        if examples is None or examples >= self.n_examples:
            return mask, self.n_examples
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ValueError(f"examples must be None or an integer >= 1, got {examples!r}")
        return mask, examples

    def cached(self, mask: int, examples: int | None = None) -> float | None:
        """The value of an earlier evaluation of ``(mask, examples)``, else None."""
        hit = self._cache.get(self._key(mask, examples))
        return None if hit is None else hit.value

    def can_afford(self, examples: int | None = None) -> bool:
        """Whether one more charged call on ``examples`` examples fits the budget."""
        cost = self.n_examples if examples is None else min(examples, self.n_examples)
        b = self.budget
        return (b.evaluations is None or self.evaluations + 1 <= b.evaluations) and (
            b.examples is None or self.examples_used + cost <= b.examples
        )

    def __call__(self, mask: int, examples: int | None = None, order: int | None = None) -> float:
        """Score ``mask`` on ``examples`` examples (None or >= n_examples: all), cached and charged."""
        key = self._key(mask, examples)
        hit = self._cache.get(key)
        if hit is not None:
            return hit.value
        if not self.can_afford(key[1]):
            raise BudgetExhausted(
                f"budget {self.budget} spent: {self.evaluations} evaluations, {self.examples_used} examples"
            )
        out = self.score(mask, None if key[1] == self.n_examples else key[1])
        value, info = out if isinstance(out, tuple) else (out, {})
        order = self._next_order if order is None else order
        evaluation = Evaluation(order, mask, key[1], float(value), dict(info))
        self._record(evaluation)
        if self.on_evaluation is not None:
            self.on_evaluation(evaluation, self)
        return evaluation.value

    def preload(self, evaluation: Evaluation) -> None:
        """Record a past evaluation (e.g. from a journal) as charged, without calling score."""
        key = self._key(evaluation.mask, evaluation.examples)
        if key in self._cache:
            raise ValueError(f"mask {evaluation.mask} on {key[1]} examples is already recorded")
        ev = evaluation
        self._record(Evaluation(ev.order, key[0], key[1], float(ev.value), dict(ev.info)))

    def _record(self, evaluation: Evaluation) -> None:
        self._cache[evaluation.mask, evaluation.examples] = evaluation
        self.records.append(evaluation)
        self._next_order = max(self._next_order, evaluation.order + 1)
        self.evaluations += 1
        self.examples_used += evaluation.examples

    def best(self) -> Evaluation | None:
        """Best full evaluation: max value; ties: fewer members, then smaller mask."""
        full = [r for r in self.records if r.examples == self.n_examples]
        return min(full, key=lambda r: rank_key(r.mask, r.value), default=None)


@dataclass(frozen=True)
class Option:
    """A declared strategy option."""

    default: Any
    kind: type | tuple  # accepted types; bool is never accepted as int
    check: Callable[[Any], bool] | None = None  # value constraint, after the type check
    help: str = ""  # the allowed values, completing "must be ...", e.g. "an integer >= 1"


class SearchStrategy(abc.ABC):
    """A budgeted search over subsets (like optuna's BaseSampler).

    Call order: ``strategy = get_strategy(name)(n_candidates, seed, **options)`` validates the
    options (``ValueError`` naming each bad key) and fills defaults into ``self.opts``; then
    ``strategy.run(objective)`` (usually through :func:`run_search`) searches by calling
    ``objective(mask, examples)`` and returns a stop reason. ``run`` catches
    :class:`BudgetExhausted` itself and returns ``"budget exhausted"``; any other exception from
    the score function propagates. The same seed, options and objective give the same calls in the
    same order. Subclasses set ``name`` (registry key), ``cost`` (``"evaluations"`` or
    ``"examples"``: which :class:`Budget` field :func:`make_budget` fills), ``supports_workers`` and
    ``options``, and are registered with :func:`register_strategy` (a built-in: also named in
    :data:`BUILTIN_STRATEGIES`) or named by an entry point of another package in the group
    ``mergemix.search_strategies``.
    """

    name: ClassVar[str]
    cost: ClassVar[str] = "evaluations"
    supports_workers: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, n_candidates: int, seed: int = 0, **options: Any):
        if n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
        problems = _option_problems(self.name, type(self).options, options)
        if problems:
            raise ValueError("; ".join(problems))
        self.n_candidates = n_candidates
        self.seed = seed
        self.opts = {k: options.get(k, o.default) for k, o in self.options.items()}

    @abc.abstractmethod
    def run(self, objective: Objective) -> str:
        """Search; return a stop reason, e.g. 'converged', 'budget exhausted', 'all subsets evaluated'."""


S = TypeVar("S", bound=type[SearchStrategy])

# The registry: name -> strategy class. The built-ins are imported on the first lookup of their name
# (this module imports none of the strategy modules, which import it to register themselves; so
# listing the names imports neither optuna nor scikit-learn); other packages add strategies through
# the entry-point group "mergemix.search_strategies" (see mergemix.plugins).
BUILTIN_STRATEGIES = {
    "exhaustive": "mergemix.search.exhaustive:Exhaustive",
    "greedy": "mergemix.search.greedy:Greedy",
    "beam": "mergemix.search.beam:Beam",
    "optuna": "mergemix.search.optuna_tpe:OptunaTPE",  # optuna is imported only when used
    "halving": "mergemix.search.halving:Halving",
    "surrogate": "mergemix.search.surrogate:Surrogate",  # scikit-learn too
}
# values of merge_eval.strategy that are not registry names: no strategy may take them
RESERVED_NAMES = {
    "auto": "merge_eval.strategy: auto picks exhaustive or the recommended budgeted strategy",
    "weights": "merge_eval.strategy: weights searches mixture weights (mergemix.search.weights)",
}


def _adopt_strategy(name: str, obj: Any) -> None:
    """Register a strategy class named by an entry point (one that did not register itself)."""
    if isinstance(obj, ModuleType):
        return  # a module must register the name itself on import
    if not (isinstance(obj, type) and issubclass(obj, SearchStrategy)):
        raise PluginError(f"search strategy {name!r}: {obj!r} is not a subclass of mergemix.search.SearchStrategy")
    if getattr(obj, "name", None) != name:
        raise PluginError(
            f"search strategy {name!r}: class {obj.__module__}.{obj.__qualname__} has name "
            f"{getattr(obj, 'name', None)!r}; set its class attribute name = {name!r} (the entry point's name)"
        )
    register_strategy(obj)


class StrategyRegistry(Registry):
    """The strategies' :class:`~mergemix.plugins.Registry`, which also refuses a plugin taking one of
    :data:`RESERVED_NAMES` (a study could never select it)."""

    def plugins(self) -> dict:
        found = super().plugins()
        for name in RESERVED_NAMES.keys() & found.keys():
            raise PluginError(
                f"search strategy {name!r} of {describe_entry_point(found[name])} clashes with mergemix's "
                f"reserved name {name!r} ({RESERVED_NAMES[name]}); rename the entry point"
            )
        return found


STRATEGIES: Registry = StrategyRegistry(
    "search strategy", GROUPS["search_strategies"], BUILTIN_STRATEGIES, _adopt_strategy
)


def register_strategy(cls: S) -> S:
    """Class decorator adding a strategy to the registry under ``cls.name`` (refused: a name taken,
    a reserved one, or a built-in's name for a class from another module)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"search strategy class {cls.__module__}.{cls.__qualname__} needs a non-empty name")
    if name in RESERVED_NAMES:
        raise PluginError(
            f"search strategy {name!r} of {cls.__module__}.{cls.__qualname__} clashes with mergemix's reserved "
            f"name {name!r} ({RESERVED_NAMES[name]}); give it another name"
        )
    STRATEGIES.add(name, cls)
    return cls


def strategy_names() -> list[str]:
    """The strategies' names (built-ins, plugins, registered), importing none of them."""
    return STRATEGIES.names()


def get_strategy(name: str) -> type[SearchStrategy]:
    """The strategy class ``name`` (a built-in or plugin is imported on first use)."""
    if name not in STRATEGIES:
        raise KeyError(f"unknown search strategy {name!r}; registered: {', '.join(STRATEGIES.names())}")
    return STRATEGIES[name]


def _option_problems(name: str, declared: dict[str, Option], options: dict) -> list[str]:
    problems = []
    for key, value in options.items():
        where = f"{OPTION_PREFIX}.{key}"
        option = declared.get(key)
        if option is None:
            allowed = f"allowed: {', '.join(declared)}" if declared else "it takes no options"
            problems.append(f"{where}: unknown option for strategy {name!r}; {allowed}")
            continue
        kinds = option.kind if isinstance(option.kind, tuple) else (option.kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok or (option.check is not None and value is not None and not option.check(value)):
            problems.append(f"{where}: must be {option.help}, got {value!r}")
    return problems


def check_options(name: str, options: dict) -> list[str]:
    """Problems with ``options`` for strategy ``name``, each naming its key; empty if all is well."""
    if name not in STRATEGIES:
        registered = ", ".join(STRATEGIES.names())
        return [f"merge_eval.strategy: unknown search strategy {name!r}; registered: {registered}"]
    return _option_problems(name, STRATEGIES[name].options, options)


@dataclass
class SearchResult:
    records: list[Evaluation]
    best: Evaluation | None
    stop_reason: str
    evaluations: int
    examples_used: int


def run_search(strategy: SearchStrategy, objective: Objective) -> SearchResult:
    """Run ``strategy`` on ``objective`` and collect what it evaluated."""
    if strategy.n_candidates != objective.n_candidates:
        raise ValueError(f"strategy is for {strategy.n_candidates} candidates, objective for {objective.n_candidates}")
    stop_reason = strategy.run(objective)
    return SearchResult(
        list(objective.records), objective.best(), stop_reason, objective.evaluations, objective.examples_used
    )
