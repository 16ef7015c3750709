"""Typed, frozen settings: one object per config section, and the sections the stages take.

The schema (``mergemix/schemas/config.schema.yaml``) is the one source of defaults. The dataclasses
here declare none (every field must be given), and there are two ways to build them:

* :meth:`Study.from_config` on the result of :func:`mergemix.config.validate_config`, which checked
  the study config and filled in the schema's defaults (the workflow: ``common.smk``'s ``SETTINGS``);
* :meth:`Section.from_cli` on one stage argument (``--hparams``, ``--split``, ``--eval``, ``--merge``,
  ``--search``, ``--tune``, ``--weights``, analyze's ``--options``): its keys are checked against the
  schema's section (types, ranges, allowed values; an unknown key is refused, naming it; a key
  without a default, such as ``finetune.lr``, must be given) and the missing ones take the schema's
  defaults, so a stage run by hand with some keys left out gets what a study gets.

The stage functions (:mod:`mergemix.stages`, :mod:`mergemix.tuning`, :mod:`mergemix.weighting`,
:mod:`mergemix.analysis`, :mod:`mergemix.data.prepared`, :mod:`mergemix.given.select`) and the
training code (the backends' ``finetune``/``pretrain``, :func:`mergemix.backends.training.fit`) take
these sections and read their attributes, never ``.get(key, default)``. For calls from Python (tests, notebooks) they also accept
a plain mapping, converted exactly as the CLI converts its JSON (:meth:`Section.coerce`: schema
defaults, unknown keys and bad values refused), and ``None`` (all the schema's defaults). Any other
value, a section of another class included, is a ``TypeError`` naming the class expected. Lists
inside a section are tuples; ``to_dict()`` gives plain JSON data back, which is what rules pass
(``js`` in ``common.smk``) and what engines get as options. The fine-tune stages take a
:class:`Checkpoint` (the CLI builds it from its ``--checkpoint-every-*`` flags, flags and not params
so that changing them never reruns a fine-tune; a flag not given falls back to its environment
variable, then to the schema's default: :func:`mergemix.stages.checkpoint_settings`; a stage given
none reads the environment and the schema the same way).

Training hyperparameters are :class:`HParams` (``finetune``; :class:`PretrainHParams` for
``pretrain.hparams``, the same schema definition), and a weighted mixture's are
:class:`WeightedHParams` (the searched ``mixture_weights`` besides them; not a config key).
``HParams.to_dict()`` is what a model's manifest records and a checkpoint's fingerprint hashes:
every key, exactly the validated config's section, so models trained before these sections existed
(from the workflow's full ``--hparams``) keep their records.

Some sections are the part of a config section that one stage depends on, so that a rule's params
(and so Snakemake's reruns) hold exactly that: :class:`Eval`, :class:`Merge` and :class:`Search` of
``merge_eval``, :class:`Tuner` of ``merge_eval.tune``, :class:`WeightsSearch` of
``merge_eval.weights``; each is built from its section (``SETTINGS.merge_eval.eval()``...).
``SCHEMA`` names the schema section a class's fields come from and ``KEYS`` the schema key of a
field named otherwise (``Search.options`` is ``merge_eval.strategy_options``);
``tests/test_settings.py`` checks that every field is a key of its schema section (all of them for
a whole section) with a default there, so the two cannot drift.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, TypeVar

S = TypeVar("S", bound="Section")


def _frozen(value: Any) -> Any:
    """Lists become tuples and mappings are copied: a section's fields cannot be reassigned, and
    changing a mapping field's copy never reaches the validated config it came from."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


@functools.cache
def _schema() -> dict:
    from mergemix.config import DEFAULT_SCHEMA, load_yaml

    return load_yaml(DEFAULT_SCHEMA)


def schema_node(path: str) -> dict:
    """The schema of the config section at dotted ``path`` (e.g. ``merge_eval.tune``; a section
    that refers to a definition, as ``finetune`` and ``pretrain.hparams`` do, as that definition)."""
    from mergemix.config import resolve_ref

    schema = _schema()
    node = schema
    for key in path.split("."):
        node = resolve_ref(schema, node)["properties"][key]
    return resolve_ref(schema, node)


class Section:
    """Built from a validated config section (:meth:`from_dict`) or from a stage's JSON argument
    (:meth:`from_cli`): every declared field present, no unknown key."""

    SCHEMA: ClassVar[str] = ""  # the dotted schema section the fields come from
    KEYS: ClassVar[Mapping[str, str]] = {}  # field -> schema key, where they differ

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any], where: str) -> S:
        names = {f.name for f in dataclasses.fields(cls)}
        missing, extra = sorted(names - set(data)), sorted(set(data) - names)
        if missing or extra:
            raise ValueError(
                f"{where}: not a validated section (missing {missing}, unknown {extra}); "
                "build settings from mergemix.config.validate_config's result"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            sub = SUBSECTIONS.get((cls, f.name))
            kwargs[f.name] = sub.from_dict(data[f.name], f"{where}.{f.name}") if sub else _frozen(data[f.name])
        return cls(**kwargs)

    @classmethod
    def from_cli(cls: type[S], data: Mapping[str, Any] | None = None, where: str | None = None) -> S:
        """A stage's JSON argument as this section: checked against the schema (an unknown key, a
        wrong type or value is a :class:`mergemix.config.ConfigError` naming the key), the keys left
        out filled with the schema's defaults. ``where`` (e.g. ``--eval``) starts the message."""
        from mergemix.config import ConfigError, _message, _non_finite

        prefix = f"{where}: " if where else ""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{prefix}expected a JSON object with keys of {cls.SCHEMA} "
                f"({', '.join(f.name for f in dataclasses.fields(cls))}), got {type(data).__name__} {data!r}"
            )
        # nested along the section's path, so messages name the config key (merge_eval.budget)
        instance: dict = copy.deepcopy(dict(data))
        for key in reversed(cls.SCHEMA.split(".")):
            instance = {key: instance}
        errors = sorted(_validator(cls).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
        problems = [_problem(e, _message) for e in errors] or _non_finite(instance)
        if problems:
            raise ConfigError(prefix + "; ".join(problems))
        for key in cls.SCHEMA.split("."):
            instance = instance[key]
        return cls.from_dict(instance, where or cls.SCHEMA)

    @classmethod
    def coerce(cls: type[S], value: Any, where: str | None = None) -> S:
        """``value`` as this section: the section itself; a mapping (or None: every default) as
        :meth:`from_cli` converts it; anything else is a ``TypeError``."""
        if isinstance(value, cls):
            return value
        if value is None or isinstance(value, Mapping):
            return cls.from_cli(value, where)
        raise TypeError(
            f"{where or cls.__name__}: expected mergemix.settings.{cls.__name__} (or a mapping of its keys), "
            f"got {type(value).__name__}"
        )

    def to_dict(self) -> dict:
        """The section as plain JSON-able data (what the CLI stages take)."""

        def plain(v):
            if isinstance(v, Section):
                return v.to_dict()
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _problem(err, message) -> str:
    """A schema error as one line: an unknown key named as such, the rest as validate_config says."""
    if err.validator == "additionalProperties" and isinstance(err.instance, Mapping):
        allowed = err.schema.get("properties", {})
        unknown = ", ".join(repr(k) for k in err.instance if k not in allowed)
        where = ".".join(map(str, err.absolute_path))
        return f"{where}: unknown key {unknown}; allowed: {', '.join(allowed)}"
    return message(err)


@functools.cache
def _validator(cls: type[Section]):
    """A schema validator (filling defaults, as validate_config's) for ``cls``'s fields, nested
    along ``cls.SCHEMA``."""
    from mergemix.config import _validator as make

    node = schema_node(cls.SCHEMA)
    props = {f.name: node["properties"][cls.KEYS.get(f.name, f.name)] for f in dataclasses.fields(cls)}
    required = [f.name for f in dataclasses.fields(cls) if cls.KEYS.get(f.name, f.name) in node.get("required", ())]
    schema: dict = {"type": "object", "additionalProperties": False, "properties": props}
    if required:  # the keys without a default (finetune's epochs, lr, batch_size)
        schema["required"] = required
    for key in reversed(cls.SCHEMA.split(".")):
        schema = {"type": "object", "required": [key], "properties": {key: schema}}
    schema["definitions"] = _schema().get("definitions", {})
    return make(schema)


@dataclass(frozen=True)
class Split(Section):
    SCHEMA = "split"

    seed: int
    val: float
    test: float
    val_from_train: float
    val_cap: int
    max_train: int | None
    max_val: int | None
    max_test: int | None


@dataclass(frozen=True)
class Tuner(Section):
    """The tuner's settings of ``tune-method`` (``merge_eval.tune`` without the per-method space)."""

    SCHEMA = "merge_eval.tune"

    budget: int
    seed: int
    n_startup_trials: int


@dataclass(frozen=True)
class Tune(Tuner):
    """The whole ``merge_eval.tune`` section: the tuner's settings and the per-method space."""

    space: dict

    def tuner(self) -> Tuner:
        return Tuner(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Tuner)})


@dataclass(frozen=True)
class WeightsSearch(Section):
    """The proportions search of ``weights-search`` (``merge_eval.weights`` without the check's
    ``check_samples``, so changing it never reruns the search)."""

    SCHEMA = "merge_eval.weights"

    sampler: str
    budget: int
    seed: int
    sigma0: float
    n_startup_trials: int


@dataclass(frozen=True)
class Weights(WeightsSearch):
    """The whole ``merge_eval.weights`` section: the search's settings and the check's sample size."""

    check_samples: int

    def search(self) -> WeightsSearch:
        return WeightsSearch(**{f.name: getattr(self, f.name) for f in dataclasses.fields(WeightsSearch)})


@dataclass(frozen=True)
class Eval(Section):
    """How merge-eval, search, tuning and weights jobs run the forward pass."""

    SCHEMA = "merge_eval"

    eval_batch_size: int | None
    precision: str


@dataclass(frozen=True)
class Merge(Section):
    """The merge method of a merge-eval or search job and its options."""

    SCHEMA = "merge_eval"

    method: str
    options: dict


@dataclass(frozen=True)
class Search(Section):
    """A target's subset search (the ``search`` and ``tune-method`` stages)."""

    SCHEMA = "merge_eval"
    KEYS = {"options": "strategy_options"}

    strategy: str
    budget: int | float | None
    seed: int
    options: dict

    def resolved(self, n: int) -> Search:
        """What runs for ``n`` candidates: ``auto`` (and ``weights``, whose binary start is searched
        as with auto) resolved by :func:`mergemix.config.resolve_strategy`, a null budget as
        :data:`mergemix.config.DEFAULT_BUDGET`. A resolved search is its own resolution."""
        from mergemix.config import DEFAULT_BUDGET, resolve_strategy

        strategy = resolve_strategy({"merge_eval": {"strategy": self.strategy, "budget": self.budget}}, n)
        budget = DEFAULT_BUDGET if self.budget is None else self.budget
        return dataclasses.replace(self, strategy=strategy, budget=budget)


@dataclass(frozen=True)
class MergeEval(Section):
    SCHEMA = "merge_eval"

    chunks: int
    method: str
    options: dict
    max_candidates: int
    strategy: str
    budget: int | float | None
    seed: int
    workers: int
    strategy_options: dict
    methods: tuple
    method_options: dict
    tune: Tune
    weights: Weights
    test: str
    eval_batch_size: int | None
    precision: str

    def eval(self) -> Eval:
        return Eval(self.eval_batch_size, self.precision)

    def merge(self, method: str | None = None) -> Merge:
        """The study's merge (``method``, ``options``), or one compared method's with its
        ``method_options`` (none given: its defaults)."""
        if method is None:
            return Merge(self.method, _frozen(self.options))
        return Merge(method, _frozen(self.method_options.get(method) or {}))

    def search(self) -> Search:
        """The subset search as configured (``auto`` unresolved: :meth:`Search.resolved`)."""
        return Search(self.strategy, self.budget, self.seed, _frozen(self.strategy_options))


@dataclass(frozen=True)
class Checkpoint(Section):
    SCHEMA = "checkpoint"

    every_minutes: float
    every_steps: int | None

    @property
    def every_seconds(self) -> float:
        return float(self.every_minutes) * 60


@dataclass(frozen=True)
class HParams(Section):
    """Training hyperparameters (the schema's ``hparams`` definition: ``finetune``, and
    :class:`PretrainHParams`). ``epochs``, ``lr`` and ``batch_size`` have no default: a stage's
    ``--hparams`` must give them. What the fine-tune stages and the backends' ``finetune`` and
    ``pretrain`` take, and what :func:`mergemix.backends.training.fit` reads; ``to_dict()`` is what
    a model's manifest records as ``hyperparameters`` (and the checkpoint fingerprint hashes)."""

    SCHEMA = "finetune"

    epochs: int
    lr: float
    batch_size: int
    optimizer: str
    momentum: float
    weight_decay: float
    schedule: str
    warmup_frac: float
    grad_clip: float | None
    seed: int

    @classmethod
    def coerce(cls, value: Any, where: str | None = None) -> HParams:
        """As :meth:`Section.coerce`; a mapping with ``mixture_weights`` besides the hyperparameters
        (a weighted mixture, as tests and notebooks write it) is a :class:`WeightedHParams`."""
        if isinstance(value, Mapping) and "mixture_weights" in value:
            return WeightedHParams.from_cli(value, where)
        return super().coerce(value, where)

    def weighted(self, weights: Mapping[str, float]) -> WeightedHParams:
        """These hyperparameters with batches drawn in the proportions ``weights`` ({dataset: weight})."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(HParams)}
        return WeightedHParams(**plain, mixture_weights=_frozen(dict(weights)))


@dataclass(frozen=True)
class PretrainHParams(HParams):
    """``pretrain.hparams``: the same definition as ``finetune`` (messages name this key)."""

    SCHEMA = "pretrain.hparams"


@dataclass(frozen=True)
class WeightedHParams(HParams):
    """Hyperparameters of a weighted mixture (``weighted-finetune``, ``weights-check``): batches
    drawn with replacement, dataset d supplying a share ``mixture_weights[d]`` of them
    (:func:`mergemix.backends.training.mixture_probabilities`). Not a config section: the weights
    are searched (``weights-search``), never configured; built by :meth:`HParams.weighted`."""

    mixture_weights: dict

    @classmethod
    def from_cli(cls, data: Mapping[str, Any] | None = None, where: str | None = None) -> WeightedHParams:
        from mergemix.config import ConfigError

        weights = (data or {}).get("mixture_weights") if isinstance(data, Mapping) else None
        if not isinstance(weights, Mapping):
            raise ConfigError(
                f"{f'{where}: ' if where else ''}mixture_weights: expected an object {{dataset: weight}}, "
                f"got {type(weights).__name__} {weights!r}"
            )
        rest = {k: v for k, v in data.items() if k != "mixture_weights"}
        return HParams.from_cli(rest, where).weighted(weights)


@dataclass(frozen=True)
class Final(Section):
    SCHEMA = "final"

    enabled: bool


@dataclass(frozen=True)
class Analysis(Section):
    SCHEMA = "analysis"

    logit_eps: float
    figure_formats: tuple
    similarity_split: str


@dataclass(frozen=True)
class Study(Section):
    """The sections the stages and the workflow read; the rest stays in the validated dict."""

    study: str
    split: Split
    finetune: HParams
    merge_eval: MergeEval
    checkpoint: Checkpoint
    final: Final
    analysis: Analysis

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Study:
        return cls.from_dict({f.name: config[f.name] for f in dataclasses.fields(cls)}, "config")


SUBSECTIONS: dict[tuple[type, str], type] = {
    (MergeEval, "tune"): Tune,
    (MergeEval, "weights"): Weights,
    (Study, "split"): Split,
    (Study, "finetune"): HParams,
    (Study, "merge_eval"): MergeEval,
    (Study, "checkpoint"): Checkpoint,
    (Study, "final"): Final,
    (Study, "analysis"): Analysis,
}

# every section a stage argument is read as (tests/test_settings.py checks each against the schema)
SECTIONS: tuple[type[Section], ...] = (
    Split,
    HParams,
    PretrainHParams,
    Tune,
    Tuner,
    Weights,
    WeightsSearch,
    Eval,
    Merge,
    Search,
    MergeEval,
    Checkpoint,
    Final,
    Analysis,
)
