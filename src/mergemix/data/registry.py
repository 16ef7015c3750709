"""Registry of dataset sources.

A source turns a dataset spec (a dict from the study config, ``source`` naming the source) into
a :class:`RawDataset`. Register a new source with::

    @register_source("my_source")
    def my_source(spec: dict, seed: int) -> RawDataset: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np


@dataclass
class RawDataset:
    # samples: an array (e.g. float32 or uint8 images [N, C, H, W]), stored as safetensors, or a
    # list of JSON-serialisable records (e.g. chat examples), stored as JSON lines
    x: "np.ndarray | list"
    y: Optional[np.ndarray]  # int64 labels [N], or None where the records carry their own targets
    classes: list[str]
    # Samples that share a group id always land in the same split (e.g. several transformed views
    # of one source image). Defaults to one group per sample.
    groups: Optional[np.ndarray] = None
    # Fixed splits given by the source (name -> indices); missing ones are carved by the splitter.
    splits: Dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# fn(spec, seed, local_dir) -> RawDataset; local_dir is the folder the source's download step
# wrote (None for sources without one). Sources never touch the network: downloads are separate.
SourceFn = Callable[[dict, int, Optional[Path]], RawDataset]
DownloadFn = Callable[[dict, Path], dict]
SOURCES: Dict[str, SourceFn] = {}
SOURCE_PARAMS: Dict[str, dict] = {}
LOCAL_PATHS: Dict[str, dict] = {}  # source -> {spec key: "file" | "folder"}
DOWNLOADERS: Dict[str, DownloadFn] = {}


def register_source(name: str, params: dict | None = None, download: DownloadFn | None = None,
                    local_paths: dict | None = None):
    """Register a source.

    ``params`` maps each allowed spec key to its allowed values (or None for any value).
    ``download(spec, out_dir) -> info`` (optional) fetches what the source needs into ``out_dir``;
    the workflow runs it as a local rule (login nodes have internet, compute nodes often not) and
    every later job reads only local files. ``local_paths`` maps spec keys that name a local input
    to ``"file"`` or ``"folder"``: a missing one is refused at config check (and so when the DAG is
    built), naming the key and the path, instead of hours later in a job.
    """

    def deco(fn: SourceFn) -> SourceFn:
        if name in SOURCES:
            raise ValueError(f"dataset source {name!r} is already registered")
        SOURCES[name] = fn
        SOURCE_PARAMS[name] = dict(params or {})
        LOCAL_PATHS[name] = dict(local_paths or {})
        if download is not None:
            DOWNLOADERS[name] = download
        return fn

    return deco


def needs_download(spec: dict) -> bool:
    _load_builtin()
    return spec.get("source") in DOWNLOADERS


def get_source(name: str) -> SourceFn:
    _load_builtin()
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown dataset source {name!r}; available: {', '.join(sorted(SOURCES))}") from None


def check_spec(name: str, spec: dict) -> list[str]:
    """Problems with a dataset spec, as messages naming the key and what is allowed."""
    _load_builtin()
    src = spec.get("source")
    if src not in SOURCES:
        return [f"datasets.{name}.source: unknown source {src!r}; allowed: {', '.join(sorted(SOURCES))}"]
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
                problems.append(f"datasets.{name}.{key}: {spec[key]} ({what}); give the {kind} of the dataset "
                                "(a relative path is from the folder snakemake or mergemix runs in)")
    return problems


def _load_builtin() -> None:
    from mergemix.data import digits  # noqa: F401  (registers itself)
    from mergemix.data import text  # noqa: F401  (chat data and benchmark targets)
    from mergemix.data import images  # noqa: F401  (image_folder, hf_images)
