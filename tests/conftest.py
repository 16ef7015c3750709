import contextlib
import copy
import fcntl
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LONG_MARKS = ("workflow", "slurm", "slow")


# The slowest modules, slowest first (measured: `make test`'s durations, seconds of one module on a
# worker of two): started first, so that the two workers do not end waiting on one long module.
SLOWEST_FIRST = [
    "test_slurm",  # mostly waiting on Slurm's status checks
    "test_workflow",  # builds tiny_study, which test_report reads
    "test_clip_workflow",
    "test_lm_workflow",
    "test_rules_hardening",
    "test_methods_workflow",
    "test_given_workflow",
    "test_benchmarks",
    "test_search_workflow",
    "test_plugins",
    "test_lm_backend",
    "test_docs",
    "test_packing",
    "test_bad_inputs",
]
# modules that only read a study another module builds (conftest.shared_study) go last, so that
# their worker does not start by waiting on the other's build
READERS_OF_SHARED_STUDIES = ["test_report"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test that is not a workflow, Slurm or slow one is a unit test (make test-fast).

    ``make test`` runs ``pytest -n 2 --dist loadfile --no-loadscope-reorder``: each module runs
    whole on one worker, so its module-scoped fixtures (a study run, trained models) run once, and
    the modules are handed out in the order set here (xdist's default reorder, by number of tests,
    would start the many quick unit modules first and leave the slow ones for the end)."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in LONG_MARKS):
            item.add_marker(pytest.mark.unit)
    rank: dict = {}
    for item in items:
        name = item.module.__name__
        if name in SLOWEST_FIRST:
            r = SLOWEST_FIRST.index(name)
        elif name in READERS_OF_SHARED_STUDIES:
            r = 10_000
        else:
            r = 1000 + (0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("workflow") else 2)
        rank[name] = min(rank.get(name, r), r)
    items[:] = sorted(items, key=lambda item: rank[item.module.__name__])


OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline_env(venv_on_path: bool = False):
    """The Hugging Face hubs set offline (and, for Snakemake jobs that call `mergemix`, this
    interpreter's bin folder on PATH), undone on exit."""
    with pytest.MonkeyPatch.context() as mp:
        for var in OFFLINE_VARS:
            mp.setenv(var, "1")
        if venv_on_path:
            mp.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        yield mp


@pytest.fixture
def default_config():
    return copy.deepcopy(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))


def tiny_config(results_dir, study="tiny", n=4, mixture=True, chunks=2, epochs=1, figure_formats=("png",)):
    """A small real study: n digits domains, 1 epoch, for workflow tests. Figures as PNG only unless
    asked (the PDF copies add a second of plotting to every analyze job; the tiny study checks both)."""
    domains = ["rotate", "noise", "mirror", "squeeze", "thin"][:n]
    return {
        "study": study,
        "results_dir": str(results_dir),
        "backend": {"name": "smallcnn", "params": {"channels": 4, "hidden": 16}},
        "pretrain": {
            "data": {"source": "digits", "domain": "clean"},
            "hparams": {"epochs": 8, "lr": 0.01, "batch_size": 32},
        },
        "split": {"seed": 0, "val": 0.2, "test": 0.3, "max_train": 150, "max_val": 80, "max_test": 120},
        "datasets": {d: {"source": "digits", "domain": d} for d in domains},
        "targets": "all",
        "finetune": {"epochs": epochs, "lr": 0.005, "batch_size": 32, "schedule": "cosine", "seed": 0},
        "merge_eval": {"chunks": chunks},
        "mixture": {"enabled": mixture, "max_candidates": 4},
        "analysis": {"figure_formats": list(figure_formats)},
    }


# The engine tests' tiny convnet on digits: one pre-trained model and a fine-tune per candidate.
DIGITS_BACKEND = {"name": "smallcnn", "params": {"channels": 4, "hidden": 16}}
DIGITS_SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "max_train": 200}
DIGITS_HP = {"epochs": 2, "lr": 0.005, "batch_size": 32, "schedule": "cosine", "seed": 0}


def train_digits(folder, candidates, pretrain_epochs: int = 8) -> dict:
    """Prepare clean, shift and ``candidates`` under ``folder/data``, pre-train on clean and fine-tune
    on each candidate (really trained, seconds on CPU); returns {candidate: model path}."""
    from mergemix import stages

    folder = Path(folder)
    for name in ["clean", "shift", *candidates]:
        stages.prepare(name, {"source": "digits", "domain": name}, DIGITS_SPLIT, folder / "data" / name)
    stages.pretrain(
        DIGITS_BACKEND,
        {"epochs": pretrain_epochs, "lr": 0.01, "batch_size": 32},
        folder / "data/clean",
        folder / "pre/model.safetensors",
    )
    models = {}
    for name in candidates:
        models[name] = str(folder / f"ft/{name}/model.safetensors")
        stages.finetune(
            DIGITS_BACKEND, DIGITS_HP, folder / "pre/model.safetensors", [folder / "data" / name], models[name]
        )
    return models


@contextlib.contextmanager
def across_workers(tmp_path_factory, name: str):
    """A folder ``name`` that every pytest-xdist worker of this session sees (the workers' common
    temporary root), held under an exclusive lock: the first worker builds what is in it, the
    others wait and reuse it (pytest-xdist's documented recipe for once-per-session fixtures)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root / name
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shared_study(tmp_path_factory, name: str, make_config):
    """One run of a study for the whole session, whichever workers its readers land on:
    ``make_config(folder)`` gives the config; returns run_study's (config, config file, results
    folder, snakemake output). A failed run leaves nothing marked done, so the next reader reruns it."""
    from test_workflow import run_study

    with across_workers(tmp_path_factory, name) as folder:
        done = folder / "snakemake.log"
        if not done.exists():
            folder.mkdir(exist_ok=True)
            cfg, path, out, log = run_study(make_config(folder), folder)
            done.write_text(log)
        cfg = yaml.safe_load(next(p for p in folder.glob("*.yaml")).read_text())
        return cfg, folder / f"{cfg['study']}.yaml", Path(cfg["results_dir"]) / cfg["study"], done.read_text()


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """One run of the tiny study (4 digits domains, every mixture), shared by every test module that
    reads it (test_workflow, test_report), on whichever worker: (config, config file, results
    folder, snakemake output). Tests must not change its files."""
    return shared_study(
        tmp_path_factory, "tiny-study", lambda folder: tiny_config(folder / "results", figure_formats=("png", "pdf"))
    )
