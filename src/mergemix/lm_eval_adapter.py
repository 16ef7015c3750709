"""lm-evaluation-harness tasks as targets (the optional ``lm-eval`` extra).

The live model (the pre-trained base with the current, possibly merged, adapter) is wrapped in
lm-eval's ``HFLM`` in memory, so no merged model is written to disk per subset. The validation and
test splits are disjoint ranges of each task's evaluation documents (lm-eval's ``samples``).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("mergemix.lm_eval")


def _require():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("lm_eval targets need lm-evaluation-harness: pip install 'mergemix[lm-eval]'") from None


def task_manager(include_path, names):
    """lm-eval's task index for ``names``, built once per process and folder (a merge-eval job
    evaluates many merged models with it, a packed job several targets). Where ``include_path`` (a
    folder, or a list of them) holds every named task, only that is indexed: indexing lm-eval's own
    14,000-odd task files takes about 8 s, and a local task of the same name as a built-in one is
    then the one used (with the built-ins indexed, theirs wins)."""
    paths = tuple(include_path) if isinstance(include_path, list) else include_path  # hashable: a cache key
    if paths:
        local = _local_index(paths)
        if local is not None and all(n in local.all_tasks for n in names):
            return local
    return _full_index(paths)


def _include_path_arg(paths):
    return list(paths) if isinstance(paths, tuple) else paths  # lm-eval takes a folder or a list


@functools.lru_cache(maxsize=8)
def _local_index(paths):
    """The index of ``paths`` alone; None on an lm-eval before ``include_defaults`` (0.4.3)."""
    from lm_eval.tasks import TaskManager

    try:
        return TaskManager(include_path=_include_path_arg(paths), include_defaults=False)
    except TypeError:
        return None


@functools.lru_cache(maxsize=8)
def _full_index(paths):
    """The index of lm-eval's own tasks and ``paths`` (None: lm-eval's own only)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=_include_path_arg(paths))


def evaluate_lm_eval(backend, model, record: dict) -> float:
    """Mean over the record's tasks of each task's metric, on the docs range of the record's split."""
    _require()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # peft injects the adapter into the transformers model in place: the base model is the live model
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.eval()
    lm = HFLM(pretrained=hf_model, tokenizer=backend.tokenizer, batch_size=int(backend.params["eval_batch_size"]))
    names = [t["name"] for t in record["tasks"]]
    tm = task_manager(record.get("include_path"), names)
    lo, hi = record["docs"]
    res = simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=record.get("num_fewshot"),
        task_manager=tm,
        samples={n: list(range(lo, hi)) for n in names},
        log_samples=False,
        bootstrap_iters=0,
    )
    scores = []
    for t in record["tasks"]:
        row = res["results"][t["name"]]
        key = next((k for k in row if k == t["metric"] or k.startswith(t["metric"] + ",")), None)
        if key is None:
            raise KeyError(
                f"lm_eval task {t['name']!r} has no metric {t['metric']!r}; it reports: {', '.join(sorted(row))}"
            )
        scores.append(float(row[key]))
    log.info("lm_eval %s docs [%d, %d): %s", record["split"], lo, hi, dict(zip(names, scores)))
    return sum(scores) / len(scores)


def lm_eval_examples(record: dict) -> list[dict]:
    """The record's split as benchmark-style examples (prompt, references), for embeddings.

    The prompt is each document's ``doc_to_text``; the reference its target (the correct choice's
    text for multiple-choice tasks), so the full sample is embedded as for other targets.
    """
    _require()
    from lm_eval.api.task import Task
    from lm_eval.tasks import get_task_dict

    names = [t["name"] for t in record["tasks"]]
    tasks = get_task_dict(names, task_manager(record.get("include_path"), names))
    lo, hi = record["docs"]
    out = []
    for name in names:
        task = tasks.get(name)
        if not isinstance(task, Task):
            raise ValueError(f"lm_eval task {name!r} is a group; list its subtasks in the target's tasks instead")
        docs = list(task.eval_docs)[lo:hi]
        for doc in docs:
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
                target = task.doc_to_choice(doc)[target]
            if isinstance(target, list):
                target = target[0]
            out.append({"prompt": str(task.doc_to_text(doc)), "references": [str(target)], "benchmark": name})
    return out
