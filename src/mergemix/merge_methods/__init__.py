"""Merge methods beyond the uniform average, one small module each, with declared options.

* ``uniform``: the average of the selected models (the paper's Eq. 4); no options.
* ``weighted``: ``sum_i w_i theta_i / sum_i w_i`` (``weights``).
* ``task_arithmetic``: ``theta0 + lambda * sum_i w_i (theta_i - theta0)`` (``lambda``, alias
  ``scale``; ``weights``; ``normalize``).
* ``ties``: TIES, trim to the top ``density`` magnitudes, elect signs, disjoint mean.
* ``dare``: DARE, drop with probability ``p = 1 - density``, rescale by 1/(1-p), average.
* ``dare_ties``: DARE's drop, then TIES's sign election and disjoint mean.

A method is ``fn(thetas [k, P], theta0 [P], **options) -> [P]`` over flat float32 vectors, one
row per selected model. Options are checked against each module's ``OPTIONS`` (allowed keys,
types, ranges, defaults) by :func:`check_options`; :func:`apply` checks, fills the defaults and
runs a method. The engine may also pass ``segments`` (the sizes of the parameter tensors, in the
order of the flat vector: needed by ``scope: tensor``) and ``rows`` (the selected models' indices
among all candidates: a DARE model then keeps one drop mask in every subset); methods that do not
use them ignore them. Nothing is registered on import: ``mergemix.merging.MERGE_METHODS`` names this
module as the target of every built-in (``merging.BUILTIN_METHODS``), and the first lookup of a name
imports it and registers :func:`registered` of that name (with :func:`linear_coefficients` for a
linear method); :func:`register_all` is kept for older callers.

Adapter backends (what the methods mean for the flat vectors the backends save)
--------------------------------------------------------------------------------
* IA3 (``causal_lm`` with ``adapter: ia3``): the merged vector is the learned scaling vectors
  ``l`` (one per adapted layer), initialised to ones, so theta0 is all ones and a task vector is
  ``l_i - 1``. Every method merges these scalings as vectors: the averages average the scalings;
  TIES trims and DARE drops entries of ``l_i - 1`` (a trimmed or dropped entry returns to the
  identity scaling 1). peft's ``add_weighted_adapter`` for IA3 is the weighted *sum* of the
  vectors, equal to ``weighted`` when the weights sum to 1 (but not to task arithmetic).
* LoRA (``adapter: lora``): a model's update of a layer is the product ``scaling * B_i @ A_i``
  (A: peft's seeded random init, shared by every fine-tuned model and theta0; B: init 0). Merging
  the factors is not merging the products: ``mean(B_i) @ mean(A_i) != mean(B_i @ A_i)``, and
  TIES/DARE on factors trim or drop entries of A and B, not of the update. The exact merge of a
  linear method (uniform, weighted, task_arithmetic) is the merge of the products; it fits a LoRA
  adapter of rank ``k * r`` by concatenation (``B = [w_1 B_1 ... w_k B_k]``, ``A = [A_1; ...; A_k]``,
  peft's ``cat``); TIES/DARE of the products act on the dense updates ``B_i @ A_i`` of each layer
  (peft's ``*_svd`` combinations then truncate them back to a rank). Exact merging of the products
  is the default for LoRA: ``causal_lm`` with ``lora_merge: products`` hands these functions the
  dense updates of each layer (its ``merge_space_params``). They only see flat vectors, so they
  merge the factors when given the factors, as ``causal_lm`` does with ``lora_merge: factors``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mergemix.lazy import LazyModule

from . import dare, dare_ties, task_arithmetic, ties, weighted
from ._options import Option, option_problems, resolve

torch = LazyModule("torch")  # imported on first use, not when the workflow reads the config (mergemix.lazy)


@dataclass(frozen=True)
class MergeMethod:
    fn: Callable[..., torch.Tensor]  # the pure function; its keyword "lambda_" is the option "lambda"
    options: dict[str, Option]
    doc: str  # what the method computes (its module's docstring)
    # (k, **keywords) -> (a, b) with merged = a * sum(thetas) + b * theta0, or None where the options
    # make the method not a function of the plain sum; None: never (see merging.linear_coefficients)
    linear: Callable[..., tuple[float, float] | None] | None = None

    def engine_args(self) -> set[str]:
        """Which of the engine's keywords (segments, rows) the function takes."""
        return {"segments", "rows"} & set(inspect.signature(self.fn).parameters)


METHODS: dict[str, MergeMethod] = {
    "uniform": MergeMethod(
        weighted.uniform_average, weighted.UNIFORM_OPTIONS, weighted.__doc__, weighted.uniform_linear
    ),
    "weighted": MergeMethod(weighted.weighted_average, weighted.OPTIONS, weighted.__doc__, weighted.weighted_linear),
    "task_arithmetic": MergeMethod(
        task_arithmetic.task_arithmetic,
        task_arithmetic.OPTIONS,
        task_arithmetic.__doc__,
        task_arithmetic.task_arithmetic_linear,
    ),
    "ties": MergeMethod(ties.ties_merge, ties.OPTIONS, ties.__doc__),
    "dare": MergeMethod(dare.dare_merge, dare.OPTIONS, dare.__doc__),
    "dare_ties": MergeMethod(dare_ties.dare_ties_merge, dare_ties.OPTIONS, dare_ties.__doc__),
}


def method_names() -> list[str]:
    return sorted(METHODS)


def check_options(
    method: str, options: Any, *, n_models: int | None = None, prefix: str = "merge_eval.options"
) -> list[str]:
    """Problems with ``options`` for ``method``, one message per bad key (its name, the bad value,
    the allowed values and the fix); empty if all is well. ``n_models``: also check that
    ``weights`` has one value per model. ``prefix`` is the config key the options sit under."""
    if method not in METHODS:
        return [f"{prefix}: unknown merge method {method!r}; allowed: {', '.join(method_names())}"]
    problems = option_problems(method, METHODS[method].options, options, prefix)
    weights = options.get("weights") if isinstance(options, dict) else None
    if not problems and n_models is not None and weights is not None and len(weights) != n_models:
        problems.append(
            f"{prefix}.weights: {len(weights)} weights for {n_models} merged models; give one weight per model"
        )
    return problems


def resolve_options(method: str, options: dict, *, n_models: int | None = None) -> dict:
    """The keyword arguments of ``method``'s function: checked options with defaults, aliases
    resolved (``scale`` -> lambda, ``p`` -> density = 1 - p) and ``lambda`` spelled ``lambda_``.
    Raises ValueError with every problem."""
    problems = check_options(method, options, n_models=n_models, prefix="options")
    if problems:
        raise ValueError("; ".join(problems))
    return {("lambda_" if k == "lambda" else k): v for k, v in resolve(METHODS[method].options, options).items()}


def apply(
    method: str,
    thetas: torch.Tensor,
    theta0: torch.Tensor | None = None,
    *,
    segments: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
    **options,
) -> torch.Tensor:
    """Merge the rows of ``thetas`` with ``method`` and its (checked) options."""
    if thetas.ndim != 2 or thetas.shape[0] == 0:
        raise ValueError(f"thetas must have shape [k>=1, P], got {tuple(thetas.shape)}")
    kwargs = resolve_options(method, options, n_models=thetas.shape[0])
    spec = METHODS[method]
    engine = {"segments": segments, "rows": rows}
    kwargs.update({k: engine[k] for k in spec.engine_args()})
    return spec.fn(thetas, theta0, **kwargs)


def linear_coefficients(method: str, k: int, **options) -> tuple[float, float] | None:
    """``(a, b)`` with the merged state ``a * sum(thetas) + b * theta0`` for ``k`` models and these
    (checked) options, or None when the method with these options is not a function of the sum."""
    spec = METHODS[method]
    return None if spec.linear is None else spec.linear(k, **resolve_options(method, options))


def tunable_kinds(method: str) -> dict[str, str]:
    """The options of ``method`` that ``merge_eval.tune`` can search: numbers as ranges (``float``,
    ``int``), booleans and strings as choices; per-model ``weights`` are not tunable this way
    (``merge_eval.strategy: weights`` searches mixture weights)."""
    kinds = {float: "float", int: "int", bool: "choice", str: "choice"}
    return {k: kinds[o.kind] for k, o in METHODS[method].options.items() if o.kind in kinds}


def check_tune_space(
    method: str, space: Any, fixed: dict | None = None, prefix: str = "merge_eval.tune.space"
) -> list[str]:
    """Problems with the tuning ``space`` of ``method`` (``{option: [low, high] | {choices: [...]}}``):
    unknown or untunable options, empty ranges, ends or choices the option does not allow, and an
    option tuned under two spellings or also fixed in ``fixed`` (``merge_eval.method_options``)."""
    from mergemix.search.tune import parse_space

    where = f"{prefix}.{method}"
    if method not in METHODS:
        return [f"{where}: unknown merge method {method!r}; allowed: {', '.join(method_names())}"]
    dims, problems = parse_space(space, tunable_kinds(method), where)
    declared = METHODS[method].options
    for d in dims:
        opt = declared[d.name]
        values = list(d.choices) if d.kind == "choice" else [d.low, d.high]
        bad = [v for v in values if not opt.accepts(v)]
        if bad:
            problems.append(
                f"{where}.{d.name}: {bad[0]!r} is not allowed for {d.name} of merge method {method!r}; "
                f"allowed: {opt.allowed}"
            )
    if not problems:
        sample = {**(fixed or {}), **{d.name: (d.choices[0] if d.kind == "choice" else d.low) for d in dims}}
        for key in sample:
            target = declared[key].alias_of if key in declared else None
            if target and target in sample:
                problems.append(
                    f"{where}: {key} and {target} are two spellings of one option of merge method {method!r} "
                    f"(tuned or fixed together); keep one of them"
                )
        for d in dims:
            if fixed and d.name in fixed:
                problems.append(
                    f"{where}.{d.name}: also fixed in merge_eval.method_options.{method}; tune it or fix it, not both"
                )
    return problems


def registered(method: str) -> Callable[..., torch.Tensor]:
    """``method`` as a registry function ``fn(thetas, theta0=None, **options)``."""
    if method not in METHODS:
        raise KeyError(f"unknown merge method {method!r}; allowed: {', '.join(method_names())}")

    def fn(thetas, theta0=None, **options):
        return apply(method, thetas, theta0, **options)

    fn.__name__ = fn.__qualname__ = f"merge_{method}"
    fn.__doc__ = METHODS[method].doc
    fn.options = METHODS[method].options  # the declared options, for config checking
    return fn


def register_all() -> list[str]:
    """Register every method of :data:`METHODS` in ``mergemix.merging``'s registry, skipping the names
    it has already; returns the names registered now.

    Kept for older callers: the registry is lazy (:mod:`mergemix.plugins`) and lists every built-in
    name before it is loaded (the first lookup of a name registers it), so this finds every name
    taken and returns ``[]``. To import and register them all, use
    ``mergemix.merging.MERGE_METHODS.load_all()``."""
    from mergemix.merging import MERGE_METHODS, register_merge_method

    takes_linear = "linear" in inspect.signature(register_merge_method).parameters
    added = []
    for name, spec in METHODS.items():
        if name in MERGE_METHODS:
            continue
        extra = {}
        if takes_linear and spec.linear is not None:
            extra["linear"] = lambda k, _name=name, **options: linear_coefficients(_name, k, **options)
        register_merge_method(name, **extra)(registered(name))
        added.append(name)
    return added


__all__ = [
    "METHODS",
    "MergeMethod",
    "Option",
    "apply",
    "check_options",
    "check_tune_space",
    "linear_coefficients",
    "method_names",
    "register_all",
    "resolve_options",
    "tunable_kinds",
]
