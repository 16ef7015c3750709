"""Typed, frozen views of a validated study config: one object per section.

:func:`mergemix.config.validate_config` checks a config against the schema and fills in the
schema's defaults; :meth:`Study.from_config` then builds these frozen dataclasses from the result.
The dataclasses declare no defaults of their own (every field must be present in the validated
config), so the schema stays the one source of defaults; ``tests/test_settings.py`` checks that
each dataclass has exactly the keys of its schema section, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


def _frozen(value: Any) -> Any:
    """Lists become tuples and mappings are copied: a section's fields cannot be reassigned, and
    changing a mapping field's copy never reaches the validated config it came from."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


class Section:
    """Built from a validated config section: every declared field required, no unknown key."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str):
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


@dataclass(frozen=True)
class Split(Section):
    seed: int
    val: float
    test: float
    val_from_train: float
    val_cap: int
    max_train: int | None
    max_val: int | None
    max_test: int | None


@dataclass(frozen=True)
class Tune(Section):
    space: dict
    budget: int
    seed: int
    n_startup_trials: int


@dataclass(frozen=True)
class MergeEval(Section):
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
    weights: dict
    test: str
    eval_batch_size: int | None
    precision: str


@dataclass(frozen=True)
class Checkpoint(Section):
    every_minutes: float
    every_steps: int | None

    @property
    def every_seconds(self) -> float:
        return float(self.every_minutes) * 60


@dataclass(frozen=True)
class Final(Section):
    enabled: bool


@dataclass(frozen=True)
class Study(Section):
    """The sections the stages and the workflow read; the rest stays in the validated dict."""

    study: str
    split: Split
    merge_eval: MergeEval
    checkpoint: Checkpoint
    final: Final

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Study:
        return cls.from_dict({f.name: config[f.name] for f in dataclasses.fields(cls)}, "config")


SUBSECTIONS: dict[tuple[type, str], type] = {
    (MergeEval, "tune"): Tune,
    (Study, "split"): Split,
    (Study, "merge_eval"): MergeEval,
    (Study, "checkpoint"): Checkpoint,
    (Study, "final"): Final,
}
