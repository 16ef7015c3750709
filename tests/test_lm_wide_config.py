"""config/llama3_ia3_wide.yaml: the language study with twelve candidate datasets. It validates,
keeps llama3_ia3_ja's targets and benchmarks, and its dry run plans a bounded number of jobs (a
budgeted optuna search and a mixture sample instead of 4,095 merged models and 4,094 mixtures per
target). Nothing is downloaded: the dry run needs neither the hub nor the benchmark files."""

import subprocess
import sys

import pytest
import yaml
from test_workflow import planned_jobs

from conftest import ROOT, offline_env
from mergemix.config import budget_evaluations, candidates_of, load_yaml, resolve_strategy, targets_of, validate_config

pytestmark = pytest.mark.workflow

WIDE = ROOT / "config" / "llama3_ia3_wide.yaml"
JA = ROOT / "config" / "llama3_ia3_ja.yaml"


@pytest.fixture(scope="module")
def wide():
    return validate_config(load_yaml(WIDE))


def test_wide_config_validates_with_at_least_twelve_candidates(wide):
    ja = validate_config(load_yaml(JA))
    targets = targets_of(wide)
    assert targets == targets_of(ja) and len(targets) == 9
    for t in targets:
        cands = candidates_of(wide, t)
        assert len(cands) >= 12 and set(candidates_of(ja, t)) <= set(cands)
        assert all(wide["datasets"][c]["source"] == "hf_chat" for c in cands)
        # the same benchmark target as the paper's language study
        assert wide["datasets"][t] == ja["datasets"][t]
        n = len(cands)
        assert resolve_strategy(wide, n) == "optuna"
        assert budget_evaluations(wide["merge_eval"]["budget"], n) == 410 < 2**n - 1
    # every candidate is a distinct slice of the hub: no dataset listed twice under two names
    slices = {
        (s["path"], yaml.safe_dump(s.get("filters")), s.get("first_n"))
        for n, s in wide["datasets"].items()
        if s["source"] == "hf_chat"
    }
    assert len(slices) == len(candidates_of(wide, targets[0]))
    assert wide["mixture"]["enabled"] and wide["mixture"]["sample"] == {"size": 60, "seed": 0}


def test_check_config_prints_the_budgeted_search():
    r = subprocess.run(
        [sys.executable, "-m", "mergemix", "check-config", str(WIDE)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 9
    assert all("12 candidates, 4095 subsets; optuna search, at most 410 merged evaluations" in ln for ln in lines)


def test_wide_language_study_plans_a_bounded_number_of_jobs(wide, tmp_path):
    cfg = load_yaml(WIDE)
    cfg["results_dir"] = str(tmp_path / "results")  # a fresh plan, whatever the repo's results/ hold
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    with offline_env():
        jobs = planned_jobs(path)
    n_targets, n_data = len(targets_of(wide)), len(candidates_of(wide, targets_of(wide)[0]))
    workers, sample = wide["merge_eval"]["workers"], wide["mixture"]["sample"]["size"]
    # the search: `workers` jobs per target sharing one journal, no exhaustive merge-eval chunks
    assert jobs["merge_search"] == n_targets * workers and "merge_eval" not in jobs
    assert jobs["gather_merge_eval"] == n_targets
    # the mixture study: the sample (shared by the targets) plus at most each target's all-candidates
    # mixture; their merged models are evaluated apart, one job per target
    assert jobs["finetune"] == n_data and sample <= jobs["mixture_finetune"] <= sample + n_targets
    assert jobs["merge_eval_sampled"] == jobs["mixture_eval"] == jobs["final_finetune"] == n_targets
    assert jobs["download_data"] == n_data and jobs["fetch_pretrained"] == 1
    assert jobs["prepare_data"] == jobs["embed"] == n_data + n_targets
    assert sum(jobs.values()) < 1000
