"""Registries of names, filled lazily from built-in tables and from other packages' entry points.

mergemix has four registries: backends (:data:`mergemix.backends.base.BACKENDS`), dataset
sources (:data:`mergemix.data.registry.SOURCES`), merge methods
(:data:`mergemix.merging.MERGE_METHODS`) and search strategies
(:data:`mergemix.search.base.STRATEGIES`). Each maps a name to its object (a backend class, a
source function, a merge function, a strategy class) and is a :class:`Registry`:

* the **built-ins** are a table ``name -> "module:attr"``; the module is imported on the first
  lookup of one of its names, never when the registry module itself is imported. The registry
  modules therefore import none of their members, and the members (which import the registry to
  register themselves) form no import cycle with it (``tests/test_import_cycles.py``);
* **plugins** are entry points of other installed distributions, in the groups of :data:`GROUPS`::

      [project.entry-points."mergemix.backends"]
      my_cnn = "my_pkg.backend:MyCNN"          # a Backend subclass whose ``name`` is "my_cnn"
      [project.entry-points."mergemix.datasets"]
      my_data = "my_pkg.data:my_data"          # a source function (or a module registering it)
      [project.entry-points."mergemix.merge_methods"]
      median = "my_pkg.merge:median"           # fn(thetas [k, P], theta0 [P], **options) -> [P]
      [project.entry-points."mergemix.search_strategies"]
      my_search = "my_pkg.search:MySearch"     # a SearchStrategy subclass whose ``name`` is "my_search"

  The entry point's name is the registered name. An entry point is loaded (its module imported)
  on the first lookup of its name; listing the names (:meth:`Registry.names`, ``in``, iteration,
  the allowed values in config messages) reads only the distributions' metadata. A plugin name that
  is also a built-in's, or another plugin's, is refused with an error naming both;
* objects registered at run time with ``register_backend``, ``register_source``,
  ``register_merge_method`` or ``register_strategy`` (a module of a plugin registering itself on
  import, a test).

Entry points are discovered from ``sys.path`` (``importlib.metadata``): an installed distribution,
or a ``*.dist-info`` folder with ``METADATA`` and ``entry_points.txt`` on ``PYTHONPATH``. The
discovery is cached per value of ``sys.path``; :func:`refresh` drops the caches and the plugins
loaded so far (for tests that install a plugin in-process).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import threading
from collections.abc import MutableMapping
from types import ModuleType
from typing import Any, Callable, Iterator

# kind -> entry-point group
GROUPS = {
    "backends": "mergemix.backends",
    "datasets": "mergemix.datasets",
    "merge_methods": "mergemix.merge_methods",
    "search_strategies": "mergemix.search_strategies",
}
# kind -> the registry object, imported on first use (this module imports no other of mergemix's)
REGISTRY_OBJECTS = {
    "backends": "mergemix.backends.base:BACKENDS",
    "datasets": "mergemix.data.registry:SOURCES",
    "merge_methods": "mergemix.merging:MERGE_METHODS",
    "search_strategies": "mergemix.search.base:STRATEGIES",
}

_REGISTRIES: list[Registry] = []


class PluginError(ValueError):
    """A plugin that cannot be used: a clashing name, or an entry point that gives the wrong object."""


def import_target(target: str) -> Any:
    """The object named by ``"package.module:attr.attr"`` (or the module, for ``"package.module"``)."""
    module, _, attrs = target.partition(":")
    obj = importlib.import_module(module)
    for a in filter(None, attrs.split(".")):
        obj = getattr(obj, a)
    return obj


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    try:
        return f"{dist.metadata['Name']} {dist.version}"
    except Exception:  # noqa: BLE001 - a broken METADATA file: name the entry point only
        return "an unknown distribution"


def describe_entry_point(ep: importlib.metadata.EntryPoint) -> str:
    return f"plugin {_dist_name(ep)} (entry point {ep.name} = {ep.value!r} in group {ep.group!r})"


class Registry(MutableMapping):
    """Name -> object, loaded on first lookup from a built-in target or a plugin's entry point.

    Membership, iteration and :meth:`names` list every name (built-in, plugin, registered) without
    importing anything; ``registry[name]`` imports what ``name`` needs. ``registry[name] = obj``
    and ``del registry[name]`` set and drop what is loaded (tests saving and restoring a registry);
    :meth:`add` is the checked registration the ``register_*`` functions use.
    """

    def __init__(self, what: str, group: str, builtins: dict[str, str], adopt: Callable[[str, Any], None]):
        self.what = what  # "backend", "dataset source", "merge method", "search strategy": for messages
        self.group = group
        self.builtins = dict(builtins)
        # registers an object a target gave that did not register itself on import (a class or
        # function named by an entry point, a built-in whose module was imported already)
        self._adopt = adopt
        self._loaded: dict[str, Any] = {}
        self._from_plugins: set[str] = set()
        self._loading: set[str] = set()
        self._lock = threading.RLock()
        self._plugin_cache: tuple | None = None  # (tuple(sys.path), {name: EntryPoint})
        _REGISTRIES.append(self)

    # --- discovery ------------------------------------------------------------------------------
    def plugins(self) -> dict[str, importlib.metadata.EntryPoint]:
        """The entry points of this registry's group on ``sys.path`` (name -> entry point), checked
        for names clashing with a built-in or with each other. Nothing is imported."""
        key = tuple(sys.path)
        cache = self._plugin_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for ep in importlib.metadata.entry_points(group=self.group):
            builtin = self.builtins.get(ep.name)
            if builtin is not None:
                if ep.value == builtin:  # mergemix's own metadata declaring its built-in
                    continue
                raise PluginError(
                    f"{self.what} {ep.name!r} of {describe_entry_point(ep)} clashes with mergemix's built-in "
                    f"{self.what} {ep.name!r} ({builtin}); a plugin cannot replace a built-in: rename the entry point"
                )
            other = found.get(ep.name)
            if other is not None and other.value != ep.value:
                raise PluginError(
                    f"{self.what} {ep.name!r} is declared by two plugins: {describe_entry_point(other)} and "
                    f"{describe_entry_point(ep)}; uninstall one or rename its entry point"
                )
            found.setdefault(ep.name, ep)
        self._plugin_cache = (key, found)
        return found

    def names(self) -> list[str]:
        """Every name that can be looked up: built-ins, plugins and registered ones (nothing imported)."""
        return sorted({*self.builtins, *self.plugins(), *self._loaded})

    def origin(self, name: str) -> str:
        """Where ``name`` comes from, in words (for messages)."""
        if name in self.builtins:
            return f"mergemix's built-in {self.builtins[name]}"
        ep = self.plugins().get(name)
        if ep is not None:
            return describe_entry_point(ep)
        obj = self._loaded.get(name)
        if obj is not None:
            return f"registered at run time by {getattr(obj, '__module__', '?')}"
        raise KeyError(name)

    # --- registration ---------------------------------------------------------------------------
    def loaded(self) -> dict[str, Any]:
        """What is imported and registered so far (a copy)."""
        return dict(self._loaded)

    def add(self, name: str, obj: Any) -> Any:
        """Register ``obj`` under ``name``: refused if the name is taken by another object, or is a
        built-in's and ``obj`` is not from that built-in's module."""
        with self._lock:
            target = self.builtins.get(name)
            if target is not None and getattr(obj, "__module__", None) == "__main__":
                spec = getattr(sys.modules.get("__main__"), "__spec__", None)
                if spec is not None and spec.name == target.partition(":")[0]:
                    return obj  # the built-in's own module run as a script (python -m): its import registers it
            if target is not None and getattr(obj, "__module__", None) != target.partition(":")[0]:
                raise PluginError(
                    f"{self.what} {name!r} of {_qualified(obj)} clashes with mergemix's built-in {self.what} "
                    f"{name!r} ({target}); give it another name"
                )
            old = self._loaded.get(name)
            if old is not None and old is not obj:
                raise ValueError(
                    f"{self.what} {name!r} is already registered (by {_qualified(old)}); "
                    f"{_qualified(obj)} cannot take its name"
                )
            self._loaded[name] = obj
            return obj

    # --- lookup ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        plugins = self.plugins()  # first: a clash is refused whichever name is looked up
        obj = self._loaded.get(name)
        if obj is not None:
            return obj
        if name in self.builtins:
            return self._load(name, self.builtins[name], lambda: import_target(self.builtins[name]))
        ep = plugins.get(name)
        if ep is not None:
            obj = self._load(name, describe_entry_point(ep), ep.load)
            self._from_plugins.add(name)
            return obj
        raise KeyError(f"unknown {self.what} {name!r}; available: {', '.join(self.names()) or 'none'}")

    def _load(self, name: str, where: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            if name in self._loading:
                raise PluginError(f"{self.what} {name!r}: importing {where} needs {name!r} itself (an import cycle)")
            self._loading.add(name)
            try:
                try:
                    obj = load()
                except (ImportError, AttributeError) as e:
                    raise ImportError(f"{self.what} {name!r}: cannot import {where}: {e}") from e
                if name not in self._loaded:
                    self._adopt(name, obj)
                if name not in self._loaded:
                    raise PluginError(
                        f"{self.what} {name!r}: {where} gave {_qualified(obj)}, which registered no "
                        f"{self.what} {name!r}"
                    )
                if not isinstance(obj, ModuleType) and self._loaded[name] is not obj:
                    raise PluginError(
                        f"{self.what} {name!r}: {where} gave {_qualified(obj)}, but the name is "
                        f"registered to {_qualified(self._loaded[name])}"
                    )
                return self._loaded[name]
            finally:
                self._loading.discard(name)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in self.builtins or name in self.plugins()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __setitem__(self, name: str, obj: Any) -> None:
        self._loaded[name] = obj

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]
        self._from_plugins.discard(name)

    def clear(self) -> None:
        """Forget what is loaded (built-ins and plugins load again on their next lookup)."""
        self._loaded.clear()
        self._from_plugins.clear()

    def load_all(self) -> dict[str, Any]:
        """Import every name (built-ins and plugins); name -> object."""
        return {n: self[n] for n in self.names()}

    def refresh(self) -> None:
        """Discover the entry points again, forgetting the plugins loaded so far."""
        with self._lock:
            self._plugin_cache = None
            for name in self._from_plugins:
                self._loaded.pop(name, None)
            self._from_plugins.clear()

    def __repr__(self) -> str:
        return f"<{self.what} registry {self.group!r}: {', '.join(self.names())}>"


def _qualified(obj: Any) -> str:
    if isinstance(obj, ModuleType):
        return f"module {obj.__name__}"
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (a key of :data:`GROUPS`), imported on first use."""
    if kind not in REGISTRY_OBJECTS:
        raise KeyError(f"unknown registry {kind!r}; allowed: {', '.join(REGISTRY_OBJECTS)}")
    return import_target(REGISTRY_OBJECTS[kind])


def names(kind: str) -> list[str]:
    """The names of ``kind`` (built-ins, plugins, registered), importing none of them."""
    return registry(kind).names()


def refresh() -> None:
    """Drop the entry-point caches (of ``importlib`` too) and the plugins loaded so far, in every
    registry: after a plugin was installed, or ``sys.path`` changed, within a running process."""
    importlib.invalidate_caches()
    for r in _REGISTRIES:
        r.refresh()
