"""Merge-method options tuned on val (merge_eval.tune): the pure tuner, the space checks, a real run."""

import pandas as pd
import pytest

from conftest import DIGITS_BACKEND, train_digits
from mergemix import io, stages
from mergemix.merge_methods import check_tune_space, tunable_kinds
from mergemix.search.tune import OptionTuner, parse_space
from mergemix.settings import Merge, Search, Tuner
from mergemix.tuning import tune_method, tuned_options

DIMS, _ = parse_space({"density": [0.05, 1.0], "lambda": [0.2, 2.0]}, tunable_kinds("ties"), "space")
STARTUP = Tuner.from_cli(
    {}
).n_startup_trials  # the schema's merge_eval.tune.n_startup_trials (OptionTuner has no default)


def score(options):
    """A smooth stand-in for the best merged val accuracy, best at density 0.35, lambda 1.3."""
    return 1.0 - abs(options["density"] - 0.35) - 0.5 * abs(options["lambda"] - 1.3), {"subset": "a+b"}


def test_start_first_then_tpe_improves():
    seen = []
    result = OptionTuner(
        DIMS, 20, seed=2, n_startup_trials=STARTUP, start={"density": 0.2, "lambda": 1.0, "weights": None}
    ).run(lambda o: seen.append(o) or score(o))
    assert seen[0] == {"density": 0.2, "lambda": 1.0}  # the untuned setting is scored first
    assert result.start.options == seen[0] and len(result.records) == len(seen) == 20
    assert result.best.value > result.start.value + 0.05
    for r in result.records:
        assert 0.05 <= r.options["density"] <= 1.0 and 0.2 <= r.options["lambda"] <= 2.0


def test_start_outside_the_space_is_left_to_the_sampler():
    seen = []
    result = OptionTuner(DIMS, 3, seed=0, n_startup_trials=STARTUP, start={"density": 0.01, "lambda": 1.0}).run(
        lambda o: seen.append(o) or score(o)
    )
    assert seen[0]["lambda"] == 1.0 and seen[0]["density"] != 0.01
    assert result.start is not None and result.start.options == seen[0]


def test_deterministic_for_its_seed():
    runs = [
        [r.options for r in OptionTuner(DIMS, 10, seed=s, n_startup_trials=STARTUP).run(score).records]
        for s in (4, 4, 5)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_resumes_after_a_kill_without_scoring_again(tmp_path):
    calls = []

    def dies_at_6(o):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the job is killed while scoring its 6th setting
        calls.append(o)
        return score(o)

    journal = tmp_path / "tune.log"
    with pytest.raises(KeyboardInterrupt):
        OptionTuner(
            DIMS, 12, seed=1, n_startup_trials=STARTUP, start={"density": 0.2, "lambda": 1.0}, journal=journal
        ).run(dies_at_6)
    again = []
    result = OptionTuner(
        DIMS, 12, seed=1, n_startup_trials=STARTUP, start={"density": 0.2, "lambda": 1.0}, journal=journal
    ).run(lambda o: again.append(o) or score(o))
    assert len(again) == 12 - 5 and [r.options for r in result.records][:5] == calls
    full = OptionTuner(
        DIMS, 12, seed=1, n_startup_trials=STARTUP, start={"density": 0.2, "lambda": 1.0}, journal=tmp_path / "full.log"
    ).run(score)
    assert [r.options for r in full.records] == [r.options for r in result.records]  # TPE replays an uninterrupted run


def test_integer_and_choice_dimensions():
    dims, problems = parse_space(
        {"seed": [0, 5], "scope": {"choices": ["global", "tensor"]}}, tunable_kinds("dare"), "s"
    )
    assert not problems
    result = OptionTuner(dims, 8, seed=0, n_startup_trials=STARTUP).run(
        lambda o: (float(o["seed"]) + (o["scope"] == "tensor"), {})
    )
    assert all(
        isinstance(r.options["seed"], int) and r.options["scope"] in ("global", "tensor") for r in result.records
    )


@pytest.mark.parametrize(
    "method,space,fixed,needle",
    [
        ("ties", {"density": [0.0, 0.5]}, {}, "merge_eval.tune.space.ties.density: 0.0 is not allowed"),
        ("ties", {"density": [0.6, 0.2]}, {}, "range [0.6, 0.2] is empty"),
        ("ties", {"weights": [0, 1]}, {}, "merge_eval.tune.space.ties.weights: not a tunable option"),
        ("ties", {"k": [0.1, 0.2]}, {}, "merge_eval.tune.space.ties.k: not a tunable option; tunable: density, lambda"),
        ("ties", {"scope": ["global", "tensor"]}, {}, "give {choices: [...]}"),
        ("ties", {"density": [0.1, 0.9]}, {"density": 0.3}, "also fixed in merge_eval.method_options.ties"),
        ("dare", {"p": [0.1, 0.9]}, {"density": 0.3}, "p and density are two spellings"),
        ("dare", {"seed": [0.5, 3]}, {}, "seed is an integer option"),
        ("uniform", {"density": [0.1, 0.9]}, {}, "tunable: none"),
        ("nope", {"density": [0.1, 0.9]}, {}, "unknown merge method 'nope'"),
        ("ties", {}, {}, "give a mapping of options to ranges"),
    ],
)
def test_space_problems_name_the_key_and_the_fix(method, space, fixed, needle):
    problems = check_tune_space(method, space, fixed)
    assert any(needle in p for p in problems), problems


def test_a_good_space_has_no_problems():
    assert check_tune_space("dare", {"p": [0.0, 0.9], "lambda": [0.5, 1.5]}, {"seed": 3}) == []
    assert check_tune_space("task_arithmetic", {"lambda": [0.1, 1.5]}) == []


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    return tmp, train_digits(tmp, ["rotate", "noise", "thin", "squeeze"])


@pytest.mark.parametrize(
    "method,space,fixed",
    [
        ("ties", {"density": [0.05, 1.0]}, {"lambda": 1.2}),
        ("task_arithmetic", {"lambda": [0.2, 1.6]}, {}),  # linear: tuned through the running sum
    ],
)
def test_tuned_options_on_real_models_match_the_merge_eval_that_uses_them(digits, method, space, fixed):
    tmp, models = digits
    search = Search("exhaustive", 1023, 0, {})
    out = tmp / method
    summary = tune_method(
        DIGITS_BACKEND,
        method,
        fixed,
        space,
        Tuner.from_cli({"budget": 5, "seed": 0}),  # n_startup_trials: the schema's
        search,
        tmp / "pre/model.safetensors",
        models,
        tmp / "data/shift",
        out / "tune.json",
        out / "tune.csv",
        journal=out / "journal.log",
    )
    trials = pd.read_csv(out / "tune.csv")
    assert len(trials) == 5 and summary["trials"] == 5
    assert (trials["evaluations"] == 15).all()  # each setting: the exhaustive search over 2^4 - 1 subsets
    assert summary["best"]["val_acc"] == pytest.approx(trials["val_acc"].max())
    assert summary["best"]["val_acc"] >= summary["start"]["val_acc"]
    assert len({tuple(r) for r in trials.filter(like="option_").itertuples(index=False)}) == 5  # 5 settings tried
    options = tuned_options(out / "tune.json")
    assert options == {**fixed, **summary["best"]["options"]}
    # the method's merge-eval with the tuned options finds exactly the tuned best subset and val accuracy
    df = stages.merge_eval(
        DIGITS_BACKEND,
        Merge(method, options),
        tmp / "pre/model.safetensors",
        models,
        tmp / "data/shift",
        0,
        1,
        out / "merge_eval.csv",
    )
    best = stages.select_best(df)
    assert best["val_acc"] == pytest.approx(summary["best"]["val_acc"]) and best["subset"] == summary["best"]["subset"]
    # and with the untuned options, the start trial's
    start = stages.merge_eval(
        DIGITS_BACKEND,
        Merge(method, fixed),
        tmp / "pre/model.safetensors",
        models,
        tmp / "data/shift",
        0,
        1,
        out / "start.csv",
    )
    assert stages.select_best(start)["val_acc"] == pytest.approx(summary["start"]["val_acc"])


def test_an_alias_starts_where_its_target_does():
    from mergemix.tuning import start_options

    assert start_options("dare", {})["p"] == pytest.approx(0.5)  # dare's default density 0.5
    assert start_options("dare", {"density": 0.8})["p"] == pytest.approx(0.2)
    assert start_options("task_arithmetic", {"lambda": 0.4})["scale"] == 0.4


def test_tuned_options_refuses_another_json(tmp_path):
    io.write_json(tmp_path / "x.json", {"best": {}})
    with pytest.raises(ValueError, match="not a tune-method result"):
        tuned_options(tmp_path / "x.json")
