"""Typed settings: built from a validated config, frozen, and with exactly the schema's keys."""

import dataclasses

import pytest

from mergemix.config import DEFAULT_SCHEMA, load_yaml, validate_config
from mergemix.settings import SUBSECTIONS, Checkpoint, MergeEval, Split, Study, Tune


def schema_keys(*path):
    node = load_yaml(DEFAULT_SCHEMA)
    for key in path:
        node = node["properties"][key]
    return set(node["properties"])


@pytest.mark.parametrize(
    "cls,path",
    [(Split, ("split",)), (MergeEval, ("merge_eval",)), (Tune, ("merge_eval", "tune")), (Checkpoint, ("checkpoint",))],
)
def test_each_section_has_exactly_the_schema_keys(cls, path):
    assert {f.name for f in dataclasses.fields(cls)} == schema_keys(*path)
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls))  # defaults only in the schema


def test_built_from_a_validated_config_and_frozen(default_config):
    cfg = validate_config(default_config)
    s = Study.from_config(cfg)
    assert s.split.to_dict() == cfg["split"] and s.merge_eval.tune.to_dict() == cfg["merge_eval"]["tune"]
    assert s.checkpoint.every_seconds == cfg["checkpoint"]["every_minutes"] * 60
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.split.seed = 3
    assert isinstance(s.merge_eval.methods, tuple)
    assert (Study, "merge_eval") in SUBSECTIONS


def test_an_unvalidated_section_is_refused(default_config):
    with pytest.raises(ValueError, match="split: not a validated section"):
        Study.from_config({**validate_config(default_config), "split": {"seed": 0}})
