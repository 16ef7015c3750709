"""The pipeline stages as functions of explicit file paths and specs (the CLI calls these)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from mergemix import __version__, io, subsets
from mergemix.backends import get_backend
from mergemix.data.prepared import load_prepared, prepare_dataset


if TYPE_CHECKING:  # pandas is imported lazily: it costs every short job ~0.3 s
    import pandas as pd

log = logging.getLogger("mergemix")


def download(name: str, spec: dict, out_dir) -> dict:
    """Fetch what a dataset's source needs into ``out_dir`` (the only data step that may use the network)."""
    from mergemix.data.registry import DOWNLOADERS, get_source

    get_source(spec["source"])
    if spec["source"] not in DOWNLOADERS:
        raise ValueError(f"source {spec['source']!r} of dataset {name!r} has no download step")
    info = DOWNLOADERS[spec["source"]](spec, Path(out_dir))
    io.write_json(Path(out_dir) / "download.json", {"name": name, "spec": spec, "info": info})
    return info


def prepare(name: str, spec: dict, split_cfg: dict, out_dir, local_dir=None) -> dict:
    info = prepare_dataset(name, spec, split_cfg, out_dir, local_dir)
    log.info("prepared %s: %s", name, info["sizes"])
    return info


def _manifest(backend, kind: str, datasets: Sequence[str], hp: dict | None, metrics: dict, **extra) -> dict:
    return {
        "kind": kind,
        "backend": backend.describe(),
        "datasets": sorted(datasets),
        "hyperparameters": hp,
        "seed": (hp or {}).get("seed"),
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


def pretrain(backend_spec: dict, hp: dict, data_dir, out_path, threads: int = 1) -> dict:
    backend = get_backend(backend_spec, threads=threads)
    model = backend.create()
    data = load_prepared(data_dir)
    metrics = backend.pretrain(model, [data], hp)
    log.info("pretrained: %s", metrics)
    return io.save_model(out_path, backend.state_to_save(model), _manifest(backend, "pretrained", [data.name], hp, metrics))


def fetch_pretrained(backend_spec: dict, out_path, threads: int = 1) -> dict:
    backend = get_backend(backend_spec, threads=threads)
    return backend.fetch_pretrained(out_path)


def _finetune(backend, hp: dict, pretrained, data_dirs: Sequence, out_path):
    model = backend.load_pretrained(pretrained)
    data = [load_prepared(d) for d in data_dirs]
    t0 = time.time()
    metrics = backend.finetune(model, data, hp)
    log.info("fine-tuned on %s in %.1fs: %s", "+".join(d.name for d in data), time.time() - t0, metrics)
    manifest = io.save_model(
        out_path, backend.state_to_save(model), _manifest(backend, "finetuned", [d.name for d in data], hp, metrics)
    )
    return model, manifest


def finetune(backend_spec: dict, hp: dict, pretrained, data_dirs: Sequence, out_path, threads: int = 1) -> dict:
    """Fine-tune the pre-trained model on the union of the train splits of ``data_dirs``."""
    return _finetune(get_backend(backend_spec, threads=threads), hp, pretrained, data_dirs, out_path)[1]


def select_best(df: pd.DataFrame, column: str = "val_acc", maximize: bool = True) -> pd.Series:
    """The row with the best ``column``; ties go to the smallest subset, then the first name."""
    df = df.copy()
    df["_key"] = df["subset"].map(subsets.sort_key)
    best = df[column].max() if maximize else df[column].min()
    tied = df[np.isclose(df[column], best, rtol=0, atol=1e-12)]
    return tied.sort_values("_key").iloc[0].drop("_key")


def final_finetune(
    backend_spec: dict, hp: dict, pretrained, merge_eval_csv, data_dirs: Mapping[str, str], target_dir, out_path, eval_out, threads: int = 1
) -> dict:
    """Algorithm 1's deployed model: fine-tune on the mixture whose merged model is best on val."""
    import pandas as pd

    best = select_best(pd.read_csv(merge_eval_csv))
    chosen = subsets.parse_subset(best["subset"])
    missing = [c for c in chosen if c not in data_dirs]
    if missing:
        raise ValueError(f"selected datasets {missing} have no prepared data among the inputs")
    backend = get_backend(backend_spec, threads=threads)
    model, manifest = _finetune(backend, hp, pretrained, [data_dirs[c] for c in chosen], out_path)
    target = load_prepared(target_dir)
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


def merge_eval(
    backend_spec: dict, merge_spec: dict, pretrained, model_paths: Mapping[str, str], target_dir, chunk: int, chunks: int, out_csv, threads: int = 1
) -> pd.DataFrame:
    from mergemix.merge_eval import MergeEvaluator

    backend = get_backend(backend_spec, threads=threads)
    ev = MergeEvaluator(backend, pretrained, model_paths, merge_spec.get("method", "uniform"), merge_spec.get("options"))
    masks = subsets.chunk_range(len(ev.names), chunk, chunks)
    t0 = time.time()
    df = ev.run(load_prepared(target_dir), masks)
    log.info("chunk %d/%d: %d merged models in %.2fs", chunk + 1, chunks, len(df), time.time() - t0)
    io.write_csv(out_csv, df)
    return df


def gather(chunk_csvs: Sequence, candidates: Sequence[str], out_csv) -> pd.DataFrame:
    """Concatenate chunk CSVs and check that every non-empty subset appears exactly once."""
    import pandas as pd

    df = pd.concat([pd.read_csv(p) for p in chunk_csvs], ignore_index=True)
    expected = {subsets.subset_id(s) for s in subsets.all_subsets(sorted(candidates))}
    counts = df["subset"].value_counts()
    dup = sorted(counts[counts > 1].index)
    missing = sorted(expected - set(df["subset"]))
    extra = sorted(set(df["subset"]) - expected)
    if dup or missing or extra:
        raise ValueError(
            f"chunks do not cover the subsets of {sorted(candidates)} exactly once: duplicated {dup[:5]}, "
            f"missing {missing[:5]}, unexpected {extra[:5]}; delete the chunk files and rerun merge-eval"
        )
    df = df.sort_values("subset", key=lambda s: s.map(subsets.sort_key)).reset_index(drop=True)
    io.write_csv(out_csv, df)
    return df


def eval_models(backend_spec: dict, pretrained, model_paths: Mapping[str, str], target_dir, out_csv, threads: int = 1) -> pd.DataFrame:
    """Evaluate saved models (keyed by subset id) on a target's val and test splits."""
    import pandas as pd

    backend = get_backend(backend_spec, threads=threads)
    model = backend.load_pretrained(pretrained)
    target = load_prepared(target_dir)
    rows = []
    for sid in sorted(model_paths, key=subsets.sort_key):
        state, _ = io.load_model(model_paths[sid])
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


def eval_pretrained(backend_spec: dict, pretrained, target_dirs: Mapping[str, str], out_csv, threads: int = 1) -> pd.DataFrame:
    import pandas as pd

    backend = get_backend(backend_spec, threads=threads)
    model = backend.load_pretrained(pretrained)
    rows = []
    for name in sorted(target_dirs):
        d = load_prepared(target_dirs[name])
        rows.append({"target": name, "val_acc": backend.evaluate(model, d, "val"), "test_acc": backend.evaluate(model, d, "test")})
    df = pd.DataFrame(rows)
    io.write_csv(out_csv, df)
    return df


def embed(backend_spec: dict, pretrained, data_dir, split: str, out_path, threads: int = 1) -> np.ndarray:
    backend = get_backend(backend_spec, threads=threads)
    model = backend.load_pretrained(pretrained)
    emb = backend.embed(model, load_prepared(data_dir), split)
    io.save_arrays(out_path, {"embeddings": emb}, {"split": split})
    return emb


def similarity(target_emb, candidate_embs: Mapping[str, str], out_csv) -> pd.DataFrame:
    import pandas as pd

    from mergemix.similarity import METRICS, score_subsets

    names = sorted(candidate_embs)
    tgt = io.load_arrays(target_emb)["embeddings"]
    cands = {n: io.load_arrays(candidate_embs[n])["embeddings"] for n in names}
    subs = subsets.all_subsets(names)
    scores = score_subsets(tgt, cands, subs)
    df = pd.DataFrame({"subset": [subsets.subset_id(s) for s in subs], "size": [len(s) for s in subs]})
    for m in METRICS:
        df[m] = scores[m]
    df = df.sort_values("subset", key=lambda s: s.map(subsets.sort_key)).reset_index(drop=True)
    io.write_csv(out_csv, df)
    return df
