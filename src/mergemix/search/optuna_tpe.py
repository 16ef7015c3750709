"""TPE search with optuna, optionally shared by several workers through a journal file."""

from __future__ import annotations

import os
from typing import Any

from .base import BudgetExhausted, Evaluation, Objective, Option, SearchStrategy, register_strategy

WORKER_SEED_STRIDE = 1_000_003  # worker w > 0 seeds its samplers from seed + w * stride


def _storage(journal: str | os.PathLike | None):
    """optuna storage: a journal file, or None (in memory)."""
    if journal is None:
        return None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(os.fspath(journal)))


def _charged(trial) -> bool:
    """Whether a trial holds a real (charged) evaluation: complete, not a duplicate nor empty."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    return trial.state == TrialState.COMPLETE and not attrs.get("duplicate") and not attrs.get("empty")


def _spent(trials, below: int | None = None) -> int:
    """Evaluations charged to a shared budget: charged trials plus evaluations in flight (numbered
    below ``below``, if given)."""
    from optuna.trial import TrialState

    def in_flight(t) -> bool:
        return t.state == TrialState.RUNNING and "examples" in t.user_attrs and (below is None or t.number < below)

    return sum(_charged(t) or in_flight(t) for t in trials)


def _evaluation(trial, n_examples: int | None = None) -> Evaluation:
    attrs = trial.user_attrs
    examples = attrs.get("examples", n_examples)
    return Evaluation(trial.number, attrs["mask"], examples, trial.value, attrs.get("info", {}))


def journal_records(journal: str | os.PathLike, study_name: str = "mergemix") -> list[Evaluation]:
    """Every charged evaluation stored in a journal file, sorted by order (the trial number)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=_storage(journal))
    return [_evaluation(t) for t in study.get_trials(deepcopy=False) if _charged(t)]


@register_strategy
class OptunaTPE(SearchStrategy):
    """optuna's TPE sampler over one include/exclude variable ``d<i>`` per candidate.

    Each trial proposes a subset. A new subset is scored on the full validation split (trial
    value = accuracy); a subset already evaluated is answered from the cache (user attr
    ``duplicate``) and the empty subset is told 0.0 (user attr ``empty``): neither costs anything.
    The sampler is reseeded before every ask, with ``seed + t`` where t counts the study's trials
    that did not fail, so a search killed mid-way and resumed on its journal replays the same
    sequence (with one worker the result is deterministic for a seed).

    Workers: with a ``journal`` file, several workers (``worker`` in ``0 .. workers - 1``) share
    one study. On start, complete evaluations already in the journal are preloaded into the
    objective (never scored again, charged to the budget) and this worker's trials left running by
    a kill are marked failed. The evaluation budget is global: before each new evaluation the
    charged trials in the journal (plus other workers' evaluations in flight) are counted. A
    subset another worker is scoring right now is not scored again (trial failed, user attr
    ``in_flight``). Each trial stores user attrs ``mask``, ``worker`` and, when evaluated,
    ``examples`` and ``info``.

    Cost: evaluations. Options: ``n_startup_trials`` (integer >= 1, default 10: random trials
    before TPE), ``multivariate`` (bool, default True), ``max_duplicate_streak`` (integer >= 1,
    default 200: stop after this many proposals in a row that need no evaluation).
    """

    name = "optuna"
    supports_workers = True
    options = {
        "n_startup_trials": Option(10, int, lambda v: v >= 1, "an integer >= 1"),
        "multivariate": Option(True, bool, help="true or false"),
        "max_duplicate_streak": Option(200, int, lambda v: v >= 1, "an integer >= 1"),
    }

    def __init__(
        self,
        n_candidates: int,
        seed: int = 0,
        *,
        journal: str | os.PathLike | None = None,
        study_name: str = "mergemix",
        worker: int = 0,
        workers: int = 1,
        **options: Any,
    ):
        super().__init__(n_candidates, seed, **options)
        if not 0 <= worker < workers:
            raise ValueError(f"worker must be in 0 .. {workers - 1}, got {worker}")
        if workers > 1 and journal is None:
            raise ValueError("several workers need a shared journal file")
        self.journal, self.study_name, self.worker, self.workers = journal, study_name, worker, workers

    def run(self, objective: Objective) -> str:
        import optuna

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            return self._search(objective)
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _search(self, objective: Objective) -> str:
        import optuna
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState

        n, n_full, limit = self.n_candidates, objective.n_examples, objective.budget.evaluations
        study = optuna.create_study(
            storage=_storage(self.journal), study_name=self.study_name, direction="maximize", load_if_exists=True
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("worker", self.worker if self.workers == 1 else None)
            if owner == self.worker:  # left running by a kill
                study.tell(t.number, state=TrialState.FAIL)
        space = {f"d{i}": CategoricalDistribution([0, 1]) for i in range(n)}
        streak = 0
        while True:
            trials = self._sync(study, objective)
            if len({r.mask for r in objective.records if r.examples == n_full}) == (1 << n) - 1:
                return "all subsets evaluated"
            if limit is not None and _spent(trials) >= limit:
                return "budget exhausted"
            study.sampler = optuna.samplers.TPESampler(
                seed=self.seed + sum(t.state != TrialState.FAIL for t in trials) + self.worker * WORKER_SEED_STRIDE,
                n_startup_trials=self.opts["n_startup_trials"],
                multivariate=self.opts["multivariate"],
            )
            trial = study.ask(space)
            trial.set_user_attr("worker", self.worker)
            mask = sum(trial.params[f"d{i}"] << i for i in range(n))
            trial.set_user_attr("mask", mask)
            # another worker may have scored or claimed this subset since the last look
            trials = self._sync(study, objective)
            cached = None if mask == 0 else objective.cached(mask)
            claimed = any(
                t.state == TrialState.RUNNING and t.user_attrs.get("mask") == mask and t.number < trial.number
                for t in trials
            )
            if mask == 0 or cached is not None or claimed:
                streak += 1
                if claimed:
                    trial.set_user_attr("in_flight", True)
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    trial.set_user_attr("empty" if mask == 0 else "duplicate", True)
                    study.tell(trial, 0.0 if mask == 0 else cached)
                if streak >= self.opts["max_duplicate_streak"]:
                    return "sampler keeps proposing evaluated subsets"
                continue
            streak = 0
            trial.set_user_attr("examples", n_full)  # commits to an evaluation, seen by other workers
            if limit is not None and self.workers > 1 and _spent(study.get_trials(deepcopy=False), trial.number) >= limit:
                study.tell(trial, state=TrialState.FAIL)
                return "budget exhausted"
            try:
                value = objective(mask, order=trial.number)
            except BudgetExhausted:
                study.tell(trial, state=TrialState.FAIL)
                return "budget exhausted"
            trial.set_user_attr("info", objective.records[-1].info)
            study.tell(trial, value)

    @staticmethod
    def _sync(study, objective: Objective) -> list:
        """The study's trials, after preloading charged ones the objective does not hold yet."""
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if _charged(t) and objective.cached(t.user_attrs["mask"], t.user_attrs.get("examples")) is None:
                objective.preload(_evaluation(t, objective.n_examples))
        return trials
