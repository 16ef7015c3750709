"""The real Snakemake workflow on a tiny study (4 digits domains, 1 epoch), then rerun behaviour."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, tiny_config
from mergemix import io
from mergemix.similarity import METRICS
from mergemix.subsets import all_subsets, subset_id

pytestmark = pytest.mark.workflow


def snakemake(configfile, *args):
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(configfile), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r.stdout + r.stderr


def rule_family(name: str) -> str:
    """A packed rule's family: `mixture_finetune_pack3` -> `mixture_finetune` (config `pack`)."""
    return re.sub(r"_pack\d+$", "", name)


def planned_jobs(configfile) -> dict:
    """Rule -> job count of what a run would execute now (from a dry run's job stats); packed rules
    (one rule per pack) count under their family's name."""
    out = snakemake(configfile, "-n")
    if "Nothing to be done" in out:
        return {}
    stats = out.split("Job stats:")[1].split("total")[0]
    jobs: dict = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stats, re.M):
        jobs[rule_family(m.group(1))] = jobs.get(rule_family(m.group(1)), 0) + int(m.group(2))
    return jobs


def run_study(cfg, folder):
    """Write ``cfg`` as a config file in ``folder``, run the workflow on it.
    Returns (config, config file, the study's results folder, snakemake's output)."""
    path = folder / f"{cfg['study']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = snakemake(path)
    return cfg, path, Path(cfg["results_dir"]) / cfg["study"], log


@pytest.fixture(scope="module")
def study(tiny_study):
    return tiny_study  # one run for the whole session (conftest.tiny_study)


def test_output_contract(study):
    cfg, _, out, log = study
    names = sorted(cfg["datasets"])
    assert "Selection table" in log
    for t in names:
        cands = [n for n in names if n != t]
        expected = {subset_id(s) for s in all_subsets(cands)}
        me = pd.read_csv(out / "merge_eval" / f"{t}.csv")
        assert list(me.columns) == ["subset", "size", "val_acc", "test_acc", "order", "val_examples"]
        assert sorted(me["subset"]) == sorted(expected)  # every non-empty subset exactly once
        assert sorted(me["order"]) == list(range(len(expected))) and me["val_examples"].nunique() == 1
        cost = io.read_json(out / "merge_eval" / f"{t}.json")
        assert cost["strategy"] == "exhaustive" and cost["evaluations"] == cost["exhaustive_evaluations"] == 7
        assert (me["size"] == me["subset"].str.count(r"\+") + 1).all()
        assert me[["val_acc", "test_acc"]].stack().between(0, 1).all()
        assert len(list((out / "merge_eval" / "chunks" / t).glob("*.csv"))) == cfg["merge_eval"]["chunks"]

        mix = pd.read_csv(out / "mixture" / f"{t}.csv")
        assert list(mix.columns) == ["subset", "size", "val_acc", "test_acc"]
        assert sorted(mix["subset"]) == sorted(expected)
        # the merged model of one dataset is that dataset's fine-tuned model
        j = me.merge(mix, on=["subset", "size"], suffixes=("_merged", "_mix"))
        single = j[j["size"] == 1]
        assert len(single) == len(cands)
        assert np.allclose(single["test_acc_merged"], single["test_acc_mix"])
        assert np.allclose(single["val_acc_merged"], single["val_acc_mix"])

        sim = pd.read_csv(out / "similarity" / f"{t}.csv")
        assert list(sim.columns) == ["subset", "size", *METRICS]
        assert sorted(sim["subset"]) == sorted(expected)

    corr = pd.read_csv(out / "correlation.csv")
    assert list(corr["target"]) == names + ["average"]
    for col in ["n_points", "pearson_acc", "pearson_logit"] + [f"{m}_pearson_logit" for m in METRICS]:
        assert col in corr.columns
    assert (corr["n_points"].iloc[:-1] == 4).all()  # 2^3 - 1 subsets minus 3 singles
    assert corr["pearson_acc"].iloc[-1] == pytest.approx(corr["pearson_acc"].iloc[:-1].mean(), abs=1e-8)

    sel = pd.read_csv(out / "selection.csv")
    for col in [
        "target",
        "pretrained",
        "m2m_merged",
        "m2m_finetuned",
        "all_datasets",
        "similarity",
        "similarity_metric",
        "random",
        "oracle",
        "selected",
    ]:
        assert col in sel.columns
    assert list(sel["target"]) == names + ["average"]
    pre = pd.read_csv(out / "pretrained.csv").set_index("target")
    for _, row in sel.iloc[:-1].iterrows():
        t = row["target"]
        me = pd.read_csv(out / "merge_eval" / f"{t}.csv")
        mix = pd.read_csv(out / "mixture" / f"{t}.csv").set_index("subset")
        best = me[me["val_acc"] == me["val_acc"].max()].sort_values("size").iloc[0]
        assert row["selected"] == best["subset"] and row["m2m_merged"] == pytest.approx(best["test_acc"])
        # the final fine-tune is a real, seeded run on the selected mixture: it reproduces the mixture model
        assert row["m2m_finetuned"] == pytest.approx(mix.loc[row["selected"], "test_acc"])
        assert row["random"] == pytest.approx(mix["test_acc"].mean())
        assert row["oracle"] == pytest.approx(mix.loc[mix["val_acc"].idxmax(), "test_acc"])
        assert row["all_datasets"] == pytest.approx(mix.loc["+".join(n for n in names if n != t), "test_acc"])
        assert row["pretrained"] == pytest.approx(pre.loc[t, "test_acc"])
    assert sel["similarity_metric"].nunique() == 1 and sel["similarity_metric"].iloc[0] in METRICS

    for fig in ["merged_vs_mixture"] + [f"similarity_{m}" for m in METRICS]:
        for fmt in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{fmt}").stat().st_size > 1000


def test_mixtures_are_shared_between_targets_and_models_have_manifests(study):
    cfg, _, out, _ = study
    names = sorted(cfg["datasets"])
    # unique mixtures of size >= 2 over all targets' candidate sets: C(4,2) + C(4,3) = 10
    mixtures = sorted(p.name for p in (out / "models" / "mixture").iterdir())
    assert len(mixtures) == 10
    for name in names:
        m = io.read_json(out / "models" / "finetuned" / name / "model.json")
        assert m["datasets"] == [name] and m["hyperparameters"]["lr"] == cfg["finetune"]["lr"]
        assert m["sha256"] == io.sha256_file(out / "models" / "finetuned" / name / "model.safetensors")
        assert 0 <= m["metrics"]["val_acc"] <= 1
    splits = json.loads((out / "data" / names[0] / "splits.json").read_text())
    assert set(splits["indices"]) == {"train", "val", "test"}


def test_reruns_do_only_what_changed(study, tmp_path):
    cfg, path, _, _ = study
    assert planned_jobs(path) == {}  # a complete run leaves nothing to do

    analysis_only = dict(cfg, analysis={**cfg["analysis"], "logit_eps": 0.001})
    p1 = tmp_path / "analysis.yaml"
    p1.write_text(yaml.safe_dump(analysis_only))
    assert set(planned_jobs(p1)) == {"analyze", "all"}

    new_lr = dict(cfg, finetune={**cfg["finetune"], "lr": 0.003})
    p2 = tmp_path / "lr.yaml"
    p2.write_text(yaml.safe_dump(new_lr))
    jobs = planned_jobs(p2)
    assert {"finetune", "mixture_finetune", "merge_eval", "final_finetune", "mixture_eval", "analyze"} <= set(jobs)
    # smallcnn packs 16 fine-tunes to a job: the 4 datasets in one, the 10 mixtures in another
    assert jobs["finetune"] == 1 and jobs["mixture_finetune"] == 1 and jobs["final_finetune"] == 1
    assert not {"prepare_data", "pretrain", "embed", "similarity", "eval_pretrained"} & set(jobs)

    unpacked = dict(new_lr, pack={"finetune": 1})
    p3 = tmp_path / "lr_unpacked.yaml"
    p3.write_text(yaml.safe_dump(unpacked))
    jobs = planned_jobs(p3)  # one job per fine-tune
    assert jobs["finetune"] == 4 and jobs["mixture_finetune"] == 10 and jobs["final_finetune"] == 4


def test_packed_and_unpacked_runs_write_the_same_results(study, tmp_path):
    """The study run with one job per fine-tune and embedding (pack 1) writes the same models, bit
    for bit, and the same per-target tables as the packed run (the smallcnn default). The unpacked
    run has one target (mirror: its 3 candidates, their 4 mixtures, one final fine-tune), so it
    runs every rule that packing changes at under half the jobs; what it writes must equal the
    packed run's files."""
    cfg, _, out, log = study
    stats = log.split("Job stats:")[1].split("total")[0]
    assert re.search(r"^mixture_finetune_pack0\s+1\s*$", stats, re.M)  # the fixture's run was packed
    cfg1 = dict(cfg, results_dir=str(tmp_path / "results"), targets=["mirror"], pack={"finetune": 1, "embed": 1})
    out1 = tmp_path / "results" / cfg["study"]
    # the prepared data and the pre-trained model are no packed rule's output: copied (times kept,
    # so that they are up to date), they are not made again
    for rel in ("data", "models/pretrained"):
        shutil.copytree(out / rel, out1 / rel)
    _, _, out1, log1 = run_study(cfg1, tmp_path)
    stats = log1.split("Job stats:")[1].split("total")[0]
    assert re.search(r"^mixture_finetune\s+4\s*$", stats, re.M) and re.search(r"^finetune\s+3\s*$", stats, re.M)
    assert re.search(r"^embed\s+4\s*$", stats, re.M) and "_pack" not in stats
    assert not re.search(r"^(prepare_data|pretrain)\s", stats, re.M)
    models = sorted(p.relative_to(out1) for p in out1.rglob("*.safetensors") if "data" not in p.parts)
    assert len(models) == 1 + 3 + 4 + 1 + 4  # pre-trained, fine-tuned, mixtures, final, embeddings
    for rel in models:
        assert io.sha256_file(out / rel) == io.sha256_file(out1 / rel), rel
    tables = [p for p in sorted(p.relative_to(out1) for p in out1.rglob("*.csv")) if "mirror" in str(p)]
    assert len(tables) >= 5  # merge_eval (and its chunks), mixture and similarity of mirror
    for rel in tables:
        assert (out / rel).read_bytes() == (out1 / rel).read_bytes(), rel
    assert io.read_json(out / "final" / "mirror.json") == io.read_json(out1 / "final" / "mirror.json")
    sel, sel1 = (pd.read_csv(o / "selection.csv").set_index("target") for o in (out, out1))
    same = [c for c in sel1.columns if not c.startswith("similarity")]  # its metric is chosen over all targets
    pd.testing.assert_series_equal(sel1.loc["mirror", same], sel.loc["mirror", same])
