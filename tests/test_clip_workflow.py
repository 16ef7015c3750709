"""The real Snakemake workflow with the clip backend on tiny offline stand-ins: a tiny open_clip
architecture with local weights; an image folder, a saved `datasets` dataset and parquet files
(the hub source's download rule runs on the local copies). Then the output contract."""

import numpy as np
import pandas as pd
import pytest
import yaml
from test_workflow import planned_jobs, run_study

from clip_fixtures import (
    IMAGE_SIZE,
    backend_spec,
    write_hf_disk,
    write_hf_parquet,
    write_image_folder,
    write_tiny_weights,
)
from conftest import offline_env
from mergemix import io
from mergemix.similarity import METRICS
from mergemix.subsets import all_subsets, subset_id

pytest.importorskip("open_clip")
pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    # the rules call `mergemix`; nothing may reach a hub
    with offline_env(venv_on_path=True):
        yield from _study(tmp_path_factory.mktemp("clipwf"))


def _study(tmp):
    weights = write_tiny_weights(tmp / "weights" / "tiny.pt")
    cfg = {
        "study": "tinyclip",
        "results_dir": str(tmp / "results"),
        "backend": backend_spec(weights),
        "split": {"seed": 0, "val_from_train": 0.2, "val_cap": 50},
        "datasets": {
            "blobs": {
                "source": "image_folder",
                "image_size": IMAGE_SIZE,
                "path": str(write_image_folder(tmp / "blobs", ["red", "green", "blue"], 10, 6, 0)),
            },
            "disk": {
                "source": "hf_images",
                "image_size": IMAGE_SIZE,
                "templates": "cars",
                "hub_id": str(write_hf_disk(tmp / "disk", ["red", "green", "blue", "yellow"], 10, 6, 10)),
            },
            "stripes": {
                "source": "hf_images",
                "image_size": IMAGE_SIZE,
                "templates": ["a {} striped thing."],
                "hub_id": str(write_hf_parquet(tmp / "pq", ["red", "green", "blue"], 10, 6, 20)),
            },
        },
        # two of the three: every per-target rule runs, the third dataset is a candidate only
        "targets": ["blobs", "disk"],
        "finetune": {
            "epochs": 1,
            "lr": 1e-4,
            "batch_size": 16,
            "optimizer": "adamw",
            "weight_decay": 0.1,
            "schedule": "cosine",
            "warmup_frac": 0.1,
            "grad_clip": 1.0,
            "seed": 0,
        },
        # one chunk per target and the three embeddings in one job: each clip job imports open_clip
        # (about 5 s of CPU), and chunking and packing are the same code for every backend (the tiny
        # digits study runs 2 chunks and unpacked embeddings); fine-tunes stay one job each (clip's default)
        "merge_eval": {"chunks": 1},
        "pack": {"embed": 3},
        "mixture": {"enabled": True, "max_candidates": 2},
        "analysis": {"figure_formats": ["png"]},
        "resources": {"gpu": 0},  # CPU here; the study config asks for one GPU per heavy job
    }
    yield run_study(cfg, tmp)


def test_output_contract(study):
    cfg, _, out, log = study
    names = sorted(cfg["datasets"])
    targets = sorted(cfg["targets"])
    assert "Selection table" in log
    pre = pd.read_csv(out / "pretrained.csv").set_index("target")
    sel = pd.read_csv(out / "selection.csv")
    assert list(sel["target"]) == targets + ["average"]
    for t in targets:
        cands = [n for n in names if n != t]
        expected = sorted(subset_id(s) for s in all_subsets(cands))
        me = pd.read_csv(out / "merge_eval" / f"{t}.csv")
        mix = pd.read_csv(out / "mixture" / f"{t}.csv")
        sim = pd.read_csv(out / "similarity" / f"{t}.csv")
        assert list(mix.columns) == ["subset", "size", "val_acc", "test_acc"]
        assert list(me.columns) == ["subset", "size", "val_acc", "test_acc", "order", "val_examples"]
        assert sorted(me["subset"]) == sorted(mix["subset"]) == sorted(sim["subset"]) == expected
        assert list(sim.columns) == ["subset", "size", *METRICS]
        assert me[["val_acc", "test_acc"]].stack().between(0, 1).all()
        # a one-dataset merge is that dataset's fine-tuned model, evaluated with the target's head
        j = me.merge(mix, on=["subset", "size"], suffixes=("_merged", "_mix"))
        single = j[j["size"] == 1]
        assert len(single) == 2 and np.allclose(single["test_acc_merged"], single["test_acc_mix"])
        final = io.read_json(out / "final" / f"{t}.json")
        best = me[me["val_acc"] == me["val_acc"].max()].sort_values("size").iloc[0]
        assert final["selected"] == best["subset"]
        # the final fine-tune is a seeded rerun of the selected mixture's fine-tune in another process
        assert final["test_acc"] == pytest.approx(mix.set_index("subset").loc[final["selected"], "test_acc"])
        row = sel.set_index("target").loc[t]
        assert row["pretrained"] == pytest.approx(pre.loc[t, "test_acc"])
        assert row["m2m_finetuned"] == pytest.approx(final["test_acc"])
    corr = pd.read_csv(out / "correlation.csv")
    assert list(corr["target"]) == targets + ["average"] and (corr["n_points"].iloc[:-1] == 1).all()
    assert (out / "figures" / "merged_vs_mixture.png").stat().st_size > 1000


def test_heads_are_files_and_models_hold_only_the_image_encoder(study):
    cfg, _, out, _ = study
    heads = out / "models" / "pretrained" / "heads"
    pretrained = io.read_json(out / "models" / "pretrained" / "model.json")
    for name, n_classes in (("blobs", 3), ("disk", 4), ("stripes", 3)):
        state, manifest = io.load_model(heads / f"{name}.safetensors")
        assert state["weight"].shape == (n_classes, 32) and manifest["pretrained_sha256"] == pretrained["sha256"]
    assert io.load_model(heads / "disk.safetensors")[1]["templates"][1] == "a photo of the {}."
    models = list((out / "models").glob("*/*/model.safetensors"))
    assert len(models) == 3 + 2 + 2  # finetuned, a mixture of two per target, final
    for m in models:
        state, manifest = io.load_model(m)
        assert state and all(k.startswith("visual.") for k in state), m
        assert manifest["backend"]["name"] == "clip"
    dl = io.read_json(out / "downloads" / "disk" / "download.json")
    assert dl["info"]["rows"] == {"train": 40, "test": 24}


def test_head_changes_rerun_only_what_uses_that_head(study, tmp_path):
    cfg, path, _, _ = study
    assert planned_jobs(path) == {}
    changed = dict(
        cfg, datasets={**cfg["datasets"], "stripes": {**cfg["datasets"]["stripes"], "templates": ["a {} stripe."]}}
    )
    p = tmp_path / "templates.yaml"
    p.write_text(yaml.safe_dump(changed))
    jobs = planned_jobs(p)
    # new prompt templates recompute that dataset's head and what uses it, but neither download nor
    # decode the images again; the other heads and the pre-trained model are reused
    assert jobs["zeroshot_head"] == 1
    assert jobs["finetune"] == 1 and jobs["mixture_finetune"] == 2 and jobs["final_finetune"] == 2
    assert jobs["mixture_eval"] == 2 and jobs["merge_eval"] == 2  # every target sees a changed model
    assert not {"fetch_pretrained", "download_data", "prepare_data", "embed", "similarity"} & set(jobs)
