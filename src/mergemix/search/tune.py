"""Tuning a merge method's options (TIES density, DARE p, task-arithmetic lambda ...) on val.

The space maps option names to a range ``[low, high]`` (numbers; integers for an integer option)
or to ``{choices: [...]}``. Each trial proposes one setting of the options; the caller's scoring
function returns the merged val accuracy it reaches (the workflow: the best subset found by the
study's subset search with those options) and an info dict. The first trial is the ``start``
setting (the method's configured or default options, where they fall inside the space), so the
tuned options can only match or beat the untuned ones on val.

Pure like the other strategies: a scoring callable and a budget, never models. optuna's TPE sampler
proposes (rebuilt before every proposal with ``seed + t``, t = trials that did not fail), and with a
journal file the study persists: a tuning run killed mid-way and rerun keeps every finished trial
(none is scored again), spends only the rest of the budget and proposes what an uninterrupted run
would have proposed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

OptionScore = Callable[[dict], "tuple[float, dict] | float"]


@dataclass(frozen=True)
class Dimension:
    """One tuned option: a float or int range, or categorical choices."""

    name: str
    kind: str  # "float", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return FloatDistribution(float(self.low), float(self.high))

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return self.low <= value <= self.high and (self.kind != "int" or float(value).is_integer())


def parse_space(space: Mapping[str, Any], kinds: Mapping[str, str], prefix: str) -> tuple[list[Dimension], list[str]]:
    """``space`` -> dimensions, with one problem per bad entry (naming ``prefix.option`` and the fix).

    ``kinds`` maps each tunable option to ``float``, ``int`` or ``choice`` (a bool or str option
    takes only ``{choices: [...]}``)."""
    dims, problems = [], []
    if not isinstance(space, Mapping) or not space:
        return [], [f"{prefix}: give a mapping of options to ranges, e.g. {{density: [0.1, 0.9]}}"]
    for name, spec in space.items():
        where = f"{prefix}.{name}"
        kind = kinds.get(name)
        if kind is None:
            problems.append(f"{where}: not a tunable option; tunable: {', '.join(kinds) or 'none'}")
            continue
        if (
            isinstance(spec, Mapping)
            and set(spec) == {"choices"}
            and isinstance(spec["choices"], (list, tuple))
            and len(spec["choices"]) >= 1
        ):
            dims.append(Dimension(name, "choice", choices=tuple(spec["choices"])))
        elif (
            kind != "choice"
            and isinstance(spec, (list, tuple))
            and len(spec) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in spec)
        ):
            low, high = spec
            if not low < high:
                problems.append(f"{where}: range {list(spec)} is empty; give [low, high] with low < high")
            elif kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                problems.append(
                    f"{where}: {name} is an integer option; give integer ends, e.g. [{math.ceil(low)}, {math.floor(high)}]"
                )
            else:
                dims.append(Dimension(name, kind, low, high))
        else:
            form = "{choices: [...]}" if kind == "choice" else "[low, high] or {choices: [...]}"
            problems.append(f"{where}: {spec!r} is not a range; give {form}")
    return dims, problems


@dataclass
class Trial:
    order: int  # optuna trial number
    options: dict
    value: float
    info: dict = field(default_factory=dict)


@dataclass
class TuneResult:
    records: list[Trial]
    start: Trial | None
    best: Trial | None


class OptionTuner:
    """TPE over ``dims`` for ``budget`` trials, the first one at ``start`` (the options of ``start``
    outside the space are left to the sampler). ``seed`` and ``n_startup_trials`` have no default
    here: the caller passes the ``merge_eval.tune`` section's (:class:`mergemix.settings.Tuner`,
    whose defaults are the schema's)."""

    def __init__(
        self,
        dims: list[Dimension],
        budget: int,
        seed: int,
        start: Mapping[str, Any] | None = None,
        *,
        n_startup_trials: int,
        journal: str | os.PathLike | None = None,
        study_name: str = "mergemix-tune",
    ):
        if not dims:
            raise ValueError("nothing to tune: give at least one option range")
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
        self.dims, self.budget, self.seed = list(dims), budget, seed
        self.start = {d.name: start[d.name] for d in dims if start and d.name in start and d.contains(start[d.name])}
        self.n_startup_trials, self.journal, self.study_name = n_startup_trials, journal, study_name

    def run(self, score: OptionScore, on_trial: Callable[[Trial, int, int], None] | None = None) -> TuneResult:
        import optuna
        from optuna.trial import TrialState

        from .optuna_tpe import _storage

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(
                storage=_storage(self.journal), study_name=self.study_name, direction="maximize", load_if_exists=True
            )
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(t.number, state=TrialState.FAIL)  # left running by a kill
            space = {d.name: d.distribution() for d in self.dims}
            if not study.get_trials(deepcopy=False) and self.start:
                study.enqueue_trial(dict(self.start))
            while True:
                trials = study.get_trials(deepcopy=False)
                done = sum(t.state == TrialState.COMPLETE for t in trials)
                if done >= self.budget:
                    break
                t_index = sum(t.state != TrialState.FAIL for t in trials)
                study.sampler = optuna.samplers.TPESampler(
                    seed=self.seed + t_index, multivariate=True, n_startup_trials=self.n_startup_trials
                )
                trial = study.ask(space)
                options = {d.name: trial.params[d.name] for d in self.dims}
                out = score(dict(options))
                value, info = out if isinstance(out, tuple) else (out, {})
                trial.set_user_attr("info", dict(info))
                study.tell(trial, float(value))
                if on_trial is not None:
                    on_trial(Trial(trial.number, options, float(value), dict(info)), done + 1, self.budget)
            records = [
                Trial(
                    t.number,
                    {d.name: t.params[d.name] for d in self.dims},
                    float(t.value),
                    t.user_attrs.get("info", {}),
                )
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            ]
        finally:
            optuna.logging.set_verbosity(verbosity)
        start = min(records, key=lambda r: r.order) if records else None
        if start is not None and start.options != {**start.options, **self.start}:
            start = None  # the start was outside the space: no trial is the untuned setting
        return TuneResult(records, start if self.start else None, best_trial(records))


def best_trial(records: list[Trial]) -> Trial | None:
    """Highest val accuracy; ties: the earliest trial (the start wins a tie)."""
    return min(records, key=lambda r: (-r.value, r.order), default=None)
