"""Declared options of the merge methods (types, ranges, defaults) and their checks.

Each method module declares ``OPTIONS: dict[str, Option]``; :func:`option_problems` checks a
user's options against it (one message per bad key, naming the key, the bad value, the allowed
values and the fix) and :func:`resolve` fills the defaults and turns aliases into their target.
The options shared by several methods are built here once (``lambda_option`` ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from mergemix.lazy import LazyModule

torch = LazyModule("torch")  # imported on first use, not when the workflow reads the config (mergemix.lazy)

SCOPES = ("global", "tensor")
RESCALES = ("inverse", "l1", "none")
SEED_LIMIT = 2**32  # torch's CPU generator uses 32 bits of a seed (see _ops.row_seed)


@dataclass(frozen=True)
class Option:
    """One option of a merge method.

    ``kind`` is float (an int is accepted), int, bool, str or list (a list of finite numbers);
    a bool is never a number. ``default`` None means "absent unless given" (see ``help``).
    ``alias_of`` makes this key another spelling of that option: ``to_target`` turns its value
    into the target's, and giving both keys is refused.
    """

    default: Any
    kind: type
    allowed: str  # the allowed values, completing "allowed: ..."
    check: Callable[[Any], bool] | None = None  # the range, after the type check
    help: str = ""  # what the option does
    alias_of: str | None = None
    to_target: Callable[[Any], Any] | None = None
    from_target: Callable[[Any], Any] | None = None  # the inverse of to_target (the alias's value of a target value)
    default_doc: str | None = None  # how to say the default when it is not a value

    def accepts(self, value: Any) -> bool:
        if value is None:  # the same as leaving the key out, where the default is "absent"
            return self.default is None
        if isinstance(value, bool) and self.kind is not bool:
            return False
        if self.kind is float:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
        elif self.kind is list:
            value = as_list(value)
            ok = value is not None and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
            )
        else:
            ok = isinstance(value, self.kind)
        return ok and (self.check is None or self.check(as_list(value) if self.kind is list else value))

    def default_text(self) -> str:
        return self.default_doc or repr(self.default)


def as_list(value: Any) -> list | None:
    """A list or tuple of values (or a 1-D tensor) as a list; None for anything else."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.ndim == 1 else None
    return list(value) if isinstance(value, (list, tuple)) else None


def lambda_option() -> Option:
    return Option(1.0, float, "a number > 0", lambda v: v > 0, "scaling of the merged task vector")


def weights_option() -> Option:
    return Option(
        None,
        list,
        "a list of numbers >= 0, one per merged model, not all 0",
        lambda v: all(x >= 0 for x in v) and sum(v) > 0,
        "weight of each merged model, in the order of the rows of thetas",
        default_doc="equal weights",
    )


def normalize_option(default: bool, divisor: str) -> Option:
    return Option(default, bool, "true or false", None, f"divide the weighted sum of task vectors by {divisor}")


def density_option(default: float, what: str) -> Option:
    return Option(default, float, "a number in (0, 1]", lambda v: 0 < v <= 1, what)


def p_option() -> Option:
    return Option(
        None,
        float,
        "a number in [0, 1)",
        lambda v: 0 <= v < 1,
        "drop probability, another spelling of density = 1 - p (give one of them)",
        alias_of="density",
        to_target=lambda p: round(1.0 - p, 12),
        from_target=lambda d: round(1.0 - d, 12),
        default_doc="that of density",
    )


def seed_option() -> Option:
    return Option(
        0,
        int,
        f"an integer in [0, {SEED_LIMIT - 1}]",
        lambda v: 0 <= v < SEED_LIMIT,
        "seed of the random drop (the same seed gives the same merged model)",
    )


def scope_option(what: str) -> Option:
    return Option(
        "global",
        str,
        " or ".join(SCOPES),
        lambda v: v in SCOPES,
        f"{what} over the whole task vector (global, the papers) or per parameter tensor (tensor, mergekit)",
    )


def rescale_option() -> Option:
    return Option(
        "inverse",
        str,
        ", ".join(RESCALES),
        lambda v: v in RESCALES,
        "rescaling of the kept entries: inverse = 1/density = 1/(1-p) (the DARE paper), l1 = match "
        "the L1 norm of the task vector per scope (mergekit >= 0.1 rescale: true), none",
    )


def option_problems(method: str, declared: dict[str, Option], options: Any, prefix: str) -> list[str]:
    """Problems with ``options`` for ``method``: unknown keys, bad values, an alias with its target."""
    if not isinstance(options, dict):
        return [f"{prefix}: {options!r} is not a mapping of option names to values; give e.g. {{density: 0.5}}"]
    problems = []
    for key, value in options.items():
        where = f"{prefix}.{key}"
        opt = declared.get(key)
        if opt is None:
            allowed = f"allowed: {', '.join(declared)}" if declared else f"it takes no options (remove {prefix})"
            problems.append(f"{where}: unknown option of merge method {method!r}; {allowed}")
        elif not opt.accepts(value):
            problems.append(
                f"{where}: {value!r} is not allowed for merge method {method!r}; allowed: {opt.allowed}. "
                f"Set {key} to {opt.allowed}, or leave it out for the default ({opt.default_text()})"
            )
        elif opt.alias_of is not None and value is not None and options.get(opt.alias_of) is not None:
            problems.append(
                f"{where}: {key} and {opt.alias_of} are two spellings of one option of merge method {method!r} "
                f"(given: {key}={value!r}, {opt.alias_of}={options[opt.alias_of]!r}); keep one of them"
            )
    return problems


def resolve(declared: dict[str, Option], options: dict) -> dict:
    """Checked ``options`` with the defaults filled in and aliases turned into their target."""
    out = {k: o.default for k, o in declared.items() if o.alias_of is None}
    for key, value in options.items():
        opt = declared[key]
        if opt.kind is list:
            value = as_list(value)
        if opt.alias_of is not None:
            if value is None:
                continue
            key, value = opt.alias_of, opt.to_target(value) if opt.to_target else value
        out[key] = value
    return out
