"""``mergemix select``: the ranked mixtures of given fine-tuned models for one target, on a
workstation, without Snakemake and without training.

The same stages as the workflow, called in order: the pre-trained model (a given mergemix file, or
fetched for hub backends), the target prepared (or a prepared folder given), its head (clip), each
candidate model imported with the checks of :func:`mergemix.given.import_model`, then the subset
search (exhaustive in Gray-code order where 2^N-1 fits the budget, as the workflow's merge-eval
with one chunk; else the budgeted strategy) and the ranking by merged val accuracy
(:func:`mergemix.analysis.rankings`). Same engine, same numbers as the workflow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

from mergemix.settings import Merge, Search, Split

log = logging.getLogger("mergemix")


def _pretrained(backend_spec: dict, pretrained, threads: int) -> Path:
    from mergemix import io, stages

    p = Path(pretrained)
    if p.is_file() and io.manifest_path(p).is_file():
        return p
    if p.is_dir() and io.manifest_path(p / "model.safetensors").is_file() and (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    backend = stages.get_backend(backend_spec, threads=threads)
    if getattr(backend, "can_pretrain", False):
        raise ValueError(
            f"--pretrained {pretrained}: no mergemix model there (model.safetensors with its model.json); "
            f"the {backend_spec['name']!r} backend is pre-trained by a study: give that study's "
            "models/pretrained/model.safetensors"
        )
    out = (p if p.suffix != ".safetensors" else p.parent) / "model.safetensors"
    if out.exists():  # e.g. the base model's own weights (a transformers folder): never overwritten
        raise ValueError(
            f"--pretrained {pretrained}: {out} is not a mergemix model (no {io.manifest_path(out).name} "
            "beside it) and is not overwritten; give a mergemix pre-trained model, or a new folder to "
            f"fetch the {backend_spec['name']!r} backend's pre-trained model into"
        )
    stages.fetch_pretrained(backend_spec, out, threads=threads)
    return out


def _target(spec_or_dir: str, split: Split, work: Path) -> Path:
    from mergemix import stages

    p = Path(spec_or_dir)
    if p.is_dir() and (p / "splits.json").is_file():
        return p
    try:
        spec = json.loads(spec_or_dir)
    except json.JSONDecodeError:
        raise ValueError(
            f"--target {spec_or_dir!r}: neither a prepared dataset folder (with splits.json) nor a "
            'JSON dataset spec such as \'{"name": "rotate", "source": "digits", "domain": "rotate"}\''
        ) from None
    if not isinstance(spec, dict) or "source" not in spec:
        raise ValueError(f"--target: the JSON spec needs a source (and a name), got {spec_or_dir!r}")
    spec = dict(spec)
    name = spec.pop("name", "target")
    out = work / "data" / name
    stages.prepare(name, spec, split, out)
    return out


def select(
    backend_spec: dict,
    pretrained,
    models: Mapping[str, str],
    target,
    out_csv,
    *,
    split: Split | None = None,
    search: Search | None = None,
    merge: Merge | None = None,
    work_dir=None,
    threads: int = 1,
    specs: Mapping[str, dict] | None = None,
):
    """Rank the subsets of ``models`` (``{name: path}``) for ``target``; writes ``out_csv`` and
    returns the ranking (rank 1 = the chosen mixture). ``split``: the target's split settings when
    it is a spec; ``search``: the subset search (``auto``: exhaustive while 2^N-1 fits the budget);
    ``merge``: the merge method and options. Each is a :mod:`mergemix.settings` section, a mapping
    of some of its keys, or None (the schema's defaults). ``specs``: extra ``models`` entry keys
    per name (format, max_distance)."""
    from mergemix import io, stages
    from mergemix.analysis import rankings
    from mergemix.given import import_model, load_base
    from mergemix.tables import read_result_table

    split, search = Split.coerce(split, "--split"), Search.coerce(search, "search")
    merge = Merge.coerce(merge, "merge")
    if len(models) < 1:
        raise ValueError("--models: give at least one NAME=PATH")
    work = Path(work_dir) if work_dir else Path(out_csv).parent / f"{Path(out_csv).stem}.work"
    work.mkdir(parents=True, exist_ok=True)
    pre = _pretrained(backend_spec, pretrained, threads)
    target_dir = _target(str(target), split, work)
    from mergemix.data.prepared import load_prepared

    tname = load_prepared(target_dir).name
    for name in models:
        if name == tname:
            raise ValueError(f"--models {name}: the target {tname!r} is among its own candidates; remove it")
    base = load_base(backend_spec, pre, threads)  # once for every given model's checks
    if getattr(base.backend, "has_heads", False):
        head = pre.parent / "heads" / f"{tname}.safetensors"
        if not head.exists():
            stages.head(backend_spec, pre, target_dir, head, threads=threads)
    paths = {}
    for name, src in sorted(models.items()):
        paths[name] = str(work / "models" / name / "model.safetensors")
        spec = {"path": src, **((specs or {}).get(name) or {})}
        import_model(backend_spec, pre, spec, name, paths[name], threads=threads, base=base)
    resolved = search.resolved(len(paths))
    raw = work / f"merge_eval.{tname}.csv"
    if resolved.strategy == "exhaustive":
        stages.merge_eval(backend_spec, merge, pre, paths, target_dir, 0, 1, raw, threads)
    else:
        stages.search(
            backend_spec, merge, resolved, pre, paths, target_dir, raw, work / f"search.{tname}.json", threads=threads
        )
    table = rankings({tname: read_result_table(raw, "merge_eval")})
    table.insert(2, "search", resolved.strategy)
    io.write_csv(out_csv, table)
    return table
