"""``mergemix select`` end to end on given checkpoints, nothing trained by mergemix: the "fine-tuned"
models are the tiny pre-trained weights moved a little, written by the libraries' own ``save_pretrained``
(transformers ``CLIPVisionModel`` folders for the clip backend; peft IA3 and LoRA adapter folders for
causal_lm). Checks the ranking of all 7 subsets (selection rule, ties), the imported models' manifests,
agreement with the merge-eval stage run on the imported models, the CLI, and a refusal that writes nothing."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_given_clip import hf_vision_config, write_hf  # noqa: E402
from test_given_lm import LORA, user_adapter  # noqa: E402

import lm_tiny  # noqa: E402
from clip_fixtures import IMAGE_SIZE, TINY_NAME, backend_spec, write_image_folder, write_tiny_weights  # noqa: E402
from conftest import offline_env  # noqa: E402
from lm_tiny import base_dir  # noqa: E402,F401 (shared fixture)
from mergemix import io, stages  # noqa: E402
from mergemix.analysis import rankings  # noqa: E402
from mergemix.backends import get_backend  # noqa: E402
from mergemix.given import GivenModelError, import_model  # noqa: E402
from mergemix.given.select import select  # noqa: E402
from mergemix.settings import Merge  # noqa: E402
from mergemix.subsets import all_subsets, subset_id  # noqa: E402
from mergemix.tables import read_result_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIP_SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.3, "val_cap": 50}
LM_SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.25, "val_cap": 100}
NAMES = ("a", "b", "c")
ALL_SUBSETS = sorted(subset_id(s) for s in all_subsets(list(NAMES)))


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with offline_env():
        yield


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_hashes(folder):
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def perturbed(state, seed, rel):
    """Each tensor moved by ``rel`` times its own spread (a stand-in for a few steps of fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        scale = float(v.std()) if v.numel() > 1 and float(v.std()) > 0 else float(v.abs().mean()) + 1e-3
        out[k] = (v + rel * scale * torch.randn(v.shape, generator=g)).contiguous()
    return out


def assert_ranking(table, raw, target):
    """7 subsets ranked 1..7 by the selection rule: highest val_acc, then fewer datasets, then the id."""
    assert list(table.columns) == ["target", "rank", "search", "subset", "size", "val_acc", "test_acc"]
    assert list(table["rank"]) == list(range(1, 8)) and set(table["target"]) == {target}
    assert sorted(table["subset"]) == ALL_SUBSETS and (table["search"] == "exhaustive").all()
    assert table["size"].tolist() == [s.count("+") + 1 for s in table["subset"]]
    assert table.iloc[0]["val_acc"] == table["val_acc"].max()
    keys = [(-round(v, 12), n, s) for v, n, s in zip(table["val_acc"], table["size"], table["subset"])]
    assert keys == sorted(keys)  # ties: the smaller subset, then the first id
    assert table.iloc[0]["subset"] == stages.select_best(raw)["subset"]
    assert table[["val_acc", "test_acc"]].stack().between(0, 1).all()


def assert_same_numbers(a, b):
    cols = ["subset", "size", "val_acc", "test_acc"]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True), check_exact=True)


# --- clip: transformers CLIPVisionModel folders ------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("select_clip")
    spec = backend_spec(write_tiny_weights(tmp / "weights" / "tiny.pt"))
    pre = tmp / "pretrained" / "model.safetensors"
    stages.fetch_pretrained(spec, pre)
    images = write_image_folder(tmp / "images", ["red", "green", "blue"], 14, 8, seed=3)
    target = tmp / "data" / "colours"
    stages.prepare(
        "colours", {"source": "image_folder", "path": str(images), "image_size": IMAGE_SIZE}, CLIP_SPLIT, target
    )
    backend = get_backend(spec)
    ref = {k: v.detach().clone() for k, v in backend.merge_params(backend.load_pretrained(pre)).items()}
    visuals, folders = {}, {}
    for i, name in enumerate(NAMES):
        # a CLIPVisionModel has no projection: fine-tuning it leaves the pre-trained one
        visuals[name] = {**perturbed(ref, seed=i + 1, rel=0.15 + 0.1 * i), "visual.proj": ref["visual.proj"]}
        folders[name], _ = write_hf(tmp / "given" / name, visuals[name], "tiny")
    return {"tmp": tmp, "spec": spec, "pre": pre, "target": target, "ref": ref, "visuals": visuals, "folders": folders}


def test_clip_select_from_transformers_folders(clip_study, tmp_path):
    s = clip_study
    head = s["pre"].parent / "heads" / "colours.safetensors"
    assert not head.exists()
    out = tmp_path / "ranking.csv"
    table = select(s["spec"], s["pre"], {n: str(f) for n, f in s["folders"].items()}, s["target"], out)
    assert head.is_file()  # the target's zero-shot head, written beside the pre-trained model
    work = tmp_path / "ranking.work"
    raw = read_result_table(work / "merge_eval.colours.csv", "merge_eval")
    assert_ranking(table, raw, "colours")
    assert_same_numbers(pd.read_csv(out), table)
    assert table["val_acc"].nunique() > 1  # the candidates really differ on the target

    pre_sha = io.read_json(io.manifest_path(s["pre"]))["sha256"]
    paths = {}
    for name, folder in s["folders"].items():
        paths[name] = work / "models" / name / "model.safetensors"
        state, manifest = io.load_model(paths[name])
        assert set(state) == set(s["visuals"][name])
        assert all(torch.equal(state[k], v) for k, v in s["visuals"][name].items())  # converted exactly
        g = manifest["given"]
        assert g["format"] == "clip_hf" and g["source"] == str(folder.resolve()) and g["proj_from_pretrained"]
        assert g["files"] == folder_hashes(folder) and {"config.json", "model.safetensors"} <= set(g["files"])
        assert 0.1 < g["relative_distance"] < 0.5
        assert manifest["hyperparameters"] == {"given": True} and manifest["data"] == [{"name": name, "sha256": None}]
        assert manifest["pretrained_sha256"] == pre_sha

    # the merge-eval stage on the imported models gives the same numbers, ranked the same
    # (as the workflow reads it: from the stage's CSV, 10 significant digits)
    stages.merge_eval(
        s["spec"],
        Merge("uniform", {}),
        s["pre"],
        {n: str(p) for n, p in paths.items()},
        s["target"],
        0,
        1,
        tmp_path / "direct.csv",
    )
    assert_same_numbers(rankings({"colours": read_result_table(tmp_path / "direct.csv", "merge_eval")}), table)
    # a one-model subset is that model itself: the backend's own evaluation of the imported weights
    backend = get_backend(s["spec"])
    model = backend.load_pretrained(s["pre"])
    backend.load_state(model, io.load_model(paths["b"])[0])
    from mergemix.data.prepared import load_prepared

    acc = backend.evaluate(model, load_prepared(s["target"]), "val")
    assert table.set_index("subset").loc["b", "val_acc"] == pytest.approx(acc, abs=1e-9)  # CSV: 10 digits


@pytest.mark.parametrize("kind", ["patch_size", "other_init"])
def test_clip_select_refuses_a_model_of_another_base(clip_study, tmp_path, kind):
    s = clip_study
    folder = tmp_path / "other"
    if kind == "patch_size":  # another architecture: 4 px patches (positional embedding of 17, not 5)
        torch.manual_seed(7)
        transformers.CLIPVisionModel(hf_vision_config("tiny", patch_size=4)).save_pretrained(folder)
    else:  # the same architecture from another pre-training run (a fresh random init)
        torch.manual_seed(7)
        transformers.CLIPVisionModel(hf_vision_config("tiny")).save_pretrained(folder)
    models = {"a": str(s["folders"]["a"]), "b": str(s["folders"]["b"]), "other": str(folder)}
    out = tmp_path / "ranking.csv"
    with pytest.raises(GivenModelError) as e:
        select(s["spec"], s["pre"], models, s["target"], out)
    msg = str(e.value)
    if kind == "patch_size":
        assert "patch_size 4 but the study's" in msg and TINY_NAME in msg and "has 8" in msg, msg
    else:
        dist = float(re.search(r"is (\d+\.\d+) away", msg).group(1))
        assert dist > 0.5 and "fine-tunes are within 0.5" in msg and "derives from another base" in msg, msg
        assert "models.other" in msg
    assert not out.exists()
    assert not (tmp_path / "ranking.work" / "models" / "other").exists()
    assert not list((tmp_path / "ranking.work").glob("merge_eval.*.csv"))


# --- causal_lm: peft adapter folders --------------------------------------------------------------------
def lm_spec(base, **params):
    return {"name": "causal_lm", "params": {"model": str(base), "eval_batch_size": 8, **params}}


def lm_setup(base, tmp, params):
    """Three users' adapters (peft's save_pretrained, moved from their init as training would) and a
    target whose references are adapter ``a``'s own completions."""
    folders = {}
    for i, name in enumerate(NAMES):
        folders[name] = tmp / "given" / name
        user_adapter(base, folders[name], seed=100 + i, **params)
    spec = lm_spec(base, **params)
    pre = tmp / "pretrained" / "model.safetensors"
    stages.fetch_pretrained(spec, pre)
    scratch = tmp / "scratch" / "model.safetensors"
    import_model(spec, pre, {"path": str(folders["a"])}, "a", scratch)
    backend = get_backend(spec, threads=1, device="cpu")
    model = backend.load_pretrained(pre)
    backend.load_state(model, io.load_model(scratch)[0])
    lm_tiny.adapter_target(backend, model, tmp / "target", LM_SPLIT)
    return spec, pre, folders, tmp / "target" / "data"


def check_lm_selection(spec, pre, folders, target, out, peft_type):
    table = select(spec, pre, {n: str(f) for n, f in folders.items()}, target, out)
    work = out.parent / f"{out.stem}.work"
    raw = read_result_table(work / "merge_eval.skill.csv", "merge_eval")
    assert_ranking(table, raw, "skill")
    assert_same_numbers(pd.read_csv(out), table)
    # the target is adapter a's own greedy completions: a alone scores 1 and is chosen
    assert table.set_index("subset").loc["a", "val_acc"] == 1.0 and table.iloc[0]["subset"] == "a"
    assert table["val_acc"].nunique() > 1
    paths = {}
    for name, folder in folders.items():
        paths[name] = str(work / "models" / name / "model.safetensors")
        g = io.read_json(io.manifest_path(paths[name]))["given"]
        assert g["format"] == "peft" and g["peft_type"] == peft_type and g["source"] == str(folder.resolve())
        assert g["files"] == folder_hashes(folder) and "adapter_model.safetensors" in g["files"]
    stages.merge_eval(spec, Merge("uniform", {}), pre, paths, target, 0, 1, out.parent / "direct.csv")
    assert_same_numbers(rankings({"skill": read_result_table(out.parent / "direct.csv", "merge_eval")}), table)
    return table


@pytest.mark.slow
def test_lm_select_ia3_adapters_and_the_cli(base_dir, tmp_path):  # noqa: F811
    spec, pre, folders, target = lm_setup(base_dir, tmp_path, {})
    table = check_lm_selection(spec, pre, folders, target, tmp_path / "ranking.csv", "IA3")

    # the command line: same models, same numbers, the table printed; --pretrained a new folder, which
    # the backend's pre-trained model is fetched into
    out = tmp_path / "cli" / "ranking.csv"
    fresh = tmp_path / "cli" / "pretrained"
    cmd = [
        sys.executable,
        "-m",
        "mergemix",
        "select",
        "--backend",
        json.dumps(spec),
        "--pretrained",
        str(fresh),
        "--models",
        *(f"{n}={f}" for n, f in folders.items()),
        "--target",
        str(target),
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["target", "rank", "search", "subset", "size", "val_acc", "test_acc"]
    assert lines[1].split()[:4] == ["skill", "1", "exhaustive", "a"]
    assert f"7 subsets ranked on val; chosen: a -> {out}" in r.stdout
    assert_same_numbers(pd.read_csv(out), table)
    assert sha256(fresh / "model.safetensors") == sha256(pre)


def test_lm_select_never_overwrites_the_base_models_weights(base_dir, tmp_path):  # noqa: F811
    """--pretrained naming the transformers base model (its folder or its weights file), not a mergemix
    model: refused before anything is written, the base model's files left as they were."""
    before = folder_hashes(base_dir)
    for given in (base_dir / "model.safetensors", base_dir):
        with pytest.raises(
            ValueError,
            match=r"model.safetensors is not a mergemix model \(no model.json beside it\) "
            r"and is not overwritten",
        ):
            select(lm_spec(base_dir), given, {"a": str(tmp_path / "a")}, tmp_path / "target", tmp_path / "r.csv")
    assert folder_hashes(base_dir) == before and not (tmp_path / "r.csv").exists()


def test_lm_select_lora_adapters(base_dir, tmp_path):  # noqa: F811
    spec, pre, folders, target = lm_setup(base_dir, tmp_path, LORA)
    check_lm_selection(spec, pre, folders, target, tmp_path / "ranking.csv", "LORA")
