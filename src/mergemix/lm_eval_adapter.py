"""lm-evaluation-harness tasks as targets (the optional ``lm-eval`` extra).

The live model (the pre-trained base with the current, possibly merged, adapter) is wrapped in
lm-eval's ``HFLM`` in memory, so no merged model is written to disk per subset. The validation and
test splits are disjoint ranges of each task's evaluation documents (lm-eval's ``samples``).
"""

from __future__ import annotations

import logging

log = logging.getLogger("mergemix.lm_eval")


def _require():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(
            "lm_eval targets need lm-evaluation-harness: pip install 'mergemix[lm-eval]'"
        ) from None


def evaluate_lm_eval(backend, model, record: dict) -> float:
    """Mean over the record's tasks of each task's metric, on the docs range of the record's split."""
    _require()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # peft injects the adapter into the transformers model in place: the base model is the live model
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.eval()
    lm = HFLM(pretrained=hf_model, tokenizer=backend.tokenizer, batch_size=int(backend.params["eval_batch_size"]))
    tm = TaskManager(include_path=record.get("include_path"))
    names = [t["name"] for t in record["tasks"]]
    lo, hi = record["docs"]
    res = simple_evaluate(
        model=lm, tasks=names, num_fewshot=record.get("num_fewshot"), task_manager=tm,
        samples={n: list(range(lo, hi)) for n in names}, log_samples=False, bootstrap_iters=0,
    )
    scores = []
    for t in record["tasks"]:
        row = res["results"][t["name"]]
        key = next((k for k in row if k == t["metric"] or k.startswith(t["metric"] + ",")), None)
        if key is None:
            raise KeyError(f"lm_eval task {t['name']!r} has no metric {t['metric']!r}; it reports: {', '.join(sorted(row))}")
        scores.append(float(row[key]))
    log.info("lm_eval %s docs [%d, %d): %s", record["split"], lo, hi, dict(zip(names, scores)))
    return sum(scores) / len(scores)
