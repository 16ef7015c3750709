"""The continuous weights search (merge_eval.strategy: weights): pure, seeded, resumable."""

import numpy as np
import pytest

from mergemix.search.weights import WeightSearch, best_weights, check_options, normalise

TARGET = np.array([0.5, 0.3, 0.2, 0.0, 0.0])


def score(w):
    """A smooth stand-in for merged val accuracy, best at TARGET's proportions."""
    return 1.0 - float(np.abs(np.asarray(w) - TARGET).sum()), {"test_acc": 0.5}


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_start_is_the_binary_subset_and_weights_only_add(sampler):
    seen = []
    result = WeightSearch(5, 0b00011, sampler=sampler, budget=25, seed=3).run(lambda w: seen.append(w) or score(w))
    assert seen[0] == (0.5, 0.5, 0.0, 0.0, 0.0)  # the first evaluation is the subset's uniform average
    assert result.start.weights == seen[0] and len(result.records) == len(seen) == 25
    assert result.best.value >= result.start.value
    assert result.best.value > result.start.value + 0.02  # it does find better proportions here
    for r in result.records:
        assert min(r.weights) >= 0 and sum(r.weights) == pytest.approx(1.0)


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_deterministic_for_its_seed(sampler):
    runs = [
        [r.weights for r in WeightSearch(5, 1, sampler=sampler, budget=12, seed=s).run(score).records]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_resumes_after_a_kill_without_scoring_again(tmp_path, sampler):
    journal = tmp_path / "weights.log"
    calls = []

    def dies_at_7(w):
        if len(calls) == 6:
            raise KeyboardInterrupt  # the job is killed while scoring its 7th vector
        calls.append(w)
        return score(w)

    with pytest.raises(KeyboardInterrupt):
        WeightSearch(5, 3, sampler=sampler, budget=15, seed=1, journal=journal).run(dies_at_7)
    again = []
    result = WeightSearch(5, 3, sampler=sampler, budget=15, seed=1, journal=journal).run(
        lambda w: again.append(w) or score(w)
    )
    assert len(again) == 15 - 6  # only the rest of the budget is spent
    assert len(result.records) == 15
    assert [r.weights for r in result.records][:6] == calls  # the finished ones are kept, in order
    if sampler == "tpe":  # TPE replays an uninterrupted run exactly
        full = WeightSearch(5, 3, sampler=sampler, budget=15, seed=1, journal=tmp_path / "full.log").run(score)
        assert [r.weights for r in full.records] == [r.weights for r in result.records]


def test_normalise_and_best():
    assert normalise([0.0, 2.0, 2.0]) == (0.0, 0.5, 0.5)
    assert normalise([0.0, 0.0]) is None
    with pytest.raises(ValueError, match="finite and >= 0"):
        normalise([-0.1, 1.0])
    from mergemix.search.weights import WeightEvaluation as E

    assert best_weights([E(0, (1.0,), 0.5), E(1, (1.0,), 0.5), E(2, (1.0,), 0.4)]).order == 0  # ties: earliest


def test_options_are_checked_with_the_key_named():
    assert check_options({"sampler": "tpe", "budget": 10, "sigma0": 1}) == []
    problems = check_options({"sampler": "nelder", "budget": 0, "sigma0": 2.0, "speed": 1})
    assert any("merge_eval.weights.sampler" in p and "cmaes, tpe" in p for p in problems)
    assert any("merge_eval.weights.budget" in p for p in problems)
    assert any("merge_eval.weights.sigma0" in p for p in problems)
    assert any("merge_eval.weights.speed" in p and "unknown option" in p for p in problems)
    with pytest.raises(ValueError, match="start_mask"):
        WeightSearch(3, 0)
