"""Given fine-tuned models (models:): a selection-only study that trains nothing, `mergemix select`
agreeing with it, and the refusals."""

import subprocess
import sys

import pandas as pd
import pytest
import yaml
from test_workflow import ROOT, planned_jobs, run_study, snakemake

from conftest import tiny_config
from mergemix import io, stages
from mergemix.config import ConfigError, validate_config
from mergemix.given import GivenModelError, import_model

pytestmark = pytest.mark.workflow
TRAINING_RULES = {"finetune", "mixture_finetune", "final_finetune", "pretrain_finetune", "weighted_finetune"}


@pytest.fixture(scope="module")
def given_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("given")
    cfg = tiny_config(tmp / "results", study="given", n=4, mixture=False, chunks=1)
    cfg["final"] = {"enabled": False}
    cfg["targets"] = ["noise", "rotate"]  # two of the four: every candidate is still imported (each serves a target)
    out = tmp / "results" / "given"
    # the study's pre-trained model first (its pretrain rule), then "the user's own" fine-tunes of it,
    # written in mergemix's format somewhere outside the study
    pre_cfg = tmp / "pre.yaml"
    pre_cfg.write_text(yaml.safe_dump(cfg))
    snakemake(
        pre_cfg, "--cores", "2", str(out / "models/pretrained/model.safetensors")
    )  # (a target after --configfile)
    own = {}
    for d in sorted(cfg["datasets"]):
        stages.prepare(d, cfg["datasets"][d], cfg["split"], tmp / "own_data" / d)
        own[d] = tmp / "own" / d / "model.safetensors"
        stages.finetune(
            cfg["backend"],
            {**cfg["finetune"], "epochs": 2},
            out / "models/pretrained/model.safetensors",
            [tmp / "own_data" / d],
            own[d],
        )
    cfg["models"] = {d: {"path": str(p.parent)} for d, p in own.items()}
    path = tmp / "given.yaml"
    path.write_text(yaml.safe_dump(cfg))
    plan = planned_jobs(path)
    return (*run_study(cfg, tmp), plan, own)


def test_selection_only_trains_nothing(given_study):
    cfg, path, out, log, plan, own = given_study
    assert not TRAINING_RULES & set(plan), plan  # no fine-tune job of any kind in the plan
    assert plan.get("import_model") == len(cfg["datasets"])
    assert "mixture_eval" not in plan
    sel = pd.read_csv(out / "selection.csv").set_index("target")
    assert sel["m2m_finetuned"].isna().all() and sel["oracle"].isna().all() and sel["all_datasets"].isna().all()
    ranks = pd.read_csv(out / "rankings.csv")
    assert sorted(ranks["target"].unique()) == sorted(sel.index.drop("average")) == cfg["targets"]
    for t in cfg["targets"]:
        r = ranks[ranks["target"] == t]
        assert list(r["rank"]) == list(range(1, 8)) and r["val_acc"].is_monotonic_decreasing
        assert r.iloc[0]["subset"] == sel.loc[t, "selected"]
    for t in cfg["datasets"]:
        m = io.read_json(out / "models/finetuned" / t / "model.json")
        assert m["given"]["source"] == str(own[t].parent.resolve()) and m["given"]["format"] == "mergemix"
        assert m["given"]["files"]["model.safetensors"] == io.sha256_file(own[t])
        assert m["hyperparameters"] == {"given": True}
        # the imported tensors are the given ones
        assert (
            io.load_model(out / "models/finetuned" / t / "model.safetensors")[0].keys()
            == io.load_model(own[t])[0].keys()
        )


def test_mergemix_select_agrees_with_the_workflow(given_study, tmp_path):
    cfg, path, out, log, plan, own = given_study
    target = "noise"
    models = [f"{d}={own[d]}" for d in sorted(cfg["datasets"]) if d != target]
    cmd = [
        sys.executable,
        "-m",
        "mergemix",
        "select",
        "--backend",
        __import__("json").dumps(cfg["backend"]),
        "--pretrained",
        str(out / "models/pretrained/model.safetensors"),
        "--models",
        *models,
        "--target",
        str(out / "data" / target),
        "--out",
        str(tmp_path / "ranking.csv"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "chosen:" in r.stdout
    mine = pd.read_csv(tmp_path / "ranking.csv")
    wf = pd.read_csv(out / "rankings.csv")
    wf = wf[wf["target"] == target].reset_index(drop=True)
    assert list(mine["subset"]) == list(wf["subset"])
    assert mine["val_acc"].tolist() == pytest.approx(wf["val_acc"].tolist(), abs=0)
    assert mine["test_acc"].tolist() == pytest.approx(wf["test_acc"].tolist(), abs=0)


def test_a_model_from_another_pretrained_is_refused(given_study, tmp_path):
    cfg, path, out, log, plan, own = given_study
    other_pre = tmp_path / "other/pre.safetensors"
    stages.pretrain(
        cfg["backend"], {"epochs": 1, "lr": 0.01, "batch_size": 32, "seed": 5}, out / "data/rotate", other_pre
    )
    ft = tmp_path / "other/ft.safetensors"
    stages.finetune(cfg["backend"], cfg["finetune"], other_pre, [out / "data/rotate"], ft)
    with pytest.raises(GivenModelError) as e:
        import_model(
            cfg["backend"],
            out / "models/pretrained/model.safetensors",
            {"path": str(ft)},
            "rotate",
            tmp_path / "imp/model.safetensors",
        )
    pre_sha = io.read_json(io.manifest_path(out / "models/pretrained/model.safetensors"))["sha256"]
    assert io.read_json(io.manifest_path(other_pre))["sha256"] in str(e.value) and pre_sha in str(e.value)
    assert not (tmp_path / "imp/model.safetensors").exists()


def test_bad_models_sections_are_refused_by_name(tmp_path, default_config):
    base = {**default_config, "mixture": {"enabled": False}, "final": {"enabled": False}}
    cands = sorted(default_config["datasets"])

    def error(models, **extra):
        with pytest.raises(ConfigError) as e:
            validate_config({**base, "models": models, **extra})
        return str(e.value)

    some = tmp_path / "m"
    some.mkdir()
    full = {c: {"path": str(some)} for c in cands}
    assert "models.rotate.path" in error({**full, "rotate": {"path": str(tmp_path / "nope")}})
    assert "no given model for candidate(s) noise" in error({c: v for c, v in full.items() if c != "noise"})
    assert "models.zebra" in error({**full, "zebra": {"path": str(some)}})
    assert "has no revision" in error({**full, "rotate": {"hub": "org/repo"}})
    assert "models.rotate.format" in error({**full, "rotate": {"path": str(some), "format": "peft"}})
    assert "mixture.enabled" in error(full, mixture={"enabled": True})
    assert "models.rotate" in error({**full, "rotate": {"path": str(some), "hub": "org/repo"}})
    ok = validate_config({**base, "models": {**full, "rotate": {"hub": "org/repo", "revision": "main"}}})
    assert ok["models"]["rotate"]["format"] == "auto" and ok["final"]["enabled"] is False


def test_the_given_vision_study_plans_and_trains_nothing():
    """config/clip_vit_b32_given.yaml (fusion_bench's public ViT-B/32 fine-tunes) plans here; it
    needs the hub to run: downloads, then imports, merge-eval and analysis, and no training job."""
    plan = planned_jobs(ROOT / "config" / "clip_vit_b32_given.yaml")
    assert plan["download_model"] == plan["import_model"] == 8
    assert plan["merge_eval"] == 16 and plan["analyze"] == 1
    assert not TRAINING_RULES & set(plan) and "mixture_eval" not in plan
