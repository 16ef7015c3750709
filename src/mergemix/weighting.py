"""Weighted mixtures (``merge_eval.strategy: weights``): search proportions on merged val accuracy,
then fine-tune on the datasets in those proportions.

``weights_search`` starts from the target's best binary subset (the gathered merge-eval table), so
the weights can only match or beat it on val; it scores the weighted average of the candidates'
fine-tuned models (``sum_i w_i theta_i``) with :class:`mergemix.search.weights.WeightSearch`
(optuna CMA-ES or TPE, journal-backed). ``weighted_finetune`` fine-tunes on the candidates with
batches drawn in proportion to the weights (``mixture_weights``, a fixed number of steps).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

from mergemix import io, subsets
from mergemix.settings import Checkpoint, Eval, HParams, Merge, WeightsSearch

log = logging.getLogger("mergemix.weights")


def weights_search(
    backend_spec: dict,
    weights_spec: WeightsSearch,
    pretrained,
    model_paths: Mapping[str, str],
    target_dir,
    merge_eval_csv,
    out_json,
    out_csv,
    journal=None,
    threads: int = 1,
    eval_spec: Eval | None = None,
) -> dict:
    """Search mixture proportions (``weights_spec``: ``merge_eval.weights`` without ``check_samples``;
    a mapping is converted as :mod:`mergemix.settings` says) from the best subset of ``merge_eval_csv``."""
    import pandas as pd

    from mergemix.data.prepared import load_prepared
    from mergemix.search.weights import WeightSearch
    from mergemix.selection import full_rows, select_best
    from mergemix.stages import _evaluator, _search_fingerprint
    from mergemix.tables import read_result_table

    spec = WeightsSearch.coerce(weights_spec, "weights")
    evaluation = Eval.coerce(eval_spec, "eval")
    ev = _evaluator(backend_spec, Merge("uniform", {}), pretrained, model_paths, threads, evaluation)
    target = load_prepared(target_dir)
    best = select_best(full_rows(read_result_table(merge_eval_csv, "merge_eval")))
    start = subsets.names_to_mask(subsets.parse_subset(best["subset"]), ev.names)
    if journal is not None:
        Path(journal).parent.mkdir(parents=True, exist_ok=True)
    # a changed model, target, start or setting starts a new study in the journal, never resumes a stale one
    fp = _search_fingerprint(
        backend_spec,
        {"method": "weighted"},
        {
            "strategy": "weights",
            "budget": spec.budget,
            "seed": spec.seed,
            "options": {**spec.to_dict(), "start": best["subset"]},
        },
        model_paths,
        target_dir,
        evaluation,
    )
    search = WeightSearch(
        len(ev.names),
        start,
        journal=journal,
        study_name=f"weights-{target.name}-{fp}",
        **spec.to_dict(),
    )
    from mergemix.progress import LogEvery

    t0, every = time.time(), LogEvery()

    def progress(evaluation, done, budget):
        if every.due(done, budget):
            rate, eta = every.rate_eta(done, budget)
            log.info(
                "weights search on %s: %d/%d evaluations (%.2f/s, ETA %.0fs), val_acc %.4f",
                target.name,
                done,
                budget,
                rate,
                eta,
                evaluation.value,
            )

    result = search.run(lambda w: ev.evaluate_weights(target, w, "val"), on_evaluation=progress)
    rows = [
        {"order": r.order, **{f"w_{n}": w for n, w in zip(ev.names, r.weights)}, "val_acc": r.value}
        for r in result.records
    ]
    io.write_csv(out_csv, pd.DataFrame(rows))
    chosen = result.best
    summary = {
        "target": target.name,
        "candidates": ev.names,
        "sampler": spec.sampler,
        "budget": spec.budget,
        "seed": spec.seed,
        "evaluations": len(result.records),
        "start": {
            "subset": best["subset"],
            "val_acc": float(result.start.value),
            "test_acc": ev.evaluate_weights(target, result.start.weights, "test"),
        },
        "best": {
            "weights": dict(zip(ev.names, chosen.weights)),
            "val_acc": float(chosen.value),
            "test_acc": ev.evaluate_weights(target, chosen.weights, "test"),
        },
        "seconds": round(time.time() - t0, 3),
    }
    io.write_json(out_json, summary)
    log.info(
        "weights for %s: %s (val %.4f, binary start %s val %.4f)",
        target.name,
        {n: round(w, 3) for n, w in summary["best"]["weights"].items()},
        chosen.value,
        best["subset"],
        result.start.value,
    )
    return summary


def weighted_finetune(
    backend_spec: dict,
    hp: HParams | Mapping,
    pretrained,
    weights_json,
    data_dirs: Mapping[str, str],
    target_dir,
    out_path,
    eval_out,
    threads: int = 1,
    checkpoint: Checkpoint | Mapping | None = None,
) -> dict:
    """Fine-tune on the candidates in the proportions ``weights_json`` chose (datasets of weight 0
    are left out), and score the model on the target's val and test splits (``hp``: the study's
    ``finetune``, given these weights by :meth:`HParams.weighted`; checkpointed and resumed as
    :func:`mergemix.stages._finetune` says)."""
    from mergemix.backends import get_backend
    from mergemix.data.prepared import load_prepared
    from mergemix.stages import _checkpoint, _finetune

    hp, checkpoint = HParams.coerce(hp, "hparams"), _checkpoint(checkpoint)

    chosen = io.read_json(weights_json)
    weights = {n: float(w) for n, w in chosen["best"]["weights"].items() if float(w) > 0}
    missing = sorted(set(weights) - set(data_dirs))
    if missing:
        raise ValueError(
            f"{weights_json}: weighted datasets {missing} have no prepared data among the inputs; "
            "delete the weights file and rerun snakemake"
        )
    backend = get_backend(backend_spec, threads=threads)
    names = sorted(weights)
    model, manifest = _finetune(
        backend, hp.weighted(weights), pretrained, [data_dirs[n] for n in names], out_path, checkpoint=checkpoint
    )
    target = load_prepared(target_dir)
    result = {
        "target": target.name,
        "weights": weights,
        "merged_val_acc": chosen["best"]["val_acc"],
        "merged_test_acc": chosen["best"]["test_acc"],
        "val_acc": backend.evaluate(model, target, "val"),
        "test_acc": backend.evaluate(model, target, "test"),
        "model_sha256": manifest["sha256"],
    }
    io.write_json(eval_out, result)
    return result


def weights_check(
    backend_spec: dict,
    hp: HParams | Mapping,
    pretrained,
    model_paths: Mapping[str, str],
    data_dirs: Mapping[str, str],
    target_dir,
    samples: int,
    seed: int,
    out_csv,
    threads: int = 1,
    eval_spec: Eval | None = None,
):
    """The surrogate check for proportions (as section 4.2 checks subsets): ``samples`` weight
    vectors drawn uniformly from the simplex (Dirichlet(1), seeded), each scored as a weighted merge
    of the candidates' fine-tuned models and as a model fine-tuned on the candidates in those
    proportions (:func:`weighted_finetune`'s sampler; the models are not kept). One row per vector."""
    import tempfile

    import numpy as np
    import pandas as pd

    from mergemix.data.prepared import load_prepared
    from mergemix.stages import _evaluator, _finetune, _fresh_rng

    hp = HParams.coerce(hp, "hparams")
    ev = _evaluator(backend_spec, Merge("uniform", {}), pretrained, model_paths, threads, eval_spec)
    missing = sorted(set(ev.names) - set(data_dirs))
    if missing:
        raise ValueError(f"candidates {missing} have no prepared data among the inputs")
    target = load_prepared(target_dir)
    draws = np.random.default_rng(seed).dirichlet(np.ones(len(ev.names)), size=samples)
    reset, loaded, rows = _fresh_rng(), {}, []
    with tempfile.TemporaryDirectory(prefix="mergemix-weights-check-") as tmp:
        for i, w in enumerate(draws):
            weights = {n: float(x) for n, x in zip(ev.names, w)}
            row = {
                "sample": i,
                **{f"w_{n}": x for n, x in weights.items()},
                "merged_val_acc": ev.evaluate_weights(target, w, "val"),
                "merged_test_acc": ev.evaluate_weights(target, w, "test"),
            }
            reset()
            model, _ = _finetune(
                ev.backend,
                hp.weighted(weights),
                pretrained,
                [data_dirs[n] for n in ev.names],
                Path(tmp) / f"{i}/model.safetensors",
                loaded,
            )
            row["finetuned_val_acc"] = ev.backend.evaluate(model, target, "val")
            row["finetuned_test_acc"] = ev.backend.evaluate(model, target, "test")
            rows.append(row)
            log.info("weights check %s %d/%d: %s", target.name, i + 1, samples, row)
    df = pd.DataFrame(rows)
    io.write_csv(out_csv, df)
    return df


def weights_check_table(checks: Mapping[str, str], pretrained_csv, out_csv, *, logit_eps: float):
    """Per target: Pearson of weighted-merged against weighted-fine-tuned test accuracy over the
    sampled weight vectors (on accuracies and on logit deltas over the pre-trained model), and an
    ``average`` row (``logit_eps``: ``analysis.logit_eps``)."""
    import pandas as pd

    from mergemix import metrics
    from mergemix.tables import pretrained_test_acc, read_result_table

    pre = read_result_table(pretrained_csv, "pretrained").set_index("target")
    rows = []
    for t, path in checks.items():
        df = pd.read_csv(path)
        base = pretrained_test_acc(pre, t, pretrained_csv)
        m, f = df["merged_test_acc"], df["finetuned_test_acc"]
        rows.append(
            {
                "target": t,
                "n_points": len(df),
                "pearson_acc": metrics.pearson(m, f),
                "pearson_logit": metrics.pearson(
                    metrics.logit_delta(m, base, logit_eps), metrics.logit_delta(f, base, logit_eps)
                ),
                "merged_test_acc": float(m.mean()),
                "finetuned_test_acc": float(f.mean()),
            }
        )
    from mergemix.analysis import with_average

    out = with_average(pd.DataFrame(rows))
    io.write_csv(out_csv, out)
    return out
