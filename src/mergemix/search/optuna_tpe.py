"""TPE search with optuna, optionally shared by several workers through a journal file."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .base import BudgetExhausted, Evaluation, Objective, Option, SearchStrategy, register_strategy

WORKER_SEED_STRIDE = 1_000_003  # worker w > 0 seeds its samplers from seed + w * stride
CLAIM_LOCK_SUFFIX = ".claims"  # workers claim subsets under the file lock <journal>.claims.lock


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


def _committed(trial) -> bool:
    """Whether a trial is an evaluation in flight: running, and has claimed its subset."""
    from optuna.trial import TrialState

    return trial.state == TrialState.RUNNING and "examples" in trial.user_attrs


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

    Journal and workers: with a ``journal`` file the study persists, and several workers
    (``worker`` in ``0 .. workers - 1``, each its own process) can share it. On start, this
    worker's trials left running by a kill are marked failed; before every proposal, complete
    evaluations in the journal are preloaded into the objective (never scored again, charged to
    the budget). The evaluation budget is global: a worker claims a new subset (user attr
    ``examples``) only while the journal's charged trials plus claimed evaluations in flight stay
    below ``Budget.evaluations``, and never claims a subset another worker is scoring (that trial
    fails with user attr ``in_flight``); with several workers claims are made under a file lock
    next to the journal. Each trial stores user attrs ``mask``, ``worker`` and, when evaluated,
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

    def _claim_lock(self):
        """A file lock serialising claims of several workers (no lock for a single worker)."""
        if self.workers == 1:
            return contextlib.nullcontext()
        from optuna.storages.journal import JournalFileSymlinkLock

        lock = JournalFileSymlinkLock(os.fspath(self.journal) + CLAIM_LOCK_SUFFIX)

        @contextlib.contextmanager
        def held():
            lock.acquire()
            try:
                yield
            finally:
                lock.release()

        return held()

    def _search(self, objective: Objective) -> str:
        import optuna
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState

        n, n_full, limit = self.n_candidates, objective.n_examples, objective.budget.evaluations
        study = optuna.create_study(
            storage=_storage(self.journal),
            study_name=self.study_name,
            direction="maximize",
            load_if_exists=True,
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("worker", self.worker if self.workers == 1 else None)
            if owner == self.worker:  # left running by a kill
                study.tell(t.number, state=TrialState.FAIL)
        space = {f"d{i}": CategoricalDistribution([0, 1]) for i in range(n)}

        def spent(trials) -> int:
            return sum(_charged(t) or _committed(t) for t in trials)

        streak = 0
        while True:
            trials = self._sync(study, objective)
            if len({r.mask for r in objective.records if r.examples == n_full}) == (1 << n) - 1:
                return "all subsets evaluated"
            if limit is not None and spent(trials) >= limit:
                return "budget exhausted"
            t_index = sum(t.state != TrialState.FAIL for t in trials)  # unchanged by a kill and resume
            study.sampler = optuna.samplers.TPESampler(
                seed=self.seed + t_index + self.worker * WORKER_SEED_STRIDE,
                n_startup_trials=self.opts["n_startup_trials"],
                multivariate=self.opts["multivariate"],
            )
            trial = study.ask(space)
            trial.set_user_attr("worker", self.worker)
            mask = sum(trial.params[f"d{i}"] << i for i in range(n))
            trial.set_user_attr("mask", mask)
            with self._claim_lock():  # look again: another worker may have scored or claimed it
                trials = self._sync(study, objective)
                cached = None if mask == 0 else objective.cached(mask)
                in_flight = any(_committed(t) and t.user_attrs["mask"] == mask for t in trials)
                free = mask != 0 and cached is None and not in_flight
                exhausted = free and limit is not None and spent(trials) >= limit
                if free and not exhausted:
                    trial.set_user_attr("examples", n_full)  # the claim
            if exhausted:
                study.tell(trial, state=TrialState.FAIL)
                return "budget exhausted"
            if not free:
                streak += 1
                if in_flight:
                    trial.set_user_attr("in_flight", True)
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    trial.set_user_attr("empty" if mask == 0 else "duplicate", True)
                    study.tell(trial, 0.0 if mask == 0 else cached)
                if streak >= self.opts["max_duplicate_streak"]:
                    return "sampler keeps proposing evaluated subsets"
                continue
            streak = 0
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
