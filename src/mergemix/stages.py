"""The pipeline stages as functions of explicit file paths and specs (the CLI calls these).

Config fragments come as typed sections of :mod:`mergemix.settings` (``Split``, ``HParams``,
``Checkpoint``, ``Merge``, ``Eval``, ``Search``); a mapping is accepted and converted as the CLI
converts its JSON (the schema's defaults for missing keys, unknown keys refused):
:meth:`mergemix.settings.Section.coerce`."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from mergemix import __version__, io, subsets
from mergemix.data.prepared import load_prepared, prepare_dataset
from mergemix.selection import full_rows, select_best  # noqa: F401  (the selection rule, re-exported)
from mergemix.settings import Checkpoint, Eval, HParams, Merge, PretrainHParams, Search, Section, Split

if TYPE_CHECKING:  # pandas is imported lazily: it costs every short job ~0.3 s
    import pandas as pd

log = logging.getLogger("mergemix")


def get_backend(spec: dict, threads: int = 1, device: str | None = None):
    """:func:`mergemix.backends.get_backend`, imported on first use: the backends import torch
    (about 2 s per process), which the data, gather, similarity and analysis stages never need."""
    from mergemix.backends import get_backend as make

    return make(spec, threads=threads, device=device)


def download(name: str, spec: dict, out_dir) -> dict:
    """Fetch what a dataset's source needs into ``out_dir`` (the only data step that may use the network)."""
    from mergemix.data.registry import DOWNLOADERS, get_source

    get_source(spec["source"])
    if spec["source"] not in DOWNLOADERS:
        raise ValueError(f"source {spec['source']!r} of dataset {name!r} has no download step")
    info = DOWNLOADERS[spec["source"]](spec, Path(out_dir))
    io.write_json(Path(out_dir) / "download.json", {"name": name, "spec": spec, "info": info})
    return info


def prepare(name: str, spec: dict, split_cfg: Split, out_dir, local_dir=None) -> dict:
    info = prepare_dataset(name, spec, Split.coerce(split_cfg, "split"), out_dir, local_dir)
    log.info("prepared %s: %s", name, info["sizes"])
    return info


def _manifest(
    backend, kind: str, datasets: Sequence, hp: HParams, metrics: dict, pretrained_sha256=None, **extra
) -> dict:
    """What a saved model derives from (see :mod:`mergemix.provenance`); ``datasets``: prepared
    datasets. ``hyperparameters`` is ``hp.to_dict()``: every key of the config's section, as the
    workflow's ``--hparams`` JSON (the validated config's) has them, and ``mixture_weights`` for a
    weighted mixture."""
    from mergemix.provenance import data_record

    return {
        "kind": kind,
        "backend": backend.describe(),
        "pretrained_sha256": pretrained_sha256,
        "datasets": sorted(d.name for d in datasets),
        "data": data_record(datasets),
        "hyperparameters": hp.to_dict(),
        "seed": hp.seed,
        "metrics": metrics,
        "mergemix_version": __version__,
        **extra,
    }


def head(backend_spec: dict, pretrained, data_dir, out_path, threads: int = 1, templates=None) -> dict:
    """A dataset's frozen classification head from the pre-trained model (CLIP's zero-shot head).

    ``templates`` (a template-set name or list) defaults to the prepared dataset's spec."""
    backend = get_backend(backend_spec, threads=threads)
    if not getattr(backend, "has_heads", False):
        raise ValueError(f"backend {backend.name!r} has no per-dataset heads")
    manifest = backend.write_head(pretrained, load_prepared(data_dir), out_path, templates=templates)
    log.info("head for %s: %d classes", manifest["dataset"], len(manifest["classnames"]))
    return manifest


def pretrain(backend_spec: dict, hp: HParams | Mapping, data_dir, out_path, threads: int = 1) -> dict:
    """Pre-train the built-in model; ``hp``: ``pretrain.hparams`` (a mapping is converted as
    ``PretrainHParams.coerce`` says)."""
    hp = hp if isinstance(hp, HParams) else PretrainHParams.coerce(hp, "hparams")
    backend = get_backend(backend_spec, threads=threads)
    model = backend.create()
    data = load_prepared(data_dir)
    metrics = backend.pretrain(model, [data], hp)
    log.info("pretrained: %s", metrics)
    return io.save_model(out_path, backend.state_to_save(model), _manifest(backend, "pretrained", [data], hp, metrics))


def fetch_pretrained(backend_spec: dict, out_path, threads: int = 1) -> dict:
    backend = get_backend(backend_spec, threads=threads)
    return backend.fetch_pretrained(out_path)


def _prepared(data_dir, loaded: dict):
    """A prepared dataset, read once per process when ``loaded`` (folder -> dataset) is shared."""
    key = str(data_dir)
    if key not in loaded:
        loaded[key] = load_prepared(data_dir)
    return loaded[key]


CHECKPOINT_STEPS_ENV = "MERGEMIX_CHECKPOINT_EVERY_STEPS"
CHECKPOINT_SECONDS_ENV = "MERGEMIX_CHECKPOINT_EVERY_SECONDS"


def checkpoint_path(out_path) -> Path:
    """The checkpoint folder of a fine-tune writing ``out_path``: ``<out_path>.ckpt`` (it holds
    ``state.safetensors`` while the fine-tune runs and is removed once the model is saved)."""
    return Path(f"{out_path}.ckpt")


def checkpoint_settings(steps=None, seconds=None) -> Checkpoint:
    """How often a fine-tune saves its checkpoint, as the fine-tune stages' flags
    (``--checkpoint-every-steps``, ``--checkpoint-every-seconds``) say: each rule as given, else its
    environment variable (``MERGEMIX_CHECKPOINT_EVERY_STEPS``, ``MERGEMIX_CHECKPOINT_EVERY_SECONDS``),
    else the schema's ``checkpoint`` default; 0 (or none, off) turns a rule off. A fine-tune stage
    given no checkpoint settings uses this (the environment, then the schema)."""
    import math
    import os

    default = Checkpoint.from_cli({}, "checkpoint")

    def value(given, var, kind, default):
        source = f"{var}={os.environ.get(var)!r}" if given is None else f"{given!r}"
        if given is None:
            given = os.environ.get(var, "").strip()
            if given == "":
                return default or None
            if given.lower() in ("none", "off", "no", "false"):
                return None
        try:
            v = kind(given)
        except (TypeError, ValueError, OverflowError):
            v = None
        if kind is int and isinstance(given, float) and v != given:
            v = None  # 2.5 steps
        if v is None or isinstance(given, bool) or not math.isfinite(v) or v < 0:
            what = "a whole number of steps" if kind is int else "a number of seconds"
            raise ValueError(f"checkpoint interval {source} is not allowed; give {what} >= 1, or 0 to turn it off")
        return v or None

    every_seconds = value(seconds, CHECKPOINT_SECONDS_ENV, float, default.every_seconds)
    return Checkpoint(
        every_minutes=every_seconds / 60 if every_seconds else 0,
        every_steps=value(steps, CHECKPOINT_STEPS_ENV, int, default.every_steps),
    )


def _checkpoint(checkpoint) -> Checkpoint:
    """A fine-tune stage's checkpoint settings: a :class:`mergemix.settings.Checkpoint`, a mapping
    (``Checkpoint.coerce``: the schema's defaults for keys left out) or None
    (:func:`checkpoint_settings`: the environment variables, then the schema)."""
    return checkpoint_settings() if checkpoint is None else Checkpoint.coerce(checkpoint, "checkpoint")


def _finetune(
    backend,
    hp: HParams,
    pretrained,
    data_dirs: Sequence,
    out_path,
    loaded: dict | None = None,
    pre: dict | None = None,
    checkpoint: Checkpoint | None = None,
):
    """Fine-tune the pre-trained model and save it with its manifest. ``hp``: the hyperparameters
    (a mapping: ``HParams.coerce``). ``loaded`` (data folder -> prepared dataset) and ``pre`` (the
    checked pre-trained manifest) let a pack of fine-tunes read each once (:func:`finetune_pack`).

    The training state is checkpointed to :func:`checkpoint_path` as ``checkpoint`` says (its
    ``every_steps`` and ``every_minutes``; None: :func:`checkpoint_settings`, the environment
    variables, then the schema); a rerun after a kill resumes from it and writes the same model
    bytes as an uninterrupted run. The checkpoint is removed once the model is saved."""
    from mergemix.backends.training import Checkpoint as TrainingCheckpoint
    from mergemix.backends.training import checkpointing, remove_checkpoint
    from mergemix.provenance import pretrained_manifest

    hp, every = HParams.coerce(hp, "hparams"), _checkpoint(checkpoint)
    model = backend.load_pretrained(pretrained)
    if pre is None:
        pre = pretrained_manifest(pretrained, backend)  # made with this backend's configuration (init_seed...)
    if loaded is None:
        loaded = {}
    data = [_prepared(d, loaded) for d in data_dirs]
    described = backend.describe()
    trained = {k: v for k, v in (described.get("params") or {}).items() if k not in backend.merge_only_params}
    saved = TrainingCheckpoint(
        checkpoint_path(out_path),
        every.every_steps or None,
        every.every_seconds or None,
        keep=True,
        fingerprint={
            "backend": {**described, "params": trained},
            "pretrained_sha256": pre["sha256"],
            "data": [[d.name, d.sha256] for d in data],
            "mergemix_version": __version__,
        },
    )
    t0 = time.time()
    with checkpointing(saved):
        metrics = backend.finetune(model, data, hp)
    log.info("fine-tuned on %s in %.1fs: %s", "+".join(d.name for d in data), time.time() - t0, metrics)
    manifest = io.save_model(
        out_path,
        backend.state_to_save(model),
        _manifest(backend, "finetuned", data, hp, metrics, pretrained_sha256=pre["sha256"]),
    )
    remove_checkpoint(saved.path)
    return model, manifest


def finetune(
    backend_spec: dict,
    hp: HParams | Mapping,
    pretrained,
    data_dirs: Sequence,
    out_path,
    threads: int = 1,
    checkpoint: Checkpoint | Mapping | None = None,
) -> dict:
    """Fine-tune the pre-trained model on the union of the train splits of ``data_dirs``
    (checkpointed and resumed as :func:`_finetune` says)."""
    hp, checkpoint = HParams.coerce(hp, "hparams"), _checkpoint(checkpoint)
    return _finetune(
        get_backend(backend_spec, threads=threads), hp, pretrained, data_dirs, out_path, checkpoint=checkpoint
    )[1]


def _fresh_rng():
    """A function that puts torch's global random state back to where this process started, so
    each job of a pack begins as a job of its own would (backends seed what they use; this covers
    any default-generator use they might make)."""
    import torch

    seed = torch.initial_seed()
    return lambda: torch.manual_seed(seed)


def finetune_pack(
    backend_spec: dict,
    hp: HParams | Mapping,
    pretrained,
    jobs: Sequence,
    threads: int = 1,
    checkpoint: Checkpoint | Mapping | None = None,
) -> list[dict]:
    """Several fine-tunes in one process: ``jobs`` is a list of ``(data_dirs, out_path)``.

    Each writes the model and manifest its own :func:`finetune` job would, bit for bit (same seed,
    hyperparameters, threads and starting weights: the pre-trained model is loaded afresh for each);
    torch is imported, the pre-trained manifest checked and each dataset read once for all of them.
    Short jobs (a small convnet fine-tunes in about a second) otherwise spend most of their time
    starting Python and importing torch."""
    from mergemix.provenance import pretrained_manifest

    hp, checkpoint = HParams.coerce(hp, "hparams"), _checkpoint(checkpoint)
    backend = get_backend(backend_spec, threads=threads)
    reset = _fresh_rng()
    pre = pretrained_manifest(pretrained, backend)
    loaded: dict = {}
    manifests = []
    for i, (data_dirs, out_path) in enumerate(jobs):
        reset()
        manifests.append(
            _finetune(
                backend,
                hp,
                pretrained,
                data_dirs,
                out_path,
                loaded,
                pre,
                checkpoint,
            )[1]
        )
        log.info("pack: %d/%d fine-tunes written (%s)", i + 1, len(jobs), out_path)
    return manifests


def final_finetune(
    backend_spec: dict,
    hp: HParams | Mapping,
    pretrained,
    merge_eval_csv,
    data_dirs: Mapping[str, str],
    target_dir,
    out_path,
    eval_out,
    threads: int = 1,
    checkpoint: Checkpoint | Mapping | None = None,
) -> dict:
    """Algorithm 1's deployed model: fine-tune on the mixture whose merged model is best on val
    (checkpointed and resumed as :func:`_finetune` says)."""
    hp, checkpoint = HParams.coerce(hp, "hparams"), _checkpoint(checkpoint)
    return _final_finetune(
        lambda: get_backend(backend_spec, threads=threads),
        hp,
        pretrained,
        merge_eval_csv,
        data_dirs,
        target_dir,
        out_path,
        eval_out,
        checkpoint=checkpoint,
    )


def _final_finetune(
    backend,
    hp: HParams,
    pretrained,
    merge_eval_csv,
    data_dirs: Mapping[str, str],
    target_dir,
    out_path,
    eval_out,
    loaded: dict | None = None,
    pre: dict | None = None,
    checkpoint: Checkpoint | None = None,
) -> dict:
    """:func:`final_finetune` with a backend (or a function making it, called once the selection is
    read), and what a pack shares (see :func:`_finetune`)."""
    from mergemix.tables import read_result_table

    best = select_best(read_result_table(merge_eval_csv, "merge_eval"))
    chosen = subsets.parse_subset(best["subset"])
    missing = [c for c in chosen if c not in data_dirs]
    if missing:
        raise ValueError(f"selected datasets {missing} have no prepared data among the inputs")
    if callable(backend):
        backend = backend()
    loaded = {} if loaded is None else loaded
    model, manifest = _finetune(
        backend,
        hp,
        pretrained,
        [data_dirs[c] for c in chosen],
        out_path,
        loaded,
        pre,
        checkpoint,
    )
    target = _prepared(target_dir, loaded)
    result = {
        "target": target.name,
        "selected": best["subset"],
        "merged_val_acc": float(best["val_acc"]),
        "merged_test_acc": float(best["test_acc"]),
        "val_acc": backend.evaluate(model, target, "val"),
        "test_acc": backend.evaluate(model, target, "test"),
        "model_sha256": manifest["sha256"],
    }
    io.write_json(eval_out, result)
    return result


def final_finetune_pack(
    backend_spec: dict,
    hp: HParams | Mapping,
    pretrained,
    jobs: Sequence[Mapping],
    threads: int = 1,
    checkpoint: Checkpoint | Mapping | None = None,
) -> list[dict]:
    """Several targets' :func:`final_finetune` in one process (see :func:`finetune_pack`): ``jobs`` are
    dicts with the keys ``merge_eval_csv``, ``data_dirs``, ``target_dir``, ``out_path`` and ``eval_out``."""
    from mergemix.provenance import pretrained_manifest

    hp, checkpoint = HParams.coerce(hp, "hparams"), _checkpoint(checkpoint)
    backend = get_backend(backend_spec, threads=threads)
    reset = _fresh_rng()
    pre = pretrained_manifest(pretrained, backend)
    loaded: dict = {}
    results = []
    for job in jobs:
        reset()
        results.append(
            _final_finetune(
                backend,
                hp,
                pretrained,
                loaded=loaded,
                pre=pre,
                checkpoint=checkpoint,
                **job,
            )
        )
        log.info("final model: %s", results[-1])
    return results


def _evaluator(
    backend_spec: dict,
    merge_spec: Merge,
    pretrained,
    model_paths: Mapping[str, str],
    threads: int,
    eval_spec: Eval | None = None,
):
    """The merge-eval engine; ``eval_spec``: merge_eval's ``eval_batch_size`` and ``precision``
    (None: the schema's defaults)."""
    from mergemix.merge_eval import MergeEvaluator

    merge, evaluation = Merge.coerce(merge_spec, "merge"), Eval.coerce(eval_spec, "eval")
    backend = get_backend(backend_spec, threads=threads)
    backend.configure_eval(evaluation.eval_batch_size, evaluation.precision)
    # options as plain JSON data (lists, not the section's tuples), as a merge method reads them
    return MergeEvaluator(backend, pretrained, model_paths, merge.method, merge.to_dict()["options"])


def merge_eval(
    backend_spec: dict,
    merge_spec: Merge,
    pretrained,
    model_paths: Mapping[str, str],
    target_dir,
    chunk: int,
    chunks: int,
    out_csv,
    threads: int = 1,
    subset_ids: Sequence[str] | None = None,
    eval_spec: Eval | None = None,
    test: str = "all",
    test_subsets: Sequence[str] = (),
) -> pd.DataFrame:
    """Merged models of one chunk of all 2^N-1 subsets (exhaustive, in Gray-code order: one model
    added to or removed from a running sum per step), or of the given ``subset_ids`` (the mixture
    sample's merged models, for the correlation study of a budgeted search).

    ``test``: ``all`` scores every subset's test split; ``selected`` only the chunk's best on val
    and ``test_subsets`` (the subsets the tables report), leaving ``test_acc`` empty elsewhere."""
    ev = _evaluator(backend_spec, merge_spec, pretrained, model_paths, threads, eval_spec)
    if subset_ids is not None:
        masks = [subsets.names_to_mask(subsets.parse_subset(s), ev.names) for s in subset_ids]
        orders = None
    else:
        pairs = subsets.gray_chunk(len(ev.names), chunk, chunks)
        orders, masks = [o for o, _ in pairs], [m for _, m in pairs]
    wanted = [subsets.names_to_mask(subsets.parse_subset(s), ev.names) for s in test_subsets]
    t0 = time.time()
    df = ev.run(load_prepared(target_dir), masks, orders, test=test, test_masks=wanted)
    log.info("chunk %d/%d: %d merged models in %.2fs", chunk + 1, chunks, len(df), time.time() - t0)
    io.write_csv(out_csv, df)
    return df


def _search_fingerprint(
    backend_spec, merge_spec, search_spec, model_paths, target_dir, eval_spec: Eval | None = None, test="all"
) -> str:
    """Identifies what a search's journal holds: a changed model, target, merge or search setting
    starts a new optuna study in the same journal instead of resuming a stale one. ``merge_spec``
    and ``search_spec`` are sections or what a caller identifies its search by (plain data)."""
    import hashlib
    import json

    def plain(v):
        return v.to_dict() if isinstance(v, Section) else v

    search_spec = plain(search_spec)
    parts = {
        "backend": backend_spec,
        "merge": plain(merge_spec),
        "search": {k: search_spec[k] for k in ("strategy", "budget", "seed", "options")},
        "models": {n: io.read_json(io.manifest_path(p)).get("sha256") for n, p in sorted(model_paths.items())},
        "target": io.sha256_file(Path(target_dir) / "splits.json"),
    }
    # evaluation settings change scores (precision) or what a trial records (test): only when not
    # the defaults, so journals written before these settings existed still resume
    evaluation = {k: v for k, v in Eval.coerce(eval_spec).to_dict().items() if v not in (None, "auto")}
    if evaluation or test != "all":
        parts["evaluation"] = {**evaluation, "test": test}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class _Progress:
    """A job-log line at least every ``every`` seconds: evaluations done / budget, rate, ETA, best so far."""

    def __init__(self, label: str, every: float = 30.0):
        from mergemix.progress import LogEvery

        self.label, self.every = label, LogEvery(every)

    def __call__(self, evaluation, objective) -> None:
        b = objective.budget
        total, done = (b.examples, objective.examples_used) if b.examples else (b.evaluations, objective.evaluations)
        if not self.every.due(done, math.inf):  # the first evaluation, then every `every` seconds
            return
        unit = "val examples" if b.examples else "evaluations"
        rate, eta = self.every.rate_eta(done, total)
        best = objective.best()
        log.info(
            "%s: %d/%s %s (%.1f/s, ETA %.0fs), best val_acc so far %s",
            self.label,
            done,
            total if total else "?",
            unit,
            rate,
            eta,
            f"{best.value:.4f}" if best else "-",
        )


def search(
    backend_spec: dict,
    merge_spec: Merge,
    search_spec: Search,
    pretrained,
    model_paths: Mapping[str, str],
    target_dir,
    out_csv,
    out_json,
    worker: int = 0,
    workers: int = 1,
    journal=None,
    threads: int = 1,
    eval_spec: Eval | None = None,
    test: str = "all",
) -> dict:
    """A budgeted search over the subsets of a target's candidates (``merge_eval.strategy``;
    ``auto`` and a null budget resolved by :meth:`mergemix.settings.Search.resolved`).

    Writes one row per evaluation this worker charged (halving scores a subset on several val
    slices: one row each) and a JSON summary; ``gather`` joins the workers' files. ``test``:
    ``all`` scores the test split of every full evaluation; ``selected`` only of this worker's
    best subset (the best over all workers is one of those)."""
    import pandas as pd

    from mergemix.search import Objective, get_strategy, make_budget, run_search

    merge, evaluation = Merge.coerce(merge_spec, "merge"), Eval.coerce(eval_spec, "eval")
    spec = Search.coerce(search_spec, "search")
    ev = _evaluator(backend_spec, merge, pretrained, model_paths, threads, evaluation)
    target = load_prepared(target_dir)
    n, n_val = len(ev.names), len(target.indices["val"])
    spec = spec.resolved(n)
    cls = get_strategy(spec.strategy)
    budget = make_budget(spec.budget, n, n_val, cls.cost)
    runtime = {}
    if cls.supports_workers:
        fp = _search_fingerprint(backend_spec, merge, spec, model_paths, target_dir, evaluation, test)
        runtime = {"journal": journal, "study_name": f"{target.name}-{fp}", "worker": worker, "workers": workers}
    elif workers != 1 or worker != 0:
        raise ValueError(f"search strategy {cls.name!r} runs as one job per target; set merge_eval.workers: 1")
    strategy = cls(n, seed=spec.seed, **spec.to_dict()["options"], **runtime)
    score = ev.scorer(target, seed=spec.seed, **({} if test == "all" else {"test": test}))

    def tagged(mask, examples=None):
        value, info = score(mask, examples)
        return value, {**info, "worker": worker}

    label = f"{cls.name} search on {target.name} (worker {worker + 1}/{workers})"
    objective = Objective(tagged, n, n_val, budget, on_evaluation=_Progress(label))
    t0 = time.time()
    result = run_search(strategy, objective)
    mine = [r for r in result.records if r.info.get("worker", worker) == worker]
    rows = [ev.row(r.mask, r.value, r.info.get("test_acc", float("nan")), r.order, r.examples) for r in mine]
    from mergemix.merge_eval import COLUMNS

    df = pd.DataFrame(rows, columns=COLUMNS)
    if test == "selected" and len(df):
        ev.fill_best_test(df, target)
    io.write_csv(out_csv, df)
    summary = {
        "target": target.name,
        "strategy": cls.name,
        "candidates": ev.names,
        "n_val": n_val,
        "seed": spec.seed,
        "options": strategy.opts,
        "budget": {"evaluations": budget.evaluations, "examples": budget.examples},
        "stop_reason": result.stop_reason,
        "worker": worker,
        "workers": workers,
        "evaluations": len(mine),
        "val_examples": int(sum(r.examples for r in mine)),
        "best": subsets.subset_id(subsets.mask_to_names(result.best.mask, ev.names)) if result.best else None,
        "seconds": round(time.time() - t0, 3),
    }
    io.write_json(out_json, summary)
    log.info(
        "%s stopped (%s) after %d evaluations, %d val examples; best %s",
        label,
        result.stop_reason,
        result.evaluations,
        result.examples_used,
        summary["best"],
    )
    return summary


def gather(
    chunk_csvs: Sequence, candidates: Sequence[str], out_csv, search_jsons: Sequence = (), out_json=None
) -> pd.DataFrame:
    """Join a target's merge-eval files into one row per subset, with a summary of the search cost.

    Exhaustive (no ``search_jsons``): the chunks must cover every non-empty subset exactly once.
    Budgeted search: the workers' rows must never score a subset twice on the same val slice;
    a subset scored on several slices (halving) keeps its largest-slice row."""
    import pandas as pd

    from mergemix.tables import read_result_table

    kind = "merge_eval_rows" if search_jsons else "merge_eval"
    df = pd.concat([read_result_table(p, kind) for p in chunk_csvs], ignore_index=True)
    n = len(candidates)
    expected = {subsets.subset_id(s) for s in subsets.all_subsets(sorted(candidates))}
    extra = sorted(set(df["subset"]) - expected)
    if search_jsons:
        dup = df[df.duplicated(["subset", "val_examples"], keep=False)]["subset"].unique().tolist()
        if dup or extra:
            raise ValueError(
                f"search results for {sorted(candidates)} are inconsistent: scored twice on the same val slice "
                f"{sorted(dup)[:5]}, unexpected {extra[:5]}; delete {Path(out_csv).parent / 'search'} and rerun"
            )
        summaries = [io.read_json(p) for p in search_jsons]
        s0 = summaries[0]
        info = {
            "strategy": s0["strategy"],
            "options": s0["options"],
            "budget": s0["budget"],
            "seed": s0["seed"],
            "workers": s0["workers"],
            "stop_reasons": sorted({s["stop_reason"] for s in summaries}),
            "n_val": s0["n_val"],
        }
    else:
        counts = df["subset"].value_counts()
        dup = sorted(counts[counts > 1].index)
        missing = sorted(expected - set(df["subset"]))
        if dup or missing or extra:
            raise ValueError(
                f"chunks do not cover the subsets of {sorted(candidates)} exactly once: duplicated {dup[:5]}, "
                f"missing {missing[:5]}, unexpected {extra[:5]}; delete the chunk files and rerun merge-eval"
            )
        info = {
            "strategy": "exhaustive",
            "options": {},
            "budget": None,
            "seed": None,
            "workers": 1,
            "stop_reasons": ["all subsets evaluated"],
            "n_val": int(df["val_examples"].max()),
        }
    info.update(
        candidates=n,
        evaluations=int(len(df)),
        val_examples=int(df["val_examples"].sum()),
        exhaustive_evaluations=2**n - 1,
        exhaustive_val_examples=(2**n - 1) * info["n_val"],
    )
    df = df.sort_values(["val_examples", "order"], ascending=[False, True]).drop_duplicates("subset")
    df = df.sort_values("subset", key=lambda s: s.map(subsets.sort_key)).reset_index(drop=True)
    io.write_csv(out_csv, df)
    if out_json is not None:
        io.write_json(out_json, info)
    return df


def eval_models(
    backend_spec: dict, pretrained, model_paths: Mapping[str, str], target_dir, out_csv, threads: int = 1
) -> pd.DataFrame:
    """Evaluate saved models (keyed by subset id) on a target's val and test splits."""
    import pandas as pd

    from mergemix import provenance

    backend = get_backend(backend_spec, threads=threads)
    model = backend.load_pretrained(pretrained)
    pre = provenance.pretrained_manifest(pretrained, backend)
    reference = {k: v.detach() for k, v in backend.merge_params(model).items()}
    target = load_prepared(target_dir)
    rows, first = [], {}
    for sid in sorted(model_paths, key=subsets.sort_key):
        state, manifest = io.load_model(model_paths[sid])
        provenance.check_model(
            manifest,
            state,
            path=model_paths[sid],
            expected_datasets=subsets.parse_subset(sid),
            pretrained=pre,
            backend=backend,
            reference=reference,
            pretrained_path=pretrained,
        )
        first = first or {model_paths[sid]: manifest}
        provenance.check_same_hyperparameters({**first, model_paths[sid]: manifest})
        backend.load_state(model, state)
        rows.append(
            {
                "subset": sid,
                "size": len(subsets.parse_subset(sid)),
                "val_acc": backend.evaluate(model, target, "val"),
                "test_acc": backend.evaluate(model, target, "test"),
            }
        )
    df = pd.DataFrame(rows, columns=["subset", "size", "val_acc", "test_acc"])
    io.write_csv(out_csv, df)
    return df


def eval_pretrained(
    backend_spec: dict, pretrained, target_dirs: Mapping[str, str], out_csv, threads: int = 1
) -> pd.DataFrame:
    import pandas as pd

    backend = get_backend(backend_spec, threads=threads)
    model = backend.load_pretrained(pretrained)
    rows = []
    for name in sorted(target_dirs):
        d = load_prepared(target_dirs[name])
        rows.append(
            {
                "target": name,
                "val_acc": backend.evaluate(model, d, "val"),
                "test_acc": backend.evaluate(model, d, "test"),
            }
        )
    df = pd.DataFrame(rows)
    io.write_csv(out_csv, df)
    return df


def embed(backend_spec: dict, pretrained, data_dir, split: str, out_path, threads: int = 1) -> np.ndarray:
    return embed_pack(backend_spec, pretrained, [(data_dir, out_path)], split, threads)[0]


def embed_pack(backend_spec: dict, pretrained, jobs: Sequence, split: str, threads: int = 1) -> list[np.ndarray]:
    """Embeddings of a split of each dataset (``jobs``: ``(data_dir, out_path)``) with one loaded model."""
    backend = get_backend(backend_spec, threads=threads)
    model = backend.load_pretrained(pretrained)
    return [_embed(backend, model, pretrained, data_dir, split, out_path) for data_dir, out_path in jobs]


def _embed(backend, model, pretrained, data_dir, split: str, out_path) -> np.ndarray:
    data = load_prepared(data_dir)
    emb = backend.embed(model, data, split)
    # what the embeddings derive from, checked by the similarity stage
    meta = {
        "split": split,
        "dataset": data.name,
        "data_sha256": data.sha256,
        "pretrained_sha256": io.read_json(io.manifest_path(pretrained))["sha256"],
    }
    io.save_arrays(out_path, {"embeddings": emb}, meta)
    return emb


def _check_embeddings(target_emb, candidate_embs: Mapping[str, str]) -> None:
    """Every embeddings file comes from the same pre-trained model and split, and each candidate's
    file holds that candidate's embeddings."""
    from mergemix.provenance import ProvenanceError

    metas = {target_emb: io.arrays_metadata(target_emb)}
    for name, path in candidate_embs.items():
        metas[path] = meta = io.arrays_metadata(path)
        if meta.get("dataset", name) != name:
            raise ProvenanceError(
                f"{path}: holds the embeddings of dataset {meta['dataset']!r}, not of candidate {name!r}; delete it and "
                "rerun snakemake (it reruns the embed stage)"
            )
    first, ref = next(iter(metas.items()))
    for path, meta in metas.items():
        for key in ("pretrained_sha256", "split"):
            if key not in meta:
                raise ProvenanceError(
                    f"{path}: no {key} in its metadata (written by an older mergemix); delete the embeddings folder "
                    f"({Path(path).parent}) and rerun snakemake (it reruns the embed stage)"
                )
            if meta[key] != ref[key]:
                raise ProvenanceError(
                    f"{path}: {key} is {meta[key]} but {ref[key]} in {first}: embeddings of different pre-trained models "
                    f"or splits are not comparable; delete the embeddings folder ({Path(path).parent}) and rerun snakemake"
                )


def similarity(
    target_emb, candidate_embs: Mapping[str, str], out_csv, subset_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """The six similarity scores of every subset of the candidates (or of ``subset_ids``)."""
    import pandas as pd

    from mergemix.similarity import METRICS, score_subsets

    names = sorted(candidate_embs)
    _check_embeddings(target_emb, {n: candidate_embs[n] for n in names})
    tgt = io.load_arrays(target_emb)["embeddings"]
    cands = {n: io.load_arrays(candidate_embs[n])["embeddings"] for n in names}
    if subset_ids is None:
        subs = subsets.all_subsets(names)
    else:
        subs = [sorted(subsets.parse_subset(s)) for s in subset_ids]
        unknown = sorted({n for s in subs for n in s} - set(names))
        if unknown:
            raise ValueError(f"subsets name datasets without embeddings among the candidates: {unknown}")
    scores = score_subsets(tgt, cands, subs)
    df = pd.DataFrame({"subset": [subsets.subset_id(s) for s in subs], "size": [len(s) for s in subs]})
    for m in METRICS:
        df[m] = scores[m]
    df = df.sort_values("subset", key=lambda s: s.map(subsets.sort_key)).reset_index(drop=True)
    io.write_csv(out_csv, df)
    return df
