"""``mergemix tune-method``: a merge method's options tuned on a target's val split (``merge_eval.tune``).

Each trial sets the method's options (fixed ones from ``merge_eval.method_options`` plus the
proposed ones) and runs the study's subset search for the target with them (the search strategies
of ``merge_eval.strategy``: exhaustive where 2^N-1 fits the budget); the trial's value is the best
merged val accuracy that search finds. The tuned options are then used by the method's merge-eval
over every subset (``merge_eval/methods/<method>/<target>.csv``), whose test accuracies
``methods.csv`` reports: tuning sees val only, as the selection does.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

from mergemix import io, subsets
from mergemix.settings import Eval, Merge, Search, Tuner

log = logging.getLogger("mergemix")


def start_options(method: str, fixed: dict) -> dict:
    """The untuned setting: ``fixed`` over the method's declared defaults (absent aliases left out)."""
    from mergemix.merge_methods import METHODS

    declared = METHODS[method].options
    out = {**{k: o.default for k, o in declared.items() if o.default is not None}, **fixed}
    for key, opt in declared.items():  # an alias (dare's p) starts where its target (density) is
        if key not in out and opt.alias_of in out and opt.from_target is not None:
            out[key] = opt.from_target(out[opt.alias_of])
    return out


def tune_method(
    backend_spec: dict,
    method: str,
    fixed: dict,
    space: dict,
    tune_spec: Tuner,
    search_spec: Search,
    pretrained,
    model_paths: Mapping[str, str],
    target_dir,
    out_json,
    out_csv,
    journal=None,
    threads: int = 1,
    eval_spec: Eval | None = None,
) -> dict:
    """Tune ``method``'s options in ``space`` over its ``fixed`` ones on the target's val split
    (``tune_spec``: the tuner's budget, seed and start-up trials; ``search_spec``: the subset search
    scoring each setting; mappings are converted as :mod:`mergemix.settings` says)."""
    import pandas as pd

    from mergemix.data.prepared import load_prepared
    from mergemix.merge_methods import check_tune_space, tunable_kinds
    from mergemix.search import Objective, get_strategy, make_budget, run_search
    from mergemix.search.tune import OptionTuner, parse_space
    from mergemix.stages import _evaluator, _search_fingerprint

    problems = check_tune_space(method, space, fixed)
    if problems:
        raise ValueError("; ".join(problems))
    dims, _ = parse_space(space, tunable_kinds(method), f"merge_eval.tune.space.{method}")
    spec, search = Tuner.coerce(tune_spec, "tune"), Search.coerce(search_spec, "search")
    evaluation = Eval.coerce(eval_spec, "eval")
    ev = _evaluator(backend_spec, Merge(method, fixed), pretrained, model_paths, threads, evaluation)
    target = load_prepared(target_dir)
    n, n_val = len(ev.names), len(target.indices["val"])
    inner = search.resolved(n)
    cls = get_strategy(inner.strategy)
    budget = make_budget(inner.budget, n, n_val, cls.cost)
    score = ev.scorer(target, seed=inner.seed, test="selected")  # val only

    def trial_score(options: dict):
        ev.set_options({**fixed, **options})
        strategy = cls(n, seed=inner.seed, **inner.to_dict()["options"])
        result = run_search(strategy, Objective(score, n, n_val, budget))
        best = result.best
        subset = subsets.subset_id(subsets.mask_to_names(best.mask, ev.names))
        return float(best.value), {"subset": subset, "evaluations": result.evaluations}

    if journal is not None:
        Path(journal).parent.mkdir(parents=True, exist_ok=True)
    fp = _search_fingerprint(
        backend_spec,
        {"method": method, "options": fixed},
        {**inner.to_dict(), "options": {"inner": inner.to_dict()["options"], "space": space, "tune": spec.to_dict()}},
        model_paths,
        target_dir,
        evaluation,
    )
    tuner = OptionTuner(
        dims,
        spec.budget,
        spec.seed,
        start_options(method, fixed),
        n_startup_trials=spec.n_startup_trials,
        journal=journal,
        study_name=f"tune-{method}-{target.name}-{fp}",
    )
    from mergemix.progress import LogEvery

    t0, every = time.time(), LogEvery()

    def progress(trial, done, total):
        if every.due(done, total):
            rate, eta = every.rate_eta(done, total)
            log.info(
                "tuning %s on %s: %d/%d settings (%.2f/s, ETA %.0fs), %s -> val_acc %.4f (%s)",
                method,
                target.name,
                done,
                total,
                rate,
                eta,
                trial.options,
                trial.value,
                trial.info.get("subset"),
            )

    result = tuner.run(trial_score, on_trial=progress)
    rows = [
        {
            "order": r.order,
            **{f"option_{k}": v for k, v in r.options.items()},
            "val_acc": r.value,
            "subset": r.info.get("subset"),
            "evaluations": r.info.get("evaluations"),
        }
        for r in result.records
    ]
    io.write_csv(out_csv, pd.DataFrame(rows))
    best = result.best
    summary = {
        "method": method,
        "target": target.name,
        "candidates": ev.names,
        "space": space,
        "fixed": fixed,
        "budget": spec.budget,
        "seed": spec.seed,
        "sampler": "tpe",
        "subset_search": {"strategy": cls.name, "budget": inner.budget, "seed": inner.seed},
        "trials": len(result.records),
        "start": None
        if result.start is None
        else {
            "options": result.start.options,
            "val_acc": result.start.value,
            "subset": result.start.info.get("subset"),
        },
        "best": {"options": best.options, "val_acc": best.value, "subset": best.info.get("subset")},
        "options": {**fixed, **best.options},  # what the method's merge-eval uses
        "seconds": round(time.time() - t0, 3),
    }
    io.write_json(out_json, summary)
    log.info(
        "tuned %s on %s: %s (val %.4f, best subset %s); untuned val %s",
        method,
        target.name,
        best.options,
        best.value,
        best.info.get("subset"),
        "-" if result.start is None else f"{result.start.value:.4f}",
    )
    return summary


def tuned_options(path) -> dict:
    """The options a ``tune-method`` JSON says the method's merge-eval uses (checked to be a mapping)."""
    data = io.read_json(path)
    options = data.get("options") if isinstance(data, dict) else None
    if not isinstance(options, dict):
        raise ValueError(f"{path}: not a tune-method result (no 'options' mapping); rerun the tune_method rule")
    return options
