"""Text sources of the language study: chat training data and benchmark targets.

Training data (records ``{"messages": [{"role": ..., "content": ...}, ...]}``):

* ``hf_chat``: a dataset of the Hugging Face hub (or a local ``datasets`` folder), with the
  paper's filters (``column == value``), ``first_n`` and a mapping of fields to chat messages.
  Its download step (a local rule) saves the split with ``save_to_disk``; preparing reads only
  that copy.
* ``jsonl_chat``: a local JSON-lines file, one chat per line (users' own data).

Training datasets have no test split: all their samples are training data, except a validation
split carved from them (``split.val_from_train``, capped at ``split.val_cap``), used for the
validation loss and the similarity baselines.

Targets (records ``{"benchmark", "prompt", "references", "metric", "max_new_tokens", "system"}``):

* ``benchmarks``: a group of JSONL benchmark files (one skill of the paper's Table 4). Each
  benchmark has a dev file (the validation split) and a test file; the target's score is the
  mean of the benchmarks' metrics.
* ``lm_eval``: tasks of lm-evaluation-harness (the ``lm-eval`` extra), evaluated on the live
  (merged) model in memory.

The field mappings of hub datasets are part of the spec, so a dataset whose columns differ from
what the study config assumes is fixed in the config, not in code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mergemix.data.registry import RawDataset, register_source
from mergemix.pins import commit_or_none

ROLES = ("system", "user", "assistant")
DEFAULT_CONVERSATION = {"role_key": "role", "content_key": "content", "roles": {}}


# ---------------------------------------------------------------------------------------------
# records -> chats
# ---------------------------------------------------------------------------------------------
def row_to_messages(row: dict, spec: dict, where: str = "") -> list[dict]:
    """One chat from one raw row, by the spec's ``messages`` or ``conversation`` mapping.

    * ``messages: [{role: user, field: question}, {role: assistant, field: answer}]``: one turn
      per listed column (``template: "Q: {question}"`` formats several columns instead of ``field``).
    * ``conversation: {field: conversations, role_key: from, content_key: value,
      roles: {human: user, gpt: assistant}}``: a column holding a list of turns.
    * neither: the row must already have ``messages`` in the standard form.
    """
    if spec.get("messages") and spec.get("conversation"):
        raise ValueError(f"{where}: give either 'messages' or 'conversation', not both")
    msgs: list[dict] = []
    if spec.get("system"):
        msgs.append({"role": "system", "content": str(spec["system"])})
    if spec.get("messages"):
        for turn in spec["messages"]:
            role = turn.get("role")
            if role not in ROLES:
                raise ValueError(f"{where}: messages role {role!r} must be one of {', '.join(ROLES)}")
            if "template" in turn:
                try:
                    content = str(turn["template"]).format(**row)
                except KeyError as e:
                    raise ValueError(
                        f"{where}: template {turn['template']!r} names column {e.args[0]!r}, which the data "
                        f"does not have; columns: {', '.join(sorted(row))}"
                    ) from None
            elif "field" in turn:
                if turn["field"] not in row:
                    raise ValueError(
                        f"{where}: messages field {turn['field']!r} is not a column of the data; columns: "
                        f"{', '.join(sorted(row))}. Fix the dataset's 'messages' mapping in the study config"
                    )
                content = str(row[turn["field"]])
            else:
                raise ValueError(f"{where}: each messages entry needs 'field' or 'template', got {turn!r}")
            msgs.append({"role": role, "content": content})
        return msgs
    conv = {**DEFAULT_CONVERSATION, "field": "messages", **(spec.get("conversation") or {})}
    turns = row.get(conv["field"])
    if not isinstance(turns, list):
        raise ValueError(
            f"{where}: column {conv['field']!r} with a list of chat turns not found; columns: "
            f"{', '.join(sorted(row))}. Give a 'messages' or 'conversation' mapping in the study config"
        )
    for t in turns:
        raw_role = t.get(conv["role_key"])
        role = conv["roles"].get(raw_role, raw_role)
        if role not in ROLES:
            raise ValueError(
                f"{where}: turn role {raw_role!r} maps to {role!r}, not one of {', '.join(ROLES)}; add it to "
                f"conversation.roles (e.g. {{human: user, gpt: assistant}})"
            )
        msgs.append({"role": role, "content": str(t.get(conv["content_key"], ""))})
    return msgs


def _json_safe(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def filter_rows(rows, filters: dict | None, first_n: int | None) -> list[dict]:
    """Rows whose columns equal the given values (all of them), then the first ``first_n``."""
    out = []
    filters = filters or {}
    for row in rows:
        if any(_json_safe(row.get(k)) != v for k, v in filters.items()):
            continue
        out.append(row)
        if first_n is not None and len(out) >= int(first_n):
            break
    return out


def _chat_dataset(rows, spec: dict, name: str, info: dict, columns: list[str]) -> RawDataset:
    """Chats from an iterable of rows (read lazily: filtering stops after ``first_n`` matches)."""
    missing = [k for k in (spec.get("filters") or {}) if k not in columns]
    if missing:
        raise ValueError(
            f"{name}: filter column(s) {missing} are not columns of the data; columns: {', '.join(sorted(columns))}"
        )
    rows = filter_rows(rows, spec.get("filters"), spec.get("first_n"))
    if not rows:
        raise ValueError(f"{name}: no rows left after filters {spec.get('filters')} and first_n {spec.get('first_n')}")
    chats = []
    for i, row in enumerate(rows):
        msgs = row_to_messages(row, spec, f"{name} row {i}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{name} row {i}: the chat has no assistant turn, so nothing would be trained on")
        chats.append({"messages": msgs})
    n = len(chats)
    # all samples are training data; the splitter carves the validation split from train
    return RawDataset(
        x=chats,
        y=None,
        classes=[],
        splits={"train": np.arange(n), "test": np.zeros(0, dtype=np.int64)},
        info={**info, "n_rows": n},
    )


CHAT_PARAMS = {"messages": None, "conversation": None, "system": None, "filters": None, "first_n": None}


# ---------------------------------------------------------------------------------------------
# hf_chat: a hub dataset (download step: a local rule) or a folder saved by save_to_disk
# ---------------------------------------------------------------------------------------------
def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def download_hf_dataset(spec: dict, out_dir: Path) -> dict:
    """Save the dataset's split to ``out_dir/dataset`` (hub id, or a local save_to_disk folder)."""
    import datasets

    out_dir = Path(out_dir)
    src = Path(str(spec["path"])).expanduser()
    split = spec.get("split", "train")
    if _is_saved_dataset(src):
        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        origin = {"local": str(src.resolve())}
    else:
        ds = datasets.load_dataset(str(spec["path"]), spec.get("name"), split=split, revision=spec.get("revision"))
        origin = {
            "hub": spec["path"],
            "name": spec.get("name"),
            "revision": spec.get("revision"),
            "resolved_revision": commit_or_none(str(spec["path"]), spec.get("revision")),
        }
    ds.save_to_disk(str(out_dir / "dataset"))
    return {**origin, "split": split, "n_rows": len(ds), "columns": list(ds.column_names)}


@register_source(
    "hf_chat",
    params={"path": None, "name": None, "revision": None, "split": None, **CHAT_PARAMS},
    download=download_hf_dataset,
)
def hf_chat(spec: dict, seed: int, local_dir: Path | None) -> RawDataset:
    import datasets

    if local_dir is None or not (Path(local_dir) / "dataset").exists():
        raise FileNotFoundError(
            f"hf_chat dataset {spec.get('path')!r} has not been downloaded to {local_dir}; run the workflow's "
            "download_data rule (snakemake runs it first, on the login node)"
        )
    ds = datasets.load_from_disk(str(Path(local_dir) / "dataset"))
    columns = list(ds.column_names)
    return _chat_dataset(iter(ds), spec, str(spec["path"]), {"path": spec["path"], "columns": columns}, columns)


# ---------------------------------------------------------------------------------------------
# jsonl_chat: users' own data, one chat per line
# ---------------------------------------------------------------------------------------------
def read_jsonl_file(path, what: str) -> list[dict]:
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: file {path} does not exist (paths are relative to the directory snakemake runs in)"
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{what}: {path} line {i} is not valid JSON ({e})") from None
    return rows


@register_source("jsonl_chat", params={"path": None, **CHAT_PARAMS}, local_paths={"path": "file"})
def jsonl_chat(spec: dict, seed: int, local_dir: Path | None) -> RawDataset:
    rows = read_jsonl_file(spec["path"], "jsonl_chat")
    columns = sorted({k for r in rows for k in r})
    return _chat_dataset(rows, spec, str(spec["path"]), {"path": str(spec["path"])}, columns)


# ---------------------------------------------------------------------------------------------
# benchmarks: a target task made of JSONL benchmark files
# ---------------------------------------------------------------------------------------------
BENCHMARK_KEYS = {"name", "dev", "test", "metric", "max_new_tokens", "system"}


def benchmark_records(bench: dict, path, max_n: int | None, where: str) -> list[dict]:
    """Records of one benchmark file: ``{"prompt": str, "references": [str, ...]}`` per line
    (``"reference": str`` or llm-jp-eval's ``"input"``/``"output"`` are accepted too)."""
    out = []
    for i, row in enumerate(read_jsonl_file(path, where)):
        prompt = row.get("prompt", row.get("input"))
        refs = row.get("references")
        if refs is None:
            refs = row.get("reference", row.get("output"))
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(prompt, str) or not isinstance(refs, list) or not refs:
            raise ValueError(
                f"{where}: {path} line {i + 1} needs 'prompt' (a string) and 'references' (a non-empty list of "
                f"strings); got keys {sorted(row)}. See docs/studies.md, 'The benchmark file format'"
            )
        out.append(
            {
                "benchmark": bench["name"],
                "prompt": prompt,
                "references": [str(r) for r in refs],
                "metric": bench["metric"],
                "max_new_tokens": int(bench["max_new_tokens"]),
                "system": bench.get("system") or row.get("system"),
            }
        )
        if max_n is not None and len(out) >= int(max_n):
            break
    return out


@register_source("benchmarks", params={"benchmarks": None, "max_per_benchmark": None})
def benchmarks(spec: dict, seed: int, local_dir: Path | None) -> RawDataset:
    from mergemix.text_metrics import get_metric

    benches = spec.get("benchmarks")
    if not isinstance(benches, list) or not benches:
        raise ValueError("benchmarks: give a non-empty list of {name, dev, test, metric, max_new_tokens}")
    records, val, test = [], [], []
    for b in benches:
        where = f"benchmark {b.get('name')!r}"
        missing = {"name", "dev", "test", "metric", "max_new_tokens"} - set(b)
        unknown = set(b) - BENCHMARK_KEYS
        if missing or unknown:
            raise ValueError(
                f"{where}: missing key(s) {sorted(missing)}, unknown key(s) {sorted(unknown)}; "
                f"allowed: {', '.join(sorted(BENCHMARK_KEYS))}"
            )
        get_metric(b["metric"])  # fail early on an unknown metric
        for split, idx in (("dev", val), ("test", test)):
            recs = benchmark_records(b, b[split], spec.get("max_per_benchmark"), f"{where} ({split})")
            if not recs:
                raise ValueError(f"{where}: {b[split]} has no records")
            idx.extend(range(len(records), len(records) + len(recs)))
            records.extend(recs)
    return RawDataset(
        x=records,
        y=None,
        classes=[],
        splits={"train": np.zeros(0, dtype=np.int64), "val": np.asarray(val), "test": np.asarray(test)},
        info={"benchmarks": [b["name"] for b in benches]},
    )


# ---------------------------------------------------------------------------------------------
# lm_eval: lm-evaluation-harness tasks as a target (optional extra)
# ---------------------------------------------------------------------------------------------
@register_source(
    "lm_eval", params={"tasks": None, "num_fewshot": None, "val_limit": None, "test_limit": None, "include_path": None}
)
def lm_eval_source(spec: dict, seed: int, local_dir: Path | None) -> RawDataset:
    """A placeholder record per split; the backend runs lm-evaluation-harness on the live model.

    Each task is ``{name: <lm-eval task>, metric: <its metric key, e.g. acc>}``. The validation
    split is the task's first ``val_limit`` evaluation documents, the test split the next
    ``test_limit`` ones (lm-eval's ``samples`` argument), so they never overlap. ``include_path``
    is a folder of extra task YAML files (e.g. tasks over local files).
    """
    tasks = spec.get("tasks")
    if (
        not isinstance(tasks, list)
        or not tasks
        or not all(isinstance(t, dict) and {"name", "metric"} <= set(t) for t in tasks)
    ):
        raise ValueError("lm_eval: 'tasks' must be a non-empty list of {name: <task>, metric: <metric key>}")
    val_n, test_n = int(spec.get("val_limit") or 100), int(spec.get("test_limit") or 1000)
    common = {
        "lm_eval": True,
        "tasks": tasks,
        "num_fewshot": spec.get("num_fewshot"),
        "include_path": spec.get("include_path"),
    }
    records = [
        {**common, "split": "val", "docs": [0, val_n]},
        {**common, "split": "test", "docs": [val_n, val_n + test_n]},
    ]
    return RawDataset(
        x=records,
        y=None,
        classes=[],
        splits={"train": np.zeros(0, dtype=np.int64), "val": np.asarray([0]), "test": np.asarray([1])},
        info={"tasks": [t["name"] for t in tasks]},
    )


# ---------------------------------------------------------------------------------------------
# converting llm-jp-eval's evaluation datasets
# ---------------------------------------------------------------------------------------------
def convert_llm_jp_eval(src, out, max_n: int | None = None) -> dict:
    """Convert one llm-jp-eval dataset file (``{"instruction", "output_length", "metrics",
    "samples": [{"input", "output"}]}``) to mergemix's benchmark JSONL.

    Returns the benchmark entry to paste into a study config (minus its ``dev``/``test`` paths):
    the instruction becomes the benchmark's ``system`` prompt and ``output_length`` its
    ``max_new_tokens``.
    """
    from mergemix import io

    data = json.loads(Path(src).read_text(encoding="utf-8"))
    samples = data["samples"][: max_n or None]
    io.write_jsonl(out, [{"prompt": s["input"], "references": [s["output"]]} for s in samples])
    metric = (data.get("metrics") or ["exact_match"])[0]
    return {
        "system": data.get("instruction"),
        "max_new_tokens": int(data.get("output_length", 64)),
        "metric": {"bleu_ja": "bleu_ja", "bleu_en": "bleu_en"}.get(metric, metric),
        "n": len(samples),
    }


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m mergemix.data.text",
        description="convert llm-jp-eval dataset files (evaluation/{dev,test}/<name>.json) to benchmark JSONL",
    )
    p.add_argument("llm_jp_eval_dir", help="llm-jp-eval's dataset folder holding dev/ and test/")
    p.add_argument("out_dir")
    p.add_argument("names", nargs="+", help="benchmark names, e.g. jnli jsquad mawps")
    p.add_argument("--max-n", type=int, default=None)
    a = p.parse_args(argv)
    entries = []
    for name in a.names:
        entry = {"name": name}
        for split in ("dev", "test"):
            out = Path(a.out_dir) / split / f"{name}.jsonl"
            meta = convert_llm_jp_eval(Path(a.llm_jp_eval_dir) / split / f"{name}.json", out, a.max_n)
            entry[split] = str(out)
        entry.update({k: meta[k] for k in ("metric", "max_new_tokens", "system")})
        entries.append(entry)
    print(json.dumps(entries, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
