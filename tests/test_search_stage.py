"""The budgeted search through the real engine: a tiny convnet really trained, then searched with
each strategy by the `search` stage, joined by `gather` and chosen by `select_best`."""

import collections
import math

import pandas as pd
import pytest

from conftest import DIGITS_BACKEND, DIGITS_HP, DIGITS_SPLIT, train_digits
from mergemix import io, stages, subsets
from mergemix.backends import get_backend
from mergemix.data.prepared import load_prepared
from mergemix.merge_eval import MergeEvaluator
from mergemix.settings import Merge, Search

BACKEND, SPLIT, HP = DIGITS_BACKEND, DIGITS_SPLIT, DIGITS_HP  # conftest.train_digits trains with these
MERGE = Merge("uniform", {})
CANDS = ["mirror", "noise", "rotate", "squeeze", "thin"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    train_digits(d, CANDS)
    return d


def _models(d):
    return {n: str(d / f"ft/{n}/model.safetensors") for n in CANDS}


def _search(d, out, strategy, budget, options=None, seed=0, **kw):
    spec = Search(strategy, budget, seed, options or {})
    out.mkdir(parents=True, exist_ok=True)
    summary = stages.search(
        BACKEND,
        MERGE,
        spec,
        d / "pre/model.safetensors",
        _models(d),
        d / "data/shift",
        out / "w0.csv",
        out / "w0.json",
        **kw,
    )
    return summary, pd.read_csv(out / "w0.csv")


def test_scorer_slices_are_nested_views_of_the_val_split(trained):
    b = get_backend(BACKEND)
    ev = MergeEvaluator(b, trained / "pre/model.safetensors", _models(trained))
    target = load_prepared(trained / "data/shift")
    score = ev.scorer(target, seed=3)
    full, info = score(0b10011)
    ev.load_subset(0b10011)
    assert full == b.evaluate(ev.model, target, "val") and info["test_acc"] == b.evaluate(ev.model, target, "test")
    n = len(target.indices["val"])
    part, info = score(0b10011, 40)
    assert info == {} and round(part * 40) == pytest.approx(part * 40, abs=1e-9)  # a count out of 40 examples
    assert score(0b10011, n)[0] == full  # a slice of the whole split is the whole split
    # the slice is the first 40 of one seeded permutation: the same subset scores the same, another seed differs
    assert score(0b10011, 40)[0] == part
    views = [ev.scorer(target, seed=s)(0b10011, 40)[0] for s in range(6)]
    assert len(set(views)) > 1


def test_greedy_search_gather_and_selection(trained, tmp_path):
    summary, rows = _search(trained, tmp_path / "g", "greedy", 20)
    assert summary["strategy"] == "greedy" and summary["evaluations"] == len(rows) <= 20
    assert list(rows.columns) == ["subset", "size", "val_acc", "test_acc", "order", "val_examples"]
    assert rows["order"].tolist() == list(range(len(rows)))
    assert not rows["subset"].duplicated().any()  # never the same subset twice
    assert rows["size"].min() == 1 and rows["test_acc"].between(0, 1).all()
    out = stages.gather(
        [tmp_path / "g/w0.csv"], CANDS, tmp_path / "me.csv", [tmp_path / "g/w0.json"], tmp_path / "me.json"
    )
    cost = io.read_json(tmp_path / "me.json")
    assert cost["strategy"] == "greedy" and cost["evaluations"] == len(rows)
    assert cost["exhaustive_evaluations"] == 31 and cost["exhaustive_val_examples"] == 31 * cost["n_val"]
    best = stages.select_best(out)
    assert best["val_acc"] == rows["val_acc"].max() and best["subset"] == summary["best"]
    # deterministic: the same search again writes the same rows
    again = _search(trained, tmp_path / "g2", "greedy", 20)[1]
    pd.testing.assert_frame_equal(rows, again)


def test_halving_scores_slices_and_selects_among_full_evaluations(trained, tmp_path):
    summary, rows = _search(trained, tmp_path / "h", "halving", 12, {"eta": 3, "min_examples": 20})
    n_val = summary["n_val"]
    assert summary["val_examples"] == rows["val_examples"].sum() <= 12 * n_val
    partial = rows[rows["val_examples"] < n_val]
    full = rows[rows["val_examples"] == n_val]
    assert len(partial) and len(full)
    assert partial["test_acc"].isna().all() and full["test_acc"].notna().all()
    assert not rows.duplicated(["subset", "val_examples"]).any()
    out = stages.gather(
        [tmp_path / "h/w0.csv"], CANDS, tmp_path / "me.csv", [tmp_path / "h/w0.json"], tmp_path / "me.json"
    )
    assert not out["subset"].duplicated().any()  # one row per subset: its largest slice
    best = stages.select_best(out)
    assert best["val_examples"] == n_val and best["val_acc"] == full["val_acc"].max()


def test_optuna_search_killed_midway_resumes_without_repeating(trained, tmp_path, monkeypatch):
    budget = 14
    journal = tmp_path / "resumed" / "journal.log"
    # an uninterrupted reference run
    ref, ref_rows = _search(trained, tmp_path / "ref", "optuna", budget, journal=tmp_path / "ref" / "journal.log")
    # the same search, killed at its 7th evaluation of a merged model
    calls = collections.Counter()
    real_scorer = MergeEvaluator.scorer

    def scorer(self, target, seed=0, _fail_at=None):
        score = real_scorer(self, target, seed)

        def counted(mask, examples=None):
            calls[mask] += 1
            if _fail_at is not None and sum(calls.values()) >= _fail_at:
                raise KeyboardInterrupt("killed")
            return score(mask, examples)

        return counted

    monkeypatch.setattr(MergeEvaluator, "scorer", lambda self, t, seed=0: scorer(self, t, seed, _fail_at=7))
    with pytest.raises(KeyboardInterrupt):
        _search(trained, tmp_path / "resumed", "optuna", budget, journal=journal)
    done_before = set(calls)
    assert len(done_before) == 7 and journal.exists()
    calls.clear()
    monkeypatch.setattr(MergeEvaluator, "scorer", lambda self, t, seed=0: scorer(self, t, seed))
    summary, rows = _search(trained, tmp_path / "resumed", "optuna", budget, journal=journal)
    # the 6 evaluations that finished before the kill are taken from the journal, never repeated
    assert len(done_before - set(calls)) >= 6 and max(calls.values()) == 1
    assert summary["best"] == ref["best"]
    # the same evaluations as the uninterrupted run (the killed trial only shifts later trial numbers)
    cols = ["subset", "size", "val_acc", "test_acc", "val_examples"]
    pd.testing.assert_frame_equal(rows.sort_values("order")[cols].reset_index(drop=True), ref_rows[cols])


def test_search_rejects_workers_for_a_single_job_strategy(trained, tmp_path):
    with pytest.raises(ValueError, match="merge_eval.workers"):
        _search(trained, tmp_path / "w", "greedy", 10, worker=0, workers=2)


def test_mixture_sample_is_size_stratified_fixed_and_shared():
    names = [f"d{i:02d}" for i in range(13)]
    s = subsets.sample_mixtures(names, 60, seed=1, max_size=12)
    assert len(s) == 60 and s == subsets.sample_mixtures(names, 60, seed=1, max_size=12)
    assert s != subsets.sample_mixtures(names, 60, seed=2, max_size=12)
    sizes = collections.Counter(len(x) for x in s)
    assert set(sizes) == set(range(2, 13)) and max(sizes.values()) - min(sizes.values()) <= 1
    assert len({tuple(x) for x in s}) == 60 and all(x == sorted(x) and set(x) <= set(names) for x in s)
    # a size with fewer subsets than its share gives them all (4 names: 6 + 4 + 1 of size 2, 3, 4)
    small = subsets.sample_mixtures(names[:4], 100, seed=0)
    assert len(small) == 6 + 4 + 1
    assert len(subsets.sample_mixtures(names[:4], 3, seed=0)) == 3
    assert math.comb(4, 2) == sum(1 for x in small if len(x) == 2)
