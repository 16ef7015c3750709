"""Packed jobs (config `pack`): one process runs several fine-tunes (or embeddings) and writes,
bit for bit, the files that one fresh process per item writes. Real smallcnn runs on tiny digits
data; the one-job-each side runs each job in a process of its own, as Snakemake would."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from mergemix import io, stages
from mergemix.config import pack_sizes, validate_config
from mergemix.settings import Split

BACKEND = {"name": "smallcnn", "params": {"channels": 4, "hidden": 16}}
SPLIT = Split.from_cli({"seed": 0, "val": 0.2, "test": 0.3, "max_train": 120, "max_val": 60, "max_test": 60})
HP = {"epochs": 2, "lr": 0.005, "batch_size": 32, "schedule": "cosine", "seed": 0}
NAMES = ["mirror", "rotate", "thin"]
# deliberately not sorted, and a mixture before the single datasets: order must not matter
PACK = ["rotate+thin+mirror", "thin", "mirror+rotate", "rotate"]


def js(obj):
    return json.dumps(obj, separators=(",", ":"))


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "mergemix", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    stages.prepare("clean", {"source": "digits", "domain": "clean"}, SPLIT, d / "data" / "clean")
    for n in NAMES:
        stages.prepare(n, {"source": "digits", "domain": n}, SPLIT, d / "data" / n)
    stages.pretrain(
        BACKEND, {"epochs": 2, "lr": 0.01, "batch_size": 32}, d / "data" / "clean", d / "pre" / "model.safetensors"
    )
    return d


def comparable(manifest: dict) -> dict:
    """A manifest without its one timing field (seconds spent training)."""
    m = json.loads(json.dumps(manifest))
    m["metrics"].pop("train_seconds")
    return m


@pytest.mark.slow
def test_finetune_pack_writes_what_one_process_per_job_writes(study, tmp_path):
    pre = study / "pre" / "model.safetensors"
    single, packed = tmp_path / "single", tmp_path / "packed"
    for sid in PACK:  # one fresh process per fine-tune, as the unpacked rules run them
        cli(
            "finetune",
            "--backend",
            js(BACKEND),
            "--hparams",
            js(HP),
            "--pretrained",
            pre,
            "--data",
            *[study / "data" / n for n in sid.split("+")],
            "--out",
            single / sid / "model.safetensors",
        )
    cli(
        "finetune-pack",
        "--backend",
        js(BACKEND),
        "--hparams",
        js(HP),
        "--pretrained",
        pre,
        "--data",
        *[f"{n}={study / 'data' / n}" for n in NAMES],
        "--subsets",
        *PACK,
        "--out",
        *[packed / sid / "model.safetensors" for sid in PACK],
    )
    for sid in PACK:
        a, b = single / sid / "model.safetensors", packed / sid / "model.safetensors"
        assert io.sha256_file(a) == io.sha256_file(b), sid
        ma, mb = io.read_json(io.manifest_path(a)), io.read_json(io.manifest_path(b))
        assert comparable(ma) == comparable(mb), sid
        assert mb["datasets"] == sorted(sid.split("+")) and mb["sha256"] == io.sha256_file(b)


def test_finetune_pack_in_process_matches_finetune_in_process(study, tmp_path):
    """The stage functions too: a pack after other work in the same process still matches."""
    pre = study / "pre" / "model.safetensors"
    data = {n: study / "data" / n for n in NAMES}
    jobs = [([data[n] for n in sid.split("+")], tmp_path / "p" / sid / "model.safetensors") for sid in reversed(PACK)]
    stages.finetune_pack(BACKEND, HP, pre, jobs)
    for sid in PACK:
        one = stages.finetune(
            BACKEND, HP, pre, [data[n] for n in sid.split("+")], tmp_path / "s" / sid / "model.safetensors"
        )
        assert one["sha256"] == io.sha256_file(tmp_path / "p" / sid / "model.safetensors"), sid


def test_embed_pack_matches_embed(study, tmp_path):
    pre = study / "pre" / "model.safetensors"
    cli(
        "embed-pack",
        "--backend",
        js(BACKEND),
        "--pretrained",
        pre,
        "--data",
        *[study / "data" / n for n in NAMES],
        "--out",
        *[tmp_path / f"p_{n}.safetensors" for n in NAMES],
    )
    for n in NAMES:
        stages.embed(BACKEND, pre, study / "data" / n, "val", tmp_path / f"s_{n}.safetensors")
        assert io.sha256_file(tmp_path / f"p_{n}.safetensors") == io.sha256_file(tmp_path / f"s_{n}.safetensors"), n


def test_pack_arguments_are_checked(study, tmp_path):
    pre = study / "pre" / "model.safetensors"
    base = ["finetune-pack", "--backend", js(BACKEND), "--hparams", js(HP), "--pretrained", str(pre)]
    cases = [
        (
            ["--data", f"thin={study / 'data' / 'thin'}", "--subsets", "thin", "rotate", "--out", str(tmp_path / "a")],
            "2 fine-tunes but --out 1",
        ),
        (
            ["--data", f"thin={study / 'data' / 'thin'}", "--subsets", "thin+rotate", "--out", str(tmp_path / "a")],
            "no --data NAME=FOLDER for rotate",
        ),
    ]
    for extra, msg in cases:
        r = subprocess.run([sys.executable, "-m", "mergemix", *base, *extra], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_pack_sizes_default_per_backend_and_config_overrides(default_config):
    cfg = validate_config(default_config)
    assert pack_sizes(cfg) == {"finetune": 16, "embed": 16}  # smallcnn: jobs of seconds
    cfg = validate_config({**default_config, "pack": {"finetune": 1}})
    assert pack_sizes(cfg) == {"finetune": 1, "embed": 16}
    from mergemix.backends.base import backend_class

    assert backend_class("clip").pack_size == backend_class("causal_lm").pack_size == 1  # fine-tunes of minutes
    for bad in (0, -1, "4", 2.5):
        with pytest.raises(ValueError, match="pack.finetune"):
            validate_config({**default_config, "pack": {"finetune": bad}})


def _same_models_both_ways(backend, hp, pretrained, dirs, tmp_path):
    """finetune_pack in one process vs finetune with a new backend per job: same model bytes."""
    jobs = [("a+b", ["a", "b"]), ("a", ["a"]), ("b+a", ["b", "a"])]
    stages.finetune_pack(
        backend,
        hp,
        pretrained,
        [([dirs[n] for n in names], tmp_path / "p" / sid / "model.safetensors") for sid, names in jobs],
    )
    for sid, names in jobs:
        one = stages.finetune(
            backend, hp, pretrained, [dirs[n] for n in names], tmp_path / "s" / sid / "model.safetensors"
        )
        assert one["sha256"] == io.sha256_file(tmp_path / "p" / sid / "model.safetensors"), sid


def test_tiny_clip_pack_matches_one_job_each(tmp_path, monkeypatch):
    """The tiny CLIP model (pack 1 by default; a study may set pack.finetune) packs bit for bit too."""
    pytest.importorskip("open_clip")
    from clip_fixtures import IMAGE_SIZE, backend_spec, write_image_folder, write_tiny_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    split = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.2, "val_cap": 20}
    backend = backend_spec(write_tiny_weights(tmp_path / "weights.pt"))
    pretrained = tmp_path / "models" / "pretrained" / "model.safetensors"
    stages.fetch_pretrained(backend, pretrained)
    dirs = {}
    for name, classes, seed in (("a", ["red", "green", "blue"], 0), ("b", ["blue", "yellow"], 5)):
        spec = {
            "source": "image_folder",
            "path": str(write_image_folder(tmp_path / f"img_{name}", classes, 8, 2, seed)),
            "image_size": IMAGE_SIZE,
        }
        stages.prepare(name, spec, split, tmp_path / "data" / name)
        dirs[name] = tmp_path / "data" / name
        stages.head(backend, pretrained, dirs[name], pretrained.parent / "heads" / f"{name}.safetensors")
    hp = {
        "epochs": 1,
        "lr": 1e-3,
        "batch_size": 8,
        "optimizer": "adamw",
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "seed": 0,
    }
    _same_models_both_ways(backend, hp, pretrained, dirs, tmp_path)


def test_tiny_causal_lm_pack_matches_one_job_each(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import lm_tiny

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    backend = {"name": "causal_lm", "params": {"model": str(lm_tiny.make_model_dir(tmp_path / "base"))}}
    pretrained = tmp_path / "pre" / "model.safetensors"
    stages.fetch_pretrained(backend, pretrained)
    split = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.25, "val_cap": 100}
    dirs = {}
    for name, pairs in (("a", lm_tiny.copying(12)), ("b", lm_tiny.reversal(12))):
        path = lm_tiny.write_jsonl(tmp_path / f"{name}.jsonl", [lm_tiny.chat(q, a) for q, a in pairs])
        stages.prepare(name, {"source": "jsonl_chat", "path": str(path)}, split, tmp_path / "data" / name)
        dirs[name] = tmp_path / "data" / name
    _same_models_both_ways(backend, {"epochs": 1, "lr": 0.01, "batch_size": 4, "seed": 0}, pretrained, dirs, tmp_path)
