import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, tiny_config
from mergemix.config import ConfigError, candidates_of, targets_of, validate_config


def test_default_config_is_valid_and_leave_one_out(default_config):
    cfg = validate_config(default_config)
    targets = targets_of(cfg)
    # six true-label domains are targets; relabel (labels shifted) is a candidate only
    assert len(cfg["datasets"]) == 7 and len(targets) == 6 and "relabel" not in targets
    for t in targets:
        assert candidates_of(cfg, t) == sorted(set(cfg["datasets"]) - {t})
    assert cfg["finetune"]["optimizer"] == "adamw"  # default filled in


def _error(cfg):
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    return str(e.value)


def test_unknown_dataset_as_target(default_config):
    default_config["targets"] = ["rotate", "cifar"]
    msg = _error(default_config)
    assert "targets" in msg and "'cifar'" in msg and "rotate" in msg  # names the allowed ones


def test_unknown_dataset_source_and_domain(default_config):
    default_config["datasets"]["x"] = {"source": "imagenet"}
    default_config["datasets"]["rotate"]["domain"] = "sheared"
    msg = _error(default_config)
    assert "datasets.x.source" in msg and "digits" in msg
    assert "datasets.rotate.domain" in msg and "'sheared'" in msg and "mirror" in msg


def test_target_among_its_own_candidates(default_config):
    default_config["candidates"] = {"rotate": ["rotate", "noise"]}
    msg = _error(default_config)
    assert "candidates.rotate" in msg and "own candidates" in msg


def test_too_many_candidates_for_exhaustive_search(default_config):
    default_config["merge_eval"]["max_candidates"] = 5
    msg = _error(default_config)
    assert "merge_eval.max_candidates=5" in msg and "63 merged models" in msg


def test_too_many_candidates_for_mixture_fine_tunes(default_config):
    default_config["mixture"]["max_candidates"] = 4
    msg = _error(default_config)
    assert "mixture.max_candidates=4" in msg and "mixture.enabled: false" in msg


def test_missing_key(default_config):
    del default_config["finetune"]["lr"]
    msg = _error(default_config)
    assert "finetune" in msg and "'lr' is a required property" in msg


def test_mistyped_value_and_misspelled_key(default_config):
    default_config["finetune"]["epochs"] = "five"
    default_config["merge_eval"]["chunk"] = 2
    msg = _error(default_config)
    assert "finetune.epochs: expected integer, got str 'five'" in msg
    assert "merge_eval" in msg and "'chunk' was unexpected" in msg and "chunks" in msg


def test_unknown_backend_param(default_config):
    default_config["backend"]["params"]["width"] = 3
    assert "backend.params" in _error(default_config)


@pytest.mark.workflow
def test_snakemake_refuses_a_bad_config_at_start(tmp_path):
    cfg = tiny_config(tmp_path / "results")
    cfg["candidates"] = {"rotate": ["rotate", "noise"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "candidates.rotate" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "merge_eval, expected",
    [
        ({"strategy": "annealing"}, ["merge_eval.strategy", "'annealing'", "surrogate"]),
        ({"strategy": "beam", "budget": 0}, ["merge_eval.budget", "0", "fraction"]),
        ({"strategy": "beam", "budget": -0.5}, ["merge_eval.budget", "-0.5"]),
        ({"strategy": "beam", "budget": 1.5}, ["merge_eval.budget", "1.5"]),
        ({"strategy": "greedy", "workers": 2}, ["merge_eval.workers", "optuna", "'greedy'"]),
        ({"workers": 3}, ["merge_eval.workers", "optuna"]),
        ({"strategy": "beam", "strategy_options": {"width": 0}}, ["merge_eval.strategy_options.width", "integer >= 1"]),
        ({"strategy": "beam", "strategy_options": {"depth": 2}}, ["merge_eval.strategy_options.depth", "width"]),
        ({"strategy_options": {"width": 2}}, ["merge_eval.strategy_options", "named strategy"]),
        ({"strategy": "exhaustive", "budget": 10}, ["merge_eval.budget", "exhaustive", "63"]),
        # merge methods and their options (declared per method module, mergemix.merge_methods)
        ({"method": "slerp"}, ["merge_eval.method", "'slerp'", "ties", "dare"]),
        ({"method": "ties", "options": {"density": 1.5}}, ["merge_eval.options.density", "1.5"]),
        ({"method": "dare", "options": {"drop": 0.5}}, ["merge_eval.options.drop", "density", "seed"]),
        ({"methods": ["uniform", "tie"]}, ["merge_eval.methods", "'tie'", "ties"]),
        ({"methods": ["ties", "ties"]}, ["merge_eval.methods", "twice"]),
        ({"methods": ["ties"], "strategy": "greedy"}, ["merge_eval.methods", "exhaustive"]),
        (
            {"methods": ["ties"], "method_options": {"dare": {"p": 0.2}}},
            ["merge_eval.method_options.dare", "not in merge_eval.methods"],
        ),
        (
            {"methods": ["ties"], "method_options": {"ties": {"density": 2}}},
            ["merge_eval.method_options.ties.density", "(0, 1]"],
        ),
        (
            {"methods": ["ties"], "tune": {"space": {"dare": {"p": [0, 0.5]}}}},
            ["merge_eval.tune.space.dare", "not in merge_eval.methods"],
        ),
        (
            {"methods": ["ties"], "tune": {"space": {"ties": {"density": [0, 0.5]}}}},
            ["merge_eval.tune.space.ties.density", "0"],
        ),
        (
            {"methods": ["ties"], "tune": {"space": {"ties": {"density": [0.1, 0.5]}}, "budget": 0}},
            ["merge_eval.tune.budget"],
        ),
        ({"methods": ["ties"], "tune": {"spaces": {}}}, ["merge_eval.tune", "spaces"]),
        # weighted mixtures
        ({"strategy": "weights", "weights": {"sampler": "nelder"}}, ["merge_eval.weights.sampler", "cmaes, tpe"]),
        ({"strategy": "weights", "weights": {"budget": 0}}, ["merge_eval.weights.budget", ">= 1"]),
        ({"strategy": "weights", "weights": {"sampling": "tpe"}}, ["merge_eval.weights", "sampling"]),
        ({"weights": {"budget": 10}}, ["merge_eval.weights", "strategy: weights"]),
    ],
)
def test_bad_search_settings_are_refused_with_the_key_named(default_config, merge_eval, expected):
    default_config["merge_eval"] = {**default_config["merge_eval"], **merge_eval}
    msg = _error(default_config)
    for part in expected:
        assert part in msg, (part, msg)


def test_search_strategy_auto_and_budgets(default_config):
    from mergemix.config import resolve_strategy

    cfg = validate_config(default_config)
    assert resolve_strategy(cfg, 6) == "exhaustive"  # 63 subsets fit the default budget of 1023
    assert resolve_strategy(cfg, 12) == "surrogate"
    default_config["merge_eval"]["budget"] = 0.1
    cfg = validate_config(default_config)
    assert resolve_strategy(cfg, 6) == "surrogate"  # 0.1 x 63 = 7 evaluations: not exhaustive


def test_too_many_mixtures_point_at_the_sample(default_config):
    default_config["mixture"]["max_candidates"] = 4
    assert "mixture.sample" in _error(default_config)
    default_config["mixture"]["sample"] = {"size": 10}
    assert validate_config(default_config)["mixture"]["sample"] == {"size": 10, "seed": 0}


def test_methods_and_weights_are_accepted(default_config):
    default_config["merge_eval"] = {
        **default_config["merge_eval"],
        "strategy": "weights",
        "weights": {"sampler": "tpe"},
        "methods": ["uniform", "ties", "dare"],
        "method": "ties",
        "options": {"density": 0.5},
        "method_options": {"dare": {"seed": 2}},
        "tune": {"space": {"ties": {"density": [0.05, 1.0]}, "dare": {"p": [0.0, 0.9]}}},
    }
    cfg = validate_config(default_config)
    from mergemix.config import resolve_strategy

    assert resolve_strategy(cfg, 6) == "exhaustive"  # the binary start of weights is searched as with auto


@pytest.mark.parametrize(
    "spec,key_fix",
    [
        (
            {"source": "jsonl_chat", "path": "nowhere/chats.jsonl"},
            "datasets.mine.path: nowhere/chats.jsonl (no such file)",
        ),
        ({"source": "image_folder", "path": "nowhere/images"}, "datasets.mine.path: nowhere/images (no such file)"),
    ],
)
def test_missing_local_inputs_are_refused_before_any_job(default_config, spec, key_fix, tmp_path):
    default_config["datasets"]["mine"] = spec
    assert key_fix in _error(default_config)
    # a file where a folder is expected is named too
    if spec["source"] == "image_folder":
        f = tmp_path / "file.txt"
        f.write_text("x")
        default_config["datasets"]["mine"] = {**spec, "path": str(f)}
        assert "(not a folder)" in _error(default_config)


@pytest.mark.slow
def test_missing_local_inputs_stop_the_dag_build(default_config, tmp_path):
    import subprocess
    import sys

    default_config["datasets"]["mine"] = {"source": "jsonl_chat", "path": str(tmp_path / "gone.jsonl")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(default_config))
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and f"datasets.mine.path: {tmp_path / 'gone.jsonl'} (no such file)" in r.stdout + r.stderr


@pytest.mark.slow
def test_checkpoint_settings_reach_every_fine_tune_job(default_config, tmp_path):
    assert validate_config(dict(default_config))["checkpoint"] == {"every_minutes": 10, "every_steps": None}
    default_config["checkpoint"] = {"every_minutes": 2.5, "every_steps": 50}
    default_config["merge_eval"] = {**default_config["merge_eval"], "strategy": "weights"}  # weighted fine-tunes too
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**default_config, "results_dir": str(tmp_path / "r")}))
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--configfile", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    cmds = [
        line
        for line in r.stdout.splitlines()
        if " -m mergemix " in line and "finetune" in line.split(" -m mergemix ")[1][:24]
    ]
    assert cmds and all("--checkpoint-every-seconds 150 --checkpoint-every-steps 50" in c for c in cmds)
    assert any(" weighted-finetune " in c for c in cmds)


def test_schema_defaults_are_the_one_source(default_config):
    from mergemix.config import schema_defaults

    no_split = {k: v for k, v in default_config.items() if k != "split"}
    assert validate_config(no_split)["split"] == schema_defaults("split")
    tune = schema_defaults("merge_eval.tune")
    assert tune == {"space": {}, "budget": 12, "seed": 0, "n_startup_trials": 4}
    assert validate_config({**default_config, "merge_eval": {"tune": {}}})["merge_eval"]["tune"] == tune
    assert schema_defaults("checkpoint") == validate_config(default_config)["checkpoint"]
