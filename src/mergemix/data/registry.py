"""Registry of dataset sources.

A source turns a dataset spec (a dict from the study config, ``source`` naming the source) into
a :class:`RawDataset`. Register a new source with::

    @register_source("my_source")
    def my_source(spec: dict, seed: int) -> RawDataset: ...

The built-in sources are imported on the first lookup of their name; another package adds sources
through the entry-point group ``mergemix.datasets`` (see :mod:`mergemix.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np

from mergemix.plugins import GROUPS, PluginError, Registry


@dataclass
class RawDataset:
    # samples: an array (e.g. float32 or uint8 images [N, C, H, W]), stored as safetensors, or a
    # list of JSON-serialisable records (e.g. chat examples), stored as JSON lines
    x: np.ndarray | list
    y: np.ndarray | None  # int64 labels [N], or None where the records carry their own targets
    classes: list[str]
    # Samples that share a group id always land in the same split (e.g. several transformed views
    # of one source image). Defaults to one group per sample.
    groups: np.ndarray | None = None
    # Fixed splits given by the source (name -> indices); missing ones are carved by the splitter.
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# fn(spec, seed, local_dir) -> RawDataset; local_dir is the folder the source's download step
# wrote (None for sources without one). Sources never touch the network: downloads are separate.
SourceFn = Callable[[dict, int, Path | None], RawDataset]
DownloadFn = Callable[[dict, Path], dict]
SOURCE_PARAMS: dict[str, dict] = {}
LOCAL_PATHS: dict[str, dict] = {}  # source -> {spec key: "file" | "folder"}
DOWNLOADERS: dict[str, DownloadFn] = {}

# The registry: name -> source function. The built-ins are imported on the first lookup of their
# name (this module imports none of the dataset modules, which import it to register themselves);
# other packages add sources through the entry-point group "mergemix.datasets" (see mergemix.plugins).
BUILTIN_SOURCES = {
    "digits": "mergemix.data.digits:digits",
    "hf_chat": "mergemix.data.text:hf_chat",
    "jsonl_chat": "mergemix.data.text:jsonl_chat",
    "benchmarks": "mergemix.data.text:benchmarks",
    "lm_eval": "mergemix.data.text:lm_eval_source",
    "image_folder": "mergemix.data.images:image_folder",
    "hf_images": "mergemix.data.images:hf_images",
}
# the attribute register_source leaves on a source function: its registration, to register it again
REGISTRATION = "__mergemix_source__"


def _adopt_source(name: str, obj) -> None:
    """Register a source function named by an entry point (or a built-in whose module was imported
    before the registry forgot it): with the params it was registered with, else those it declares
    as attributes ``params``, ``download`` and ``local_paths`` (none: only ``source`` is allowed)."""
    if isinstance(obj, ModuleType) or not callable(obj):
        return  # a module must register the name itself on import
    reg = getattr(obj, REGISTRATION, None)
    if reg is None:
        reg = {k: getattr(obj, k, None) for k in ("params", "download", "local_paths")}
    elif reg.get("name") != name:
        raise PluginError(
            f"dataset source {name!r}: function {obj.__module__}.{obj.__qualname__} is registered as "
            f"{reg.get('name')!r}; name its entry point {reg.get('name')!r}"
        )
    register_source(name, params=reg["params"], download=reg["download"], local_paths=reg["local_paths"])(obj)


SOURCES: Registry = Registry("dataset source", GROUPS["datasets"], BUILTIN_SOURCES, _adopt_source)


def register_source(
    name: str, params: dict | None = None, download: DownloadFn | None = None, local_paths: dict | None = None
):
    """Register a source.

    ``params`` maps each allowed spec key to its allowed values (or None for any value).
    ``download(spec, out_dir) -> info`` (optional) fetches what the source needs into ``out_dir``;
    the workflow runs it as a local rule (login nodes have internet, compute nodes often not) and
    every later job reads only local files. ``local_paths`` maps spec keys that name a local input
    to ``"file"`` or ``"folder"``: a missing one is refused at config check (and so when the DAG is
    built), naming the key and the path, instead of hours later in a job.
    """

    def deco(fn: SourceFn) -> SourceFn:
        # refused: a name taken, or a built-in's name for a function of another module
        SOURCES.add(name, fn)
        try:
            setattr(
                fn, REGISTRATION, {"name": name, "params": params, "download": download, "local_paths": local_paths}
            )
        except (AttributeError, TypeError):  # a callable that takes no attributes
            pass
        SOURCE_PARAMS[name] = dict(params or {})
        LOCAL_PATHS[name] = dict(local_paths or {})
        if download is not None:
            DOWNLOADERS[name] = download
        return fn

    return deco


def source_names() -> list[str]:
    """The sources' names (built-ins and plugins), importing none of them."""
    return SOURCES.names()


def needs_download(spec: dict) -> bool:
    src = spec.get("source")
    if src not in SOURCES:
        return False
    SOURCES[src]  # imported: registered with its download step, if any
    return src in DOWNLOADERS


def get_source(name: str) -> SourceFn:
    if name not in SOURCES:
        raise KeyError(f"unknown dataset source {name!r}; available: {', '.join(SOURCES.names())}")
    return SOURCES[name]


def check_spec(name: str, spec: dict) -> list[str]:
    """Problems with a dataset spec, as messages naming the key and what is allowed."""
    src = spec.get("source")
    if not isinstance(src, str) or src not in SOURCES:
        return [f"datasets.{name}.source: unknown source {src!r}; allowed: {', '.join(SOURCES.names())}"]
    SOURCES[src]  # imported: its params registered
    problems = []
    allowed = SOURCE_PARAMS[src]
    for key, value in spec.items():
        if key == "source":
            continue
        if key not in allowed:
            problems.append(
                f"datasets.{name}.{key}: not a parameter of source {src!r}; allowed: {', '.join(sorted(allowed)) or 'none'}"
            )
        elif allowed[key] is not None and value not in allowed[key]:
            problems.append(
                f"datasets.{name}.{key}: {value!r} is not allowed; allowed: {', '.join(map(str, allowed[key]))}"
            )
    for key, kind in LOCAL_PATHS.get(src, {}).items():
        if key in spec and isinstance(spec[key], str):
            path = Path(spec[key]).expanduser()
            ok = path.is_file() if kind == "file" else path.is_dir()
            if not ok:
                what = "no such file" if not path.exists() else f"not a {kind}"
                problems.append(
                    f"datasets.{name}.{key}: {spec[key]} ({what}); give the {kind} of the dataset "
                    "(a relative path is from the folder snakemake or mergemix runs in)"
                )
    return problems


def _load_builtin() -> None:
    """Kept for older callers: the sources are imported on the first lookup of their name now."""
