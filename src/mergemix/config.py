"""Study configuration: schema validation with defaults, then the checks a schema cannot express.

Every problem is reported at start, with the key, what was given and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A study config that cannot run; the message names each bad key and the fix."""


def _validator(schema: dict):
    import jsonschema

    base = jsonschema.Draft7Validator

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def _path(err) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<top level>"


def _message(err) -> str:
    key = _path(err)
    if err.validator == "required":
        return f"{key}: {err.message}; add it (see README.md, Configuration)"
    if err.validator == "additionalProperties":
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        return f"{key}: {err.message}; allowed keys: {allowed}"
    if err.validator == "enum":
        return f"{key}: {err.instance!r} is not allowed; allowed: {', '.join(map(str, err.validator_value))}"
    if err.validator == "type":
        return f"{key}: expected {err.validator_value}, got {type(err.instance).__name__} {err.instance!r}"
    if err.validator == "pattern":
        return f"{key}: {err.instance!r} is not a valid name; use letters, digits, '_' and '-' only"
    if err.validator == "oneOf" and key == "targets":
        return f"targets: {err.instance!r} must be 'all' or a list of dataset names"
    return f"{key}: {err.message}"


def load_yaml(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def validate_config(config: dict, schema_path=None) -> dict:
    """Validate ``config`` and fill defaults. Returns a new dict; raises :class:`ConfigError`."""
    config = copy.deepcopy(config)
    schema = load_yaml(schema_path or DEFAULT_SCHEMA)
    errors = sorted(_validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [_message(e) for e in errors]
    if not problems:
        problems = semantic_problems(config)
    if problems:
        raise ConfigError("invalid study config:\n  - " + "\n  - ".join(problems))
    return config


def semantic_problems(config: dict) -> list[str]:
    from mergemix.backends.base import BACKENDS, _load_builtin
    from mergemix.data.registry import check_spec
    from mergemix.merging import MERGE_METHODS

    _load_builtin()
    problems: list[str] = []
    names = list(config["datasets"])
    for name, spec in config["datasets"].items():
        problems += check_spec(name, spec)
    backend = config["backend"]["name"]
    if backend not in BACKENDS:
        problems.append(f"backend.name: unknown backend {backend!r}; allowed: {', '.join(sorted(BACKENDS))}")
    else:
        cls = BACKENDS[backend]
        unknown = set(config["backend"].get("params", {})) - set(cls.defaults)
        if unknown:
            problems.append(
                f"backend.params: unknown parameter(s) {', '.join(sorted(unknown))} for backend {backend!r}; "
                f"allowed: {', '.join(sorted(cls.defaults))}"
            )
        if cls.can_pretrain and "pretrain" not in config:
            problems.append(f"pretrain: backend {backend!r} is pre-trained by the pipeline; add a pretrain section")
        if not cls.can_pretrain and "pretrain" in config:
            problems.append(f"pretrain: backend {backend!r} loads pre-trained weights; remove the pretrain section")
    if "pretrain" in config:
        problems += check_spec("<pretrain.data>", config["pretrain"]["data"])
    method = config["merge_eval"]["method"]
    if method not in MERGE_METHODS:
        problems.append(f"merge_eval.method: unknown merge method {method!r}; allowed: {', '.join(sorted(MERGE_METHODS))}")

    targets = names if config["targets"] == "all" else config["targets"]
    for t in targets:
        if t not in config["datasets"]:
            problems.append(f"targets: unknown dataset {t!r}; allowed: {', '.join(names)}")
    for t, cands in config["candidates"].items():
        if t not in targets:
            problems.append(f"candidates.{t}: {t!r} is not a target; targets: {', '.join(targets)}")
        for c in cands:
            if c not in config["datasets"]:
                problems.append(f"candidates.{t}: unknown dataset {c!r}; allowed: {', '.join(names)}")
        if t in cands:
            problems.append(
                f"candidates.{t}: the target {t!r} is among its own candidates; remove it "
                "(a target's training data must not be a candidate)"
            )
    if problems:
        return problems
    limit = config["merge_eval"]["max_candidates"]
    mix = config["mixture"]
    for t in targets:
        n = len(candidates_of(config, t))
        if n > limit:
            problems.append(
                f"candidates.{t}: {n} candidates means {2**n - 1} merged models, above merge_eval.max_candidates={limit}; "
                "give fewer candidates or raise merge_eval.max_candidates (at most 30)"
            )
        if mix["enabled"] and n > mix["max_candidates"]:
            problems.append(
                f"candidates.{t}: {n} candidates means {2**n - 1} mixture fine-tunes, above mixture.max_candidates="
                f"{mix['max_candidates']}; set mixture.enabled: false or raise mixture.max_candidates"
            )
    return problems


def targets_of(config: dict) -> list[str]:
    return list(config["datasets"]) if config["targets"] == "all" else list(config["targets"])


def candidates_of(config: dict, target: str) -> list[str]:
    """Sorted candidates of ``target``: the explicit list, or every other dataset (leave-one-task-out)."""
    if target in config.get("candidates", {}):
        return sorted(config["candidates"][target])
    return sorted(n for n in config["datasets"] if n != target)


def stage_spec(config: dict, *keys: str) -> dict[str, Any]:
    """The slice of the config a stage depends on (its Snakemake params)."""
    return {k: config[k] for k in keys if k in config}
