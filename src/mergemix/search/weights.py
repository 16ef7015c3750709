"""Continuous mixture weights: a point on the simplex searched with optuna (CMA-ES or TPE).

The binary search answers "which datasets"; this one answers "in what proportions". Each
candidate ``i`` gets a raw weight ``u_i`` in ``[0, 1]``; the mixture weights are ``u / sum(u)``
(zero allowed, so a weight vector can drop a dataset). The first trial is the best binary subset
found before (``u_i = 1`` for its members, 0 elsewhere: exactly its uniform average), so the best
weights found can only match or beat the binary choice on validation.

Pure like the other strategies: it sees a scoring callable ``score(weights) -> (val, info)`` and a
budget of evaluations, never models. With a journal file the optuna study persists: a search
killed mid-way and rerun on its journal keeps every finished evaluation (none is scored again) and
spends only the rest of the budget. The sampler is rebuilt before every proposal (TPE with
``seed + t``, t = trials that did not fail), so a resumed TPE search replays the proposals of an
uninterrupted one; CMA-ES resumes from the generation state stored in the journal, so its proposals
after a kill may differ from an uninterrupted run's (each run is still deterministic for its seed).

Why optuna and not a hand-written CMA-ES: optuna's ``CmaEsSampler`` (backed by the ``cmaes``
package) and ``TPESampler`` are maintained, seeded, and persist their state in the same journal
storage the subset search already uses.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .base import Option, _option_problems

SAMPLERS = ("cmaes", "tpe")
# The options' types and ranges; their defaults are the schema's (merge_eval.weights, the one source of
# defaults), read when a WeightSearch leaves an option out (Option.default is not used here).
OPTIONS: dict[str, Option] = {
    "sampler": Option(None, str, lambda v: v in SAMPLERS, f"one of {', '.join(SAMPLERS)}"),
    "budget": Option(None, int, lambda v: v >= 1, "an integer >= 1 (weight vectors evaluated, the start included)"),
    "seed": Option(None, int, lambda v: v >= 0, "an integer >= 0"),
    "sigma0": Option(None, (int, float), lambda v: 0 < v <= 1, "a number in (0, 1] (CMA-ES initial step size)"),
    "n_startup_trials": Option(None, int, lambda v: v >= 1, "an integer >= 1 (TPE: random trials before TPE)"),
    # the surrogate check (workflow, not the search): weight vectors fine-tuned to compare with their merges
    "check_samples": Option(None, int, lambda v: v >= 0, "an integer >= 0 (0: no check)"),
}
WeightScore = Callable[[Sequence[float]], "tuple[float, dict] | float"]


def check_options(options: dict, prefix: str = "merge_eval.weights") -> list[str]:
    """Problems with the ``merge_eval.weights`` section, each naming its key."""
    problems = _option_problems("weights", OPTIONS, options)
    return [p.replace("merge_eval.strategy_options", prefix) for p in problems]


def normalise(raw: Sequence[float]) -> tuple[float, ...] | None:
    """Raw weights in [0, 1] -> a point on the simplex; None when every weight is zero."""
    if any(not math.isfinite(u) or u < 0 for u in raw):
        raise ValueError(f"weights must be finite and >= 0, got {list(raw)}")
    total = float(sum(raw))
    return None if total <= 0 else tuple(float(u) / total for u in raw)


@dataclass
class WeightEvaluation:
    order: int  # optuna trial number
    weights: tuple[float, ...]  # on the simplex
    value: float  # val accuracy
    info: dict = field(default_factory=dict)


@dataclass
class WeightResult:
    records: list[WeightEvaluation]
    start: WeightEvaluation | None
    best: WeightEvaluation | None
    stop_reason: str


def _storage(journal):
    from .optuna_tpe import _storage as storage

    return storage(journal)


class WeightSearch:
    """Search mixture weights over ``n_candidates`` datasets, starting from ``start_mask``."""

    def __init__(
        self,
        n_candidates: int,
        start_mask: int,
        *,
        journal: str | os.PathLike | None = None,
        study_name: str = "mergemix-weights",
        **options: Any,
    ):
        problems = check_options(options)
        if problems:
            raise ValueError("; ".join(problems))
        if not 1 <= start_mask < 1 << n_candidates:
            raise ValueError(f"start_mask {start_mask} is not a non-empty subset of {n_candidates} candidates")
        self.n, self.start_mask = n_candidates, start_mask
        if set(OPTIONS) - set(options):
            from mergemix.config import schema_defaults

            options = {**schema_defaults("merge_eval.weights"), **options}
        self.opts = {k: options[k] for k in OPTIONS}
        self.journal, self.study_name = journal, study_name

    def _sampler(self, t_index: int):
        import optuna

        seed = self.opts["seed"] + t_index
        if self.opts["sampler"] == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=self.opts["n_startup_trials"], multivariate=True
            )
        x0 = {f"w{i}": float(self.start_mask >> i & 1) for i in range(self.n)}
        # CMA-ES keeps its generation state in the study; the seed only matters for its first ask.
        # x0 and sigma0 are deprecated since optuna 4.9 (removal in 6.0; we pin < 6): without them
        # the search would centre on (0.5, ..., 0.5) instead of the binary choice it should refine.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return optuna.samplers.CmaEsSampler(
                x0=x0,
                sigma0=float(self.opts["sigma0"]),
                seed=self.opts["seed"],
                n_startup_trials=0,
                warn_independent_sampling=False,
            )

    def run(
        self, score: WeightScore, on_evaluation: Callable[[WeightEvaluation, int, int], None] | None = None
    ) -> WeightResult:
        import optuna
        from optuna.distributions import FloatDistribution
        from optuna.trial import TrialState

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(
                storage=_storage(self.journal), study_name=self.study_name, direction="maximize", load_if_exists=True
            )
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(t.number, state=TrialState.FAIL)  # left running by a kill
            space = {f"w{i}": FloatDistribution(0.0, 1.0) for i in range(self.n)}
            start = {f"w{i}": float(self.start_mask >> i & 1) for i in range(self.n)}
            if not study.get_trials(deepcopy=False):
                study.enqueue_trial(start)
            budget, stop = self.opts["budget"], "budget exhausted"
            while True:
                trials = study.get_trials(deepcopy=False)
                done = [t for t in trials if t.state == TrialState.COMPLETE]
                if len(done) >= budget:
                    break
                study.sampler = self._sampler(sum(t.state != TrialState.FAIL for t in trials))
                trial = study.ask(space)
                raw = [trial.params[f"w{i}"] for i in range(self.n)]
                weights = normalise(raw)
                if weights is None:  # all zero: no model; told 0 and charged (rare in [0,1]^n)
                    trial.set_user_attr("empty", True)
                    study.tell(trial, 0.0)
                    continue
                out = score(weights)
                value, info = out if isinstance(out, tuple) else (out, {})
                trial.set_user_attr("weights", list(weights))
                trial.set_user_attr("info", dict(info))
                study.tell(trial, float(value))
                if on_evaluation is not None:
                    on_evaluation(
                        WeightEvaluation(trial.number, weights, float(value), dict(info)), len(done) + 1, budget
                    )
            records = weight_records(study)
        finally:
            optuna.logging.set_verbosity(verbosity)
        start_rec = next((r for r in records if r.order == min(x.order for x in records)), None) if records else None
        return WeightResult(records, start_rec, best_weights(records), stop)


def weight_records(study) -> list[WeightEvaluation]:
    from optuna.trial import TrialState

    return [
        WeightEvaluation(t.number, tuple(t.user_attrs["weights"]), float(t.value), t.user_attrs.get("info", {}))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "weights" in t.user_attrs and not t.user_attrs.get("empty")
    ]


def best_weights(records: Sequence[WeightEvaluation]) -> WeightEvaluation | None:
    """Highest val accuracy; ties: the earliest trial (the binary start wins a tie)."""
    return min(records, key=lambda r: (-r.value, r.order), default=None)
