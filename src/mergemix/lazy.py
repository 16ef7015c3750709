"""Modules imported on their first use, for the modules the workflow reads at every start.

Why: the Snakefile reads each backend's class attributes (``needs_gpu``, ``can_pretrain``,
``pack_size``, ``check_params``) when it builds the DAG, which happens at every ``snakemake`` start,
every dry run, and inside every Slurm job. Importing torch there cost about 2.5 s of each start
(more than the rest of Snakemake's start); the backend modules therefore refer to torch through a
:class:`LazyModule`, and a job that trains or evaluates imports it on first use as before.
(``importlib.util.LazyLoader`` does this by replacing ``sys.modules`` entries, which changes what
every other importer of torch sees; this proxy changes nothing outside mergemix's own modules.)
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


class LazyModule:
    """A stand-in for module ``name``: the first attribute read imports it. Each attribute read is
    then kept on the stand-in, so that later reads of it (``torch.cat`` in a training step, a
    merge-eval loop) are plain attribute lookups, not a call of ``__getattr__`` (0.8 us against
    0.04 us per read, measured). An attribute is therefore bound at its first read: reassigning it
    on the module later is not seen through the stand-in."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def _load(self) -> ModuleType:
        module = self._module
        if module is None:
            module = importlib.import_module(self._name)
            object.__setattr__(self, "_module", module)
        return module

    def __getattr__(self, attr: str):  # only for attributes not read before (see the class docstring)
        value = getattr(self._load(), attr)
        object.__setattr__(self, attr, value)
        return value

    def __setattr__(self, attr: str, value) -> None:
        raise AttributeError(f"{self._name} (imported on first use) is read-only through mergemix.lazy")

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r}, {state}>"


def no_grad(fn):
    """``@torch.no_grad()`` for a method, without importing torch when the class is defined."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
