"""Weighted mixtures through the real engine: a tiny convnet really trained, proportions searched
on merged val accuracy from the best binary subset, then a weighted fine-tune."""

import pandas as pd
import pytest

from conftest import DIGITS_BACKEND, DIGITS_HP, DIGITS_SPLIT, train_digits
from mergemix import io, metrics, stages
from mergemix.backends import get_backend
from mergemix.data.prepared import load_prepared
from mergemix.merge_eval import MergeEvaluator
from mergemix.settings import Merge, WeightsSearch
from mergemix.weighting import weighted_finetune, weights_search

BACKEND, SPLIT, HP = DIGITS_BACKEND, DIGITS_SPLIT, DIGITS_HP  # conftest.train_digits trains with these
CANDS = ["noise", "rotate", "thin"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    models = train_digits(d, CANDS, pretrain_epochs=6)
    stages.merge_eval(
        BACKEND, Merge("uniform", {}), d / "pre/model.safetensors", models, d / "data/shift", 0, 1, d / "me.csv"
    )
    return d, models


def test_weighted_vector_one_hot_is_the_model_and_uniform_is_the_subset_average(trained):
    d, models = trained
    ev = MergeEvaluator(get_backend(BACKEND), d / "pre/model.safetensors", models)
    target = load_prepared(d / "data/shift")
    for i in range(3):
        onehot = [float(j == i) for j in range(3)]
        assert ev.evaluate_weights(target, onehot) == ev.evaluate(target, "val", 1 << i)
    assert ev.evaluate_weights(target, [0.5, 0.0, 0.5]) == pytest.approx(ev.evaluate(target, "val", 0b101))
    with pytest.raises(ValueError, match="summing to 1"):
        ev.weighted_vector([0.5, 0.6, 0.0])


def test_weights_search_starts_at_the_best_subset_and_resumes(trained, tmp_path):
    d, models = trained
    best = stages.select_best(pd.read_csv(d / "me.csv"))
    args = (
        BACKEND,
        WeightsSearch.from_cli({"sampler": "tpe", "budget": 8, "seed": 0}),  # the rest: the schema's defaults
        d / "pre/model.safetensors",
        models,
        d / "data/shift",
        d / "me.csv",
    )
    s = weights_search(*args, tmp_path / "w.json", tmp_path / "w.csv", journal=tmp_path / "new/j.log")
    assert s["start"]["subset"] == best["subset"] and s["start"]["val_acc"] == pytest.approx(float(best["val_acc"]))
    assert s["best"]["val_acc"] >= s["start"]["val_acc"] and s["evaluations"] == 8
    assert sum(s["best"]["weights"].values()) == pytest.approx(1.0)
    rows = pd.read_csv(tmp_path / "w.csv")
    assert len(rows) == 8 and set(rows.columns) >= {f"w_{c}" for c in CANDS}
    again = weights_search(
        *args, tmp_path / "w2.json", tmp_path / "w2.csv", journal=tmp_path / "new/j.log"
    )  # done: nothing new
    assert again["best"] == s["best"] and again["evaluations"] == 8
    fresh = weights_search(*args, tmp_path / "w3.json", tmp_path / "w3.csv", journal=tmp_path / "j3.log")
    assert fresh["best"] == s["best"]  # deterministic for its seed


def test_weighted_finetune_uses_the_chosen_proportions(trained, tmp_path):
    d, models = trained
    io.write_json(
        tmp_path / "w.json",
        {"best": {"weights": {"noise": 0.7, "rotate": 0.0, "thin": 0.3}, "val_acc": 0.5, "test_acc": 0.5}},
    )
    dirs = {c: str(d / "data" / c) for c in CANDS}
    r = weighted_finetune(
        BACKEND,
        HP,
        d / "pre/model.safetensors",
        tmp_path / "w.json",
        dirs,
        d / "data/shift",
        tmp_path / "m/model.safetensors",
        tmp_path / "r.json",
    )
    manifest = io.read_json(tmp_path / "m/model.json")
    assert manifest["hyperparameters"]["mixture_weights"] == {"noise": 0.7, "thin": 0.3}
    assert [x["name"] for x in manifest["data"]] == ["noise", "thin"]  # weight 0: left out
    assert 0 <= r["test_acc"] <= 1 and r["weights"] == {"noise": 0.7, "thin": 0.3}


def test_weights_check_scores_each_sampled_vector_merged_and_fine_tuned(trained, tmp_path):
    from mergemix.weighting import weights_check, weights_check_table

    d, models = trained
    dirs = {c: str(d / "data" / c) for c in CANDS}
    df = weights_check(
        BACKEND, HP, d / "pre/model.safetensors", models, dirs, d / "data/shift", 3, 5, tmp_path / "c.csv"
    )
    assert len(df) == 3 and (df[[f"w_{c}" for c in CANDS]].sum(axis=1) - 1).abs().max() < 1e-9
    again = weights_check(
        BACKEND, HP, d / "pre/model.safetensors", models, dirs, d / "data/shift", 3, 5, tmp_path / "c2.csv"
    )
    pd.testing.assert_frame_equal(df, again)  # seeded draws and fine-tunes
    ev = MergeEvaluator(get_backend(BACKEND), d / "pre/model.safetensors", models)
    w = df.loc[1, [f"w_{c}" for c in CANDS]].to_numpy(dtype=float)
    assert df.loc[1, "merged_test_acc"] == ev.evaluate_weights(load_prepared(d / "data/shift"), w, "test")
    pd.DataFrame([{"target": "shift", "val_acc": 0.3, "test_acc": 0.3}]).to_csv(tmp_path / "pre.csv", index=False)
    table = weights_check_table({"shift": tmp_path / "c.csv"}, tmp_path / "pre.csv", tmp_path / "t.csv", logit_eps=1e-4)
    assert list(table["target"]) == ["shift", "average"] and table.loc[0, "n_points"] == 3
    m, f = df["merged_test_acc"], df["finetuned_test_acc"]
    want = metrics.pearson(metrics.logit_delta(m, 0.3, 1e-4), metrics.logit_delta(f, 0.3, 1e-4))
    assert table.loc[0, "pearson_logit"] == pytest.approx(want, nan_ok=True)
    assert -1 <= table.loc[0, "pearson_acc"] <= 1
