"""The real Snakemake workflow with the causal_lm backend (IA3) on a tiny local Llama.

Three synthetic instruction datasets are the candidates (arithmetic from a saved ``datasets``
dataset through the download rule, with a filter and first_n; reversal and copying from JSONL
chats); the target is a group of two JSONL benchmarks. Every job runs with the hubs offline.
"""

import pandas as pd
import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_workflow import planned_jobs, run_study  # noqa: E402

import lm_tiny  # noqa: E402
from conftest import offline_env  # noqa: E402
from mergemix import io  # noqa: E402
from mergemix.similarity import METRICS  # noqa: E402
from mergemix.subsets import all_subsets, subset_id  # noqa: E402

pytestmark = pytest.mark.workflow
CANDIDATES = ["arith", "copy", "reverse"]


@pytest.fixture(scope="module")
def offline_jobs():
    with offline_env(venv_on_path=True):
        yield


def lm_config(tmp):
    base = lm_tiny.make_model_dir(tmp / "tiny_llama")
    saved = lm_tiny.save_hf_dataset(tmp / "arith_saved", lm_tiny.arithmetic(24), lm_tiny.copying(24, seed=5))
    copy = lm_tiny.write_jsonl(tmp / "copy.jsonl", [lm_tiny.chat(q, a) for q, a in lm_tiny.copying(12)])
    rev = lm_tiny.write_jsonl(tmp / "reverse.jsonl", [lm_tiny.chat(q, a) for q, a in lm_tiny.reversal(12)])
    return {
        "study": "lmtiny",
        "results_dir": str(tmp / "results"),
        "backend": {"name": "causal_lm", "params": {"model": str(base), "max_length": 64, "embed_max_length": 64}},
        "split": {"seed": 0, "val_from_train": 0.25, "val_cap": 100},
        "datasets": {
            "arith": {
                "source": "hf_chat",
                "path": str(saved),
                "filters": {"lang": "ja"},
                "first_n": 12,
                "messages": [{"role": "user", "field": "question"}, {"role": "assistant", "field": "answer"}],
            },
            "copy": {"source": "jsonl_chat", "path": str(copy)},
            "reverse": {"source": "jsonl_chat", "path": str(rev)},
            "skill": {"source": "benchmarks", "benchmarks": lm_tiny.write_benchmarks(tmp / "bench", 3, 4)},
        },
        "targets": ["skill"],
        "candidates": {"skill": CANDIDATES},
        "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 4, "seed": 0},
        "merge_eval": {"chunks": 2},
        "mixture": {"enabled": True, "max_candidates": 3},
        # the 3 + 4 + 1 fine-tunes in 3 jobs instead of 8 and the 4 embeddings in one (each job
        # imports transformers and peft, about 6 s of CPU); the causal_lm default, one embedding a
        # job (a changed target re-embeds only itself), is planned in test_lm_wide_config
        "pack": {"finetune": 8, "embed": 4},
        "analysis": {"figure_formats": ["png"]},
        "resources": {"threads": 1, "gpu": 0},
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory, offline_jobs):
    tmp = tmp_path_factory.mktemp("lmwf")
    return run_study(lm_config(tmp), tmp)


def test_lm_output_contract(study):
    cfg, _, out, log = study
    assert "Selection table" in log
    expected = sorted(subset_id(s) for s in all_subsets(CANDIDATES))
    me = pd.read_csv(out / "merge_eval" / "skill.csv")
    mix = pd.read_csv(out / "mixture" / "skill.csv")
    assert list(me.columns) == ["subset", "size", "val_acc", "test_acc", "order", "val_examples"]
    assert list(mix.columns) == ["subset", "size", "val_acc", "test_acc"]
    for df in (me, mix):
        assert sorted(df["subset"]) == expected
        assert df[["val_acc", "test_acc"]].stack().between(0, 1).all()
    # the merged model of one dataset is that dataset's fine-tuned adapter
    j = me.merge(mix, on=["subset", "size"], suffixes=("_merged", "_mix"))
    single = j[j["size"] == 1]
    assert len(single) == 3 and (single["test_acc_merged"] == single["test_acc_mix"]).all()

    final = io.read_json(out / "final" / "skill.json")
    best = me[me["val_acc"] == me["val_acc"].max()].sort_values("size").iloc[0]
    assert final["selected"] == best["subset"]
    # the final fine-tune is a seeded rerun of the selected mixture: same score as its mixture model
    assert final["test_acc"] == pytest.approx(mix.set_index("subset").loc[final["selected"], "test_acc"])

    sel = pd.read_csv(out / "selection.csv")
    assert list(sel["target"]) == ["skill", "average"]
    assert sel.loc[0, "all_datasets"] == pytest.approx(mix.set_index("subset").loc["+".join(CANDIDATES), "test_acc"])
    corr = pd.read_csv(out / "correlation.csv")
    assert list(corr["target"]) == ["skill", "average"] and corr.loc[0, "n_points"] == 4
    sim = pd.read_csv(out / "similarity" / "skill.csv")
    assert list(sim.columns) == ["subset", "size", *METRICS] and sorted(sim["subset"]) == expected
    assert (out / "figures" / "merged_vs_mixture.png").stat().st_size > 1000


def test_lm_models_are_adapters_over_one_local_base(study):
    cfg, _, out, _ = study
    pre = io.read_json(out / "models" / "pretrained" / "model.json")
    assert (out / "models" / "pretrained" / pre["base_model"]).resolve() == (out.parents[1] / "tiny_llama").resolve()
    for name in CANDIDATES:
        state, m = io.load_model(out / "models" / "finetuned" / name / "model.safetensors")
        assert m["datasets"] == [name] and m["backend"]["name"] == "causal_lm"
        assert all(".ia3_l." in k for k in state) and sum(v.numel() for v in state.values()) == 384
        assert m["metrics"]["val_loss"] > 0 and m["metrics"]["n_train"] == 9
    # arith went through the download rule and kept the 12 first 'ja' rows
    assert io.read_json(out / "downloads" / "arith" / "download.json")["info"]["n_rows"] == 48
    assert len(io.read_jsonl(out / "data" / "arith" / "samples.jsonl")) == 12
    # embeddings: training datasets in full (appendix A.4), the target's validation split
    emb = {n: io.load_arrays(out / "embeddings" / f"{n}.safetensors")["embeddings"] for n in [*CANDIDATES, "skill"]}
    assert all(emb[n].shape == (12, 64) for n in CANDIDATES) and emb["skill"].shape == (6, 64)


def test_lm_rerun_has_nothing_to_do(study):
    _, path, _, _ = study
    assert planned_jobs(path) == {}


def test_lm_changing_a_benchmark_reruns_only_what_depends_on_the_target(study, tmp_path):
    cfg, _, _, _ = study
    benches = [dict(b) for b in cfg["datasets"]["skill"]["benchmarks"]]
    benches[0]["max_new_tokens"] = 6
    changed = dict(cfg, datasets={**cfg["datasets"], "skill": {**cfg["datasets"]["skill"], "benchmarks": benches}})
    p = tmp_path / "bench.yaml"
    p.write_text(yaml.safe_dump(changed))
    jobs = planned_jobs(p)
    assert jobs["prepare_data"] == 1 and jobs["embed"] == 1  # the pack of the four embeddings
    assert {"merge_eval", "mixture_eval", "eval_pretrained", "similarity", "analyze"} <= set(jobs)
    # the adapters do not depend on the target: nothing is downloaded, fetched or fine-tuned again
    assert not {"download_data", "fetch_pretrained", "finetune", "mixture_finetune"} & set(jobs)
