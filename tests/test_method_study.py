"""The merge-method comparison (merge_eval.methods): correlation and choice per method and target."""

import math

import numpy as np
import pandas as pd
import pytest

from mergemix import metrics
from mergemix.method_study import compare_methods


def table(accs: dict, val: dict | None = None) -> pd.DataFrame:
    rows = []
    for sid, test in accs.items():
        rows.append(
            {
                "subset": sid,
                "size": sid.count("+") + 1,
                "val_acc": (val or accs)[sid],
                "test_acc": test,
                "order": len(rows),
                "val_examples": 100,
            }
        )
    return pd.DataFrame(rows)


def test_each_method_gets_its_correlation_and_the_fine_tuned_accuracy_of_its_choice(tmp_path):
    subsets = ["a", "b", "c", "a+b", "a+c", "b+c", "a+b+c"]
    rng = np.random.default_rng(0)
    mixture = dict(zip(subsets, rng.uniform(0.5, 0.9, len(subsets))))
    good = {s: v + 0.01 * rng.standard_normal() for s, v in mixture.items()}  # tracks fine-tuning
    bad = {s: 1.4 - v for s, v in mixture.items()}  # anti-correlated, and picks the worst mixture on val
    pd.DataFrame([{"target": "t", "val_acc": 0.4, "test_acc": 0.45}]).to_csv(tmp_path / "pre.csv", index=False)
    table(mixture).drop(columns=["order", "val_examples"]).to_csv(tmp_path / "mix.csv", index=False)
    table(good).to_csv(tmp_path / "good.csv", index=False)
    table(bad).to_csv(tmp_path / "bad.csv", index=False)
    df = compare_methods(
        {"uniform": {"t": tmp_path / "good.csv"}, "ties": {"t": tmp_path / "bad.csv"}},
        {"t": tmp_path / "mix.csv"},
        tmp_path / "pre.csv",
        tmp_path / "methods.csv",
        figure=tmp_path / "methods",
        figure_formats=["png"],
        logit_eps=1e-4,
    )
    assert (tmp_path / "methods.png").stat().st_size > 1000
    rows = df.set_index(["method", "target"])
    multi = [s for s in subsets if "+" in s]
    want = metrics.pearson(
        metrics.logit_delta([good[s] for s in multi], 0.45, 1e-4),
        metrics.logit_delta([mixture[s] for s in multi], 0.45, 1e-4),
    )
    assert rows.loc[("uniform", "t"), "pearson_logit"] == pytest.approx(want)
    assert rows.loc[("uniform", "t"), "n_points"] == 4  # singles excluded
    assert rows.loc[("uniform", "t"), "pearson_logit"] > 0.9 and rows.loc[("ties", "t"), "pearson_logit"] < -0.9
    best = max(subsets, key=lambda s: good[s])
    assert rows.loc[("uniform", "t"), "m2m_subset"] == best
    assert rows.loc[("uniform", "t"), "m2m_finetuned"] == pytest.approx(mixture[best])
    worst = min(subsets, key=lambda s: mixture[s])
    assert rows.loc[("ties", "t"), "m2m_finetuned"] == pytest.approx(mixture[worst])
    assert rows.loc[("ties", "average"), "oracle"] == pytest.approx(max(mixture.values()))
    assert set(df["target"]) == {"t", "average"} and len(df) == 4


def test_without_mixtures_only_the_choices_are_reported(tmp_path):
    pd.DataFrame([{"target": "t", "val_acc": 0.4, "test_acc": 0.45}]).to_csv(tmp_path / "pre.csv", index=False)
    table({"a": 0.6, "b": 0.7, "a+b": 0.65}).to_csv(tmp_path / "u.csv", index=False)
    df = compare_methods(
        {"uniform": {"t": tmp_path / "u.csv"}}, {}, tmp_path / "pre.csv", tmp_path / "m.csv", logit_eps=1e-4
    )
    row = df.iloc[0]
    assert row["m2m_subset"] == "b" and row["m2m_merged"] == 0.7
    assert math.isnan(row["pearson_logit"]) and math.isnan(row["m2m_finetuned"])
