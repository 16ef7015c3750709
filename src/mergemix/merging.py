"""Merge methods over flat parameter vectors, with a registry (in the spirit of mergekit).

A merge method takes the stacked fine-tuned states ``thetas`` (shape ``[k, P]``, one row per
selected model), the pre-trained state ``theta0`` (shape ``[P]``) and keyword options, and returns
the merged state (shape ``[P]``). Everything here is pure tensor math, no I/O.

The built-in methods live one per module in :mod:`mergemix.merge_methods` (uniform, weighted,
task_arithmetic, ties, dare, dare_ties) and are registered here on the first lookup of their name
(this module imports none of them); another package adds its own through the entry-point group
``mergemix.merge_methods`` (see :mod:`mergemix.plugins`), or with :func:`register_merge_method`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable, Sequence

from mergemix.lazy import LazyModule, no_grad
from mergemix.plugins import GROUPS, PluginError, Registry

torch = LazyModule("torch")  # imported on first use, not when the workflow reads the config (mergemix.lazy)

MergeFn = Callable[..., "torch.Tensor"]
# Methods linear in the sum of the selected rows: ``linear(k, **options) -> (a, b)`` such that the
# merged state is ``a * sum(thetas) + b * theta0`` for ``k`` selected models. The merge-eval engine
# keeps that sum as a running sum (one row added or removed per Gray-code step); a method without
# it (TIES, DARE...) is merged from scratch for every subset.
LINEAR: dict[str, Callable[..., tuple[float, float]]] = {}

# name -> the module whose ``METHODS`` table has it (a mergemix.merge_methods.MergeMethod each)
BUILTIN_METHODS = {
    name: "mergemix.merge_methods" for name in ("uniform", "weighted", "task_arithmetic", "ties", "dare", "dare_ties")
}


def _adopt_method(name: str, obj) -> None:
    """Register what a target gave: a built-in of a ``METHODS`` table (mergemix.merge_methods, with
    declared options and, for linear methods, their coefficients), or a plugin's function
    ``fn(thetas, theta0, **options)`` (its ``linear`` attribute, if any, as its coefficients)."""
    if isinstance(obj, ModuleType):
        table = getattr(obj, "METHODS", {})
        if name in table and hasattr(obj, "registered"):
            extra = {}
            if table[name].linear is not None:
                extra["linear"] = lambda k, _lin=obj.linear_coefficients, **options: _lin(name, k, **options)
            register_merge_method(name, **extra)(obj.registered(name))
        return  # else: the module must register the name itself on import
    if not callable(obj):
        raise PluginError(f"merge method {name!r}: {obj!r} is not a function fn(thetas, theta0, **options)")
    register_merge_method(name, linear=getattr(obj, "linear", None))(obj)


MERGE_METHODS: Registry = Registry("merge method", GROUPS["merge_methods"], BUILTIN_METHODS, _adopt_method)


def register_merge_method(name: str, linear: Callable[..., tuple[float, float]] | None = None):
    """Decorator adding ``fn(thetas, theta0, **options)`` to the registry (a plugin's method, say).
    A function may declare its options as ``fn.options`` (``mergemix.merge_methods`` Options) to
    have them checked at config check; otherwise its keyword names and default types are."""

    def deco(fn: MergeFn) -> MergeFn:
        # refused: a name taken, or a built-in's name for a function of another module
        MERGE_METHODS.add(name, fn)
        if linear is not None:
            LINEAR[name] = linear
        return fn

    return deco


def _load_builtin() -> None:
    """Kept for older callers: the methods are imported on the first lookup of their name now."""


def method_names() -> list[str]:
    """The methods' names (built-ins, plugins, registered), importing none of them."""
    return MERGE_METHODS.names()


def get_merge_method(name: str) -> MergeFn:
    if name not in MERGE_METHODS:
        raise KeyError(f"unknown merge method {name!r}; registered: {', '.join(MERGE_METHODS.names())}")
    return MERGE_METHODS[name]


def merge(
    method: str, thetas: torch.Tensor, theta0: torch.Tensor | None = None, *, segments=None, rows=None, **options
) -> torch.Tensor:
    """Merge the rows of ``thetas`` with ``method``. ``segments`` (sizes of the parameter tensors in
    the flat vector) and ``rows`` (the rows' indices among all candidates) go to methods that take
    them (TIES/DARE ``scope: tensor``, DARE's per-model drop masks)."""
    if thetas.ndim != 2 or thetas.shape[0] == 0:
        raise ValueError(f"thetas must have shape [k>=1, P], got {tuple(thetas.shape)}")
    fn = get_merge_method(method)
    if hasattr(fn, "options"):  # a mergemix.merge_methods method: it knows the engine's keywords
        return fn(thetas, theta0, segments=segments, rows=rows, **options)
    return fn(thetas, theta0, **options)


def flatten_state(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """Concatenate the tensors of ``state`` in ``keys`` order into one float32 vector."""
    return torch.cat([state[k].detach().reshape(-1).to(torch.float32) for k in keys])


def unflatten_into(vec: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Copy a flat vector into live parameter tensors, in order, without allocation per tensor."""
    offset = 0
    for p in params:
        n = p.numel()
        p.data.copy_(vec[offset : offset + n].view_as(p))
        offset += n
    if offset != vec.numel():
        raise ValueError(f"flat vector has {vec.numel()} values, parameters need {offset}")


def linear_coefficients(method: str, k: int, **options) -> tuple[float, float] | None:
    """``(a, b)`` with merged = ``a * sum(thetas) + b * theta0`` for ``k`` selected models, or None
    for a method that is not linear in the sum (merged from scratch for every subset)."""
    get_merge_method(method)
    lin = LINEAR.get(method)
    if lin is None:
        return None
    try:
        return lin(k, **options)
    except TypeError:  # options the linear form does not cover (per-model weights, say): from scratch
        return None


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


class RunningSum:
    """The sum of the rows of ``thetas`` (``[N, P]``) that a bitmask selects, kept in one
    preallocated vector and moved from subset to subset in place.

    :meth:`move_to` adds the rows that enter and subtracts the rows that leave (one add or subtract
    per step of a Gray-code enumeration, whatever ``P``), or rebuilds the sum from its rows when that
    takes fewer row operations (a single model is then copied exactly).

    ``dtype`` of the sum (None: float64 on a GPU, else the rows' dtype). In float64, float32 rows
    add up exactly unless their magnitudes span more than 2^29, so adding and later subtracting a
    row leaves no trace and the merged state is the correctly rounded average; a GPU casts inside
    the add kernel at little cost, but on CPU mixed float32/float64 arithmetic runs ~10x slower
    than float32, so the CPU keeps the sum in float32, where adding then subtracting a row leaves a
    rounding error of up to half an ulp of the sum. After ``reanchor_every`` incremental row
    operations (None: 64 for a float32 sum, 4096 for float64) the sum is rebuilt from its rows,
    which bounds that drift whatever the number of steps: in float32, a few ulps of the average
    at 64, for about ``k / 64`` extra row operations per step.
    """

    def __init__(self, thetas: torch.Tensor, reanchor_every: int | None = None, dtype: torch.dtype | None = None):
        if thetas.ndim != 2 or thetas.shape[0] == 0:
            raise ValueError(f"thetas must have shape [N>=1, P], got {tuple(thetas.shape)}")
        if dtype is None:
            dtype = torch.float64 if thetas.device.type == "cuda" else thetas.dtype
        if reanchor_every is None:
            reanchor_every = 4096 if dtype == torch.float64 else 64
        if reanchor_every < 1:
            raise ValueError(f"reanchor_every must be >= 1, got {reanchor_every}")
        self.thetas = thetas
        self.sum = torch.zeros(thetas.shape[1], dtype=dtype, device=thetas.device)
        self.mask = 0
        self.reanchor_every = int(reanchor_every)
        self.since_anchor = 0
        self.row_ops = 0  # rows added, subtracted or copied so far (for tests and benchmarks)
        self.rebuilds = 0

    @property
    def k(self) -> int:
        return bin(self.mask).count("1")

    @no_grad
    def rebuild(self, mask: int) -> torch.Tensor:
        """The sum of ``mask``'s rows computed from the rows themselves, in index order."""
        idx = _bits(mask)
        if idx and idx[-1] >= self.thetas.shape[0]:
            raise ValueError(f"mask {mask:#b} selects row {idx[-1]} of {self.thetas.shape[0]}")
        if not idx:
            self.sum.zero_()
        else:
            self.sum.copy_(self.thetas[idx[0]])
            for i in idx[1:]:
                self.sum.add_(self.thetas[i])
        self.mask, self.since_anchor = mask, 0
        self.row_ops += len(idx)
        self.rebuilds += 1
        return self.sum

    @no_grad
    def move_to(self, mask: int) -> torch.Tensor:
        """The running sum, moved to ``mask``'s rows; returns the (shared, in-place) sum vector."""
        if mask < 0:
            raise ValueError(f"mask must be >= 0, got {mask}")
        diff = mask ^ self.mask
        if not diff:
            return self.sum
        n_diff, n_new = bin(diff).count("1"), bin(mask).count("1")
        if self.mask == 0 or n_new <= n_diff or self.since_anchor + n_diff > self.reanchor_every:
            return self.rebuild(mask)
        if diff.bit_length() > self.thetas.shape[0]:
            raise ValueError(f"mask {mask:#b} selects rows beyond the {self.thetas.shape[0]} of thetas")
        for i in _bits(diff):
            if mask >> i & 1:
                self.sum.add_(self.thetas[i])
            else:
                self.sum.sub_(self.thetas[i])
        self.mask = mask
        self.since_anchor += n_diff
        self.row_ops += n_diff
        return self.sum


class LiveParams:
    """Live parameter tensors written from flat ``[P]`` vectors without a model-sized temporary.

    When every parameter is float32 on ``device``, the parameters are rebound to views of one flat
    buffer (``self.flat``): a merged state is then written with one kernel (``a * sum + b * theta0``
    straight into the model). Otherwise (mixed dtypes or devices, e.g. a sharded language model)
    each tensor is written from its slice, with the same arithmetic.
    """

    def __init__(self, params: Sequence[torch.Tensor], device=None):
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        device = (
            torch.device(device)
            if device is not None
            else (self.params[0].device if self.params else torch.device("cpu"))
        )
        self.flat: torch.Tensor | None = None
        if self.params and all(p.dtype == torch.float32 and p.device == device for p in self.params):
            with torch.no_grad():
                flat = torch.empty(self.numel, dtype=torch.float32, device=device)
                offset = 0
                for p, n in zip(self.params, self.sizes):
                    flat[offset : offset + n].copy_(p.detach().reshape(-1))
                    p.data = flat[offset : offset + n].view(p.shape)
                    offset += n
            self.flat = flat

    def _check(self, vec: torch.Tensor) -> None:
        if vec.numel() != self.numel:
            raise ValueError(f"flat vector has {vec.numel()} values, parameters need {self.numel}")

    @no_grad
    def write(self, vec: torch.Tensor) -> None:
        """Copy a flat vector into the parameters."""
        self._check(vec)
        if self.flat is not None:
            self.flat.copy_(vec)
        else:
            unflatten_into(vec, self.params)

    @no_grad
    def write_linear(self, total: torch.Tensor, a: float, b: float = 0.0, theta0: torch.Tensor | None = None) -> None:
        """Write ``a * total + b * theta0`` into the parameters, in place."""
        self._check(total)
        if b and theta0 is None:
            raise ValueError("a merge with a theta0 term needs theta0")
        if self.flat is not None:
            torch.mul(total, a, out=self.flat)
            if b:
                self.flat.add_(theta0, alpha=b)
            return
        offset = 0
        for p, n in zip(self.params, self.sizes):
            src = total[offset : offset + n].view(p.shape)
            if p.device == total.device and not b:
                torch.mul(src, a, out=p.data)  # rounded to the parameter's dtype
            else:  # another device, or a theta0 term: one tensor-sized temporary, then a cast copy
                val = src * a
                if b:
                    val.add_(theta0[offset : offset + n].view(p.shape), alpha=b)
                p.data.copy_(val)
            offset += n
