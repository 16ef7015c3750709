"""Study configuration: schema validation with defaults, then the checks a schema cannot express.

Every problem is reported at start, with the key, what was given and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

# inside the package, so `mergemix check-config` works from an installed wheel; the workflow uses this file too
DEFAULT_SCHEMA = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


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


def _number_hint(value) -> str | None:
    """For a string YAML read from what was meant as a number (``1e-3``): how to write it."""
    import re

    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*([+-]?\d+)([eE][+-]?\d+)\s*", value)
    if m:
        return f"YAML reads {value!r} as text; write {m[1]}.0{m[2]}"
    try:
        float(value)
    except ValueError:
        return None
    return f"write {value.strip()} without quotes"


def _duplicates(items) -> list:
    seen, dup = set(), []
    for x in items:
        key = repr(x)
        if key in seen and x not in dup:
            dup.append(x)
        seen.add(key)
    return dup


def _message(err) -> str:
    key = _path(err)
    if (
        err.validator == "type"
        and _number_hint(err.instance)
        and {"number", "integer"}
        & set([err.validator_value] if isinstance(err.validator_value, str) else err.validator_value)
    ):
        return f"{key}: expected a number, got the string {err.instance!r}; {_number_hint(err.instance)}"
    if err.validator == "type" and err.instance is None:
        return f"{key}: no value given (empty in the YAML file); give a {err.validator_value} or remove the key"
    if err.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[err.validator]
        return f"{key}: {err.instance!r} is not allowed; give a value {op} {err.validator_value}"
    if err.validator == "minProperties" and not err.instance:
        return f"{key}: empty; list at least {err.validator_value} entries (see config/README.md)"
    if err.validator == "uniqueItems" or (
        key == "targets" and isinstance(err.instance, list) and _duplicates(err.instance)
    ):
        dup = ", ".join(map(repr, _duplicates(err.instance)))
        return f"{key}: {dup} listed more than once; list each name once"
    if err.validator == "required":
        return f"{key}: {err.message}; add it (see config/README.md)"
    if err.validator == "additionalProperties":
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        return f"{key}: {err.message}; allowed keys: {allowed}"
    if err.validator == "enum":
        return f"{key}: {err.instance!r} is not allowed; allowed: {', '.join(map(str, err.validator_value))}"
    if err.validator == "type":
        return f"{key}: expected {err.validator_value}, got {type(err.instance).__name__} {err.instance!r}"
    if err.validator == "pattern":
        return f"{key}: {err.instance!r} is not a valid name; use letters, digits, '_' and '-' only"
    if key == "merge_eval.budget":
        return (
            f"merge_eval.budget: {err.instance!r} is not a budget; give a number of merged evaluations (an integer "
            ">= 1), a fraction of all subsets in (0, 1] such as 0.1, or null"
        )
    if key == "mixture.sample" and err.validator in ("oneOf", "anyOf"):
        return f"mixture.sample: {err.instance!r} must be null or {{size: <integer >= 1>, seed: <integer>}}"
    if err.validator == "oneOf" and key == "targets":
        return f"targets: {err.instance!r} must be 'all' or a list of dataset names"
    return f"{key}: {err.message}"


def load_yaml(path) -> dict:
    """A YAML file's content; a syntax error is a :class:`ConfigError` naming the file, line and column."""
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
            raise ConfigError(f"{where}: YAML syntax error: {what}; fix the file at that line") from None


def resolve_ref(schema: dict, node: dict) -> dict:
    """``node`` of ``schema``, or the definition it refers to (``{$ref: "#/definitions/hparams"}``)."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target = schema
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def schema_defaults(section: str, schema_path=None) -> dict:
    """The defaults the schema declares for the properties of ``section`` (dotted, e.g.
    ``merge_eval.tune``, or ``finetune``: its definition's): the one source of defaults, for code
    that runs outside a validated study (``mergemix select``, a stage called from Python)."""
    schema = load_yaml(schema_path or DEFAULT_SCHEMA)
    node = schema
    for key in section.split("."):
        node = resolve_ref(schema, resolve_ref(schema, node)["properties"][key])
    return {k: v["default"] for k, v in node.get("properties", {}).items() if isinstance(v, dict) and "default" in v}


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
    from mergemix.merging import get_merge_method, method_names

    _load_builtin()
    problems: list[str] = _non_finite(config)
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
        else:
            problems += cls.check_params({**cls.defaults, **config["backend"].get("params", {})})
        if cls.can_pretrain and "pretrain" not in config:
            problems.append(f"pretrain: backend {backend!r} is pre-trained by the pipeline; add a pretrain section")
        if not cls.can_pretrain and "pretrain" in config:
            problems.append(f"pretrain: backend {backend!r} loads pre-trained weights; remove the pretrain section")
    if "pretrain" in config:
        problems += check_spec("<pretrain.data>", config["pretrain"]["data"])
    method = config["merge_eval"]["method"]
    if method not in method_names():
        problems.append(f"merge_eval.method: unknown merge method {method!r}; allowed: {', '.join(method_names())}")
    elif hasattr(get_merge_method(method), "options"):  # declared options: keys, types and ranges checked
        from mergemix import merge_methods

        problems += merge_methods.check_options(method, config["merge_eval"].get("options") or {})
    else:  # a plugin's method: its keyword names and default types
        problems += merge_option_problems(method, get_merge_method(method), config["merge_eval"].get("options") or {})
    problems += unknown_strategy(config["merge_eval"]["strategy"])  # its options: search_problems
    split = config["split"]
    if split["val"] + split["test"] >= 1:
        problems.append(
            f"split.val + split.test: {split['val']} + {split['test']} leaves no training data; make their sum below 1 "
            "(e.g. val: 0.2, test: 0.3)"
        )

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
    problems += given_problems(config, targets)
    if problems:
        return problems
    return problems + search_problems(config, targets)


def given_problems(config: dict, targets: list[str]) -> list[str]:
    """The ``models`` section (given fine-tuned models): known datasets, every candidate covered,
    formats the backend reads, local paths that exist, no mixture study (see mergemix.given)."""
    import os

    models = config.get("models") or {}
    if not models:
        return []
    from mergemix.given import BACKEND_FORMATS

    problems = []
    backend = config["backend"]["name"]
    allowed = BACKEND_FORMATS.get(backend)
    for name, spec in models.items():
        if name not in config["datasets"]:
            problems.append(
                f"models.{name}: {name!r} is not a dataset of the study; allowed: {', '.join(sorted(config['datasets']))}"
            )
        if allowed is not None and spec.get("format", "auto") not in ("auto", *allowed):
            problems.append(
                f"models.{name}.format: {spec['format']!r} is not read by the {backend!r} backend; "
                f"allowed: auto, {', '.join(allowed)}"
            )
        if "path" in spec:
            path = os.path.expanduser(spec["path"])
            if not os.path.exists(path):
                problems.append(
                    f"models.{name}.path: {spec['path']} does not exist; fix the path (relative paths are "
                    "from the folder snakemake runs in)"
                )
            if "revision" in spec or "subfolder" in spec:
                problems.append(
                    f"models.{name}: revision and subfolder are for hub models; remove them from a local path"
                )
        elif "revision" not in spec:
            problems.append(
                f"models.{name}: hub model {spec['hub']!r} has no revision; add revision: main and pin it "
                "to a commit with `mergemix pin-revisions <config> --write` (or add revision: <commit>)"
            )
    cands = sorted({c for t in targets for c in candidates_of(config, t)})
    missing = [c for c in cands if c not in models]
    if missing:
        problems.append(
            f"models: no given model for candidate(s) {', '.join(missing)}; give one per candidate dataset "
            "(given models are not combined with mergemix's own fine-tunes: their hyperparameters differ)"
        )
    if config["mixture"]["enabled"]:
        problems.append(
            "mixture.enabled: the correlation study fine-tunes mixtures to compare with single-dataset "
            "models, which here are given (other hyperparameters); set mixture.enabled: false"
        )
    return problems


# The strategy `auto` picks when a target's 2^N-1 subsets exceed the budget: the one that came
# closest to exhaustive in benchmarks/search.py (docs/search-and-merge-methods.md, Search strategies).
AUTO_STRATEGY = "surrogate"
DEFAULT_BUDGET = 1023
# merge_eval.strategy: weights searches mixture proportions (merge_eval.weights) from the best binary
# subset, which is found as with auto
WEIGHTS_STRATEGY = "weights"


def budget_evaluations(budget, n: int) -> int:
    """merge_eval.budget as a number of merged evaluations for ``n`` candidates (see search.make_budget)."""
    from mergemix.search import make_budget

    return make_budget(DEFAULT_BUDGET if budget is None else budget, n, 1, "evaluations").evaluations


def resolve_strategy(config: dict, n: int) -> str:
    """The search strategy a target with ``n`` candidates uses (``auto`` resolved)."""
    me = config["merge_eval"]
    if me["strategy"] not in ("auto", WEIGHTS_STRATEGY):
        return me["strategy"]
    # weights: the binary choice it starts from is searched as with auto
    return "exhaustive" if 2**n - 1 <= budget_evaluations(me["budget"], n) else AUTO_STRATEGY


def unknown_strategy(name: str) -> list[str]:
    """The problem with ``merge_eval.strategy: name`` if no registry has ``name`` (a built-in or a
    plugin's strategy, listed without importing any), else none."""
    from mergemix.search import strategy_names

    if name in ("auto", WEIGHTS_STRATEGY) or name in strategy_names():
        return []
    return [
        f"merge_eval.strategy: unknown search strategy {name!r}; allowed: auto, {WEIGHTS_STRATEGY}, "
        f"{', '.join(strategy_names())}"
    ]


def search_problems(config: dict, targets: list[str]) -> list[str]:
    """merge_eval's search keys and the mixture study's size, per target."""
    from mergemix.search import check_options, get_strategy, strategy_names

    problems: list[str] = []
    me, mix = config["merge_eval"], config["mixture"]
    name = me["strategy"]
    unknown = unknown_strategy(name)
    if unknown:
        return unknown
    from mergemix.search.weights import check_options as weights_problems

    problems += weights_problems(me["weights"])
    if me["weights"] != schema_defaults("merge_eval.weights") and name != WEIGHTS_STRATEGY:
        problems.append("merge_eval.weights: set only with merge_eval.strategy: weights (or remove it)")
    if name == WEIGHTS_STRATEGY:
        name = "auto"
    methods = me.get("methods") or []
    from mergemix.merging import method_names

    for m in methods:
        if m not in method_names():
            problems.append(f"merge_eval.methods: unknown merge method {m!r}; allowed: {', '.join(method_names())}")
    if len(set(methods)) != len(methods):
        problems.append(f"merge_eval.methods: {methods} names a method twice; list each once")
    from mergemix import merge_methods

    fixed_all = me.get("method_options") or {}
    for m, opts in fixed_all.items():
        if m not in methods:
            problems.append(
                f"merge_eval.method_options.{m}: {m!r} is not in merge_eval.methods {methods}; add it there or remove these options"
            )
        else:
            problems += merge_methods.check_options(m, opts, prefix=f"merge_eval.method_options.{m}")
    for m, space in ((me.get("tune") or {}).get("space") or {}).items():
        if m not in methods:
            problems.append(
                f"merge_eval.tune.space.{m}: {m!r} is not in merge_eval.methods {methods}; add it there or remove its space"
            )
        else:
            problems += merge_methods.check_tune_space(m, space, fixed_all.get(m) or {})
    if methods and any(resolve_strategy(config, len(candidates_of(config, t))) != "exhaustive" for t in targets):
        problems.append(
            "merge_eval.methods: comparing merge methods scores every subset; it needs the exhaustive "
            "strategy for every target (raise merge_eval.budget or remove merge_eval.methods)"
        )
    if name == "auto" and me["strategy_options"]:
        problems.append(
            "merge_eval.strategy_options: options need a named strategy; set merge_eval.strategy "
            f"(one of {', '.join(strategy_names())}) or remove the options"
        )
    elif name != "auto":
        problems += check_options(name, me["strategy_options"])
    if me["workers"] > 1 and (name == "auto" or not get_strategy(name).supports_workers):
        shared = [s for s in strategy_names() if get_strategy(s).supports_workers]
        problems.append(
            f"merge_eval.workers: {me['workers']} workers need a strategy that shares a journal ({', '.join(shared)}); "
            f"strategy is {name!r}: set merge_eval.workers: 1 or merge_eval.strategy: {shared[0]}"
        )
    for t in targets:
        n = len(candidates_of(config, t))
        strategy = resolve_strategy(config, n)
        budget = budget_evaluations(me["budget"], n)
        if strategy == "exhaustive":
            if n > me["max_candidates"]:
                problems.append(
                    f"candidates.{t}: {n} candidates means {2**n - 1} merged models, above merge_eval.max_candidates="
                    f"{me['max_candidates']}; choose a budgeted merge_eval.strategy (greedy, beam, optuna, halving, "
                    "surrogate) or give fewer candidates"
                )
            elif me["budget"] is not None and budget < 2**n - 1:
                problems.append(
                    f"merge_eval.budget: {me['budget']} allows {budget} merged evaluations, but the exhaustive strategy "
                    f"evaluates all {2**n - 1} subsets of target {t!r}; raise the budget or choose a budgeted strategy"
                )
        if mix["enabled"] and mix["sample"] is None and n > mix["max_candidates"]:
            problems.append(
                f"candidates.{t}: {n} candidates means {2**n - 2} mixture fine-tunes, above mixture.max_candidates="
                f"{mix['max_candidates']}; set mixture.sample: {{size: 100}} (a size-stratified sample), "
                "mixture.enabled: false, or raise mixture.max_candidates"
            )
    return problems


def _non_finite(obj, key: str = "") -> list[str]:
    """Every NaN or infinite number in the config (YAML's .nan, .inf), by key."""
    import math

    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, f"{key}.{k}" if key else str(k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, f"{key}.{i}")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [f"{key}: {obj} is not a finite number; give a finite value"]
    return []


def merge_option_problems(method: str, fn, options: dict) -> list[str]:
    """``merge_eval.options`` against the merge function's signature: its keyword names, and the
    type of each keyword's default (an int is accepted where the default is a float)."""
    import inspect

    sig = inspect.signature(fn)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    allowed = {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in ("thetas", "theta0")
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
    }
    problems = []
    for k, v in options.items():
        if k not in allowed:
            if not takes_any:
                problems.append(
                    f"merge_eval.options.{k}: unknown option of merge method {method!r}; "
                    f"allowed: {', '.join(sorted(allowed)) or 'none (remove merge_eval.options)'}"
                )
            continue
        default = allowed[k]
        if default is None:
            continue
        want = type(default)
        ok = (
            isinstance(v, bool)
            if want is bool
            else (
                isinstance(v, (int, float)) and not isinstance(v, bool)
                if want is float
                else isinstance(v, want) and not (isinstance(v, bool) and want is not bool)
            )
        )
        if not ok:
            hint = _number_hint(v)
            problems.append(
                f"merge_eval.options.{k}: {v!r} is a {type(v).__name__}, merge method {method!r} expects a "
                f"{want.__name__} (default {default!r}){'; ' + hint if hint else ''}"
            )
    return problems


def pack_sizes(config: dict) -> dict[str, int]:
    """``pack``: items per job of each packable stage (fine-tunes, embeddings), a null key resolved to
    the backend's ``pack_size`` (smallcnn 16; backends whose fine-tunes last minutes 1)."""
    from mergemix.backends.base import backend_class

    default = backend_class(config["backend"]["name"]).pack_size
    return {k: default if v is None else int(v) for k, v in config.get("pack", {}).items()}


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
