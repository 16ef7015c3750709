"""mergemix.search: the Objective contract, budgets, options, and every strategy on synthetic
objectives with a known optimum (no training, no torch)."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from mergemix.search import (
    Budget,
    BudgetExhausted,
    Evaluation,
    Objective,
    SearchStrategy,
    check_options,
    get_strategy,
    make_budget,
    register_strategy,
    run_search,
    strategy_names,
)
from mergemix.search import base as search_base

STRATEGIES = ["beam", "exhaustive", "greedy", "halving", "optuna", "surrogate"]


def bits(mask, n):
    return np.array([mask >> i & 1 for i in range(n)], dtype=float)


def quadratic(n, seed, pair=0.5, squash=False):
    """Additive plus pairwise score of a subset (optionally through tanh), and its unique argmax."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), np.triu(rng.normal(size=(n, n)) * pair, 1)

    def score(mask, examples):
        x = bits(mask, n)
        f = float(a @ x + x @ b @ x)
        return float(np.tanh(f / 2)) if squash else f

    values = sorted(((score(m, None), m) for m in range(1, 1 << n)), reverse=True)
    assert values[0][0] > values[1][0] + 1e-9
    return score, values[0][1]


def noisy_slices(n, n_examples, seed, slope=0.05):
    """Accuracy on the first m examples of a val split: each subset's true accuracy (0.9 minus
    ``slope`` per candidate it differs from a hidden target) drawn as deterministic per-example
    Bernoulli outcomes, so small slices are noisy and the full split is exact. Returns the score
    and the subset with the best full-split accuracy (None if that is tied)."""
    rng = np.random.default_rng(seed)
    target = int(rng.integers(1, 1 << n))
    masks = np.arange(1, 1 << n)
    true = 0.9 - slope * np.array([bin(int(m) ^ target).count("1") for m in masks])
    correct = np.cumsum(rng.random((masks.size, n_examples)) < true[:, None], axis=1)

    def score(mask, examples):
        m = n_examples if examples is None else examples
        assert 1 <= m < n_examples or examples is None
        return float(correct[mask - 1, m - 1] / m)

    full = correct[:, -1]
    top = np.argsort(-full, kind="stable")
    return score, int(masks[top[0]]) if full[top[0]] > full[top[1]] else None


class Counting:
    """Wraps a score function, records every call and returns an info dict."""

    def __init__(self, score, fail_at=None):
        self.score, self.fail_at, self.calls = score, fail_at, []

    def __call__(self, mask, examples):
        self.calls.append((mask, examples))
        if len(self.calls) == self.fail_at:
            raise RuntimeError("killed")
        return self.score(mask, examples), {"call": len(self.calls)}


def search(name, score, n, n_examples, budget, seed=0, **kwargs):
    cls = get_strategy(name)
    objective = Objective(score, n, n_examples, make_budget(budget, n, n_examples, cls.cost))
    return run_search(cls(n, seed=seed, **kwargs), objective), objective


def summary(records):
    return [(r.mask, r.examples, r.value, r.info) for r in records]


# --- Objective -------------------------------------------------------------------------------


def test_objective_caches_orders_and_charges():
    counting = Counting(lambda m, e: m / 10)
    seen = []
    obj = Objective(counting, 4, 100, Budget(), lambda ev, o: seen.append((ev.order, o.evaluations)))
    assert obj(3) == 0.3 and obj(3) == 0.3 and obj(3, 100) == 0.3 and obj(3, 500) == 0.3
    assert obj(3, 10) == 0.3 and obj(5, order=7) == 0.5 and obj(6) == 0.6
    assert counting.calls == [(3, None), (3, 10), (5, None), (6, None)]
    assert [(r.order, r.mask, r.examples) for r in obj.records] == [(0, 3, 100), (1, 3, 10), (7, 5, 100), (8, 6, 100)]
    assert obj.records[0].info == {"call": 1} and seen == [(0, 1), (1, 2), (7, 3), (8, 4)]
    assert (obj.evaluations, obj.examples_used) == (4, 310)
    assert obj.cached(3, 10) == 0.3 and obj.cached(3, 11) is None and obj.cached(9) is None


@pytest.mark.parametrize("mask", [0, 16, -1, True, 1.0])
def test_objective_rejects_bad_masks(mask):
    obj = Objective(lambda m, e: 0.0, 4, 10, Budget())
    with pytest.raises(ValueError, match=f"mask {mask!r}"):
        obj(mask)
    with pytest.raises(ValueError, match="examples"):
        obj(1, 0)


def test_objective_budget():
    counting = Counting(lambda m, e: 0.5)
    obj = Objective(counting, 4, 100, Budget(evaluations=2))
    obj(1), obj(2)
    assert not obj.can_afford()
    with pytest.raises(BudgetExhausted):
        obj(3)
    assert obj(1) == 0.5 and len(counting.calls) == 2  # cached calls stay free
    obj = Objective(counting, 4, 100, Budget(examples=150))
    obj(1, 40), obj(2)
    assert obj.can_afford(10) and not obj.can_afford(11) and not obj.can_afford()
    with pytest.raises(BudgetExhausted):
        obj(3, 20)
    assert obj.examples_used == 140


def test_objective_preload_and_best():
    obj = Objective(Counting(lambda m, e: 0.0), 4, 100, Budget(evaluations=3))
    for order, mask, examples, value in [(5, 0b0111, 100, 0.8), (6, 0b1000, 100, 0.8), (2, 0b0001, 10, 0.9)]:
        obj.preload(Evaluation(order, mask, examples, value))
    assert obj.evaluations == 3 and obj.examples_used == 210 and obj.cached(8) == 0.8
    assert obj.best().mask == 0b1000  # a slice evaluation is never best; ties: fewer members
    with pytest.raises(ValueError, match="already recorded"):
        obj.preload(Evaluation(9, 8, 100, 0.1))
    with pytest.raises(BudgetExhausted):
        obj(4)
    obj = Objective(lambda m, e: 0.5, 4, 100, Budget())
    obj(6), obj(5), obj(9, 50)
    assert obj.best().mask == 5  # same size: smaller mask
    assert Objective(lambda m, e: 0.5, 4, 100, Budget()).best() is None


# --- budgets, options, registry -------------------------------------------------------------


def test_make_budget():
    assert make_budget(None, 4, 100, "evaluations") == Budget(evaluations=15)
    assert make_budget(5, 4, 100, "evaluations") == Budget(evaluations=5)
    assert make_budget(100, 4, 100, "evaluations") == Budget(evaluations=15)
    assert make_budget(0.5, 4, 100, "evaluations") == Budget(evaluations=8)
    assert make_budget(0.2, 8, 100, "evaluations") == Budget(evaluations=51)
    assert make_budget(1e-9, 8, 100, "evaluations") == Budget(evaluations=1)
    assert make_budget(1.0, 8, 100, "evaluations") == Budget(evaluations=255)
    assert make_budget(0.5, 4, 100, "examples") == Budget(examples=800)
    assert make_budget(None, 4, 30, "examples") == Budget(examples=450)
    for bad in [0, -1, 1.5, 0.0, True, "3"]:
        with pytest.raises(ValueError, match="budget"):
            make_budget(bad, 4, 100, "evaluations")
    with pytest.raises(ValueError, match="cost"):
        make_budget(3, 4, 100, "seconds")


def test_registry_and_check_options():
    assert strategy_names() == STRATEGIES
    assert get_strategy("beam").options["width"].default == 3
    with pytest.raises(KeyError, match="unknown search strategy 'nope'; registered: beam, exhaustive"):
        get_strategy("nope")
    assert check_options("nope", {}) == [
        "merge_eval.strategy: unknown search strategy 'nope'; registered: " + ", ".join(STRATEGIES)
    ]
    assert check_options("beam", {"width": 2, "patience": 0}) == []
    assert check_options("surrogate", {"n_init": None, "alpha": 2, "model": "gbm"}) == []
    assert check_options("beam", {"width": 0, "foo": 1}) == [
        "merge_eval.strategy_options.width: must be an integer >= 1, got 0",
        "merge_eval.strategy_options.foo: unknown option for strategy 'beam'; allowed: width, patience",
    ]
    assert check_options("beam", {"width": True}) == [
        "merge_eval.strategy_options.width: must be an integer >= 1, got True"
    ]
    assert check_options("greedy", {"backward": 1, "min_improvement": -0.1}) == [
        "merge_eval.strategy_options.backward: must be true or false, got 1",
        "merge_eval.strategy_options.min_improvement: must be a number >= 0, got -0.1",
    ]
    assert check_options("halving", {"eta": 2.0}) == [
        "merge_eval.strategy_options.eta: must be an integer >= 2, got 2.0"
    ]
    assert "model: must be 'ridge' or 'gbm'" in check_options("surrogate", {"model": "svm"})[0]
    assert check_options("exhaustive", {"width": 3}) == [
        "merge_eval.strategy_options.width: unknown option for strategy 'exhaustive'; it takes no options"
    ]
    assert "journal: unknown option" in check_options("optuna", {"journal": "x"})[0]  # runtime, not config
    with pytest.raises(ValueError, match="strategy_options.width: must be an integer >= 1"):
        get_strategy("beam")(4, width=0)
    assert get_strategy("beam")(4, width=5).opts == {"width": 5, "patience": 1}
    assert get_strategy("optuna").supports_workers and get_strategy("halving").cost == "examples"

    class Duplicate(SearchStrategy):
        name = "greedy"

        def run(self, objective):
            return "done"

    with pytest.raises(ValueError, match="clashes with mergemix's built-in search strategy 'greedy'"):
        register_strategy(Duplicate)  # a built-in's name, from another module
    Duplicate.name = "greedy_twin"
    try:
        assert register_strategy(Duplicate) is Duplicate and get_strategy("greedy_twin") is Duplicate
        assert "greedy_twin" in strategy_names()
        Twin = type("Twin", (Duplicate,), {})
        with pytest.raises(ValueError, match="'greedy_twin' is already registered"):
            register_strategy(Twin)
    finally:
        del search_base.STRATEGIES["greedy_twin"]
    assert strategy_names() == STRATEGIES


def test_import_is_light():
    code = (
        "import sys, mergemix.search as s; s.Objective(lambda m, e: 0.0, 2, 1, s.Budget())(1);"
        "print(sorted(m for m in ('optuna', 'sklearn', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the contract every strategy keeps --------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 20, None])
@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_contract(name, budget):
    n = 4 if budget is None else 6
    score, _ = noisy_slices(n, 50, seed=1)
    results = []
    for _ in range(2):
        counting = Counting(score)
        result, objective = search(name, counting, n, 50, budget, seed=3)
        results.append(result)
        assert len(counting.calls) == len(set(counting.calls)) == result.evaluations == len(result.records)
        limits = objective.budget
        assert limits.evaluations is None or result.evaluations <= limits.evaluations
        assert limits.examples is None or result.examples_used <= limits.examples
        assert result.records and result.best is not None and result.stop_reason
        assert len({r.order for r in result.records}) == len(result.records)
    assert results[0] == results[1]  # deterministic for a seed
    if budget == 1 and name != "halving":  # halving plans its rungs to fit, here one full evaluation
        assert results[0].stop_reason == "budget exhausted"


# --- each strategy finds the optimum ----------------------------------------------------------


def test_exhaustive():
    score, best = quadratic(8, seed=0)
    result, _ = search("exhaustive", score, 8, 100, None)
    assert result.best.mask == best and result.stop_reason == "all subsets evaluated"
    assert [r.mask for r in result.records] == list(range(1, 256))


def test_greedy_on_additive_objective():
    score, best = quadratic(10, seed=2, pair=0.0)
    result, _ = search("greedy", score, 10, 100, None)
    assert result.best.mask == best and result.stop_reason == "converged"
    assert result.evaluations <= 10 * 11 // 2


def test_greedy_backward_pass_removes_a_member():
    table = {1: 0.5, 2: 0.6, 4: 0.55, 3: 0.65, 6: 0.62, 7: 0.7, 5: 0.75}
    forward, _ = search("greedy", lambda m, e: table[m], 3, 10, None, backward=False)
    assert forward.best.mask == 7 and [r.mask for r in forward.records] == [1, 2, 4, 3, 6, 7]
    both, _ = search("greedy", lambda m, e: table[m], 3, 10, None)  # 6 and 3 are cached: only 5 is new
    assert both.best.mask == 5 and [r.mask for r in both.records] == [1, 2, 4, 3, 6, 7, 5]
    strict, _ = search("greedy", lambda m, e: table[m], 3, 10, None, min_improvement=0.06)
    assert strict.best.mask == 3 and [r.mask for r in strict.records] == [1, 2, 4, 3, 6]  # stays at mask 2


def test_beam_beats_greedy_on_interactions():
    score, best = quadratic(10, seed=7, pair=0.5)
    greedy, _ = search("greedy", score, 10, 100, None)
    narrow, _ = search("beam", score, 10, 100, None)
    wide, _ = search("beam", score, 10, 100, None, width=4)
    assert greedy.best.mask != best and narrow.best.mask != best
    assert wide.best.mask == best and wide.evaluations < 1023 / 6 and wide.stop_reason == "converged"


@pytest.mark.parametrize("seed", [0, 1])
def test_optuna_finds_optimum(seed):
    score, best = quadratic(8, seed=seed, pair=0.5)
    result, _ = search("optuna", score, 8, 100, 0.35, seed=seed)
    assert result.best.mask == best and result.evaluations == 90 and result.stop_reason == "budget exhausted"


def test_surrogate_finds_optimum():
    score, best = quadratic(10, seed=4, pair=0.5, squash=True)
    result, _ = search("surrogate", score, 10, 100, 0.3)
    assert result.best.mask == best and result.evaluations == 307


def test_surrogate_gbm_in_batches():
    """Wiring of model="gbm" and batch (gradient boosting is weak on so few samples: a smoke test)."""
    strategy = get_strategy("surrogate")(8, seed=2, model="gbm", batch=27)
    assert type(strategy.model()).__name__ == "HistGradientBoostingRegressor"
    score, best = quadratic(8, seed=2, pair=0.5, squash=True)
    objective = Objective(score, 8, 100, make_budget(0.35, 8, 100, "evaluations"))
    result = run_search(strategy, objective)  # 9 initial subsets, then 3 batches of 27
    assert result.evaluations == 90 and result.stop_reason == "budget exhausted" and result.best.mask == best


def test_halving_finds_optimum_on_noisy_slices():
    score, best = noisy_slices(10, 300, seed=5)
    result, objective = search("halving", Counting(score), 10, 300, 0.3, eta=3, min_examples=20)
    assert best is not None and result.best.mask == best and result.stop_reason == "all rungs done"
    assert result.examples_used <= objective.budget.examples
    screened = {r.mask for r in result.records}
    assert len(screened) == 1023 and sum(r.examples == 300 for r in result.records) < 50


def test_halving_shrinks_population_to_fit():
    score, _ = noisy_slices(8, 100, seed=0)
    result, objective = search("halving", score, 8, 100, 2)  # two full evaluations' worth of examples
    assert result.examples_used <= 200 and result.best is not None
    result, _ = search("halving", score, 8, 100, 20, population=50, eta=2, min_examples=5)
    assert len({r.mask for r in result.records}) <= 50 and result.examples_used <= 2000


# --- optuna: journal resume and workers -------------------------------------------------------


def test_optuna_resumes_from_journal(tmp_path):
    from mergemix.search.optuna_tpe import journal_records

    score, _ = quadratic(8, seed=6)
    reference, _ = search("optuna", Counting(score), 8, 100, 20, seed=7)
    journal = tmp_path / "study.log"
    killed = Counting(score, fail_at=8)
    with pytest.raises(RuntimeError, match="killed"):
        search("optuna", killed, 8, 100, 20, seed=7, journal=journal)
    first = {m for m, _ in killed.calls[:7]}
    resumed_calls = Counting(score)
    resumed, _ = search("optuna", resumed_calls, 8, 100, 20, seed=7, journal=journal)
    assert not first & {m for m, _ in resumed_calls.calls} and len(resumed_calls.calls) == 13
    assert resumed.evaluations == 20
    strip = [(m, e, v) for m, e, v, _ in summary(reference.records)]
    assert [(m, e, v) for m, e, v, _ in summary(resumed.records)] == strip
    assert resumed.best.mask == reference.best.mask and resumed.stop_reason == "budget exhausted"
    assert summary(journal_records(journal)) == summary(resumed.records)


def test_optuna_workers_share_budget(tmp_path):
    import optuna

    from mergemix.search.optuna_tpe import journal_records

    score, _ = quadratic(6, seed=8)
    journal = tmp_path / "shared.log"
    common = dict(journal=journal, workers=2, max_duplicate_streak=50)
    w0 = Counting(score, fail_at=6)
    with pytest.raises(RuntimeError):
        search("optuna", w0, 6, 100, 20, worker=0, **common)
    w1 = Counting(score)
    first, _ = search("optuna", w1, 6, 100, 20, worker=1, **common)
    assert first.stop_reason == "budget exhausted" and first.evaluations == 19  # 1 still in flight
    w0_again = Counting(score)
    again, _ = search("optuna", w0_again, 6, 100, 20, worker=0, **common)
    calls = [m for c in (w0.calls[:5], w1.calls, w0_again.calls) for m, _ in c]
    records = journal_records(journal)
    assert len(calls) == len(set(calls)) == len(records) == again.evaluations == 20
    assert sorted(r.mask for r in records) == sorted(calls)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="mergemix", storage=storage)
    attrs = [t.user_attrs for t in study.get_trials()]
    assert all({"mask", "worker"} <= a.keys() for a in attrs) and any(a.get("duplicate") for a in attrs)


def test_optuna_concurrent_workers(tmp_path):
    from mergemix.search.optuna_tpe import journal_records

    score, _ = quadratic(6, seed=9)
    journal = tmp_path / "threads.log"
    # Both workers meet at their first evaluation, so neither can drain the shared budget
    # before the other has started (one thread finishing all 25 alone made this test flaky).
    meet = threading.Barrier(2, timeout=120)

    def rendezvous(w):
        def score_w(mask, examples):
            if not counting[w].calls[1:]:
                meet.wait()
            return score(mask, examples)

        return score_w

    counting = [Counting(rendezvous(0)), Counting(rendezvous(1))]

    def work(w):
        search("optuna", counting[w], 6, 100, 25, seed=w, journal=journal, worker=w, workers=2)

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls = [m for c in counting for m, _ in c.calls]
    assert all(c.calls for c in counting) and len(calls) == len(set(calls)) == len(journal_records(journal)) == 25
