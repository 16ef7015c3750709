"""Hardening of the rules: every path and free text in a shell command is quoted (a results_dir
with spaces or shell characters is only a folder name), and every file a job reads or writes is
declared, so that deleting any file under results/<study>/ and rerunning rebuilds it and exactly
what depends on it."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import planned_jobs, rule_family, snakemake

import lm_tiny
from conftest import ROOT, tiny_config
from mergemix.config import ConfigError, validate_config
from mergemix.data.prepared import prepare_dataset
from mergemix.data.registry import SOURCES, _load_builtin

pytestmark = pytest.mark.workflow  # most of these run Snakemake on a study
RULES = ROOT / "workflow" / "rules"
# a results_dir an unquoted shell command would split at the space and run `touch PWNED` in
WEIRD = "res dir;touch PWNED"
TARGET = "mirror"  # the only target of the study below: every rule runs, at half a full study's jobs
# shell fields that are not paths or free text: numbers, or wildcards restricted to digits
UNQUOTED_OK = {
    "MERGEMIX",
    "CHECKPOINT_ARGS",
    "threads",
    "params.chunks",
    "params.workers",
    "wildcards.chunk",
    "wildcards.worker",
}


def job_stats(log: str) -> dict:
    """Rule -> job count from the "Job stats" table a Snakemake run prints first; packed rules
    (`finetune_pack0`, ...) count under their family's name."""
    if "Nothing to be done" in log:
        return {}
    stats = log.split("Job stats:")[1].split("total")[0]
    jobs: dict = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stats, re.M):
        jobs[rule_family(m.group(1))] = jobs.get(rule_family(m.group(1)), 0) + int(m.group(2))
    return jobs


def final_tables(out: Path) -> dict:
    paths = [
        out / "selection.csv",
        out / "correlation.csv",
        *sorted((out / "merge_eval").glob("*.csv")),
        *sorted((out / "mixture").glob("*.csv")),
    ]
    return {p.relative_to(out).as_posix(): pd.read_csv(p) for p in paths}


def pwned_files(*folders) -> list:
    return [p for d in folders for p in Path(d).rglob("PWNED")]


@pytest.fixture(scope="module")
def weird_study(tmp_path_factory):
    """A tiny study (3 digits domains, every mixture, one merge-eval chunk) in a results_dir with a
    space and a `;touch PWNED`. Returns (tmp folder, config file, results folder, log, tmp listing before)."""
    tmp = tmp_path_factory.mktemp("hardening")
    cfg = tiny_config(tmp / WEIRD, study="hard", n=3, mixture=True, chunks=1)
    cfg["targets"] = [TARGET]
    cfg["analysis"] = {"figure_formats": ["png"]}  # analyze runs after every deletion below
    path = tmp / "hard.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = sorted(os.listdir(tmp))
    log = snakemake(path)
    return tmp, path, tmp / WEIRD / "hard", log, before


def test_results_dir_with_a_space_and_shell_characters_is_only_a_folder(weird_study):
    tmp, _, out, log, before = weird_study
    assert (out / "selection.csv").is_file() and "Selection table" in log
    assert sorted(os.listdir(tmp)) == sorted(before + [WEIRD])  # nothing created beside the results folder
    assert not pwned_files(tmp)
    assert not (ROOT / "PWNED").exists() and not (Path.cwd() / "PWNED").exists()
    assert not any(p.name == "PWNED" for p in ROOT.iterdir())


def test_deleting_any_result_rebuilds_it_and_exactly_what_depends_on_it(weird_study):
    tmp, path, out, _, _ = weird_study
    untouched = final_tables(out)
    # what a file's deletion reruns (the study has one target, mirror; candidates noise and rotate)
    model_users = {
        "merge_eval": 1,
        "gather_merge_eval": 1,
        "final_finetune": 1,
        "mixture_eval": 1,
        "analyze": 1,
        "all": 1,
    }
    data_users = {"prepare_data": 1, "finetune": 1, "embed": 1, "mixture_finetune": 1, "similarity": 1, **model_users}
    cases = [  # cheap to expensive
        (
            "merge_eval chunk",
            ["merge_eval/chunks/mirror/0.csv"],
            {"merge_eval": 1, "gather_merge_eval": 1, "final_finetune": 1, "analyze": 1, "all": 1},
        ),
        ("embeddings", ["embeddings/noise.safetensors"], {"embed": 1, "similarity": 1, "analyze": 1, "all": 1}),
        (
            "mixture model",
            ["models/mixture/noise+rotate/model.safetensors"],
            {"mixture_finetune": 1, "mixture_eval": 1, "analyze": 1, "all": 1},
        ),
        ("fine-tuned model's manifest", ["models/finetuned/noise/model.json"], {"finetune": 1, **model_users}),
        ("fine-tuned model", ["models/finetuned/rotate/model.safetensors"], {"finetune": 1, **model_users}),
        ("splits.json", ["data/noise/splits.json"], data_users),
        ("prepared data file", ["data/rotate/arrays.safetensors"], data_users),
        # smallcnn packs fine-tunes and embeddings (config `pack`): the 2 fine-tunes are one job, the 3 embeddings another
        (
            "pre-trained model and its manifest",
            ["models/pretrained/model.safetensors", "models/pretrained/model.json"],
            {
                "pretrain": 1,
                "finetune": 1,
                "eval_pretrained": 1,
                "embed": 1,
                **{k: v for k, v in data_users.items() if k not in ("prepare_data", "finetune", "embed")},
            },
        ),
    ]
    # each deletion's plan, file by file: the deleted file is moved aside, the dry run must plan
    # exactly what depends on it, and the file is moved back (same bytes and mtime)
    for what, files, expected in cases:
        for f in files:
            (out / f).rename(out / f"{f}.aside")
        try:
            assert planned_jobs(path) == expected, what
        finally:
            for f in files:
                (out / f"{f}.aside").rename(out / f)
    # then every file of every case deleted at once and one real rerun: all are rebuilt, and the
    # results are those of the untouched run (one run instead of one per case: the suite's time)
    t0 = time.monotonic()
    deleted = [f for _, files, _ in cases for f in files]
    for f in deleted:
        (out / f).unlink()
    log = snakemake(path)
    assert job_stats(log)["pretrain"] == 1 and job_stats(log)["analyze"] == 1
    for f in deleted:
        assert (out / f).is_file(), f
    now = final_tables(out)
    assert sorted(now) == sorted(untouched)
    for name, df in untouched.items():
        pd.testing.assert_frame_equal(now[name], df, obj=f"{name} after deleting {len(deleted)} files")
    print(f"{len(deleted)} deleted files rebuilt in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    assert planned_jobs(path) == {}  # the reruns left a complete study
    assert not pwned_files(tmp) and not (ROOT / "PWNED").exists()


def test_every_shell_interpolation_is_quoted():
    fields = []
    for smk in sorted(RULES.glob("*.smk")):
        for block in re.findall(r"shell:\s*\n((?:[ \t]*\"[^\"\n]*\"[ \t]*\n)+)", smk.read_text()):
            fields += [(smk.name, f) for f in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", block)]
    assert len(fields) > 50  # the blocks were found
    bad = [(name, f) for name, f in fields if not f.endswith(":q") and f not in UNQUOTED_OK]
    assert not bad, bad


def test_names_that_reach_a_shell_are_restricted(tmp_path):
    """Study, dataset, target and candidate names match the schema's name pattern (checked before
    the workflow is built); a results_dir with braces (Snakemake's wildcard syntax) is refused."""
    base = tiny_config(tmp_path / "results", n=3)
    bad = {
        "study": dict(base, study="a;b"),
        "datasets": dict(base, datasets={**base["datasets"], "x y": {"source": "digits", "domain": "thin"}}),
        "targets": dict(base, targets=["rotate", "$(touch PWNED)"]),
        "candidates.rotate": dict(base, candidates={"rotate": ["noise", "a'b"]}),
        "candidates.r;m": dict(base, candidates={"r;m": ["noise"]}),  # keys must be targets
    }
    for key, cfg in bad.items():
        with pytest.raises(ConfigError, match=re.escape(key)):
            validate_config(cfg)
    p = tmp_path / "braces.yaml"
    p.write_text(yaml.safe_dump(dict(base, results_dir=str(tmp_path / "res{x}"))))
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(p)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "results_dir" in r.stdout + r.stderr and "braces" in r.stdout + r.stderr


def test_record_sources_are_the_ones_that_write_samples_jsonl(tmp_path):
    """common.smk's RECORD_SOURCES (which file prepare_data declares) matches what the sources write."""
    declared = set(
        re.findall(
            r'"(\w+)"',
            re.search(r"RECORD_SOURCES = frozenset\(\{(.*?)\}\)", (RULES / "common.smk").read_text()).group(1),
        )
    )
    _load_builtin()
    assert declared == {n for n, fn in SOURCES.items() if fn.__module__ == "mergemix.data.text"}
    assert {fn.__module__ for n, fn in SOURCES.items() if n not in declared} <= {
        "mergemix.data.digits",
        "mergemix.data.images",
    }
    split = {"seed": 0, "val": 0.2, "test": 0.3}
    prepare_dataset("d", {"source": "digits", "domain": "rotate"}, split, tmp_path / "d")
    chats = lm_tiny.write_jsonl(tmp_path / "c.jsonl", [lm_tiny.chat(f"q{i}", f"a{i}") for i in range(10)])
    prepare_dataset("c", {"source": "jsonl_chat", "path": str(chats)}, split, tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "d")) == ["arrays.safetensors", "splits.json"]
    assert sorted(os.listdir(tmp_path / "c")) == ["samples.jsonl", "splits.json"]


def test_a_study_with_array_and_record_datasets_declares_each_data_file(tmp_path):
    cfg = tiny_config(tmp_path / "results", n=3)
    chats = lm_tiny.write_jsonl(tmp_path / "c.jsonl", [lm_tiny.chat(f"q{i}", f"a{i}") for i in range(10)])
    cfg["datasets"]["chat"] = {"source": "jsonl_chat", "path": str(chats)}
    p = tmp_path / "mixed.yaml"
    p.write_text(yaml.safe_dump(cfg))
    log = snakemake(p, "-n")  # a dry run prints each job's input and output files
    jobs = job_stats(log)
    assert jobs["prepare_data"] == 4 and jobs["prepare_data_records"] == 1  # _pretrain and 3 digits; the chats
    assert re.search(
        r"rule prepare_data_records:\n\s+output: \S+/data/chat/splits.json, \S+/data/chat/samples.jsonl", log
    )
    assert re.search(
        r"rule prepare_data:\n\s+output: \S+/data/rotate/splits.json, \S+/data/rotate/arrays.safetensors", log
    )
