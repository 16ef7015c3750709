"""The workflow with merge_eval.methods and strategy: weights: a real tiny run."""

import json

import pandas as pd
import pytest
from test_workflow import run_study

from conftest import tiny_config
from mergemix import io

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def methods_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    cfg = tiny_config(tmp / "results", study="methods", n=4, chunks=1)
    cfg["targets"] = ["mirror"]  # one of the four: every per-target rule once
    cfg["merge_eval"] = {
        "chunks": 1,
        "strategy": "weights",
        "methods": ["uniform", "ties", "dare"],
        "weights": {"sampler": "tpe", "budget": 6, "check_samples": 3},
        "method_options": {"dare": {"seed": 3}},
        "tune": {"space": {"ties": {"density": [0.05, 1.0]}}, "budget": 3},
    }
    return run_study(cfg, tmp)


def test_methods_weights_and_the_check(methods_study):
    cfg, _, out, log = methods_study
    targets = sorted(cfg["targets"])
    methods = pd.read_csv(out / "methods.csv")
    assert set(methods["method"]) == {"uniform", "ties", "dare"} and (out / "figures/methods.png").exists()
    sel = pd.read_csv(out / "selection.csv").set_index("target")
    m = methods.set_index(["method", "target"])
    for t in targets:
        # the uniform row of the comparison is the study's own merge-eval and selection
        assert m.loc[("uniform", t), "m2m_subset"] == sel.loc[t, "selected"]
        assert m.loc[("uniform", t), "m2m_merged"] == pytest.approx(sel.loc[t, "m2m_merged"])
        w = io.read_json(out / "weights" / f"{t}.json")
        assert w["start"]["subset"] == sel.loc[t, "selected"] and w["evaluations"] == 6
        assert w["best"]["val_acc"] >= w["start"]["val_acc"]
        assert sel.loc[t, "m2m_weighted"] == pytest.approx(
            io.read_json(out / "final" / f"{t}.weighted.json")["test_acc"]
        )
        assert len(pd.read_csv(out / "weights" / "check" / f"{t}.csv")) == 3
    assert (m.xs("ties", level="method")["m2m_merged"] != m.xs("uniform", level="method")["m2m_merged"]).any()
    check = pd.read_csv(out / "weights_check.csv")
    assert set(check["target"]) == {*targets, "average"}


def test_tuned_and_fixed_options_reach_the_comparison(methods_study):
    cfg, _, out, log = methods_study
    m = pd.read_csv(out / "methods.csv").set_index(["method", "target"])
    for t in sorted(cfg["targets"]):
        tuned = io.read_json(out / "tune" / "ties" / f"{t}.json")
        assert tuned["trials"] == 3 and len(pd.read_csv(out / "tune" / "ties" / f"{t}.csv")) == 3
        assert 0.05 <= tuned["options"]["density"] <= 1.0
        assert bool(m.loc[("ties", t), "tuned"]) and not bool(m.loc[("dare", t), "tuned"])
        assert json.loads(m.loc[("ties", t), "options"]) == tuned["options"]
        assert json.loads(m.loc[("dare", t), "options"]) == {"seed": 3}
        # the method's merge-eval used the tuned options: its best val is the tuning's best
        ties = pd.read_csv(out / "merge_eval" / "methods" / "ties" / f"{t}.csv")
        assert ties["val_acc"].max() == pytest.approx(tuned["best"]["val_acc"])
