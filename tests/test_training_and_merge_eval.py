"""Small real runs of the stages in-process: a tiny convnet really trained, merged and evaluated."""

import pandas as pd
import pytest
import torch

from mergemix import io, stages
from mergemix.backends import get_backend
from mergemix.data.prepared import load_prepared
from mergemix.merge_eval import MergeEvaluator
from mergemix.settings import Merge, Split

BACKEND = {"name": "smallcnn", "params": {"channels": 4, "hidden": 16}}
SPLIT = Split.from_cli({"seed": 0, "val": 0.2, "test": 0.3, "max_train": 300})
HP = {"epochs": 4, "lr": 0.005, "batch_size": 32, "schedule": "cosine", "seed": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    for name, domain in [("clean", "clean"), ("rotate", "rotate"), ("mirror", "mirror"), ("thin", "thin")]:
        stages.prepare(name, {"source": "digits", "domain": domain}, SPLIT, d / "data" / name)
    stages.pretrain(
        BACKEND, {"epochs": 10, "lr": 0.01, "batch_size": 32}, d / "data/clean", d / "pre/model.safetensors"
    )
    for name in ["rotate", "mirror", "thin"]:
        stages.finetune(
            BACKEND, HP, d / "pre/model.safetensors", [d / "data" / name], d / f"ft/{name}/model.safetensors"
        )
    return d


def test_finetuning_beats_the_pretrained_model_on_its_own_domain(trained):
    b = get_backend(BACKEND)
    pre = b.load_pretrained(trained / "pre/model.safetensors")
    mirror = load_prepared(trained / "data/mirror")
    before = b.evaluate(pre, mirror, "val")
    ft = b.load_pretrained(trained / "pre/model.safetensors")
    b.load_state(ft, io.load_model(trained / "ft/mirror/model.safetensors")[0])
    after = b.evaluate(ft, mirror, "val")
    assert after > before + 0.1


def test_finetuning_is_reproducible(trained, tmp_path):
    stages.finetune(
        BACKEND, HP, trained / "pre/model.safetensors", [trained / "data/thin"], tmp_path / "again.safetensors"
    )
    a = io.load_model(trained / "ft/thin/model.safetensors")[0]
    b = io.load_model(tmp_path / "again.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merged_states_are_the_average_and_singletons_are_the_finetuned_models(trained):
    b = get_backend(BACKEND)
    paths = {n: trained / f"ft/{n}/model.safetensors" for n in ["mirror", "rotate", "thin"]}
    ev = MergeEvaluator(b, trained / "pre/model.safetensors", paths)
    assert ev.names == ["mirror", "rotate", "thin"]
    states = {n: io.load_model(p)[0] for n, p in paths.items()}
    ev.load_subset(0b101)  # mirror + thin
    for k, p in ev.model.named_parameters():
        assert torch.allclose(p, (states["mirror"][k] + states["thin"][k]) / 2, atol=1e-7)
    target = load_prepared(trained / "data/rotate")
    df = ev.run(target, range(1, 8))
    assert len(df) == 7
    # single subsets: exactly the fine-tuned model
    ft = b.load_pretrained(trained / "pre/model.safetensors")
    b.load_state(ft, states["thin"])
    row = df.set_index("subset").loc["thin"]
    assert row["val_acc"] == b.evaluate(ft, target, "val") and row["test_acc"] == b.evaluate(ft, target, "test")


def test_gather_rejects_incomplete_or_duplicated_chunks(trained, tmp_path):
    paths = {n: str(trained / f"ft/{n}/model.safetensors") for n in ["mirror", "thin"]}
    for k in range(2):
        stages.merge_eval(
            BACKEND,
            Merge("uniform", {}),
            trained / "pre/model.safetensors",
            paths,
            trained / "data/rotate",
            k,
            2,
            tmp_path / f"c{k}.csv",
        )
    out = stages.gather([tmp_path / "c0.csv", tmp_path / "c1.csv"], ["mirror", "thin"], tmp_path / "all.csv")
    assert list(out["subset"]) == ["mirror", "thin", "mirror+thin"]
    with pytest.raises(ValueError, match="missing"):
        stages.gather([tmp_path / "c0.csv"], ["mirror", "thin"], tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="duplicated"):
        stages.gather([tmp_path / "c0.csv"] * 2 + [tmp_path / "c1.csv"], ["mirror", "thin"], tmp_path / "bad.csv")
    # a chunk with an accuracy out of [0, 1] is refused by gather too, naming the file
    bad = pd.read_csv(tmp_path / "c1.csv")
    bad.loc[0, "val_acc"] = 1.7
    bad.to_csv(tmp_path / "c1bad.csv", index=False)
    with pytest.raises(ValueError, match=r"c1bad\.csv.*outside \[0, 1\]"):
        stages.gather([tmp_path / "c0.csv", tmp_path / "c1bad.csv"], ["mirror", "thin"], tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


def test_a_corrupted_model_file_is_refused_with_the_fix(trained, tmp_path):
    import shutil

    src = trained / "ft/thin"
    dst = tmp_path / "thin"
    shutil.copytree(src, dst)
    data = bytearray((dst / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (dst / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(io.ModelFileError, match="sha256.*rerun"):
        io.load_model(dst / "model.safetensors")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert io.read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_select_best_breaks_ties_towards_the_smallest_subset():
    df = pd.DataFrame({"subset": ["a+b", "c", "a", "a+b+c"], "val_acc": [0.9, 0.9, 0.5, 0.9], "test_acc": [1, 2, 3, 4]})
    assert stages.select_best(df)["subset"] == "c"
    assert stages.select_best(df, "val_acc", maximize=False)["subset"] == "a"


def test_eval_pretrained_scores_each_target_on_its_own_data(trained, tmp_path):
    # eval-pretrained loads one target after another in one process; a split cache keyed by id()
    # once handed a target the tensors of an earlier, freed one whose id had been reused
    names = ["clean", "mirror", "rotate", "thin"] * 3
    dirs = {f"{n}{i}": trained / "data" / n for i, n in enumerate(names)}
    df = stages.eval_pretrained(BACKEND, trained / "pre/model.safetensors", dirs, tmp_path / "pre.csv")
    fresh = {}
    for n in set(names):
        b = get_backend(BACKEND)
        model = b.load_pretrained(trained / "pre/model.safetensors")
        fresh[n] = b.evaluate(model, load_prepared(trained / "data" / n), "test")
    assert len(set(fresh.values())) == 4  # the domains really score differently
    for _, row in df.iterrows():
        assert row["test_acc"] == fresh[row["target"].rstrip("0123456789")], row["target"]


def test_split_cache_never_serves_another_dataset_under_a_reused_id(trained):
    b = get_backend(BACKEND)
    model = b.load_pretrained(trained / "pre/model.safetensors")
    mirror, rotate = load_prepared(trained / "data/mirror"), load_prepared(trained / "data/rotate")
    expected = b.evaluate(model, rotate, "val")
    b2 = get_backend(BACKEND)
    b2.evaluate(model, mirror, "val")
    # what the cache would hold had mirror been freed and rotate been allocated at its address
    (_, split), entry = next(iter(b2._tensors.items()))
    b2._tensors[(id(rotate), split)] = entry
    assert b2.evaluate(model, rotate, "val") == expected != b.evaluate(model, mirror, "val")
