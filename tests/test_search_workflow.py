"""The workflow with a budgeted search and a mixture sample: a real tiny run with `greedy`, and
the plan of a 13-dataset study (12 candidates per target) that must stay bounded."""

import pandas as pd
import pytest
import yaml
from test_workflow import planned_jobs, run_study

from conftest import tiny_config
from mergemix import io
from mergemix.subsets import parse_subset

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def greedy_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("greedy")
    cfg = tiny_config(tmp / "results", study="greedy", n=5)
    cfg["targets"] = ["noise"]  # one of the five (4 candidates): every per-target rule once
    cfg["merge_eval"] = {"strategy": "greedy", "budget": 10}
    cfg["mixture"] = {"enabled": True, "sample": {"size": 4, "seed": 0}}
    return run_study(cfg, tmp)


def test_greedy_study_outputs(greedy_study):
    cfg, _, out, log = greedy_study
    names = sorted(cfg["datasets"])
    assert "search: greedy" in log and "oracle among sampled" in log
    sel = pd.read_csv(out / "selection.csv").set_index("target")
    for t in cfg["targets"]:
        me = pd.read_csv(out / "merge_eval" / f"{t}.csv")
        cost = io.read_json(out / "merge_eval" / f"{t}.json")
        assert cost["strategy"] == "greedy" and cost["evaluations"] == len(me) <= 10
        assert cost["exhaustive_evaluations"] == 15
        best = me.sort_values(["val_acc", "size"], ascending=[False, True]).iloc[0]
        row = sel.loc[t]
        assert row["selected"] == best["subset"] and row["search"] == "greedy"
        assert row["evaluations"] == len(me) and row["oracle_scope"] == "sampled mixtures"
        final = io.read_json(out / "final" / f"{t}.json")
        assert final["selected"] == row["selected"]
        # the mixture study: singles, the sample's mixtures that avoid t, and all candidates
        mix = pd.read_csv(out / "mixture" / f"{t}.csv")
        assert t not in {n for s in mix["subset"] for n in parse_subset(s)}
        assert "+".join(n for n in names if n != t) in set(mix["subset"])
        # merged models of the fine-tuned mixtures are evaluated apart, for the correlation only
        sampled = pd.read_csv(out / "merge_eval" / "sampled" / f"{t}.csv")
        assert set(sampled["subset"]) == set(mix["subset"])
        assert row["mixtures"] == len(set(mix["subset"]) | {row["selected"]})
    corr = pd.read_csv(out / "correlation.csv")
    assert corr["pearson_logit"].iloc[:-1].notna().any()


def test_wide_study_plans_a_bounded_number_of_jobs(tmp_path):
    doms = ["rotate", "noise", "shift", "contrast", "mirror", "squeeze", "thin"]
    cfg = tiny_config(tmp_path / "results", study="wide", n=1)
    cfg["datasets"] = {
        f"{d}{i}": {"source": "digits", "domain": d, "strength": 0.6 + 0.3 * i} for d in doms for i in range(2)
    }
    del cfg["datasets"]["thin1"]  # 13 datasets: 12 candidates per target, 4,095 subsets each
    cfg["merge_eval"] = {"strategy": "optuna", "budget": 0.1, "workers": 2}
    cfg["mixture"] = {"enabled": True, "sample": {"size": 40, "seed": 0}}
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(path)
    assert jobs["merge_search"] == 13 * 2 and "merge_eval" not in jobs
    # smallcnn packs 16 fine-tunes to a job (config `pack`): the 13 datasets in one, the mixtures in a few
    assert jobs["finetune"] == 1 and jobs["mixture_finetune"] <= 4 and jobs["final_finetune"] == 1
    assert sum(jobs.values()) < 150
    path.write_text(yaml.safe_dump(dict(cfg, pack={"finetune": 1, "embed": 1})))  # one job per fine-tune
    jobs = planned_jobs(path)
    assert jobs["finetune"] == 13 and jobs["mixture_finetune"] <= 40 + 13  # the sample plus each all-candidates mixture
    assert sum(jobs.values()) < 250
