"""Typed settings: built from a validated config, frozen, and with exactly the schema's keys; the
stages' JSON arguments read as sections, with the schema's defaults."""

import dataclasses
import json

import pytest

from mergemix.config import DEFAULT_SCHEMA, ConfigError, load_yaml, schema_defaults, validate_config
from mergemix.settings import (
    SECTIONS,
    SUBSECTIONS,
    Analysis,
    Checkpoint,
    Eval,
    Final,
    HParams,
    Merge,
    MergeEval,
    PretrainHParams,
    Search,
    Split,
    Study,
    Tune,
    Tuner,
    WeightedHParams,
    Weights,
    WeightsSearch,
)

# whole sections: exactly the schema section's keys
WHOLE = [Split, HParams, PretrainHParams, MergeEval, Tune, Weights, Checkpoint, Final, Analysis]


def schema_section(path: str) -> dict:
    schema = load_yaml(DEFAULT_SCHEMA)
    node = schema
    for key in path.split("."):
        node = node["properties"][key]
        if "$ref" in node:  # finetune, pretrain.hparams: the hparams definition
            node = schema["definitions"][node["$ref"].removeprefix("#/definitions/")]
    return node


def schema_props(path: str) -> dict:
    return schema_section(path)["properties"]


def schema_keys(cls) -> set:
    return {cls.KEYS.get(f.name, f.name) for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_each_section_is_keys_of_its_schema_section_with_their_defaults_there(cls):
    props = schema_props(cls.SCHEMA)
    assert schema_keys(cls) <= set(props)
    if cls in WHOLE:
        assert schema_keys(cls) == set(props)
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls))  # defaults only in the schema
    # so every key may be left out of a stage's JSON, but for the ones the schema requires (finetune.lr)
    required = set(schema_section(cls.SCHEMA).get("required", []))
    assert all("default" in props[k] or k in required for k in schema_keys(cls))
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_the_stage_sections_are_the_parts_of_their_section():
    assert {f.name for f in dataclasses.fields(Eval)} == {"eval_batch_size", "precision"}
    assert {f.name for f in dataclasses.fields(Merge)} == {"method", "options"}
    assert schema_keys(Search) == {"strategy", "budget", "seed", "strategy_options"}
    assert schema_keys(Tuner) == set(schema_props("merge_eval.tune")) - {"space"}
    assert schema_keys(WeightsSearch) == set(schema_props("merge_eval.weights")) - {"check_samples"}


def test_built_from_a_validated_config_and_frozen(default_config):
    cfg = validate_config(default_config)
    s = Study.from_config(cfg)
    assert s.split.to_dict() == cfg["split"] and s.merge_eval.tune.to_dict() == cfg["merge_eval"]["tune"]
    assert s.merge_eval.weights.to_dict() == cfg["merge_eval"]["weights"] == schema_defaults("merge_eval.weights")
    assert s.analysis.to_dict() == cfg["analysis"]
    assert s.checkpoint.every_seconds == cfg["checkpoint"]["every_minutes"] * 60
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.split.seed = 3
    assert isinstance(s.merge_eval.methods, tuple)
    assert (Study, "merge_eval") in SUBSECTIONS


def test_an_unvalidated_section_is_refused(default_config):
    with pytest.raises(ValueError, match="split: not a validated section"):
        Study.from_config({**validate_config(default_config), "split": {"seed": 0}})


def test_the_parts_a_rule_passes_are_the_slices_it_passed_before(default_config):
    """The rules' params (sorted JSON) are unchanged for an unchanged config: no needless reruns."""
    default_config["merge_eval"].update(budget=None, strategy_options={}, eval_batch_size=64)
    cfg = validate_config(default_config)
    me, s = cfg["merge_eval"], Study.from_config(cfg).merge_eval
    assert s.eval().to_dict() == {k: me[k] for k in ("eval_batch_size", "precision")}
    assert s.merge().to_dict() == {k: me[k] for k in ("method", "options")}
    assert s.tune.tuner().to_dict() == {k: v for k, v in me["tune"].items() if k != "space"}
    assert s.weights.search().to_dict() == {k: v for k, v in me["weights"].items() if k != "check_samples"}
    search = s.search().resolved(4).to_dict()
    assert search == {"strategy": "exhaustive", "budget": 1023, "seed": me["seed"], "options": {}}
    assert Search.coerce(search).resolved(4).to_dict() == search  # a resolved search is its own resolution
    assert s.merge("ties").to_dict() == {"method": "ties", "options": {}}


def test_a_stage_argument_takes_the_schema_defaults_for_missing_keys():
    assert Eval.from_cli({}) == Eval(None, schema_defaults("merge_eval")["precision"])
    assert Eval.from_cli({"precision": "bf16"}).precision == "bf16"
    split = Split.from_cli({"seed": 4, "max_train": 100})
    assert split.to_dict() == {**schema_defaults("split"), "seed": 4, "max_train": 100}
    search = Search.from_cli({"strategy": "greedy"})
    assert (search.budget, search.seed, search.options) == (None, 0, {})
    assert search.resolved(5).budget == 1023  # null: 1023 merged evaluations, as in a study
    assert Search.from_cli({}).resolved(12).strategy == "surrogate"  # auto: the budgeted strategy past 1023
    assert Weights.from_cli(None).to_dict() == schema_defaults("merge_eval.weights")
    assert Tuner.from_cli({"budget": 3}).n_startup_trials == schema_defaults("merge_eval.tune")["n_startup_trials"]


@pytest.mark.parametrize(
    "cls,data,expected",
    [
        (Eval, {"precision": "fp32", "batch": 8}, ["--x: merge_eval: unknown key 'batch'", "eval_batch_size"]),
        (Search, {"strategy_options": {}}, ["unknown key 'strategy_options'", "options"]),  # the JSON says options
        (WeightsSearch, {"check_samples": 2}, ["unknown key 'check_samples'"]),
        (Eval, {"precision": "fp16"}, ["merge_eval.precision", "auto, fp32, bf16"]),
        (Split, {"val": 1.5}, ["split.val", "< 1"]),
        (Search, {"budget": 0}, ["merge_eval.budget", "not a budget"]),
        (Weights, {"sampler": "nelder"}, ["merge_eval.weights.sampler", "cmaes, tpe"]),
        (Tuner, {"seed": "1"}, ["merge_eval.tune.seed"]),
        (Merge, ["uniform"], ["expected a JSON object"]),
    ],
)
def test_a_bad_stage_argument_is_refused_naming_the_key(cls, data, expected):
    with pytest.raises(ConfigError) as e:
        cls.from_cli(data, "--x")
    for part in expected:
        assert part in str(e.value), (part, str(e.value))


def test_a_stage_takes_a_section_a_mapping_or_none_and_nothing_else():
    merge = Merge("ties", {"density": 0.3})
    assert Merge.coerce(merge) is merge
    assert Merge.coerce({"method": "ties"}) == Merge("ties", {})
    assert Eval.coerce(None) == Eval.from_cli({})
    with pytest.raises(TypeError, match="expected mergemix.settings.Eval"):
        Eval.coerce(Merge.from_cli({}))  # a section of another kind
    with pytest.raises(TypeError, match="expected mergemix.settings.Split"):
        Split.coerce(json.dumps({"seed": 0}))  # JSON text: parse it first
    with pytest.raises(ConfigError, match="unknown key 'seeds'"):
        Split.coerce({"seeds": 0})


# --- the stages' command lines --------------------------------------------------------------------


def test_the_cli_fills_a_stage_argument_with_the_schema_defaults(tmp_path):
    from mergemix import io
    from mergemix.cli import main

    spec = json.dumps({"source": "digits", "domain": "rotate"})
    argv = ["prepare", "--name", "rotate", "--spec", spec, "--split", json.dumps({"seed": 1, "max_train": 50})]
    assert main([*argv, "--out", str(tmp_path / "d")]) == 0
    recorded = io.read_json(tmp_path / "d" / "splits.json")
    assert recorded["split"] == {**schema_defaults("split"), "seed": 1, "max_train": 50}
    assert recorded["sizes"]["train"] == 50


# each stage's required arguments (dummies: its JSON is read before anything else is)
STAGE_ARGS = {
    "prepare": {"--name": "x", "--spec": "{}", "--split": "{}", "--out": "o"},
    "merge-eval": {"--backend": "{}", "--merge": "{}", "--pretrained": "p", "--models": "a=m", "--target": "t"},
    "search": {"--backend": "{}", "--merge": "{}", "--search": "{}", "--pretrained": "p", "--models": "a=m"},
    "tune-method": {"--backend": "{}", "--method": "ties", "--space": "{}", "--search": "{}", "--pretrained": "p"},
    "weights-search": {"--backend": "{}", "--weights": "{}", "--pretrained": "p", "--models": "a=m"},
    "analyze": {"--targets": "{}", "--pretrained-csv": "p", "--merge-eval": "t=m", "--similarity": "t=s"},
    "select": {"--backend": "{}", "--pretrained": "p", "--models": "a=m", "--target": "t", "--out": "o"},
}
MORE = {  # the other required arguments, the same for every stage that takes them
    "--target": "t",
    "--models": "a=m",
    "--out": "o",
    "--summary": "s",
    "--out-csv": "c",
    "--merge-eval": "me.csv",
    "--out-dir": "o",
}
TAKES = {
    "merge-eval": ["--out"],
    "search": ["--target", "--out", "--summary"],
    "tune-method": ["--models", "--target", "--out", "--out-csv"],
    "weights-search": ["--target", "--merge-eval", "--out", "--out-csv"],
    "analyze": ["--out-dir"],
}


@pytest.mark.parametrize(
    "stage,flag,value,key",
    [
        ("prepare", "--split", {"seed": 0, "val_fraction": 0.2}, "val_fraction"),
        ("merge-eval", "--merge", {"method": "ties", "option": {}}, "option"),
        ("merge-eval", "--eval", {"batch_size": 8}, "batch_size"),
        ("search", "--search", {"strategy": "greedy", "strategy_options": {}}, "strategy_options"),
        ("search", "--eval", {"precison": "bf16"}, "precison"),
        ("tune-method", "--tune", {"space": {}}, "space"),
        ("weights-search", "--weights", {"check_samples": 4}, "check_samples"),
        ("analyze", "--options", {"logit_epsilon": 0.01}, "logit_epsilon"),
        ("select", "--split", {"seeds": 1}, "seeds"),
    ],
)
def test_the_cli_refuses_an_unknown_key_naming_it(stage, flag, value, key, capsys):
    from mergemix.cli import main

    args = {**STAGE_ARGS[stage], **{k: MORE[k] for k in TAKES.get(stage, [])}, flag: json.dumps(value)}
    assert main([stage, *(x for kv in args.items() for x in kv)]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: " in err and f"unknown key {key!r}" in err, err


def test_a_stage_called_with_a_bad_mapping_fails_before_any_work(tmp_path):
    from mergemix import stages

    with pytest.raises(ConfigError, match="unknown key 'optoins'"):
        stages.merge_eval({}, {"method": "uniform", "optoins": {}}, "p", {"a": "m"}, tmp_path, 0, 1, tmp_path / "o.csv")
    with pytest.raises(TypeError, match="expected mergemix.settings.Search"):
        stages.search({}, Merge.from_cli({}), Eval.from_cli({}), "p", {"a": "m"}, tmp_path, "o.csv", "o.json")


# --- training hyperparameters ---------------------------------------------------------------------

HP = {"epochs": 2, "lr": 0.01, "batch_size": 8}


def test_hparams_are_the_schemas_hparams_definition_for_finetune_and_pretrain():
    hparams = load_yaml(DEFAULT_SCHEMA)["definitions"]["hparams"]
    assert {f.name for f in dataclasses.fields(HParams)} == set(hparams["properties"])
    assert schema_props("finetune") == schema_props("pretrain.hparams") == hparams["properties"]
    assert {f.name for f in dataclasses.fields(PretrainHParams)} == {f.name for f in dataclasses.fields(HParams)}
    # no default in the schema: the keys a stage's --hparams must give
    assert set(hparams["required"]) == {k for k, v in hparams["properties"].items() if "default" not in v}
    assert set(hparams["required"]) == {"epochs", "lr", "batch_size"}
    assert schema_defaults("finetune") == {k: v["default"] for k, v in hparams["properties"].items() if "default" in v}


def test_hparams_take_the_schema_defaults_and_record_what_the_config_holds(default_config):
    hp = HParams.from_cli(HP, "--hparams")
    assert hp.to_dict() == {**schema_defaults("finetune"), **HP}
    assert (hp.optimizer, hp.schedule, hp.weight_decay, hp.grad_clip) == ("adamw", "constant", 0.0, None)
    cfg = validate_config(default_config)
    study = Study.from_config(cfg)
    # what the rules pass (--hparams) and the manifests record: the validated section, unchanged
    assert study.finetune.to_dict() == cfg["finetune"] and isinstance(study.finetune, HParams)
    assert HParams.from_cli(cfg["finetune"]) == study.finetune
    assert PretrainHParams.from_cli(HP).to_dict() == hp.to_dict()
    assert HParams.coerce(HP) == hp and HParams.coerce(hp) is hp
    weighted = hp.weighted({"a": 0.25, "b": 0.75})
    assert isinstance(weighted, WeightedHParams) and weighted.mixture_weights == {"a": 0.25, "b": 0.75}
    assert weighted.to_dict() == {**hp.to_dict(), "mixture_weights": {"a": 0.25, "b": 0.75}}
    assert HParams.coerce({**HP, "mixture_weights": {"a": 0.25, "b": 0.75}}) == weighted
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.lr = 0.1


@pytest.mark.parametrize(
    "cls,data,expected",
    [
        (HParams, {**HP, "learning_rate": 0.1}, ["--x: finetune: unknown key 'learning_rate'", "weight_decay"]),
        (PretrainHParams, {**HP, "wd": 0.1}, ["--x: pretrain.hparams: unknown key 'wd'"]),
        (HParams, {"epochs": 2, "batch_size": 8}, ["finetune: 'lr' is a required property"]),
        (HParams, {**HP, "optimizer": "lion"}, ["finetune.optimizer", "adamw, adam, sgd"]),
        (HParams, {**HP, "warmup_frac": 1.5}, ["finetune.warmup_frac", "<= 1"]),
        (HParams, {**HP, "mixture_weights": {"a": 1}}, ["unknown key 'mixture_weights'"]),  # searched, not configured
    ],
)
def test_bad_hparams_are_refused_naming_the_key(cls, data, expected):
    with pytest.raises(ConfigError) as e:
        cls.from_cli(data, "--x")
    for part in expected:
        assert part in str(e.value), (part, str(e.value))


def test_the_cli_fills_hparams_with_the_schema_defaults(tmp_path, monkeypatch):
    """finetune's --hparams with the required keys only: the model's manifest records every key,
    the schema's defaults filled in (what a study's validated finetune section would hold)."""
    from mergemix import stages
    from mergemix.cli import main

    recorded = {}

    def finetune(backend_spec, hp, pretrained, data_dirs, out_path, threads=1, checkpoint=None):
        recorded.update(hp=hp, checkpoint=checkpoint)

    monkeypatch.setattr(stages, "finetune", finetune)
    monkeypatch.delenv(stages.CHECKPOINT_STEPS_ENV, raising=False)
    monkeypatch.setenv(stages.CHECKPOINT_SECONDS_ENV, "120")
    argv = ["finetune", "--backend", "{}", "--hparams", json.dumps(HP), "--pretrained", "p", "--data", "d"]
    assert main([*argv, "--out", str(tmp_path / "m"), "--checkpoint-every-steps", "5"]) == 0
    assert isinstance(recorded["hp"], HParams) and recorded["hp"].to_dict() == {**schema_defaults("finetune"), **HP}
    # the flag given, the environment for the other rule
    assert recorded["checkpoint"] == Checkpoint(2, 5) and recorded["checkpoint"].every_seconds == 120


@pytest.mark.parametrize(
    "stage,extra",
    [
        ("pretrain", ["--data", "d", "--out", "o"]),
        ("finetune", ["--pretrained", "p", "--data", "d", "--out", "o"]),
        ("weighted-finetune", ["--pretrained", "p", "--weights", "w", "--data", "a=d", "--target", "t", "--out", "o"]),
    ],
)
def test_the_cli_refuses_an_unknown_hparams_key_naming_it(stage, extra, capsys):
    from mergemix.cli import main

    if stage == "weighted-finetune":
        extra = [*extra, "--eval-out", "e"]
    hp = json.dumps({**HP, "weight_decy": 0.1})
    assert main([stage, "--backend", "{}", "--hparams", hp, *extra]) == 2
    err = capsys.readouterr().err
    assert "--hparams: " in err and "unknown key 'weight_decy'" in err, err
