"""Pin a study's hub datasets and given models to commits: ``mergemix pin-revisions CONFIG [--write]``.

A hub revision such as ``main`` is a branch: it moves, and the same config can fetch other data a
month later. Pinning replaces it with the commit it resolves to, in the config file itself, so the
study is reproducible and its hash-triggered reruns mean what they say. Two kinds of entry are
pinned: the hub datasets (``datasets.<name>``) and the given models read from the hub
(``models.<name>`` with ``hub:``; a model given by a local ``path:`` needs no pin). A dataset and its
given model usually share a name, so pins are keyed ``datasets.<name>`` / ``models.<name>``.

Pin *before* the first download: the revision is part of every data rule's params, so pinning a study
that has already downloaded makes Snakemake redo it from the download on (the data may be the same
bytes, but Snakemake cannot know that). The commits come from the hub (a local step, like download),
or, with ``from_downloads``, from the ``resolved_revision`` each download recorded
(``downloads/<name>/download.json`` for datasets, ``given/<name>/download.json`` for models).

The config text is edited in place, not re-serialised, so comments and layout survive; the edit is
checked by parsing the result (every other value unchanged) before the file is atomically replaced.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import yaml

from mergemix import io

log = logging.getLogger("mergemix.data")
#: source -> the spec key holding its hub repository id
REPO_KEYS = {"hf_images": "hub_id", "hf_chat": "path"}
#: the spec key holding a given model's hub repository id
MODEL_REPO_KEY = "hub"
#: the config sections whose hub entries are pinned
SECTIONS = ("datasets", "models")
_KIND = {"datasets": "dataset", "models": "model"}
_SHA = re.compile(r"^[0-9a-f]{40}$")


def hub_datasets(config: dict) -> dict[str, tuple[str, str | None]]:
    """name -> (hub repository id, configured revision) for every dataset read from a hub
    (local paths, which need no pin, are left out)."""
    out = {}
    for name, spec in config["datasets"].items():
        key = REPO_KEYS.get(spec.get("source"))
        if key and spec.get(key) and not Path(str(spec[key])).expanduser().exists():
            out[name] = (str(spec[key]), spec.get("revision"))
    return out


def hub_models(config: dict) -> dict[str, tuple[str, str | None]]:
    """name -> (hub repository id, configured revision) for every given model read from the hub
    (``models.<name>.hub``; models given by a local ``path`` are left out)."""
    return {
        name: (str(spec[MODEL_REPO_KEY]), spec.get("revision"))
        for name, spec in (config.get("models") or {}).items()
        if spec.get(MODEL_REPO_KEY)
    }


def hub_commit(repo: str, revision: str | None) -> str:
    """The commit a hub dataset revision resolves to (network)."""
    from huggingface_hub import HfApi

    return HfApi().dataset_info(repo, revision=revision).sha


def hub_model_commit(repo: str, revision: str | None) -> str:
    """The commit a hub model revision resolves to (network)."""
    from huggingface_hub import HfApi

    return HfApi().model_info(repo, revision=revision).sha


def commit_or_none(repo: str, revision: str | None) -> str | None:
    """``hub_commit`` for a download's record: None, with a warning, where the hub cannot say (the
    download itself has succeeded; the record only informs a later pin)."""
    try:
        return hub_commit(repo, revision)
    except Exception as e:
        log.warning("could not resolve the commit of %s: %s", repo, e)
        return None


def downloaded_commit(download_dir: Path) -> str | None:
    """The commit the download stage recorded in ``download_dir/download.json``, if any."""
    path = Path(download_dir) / "download.json"
    if not path.exists():
        return None
    info = io.read_json(path).get("info", {})
    return info.get("resolved_revision")


def downloaded_model(download_dir: Path) -> dict | None:
    """The record the ``download_model`` rule wrote in ``download_dir/download.json`` (``hub``,
    ``revision``, ``resolved_revision``: see mergemix.given.hub), if any."""
    path = Path(download_dir) / "download.json"
    return io.read_json(path) if path.exists() else None


def split_key(key: str) -> tuple[str, str]:
    """A pin's key -> (section, name): ``models.cars`` -> (models, cars); a bare name is a dataset's."""
    section, dot, name = key.partition(".")
    return (section, name) if dot and section in SECTIONS else ("datasets", key)


def _checked(kind: str, name: str, repo: str, revision, commit) -> str:
    if not _SHA.match(str(commit)):
        raise ValueError(f"{kind} {name!r}: {repo}@{revision} resolved to {commit!r}, which is not a commit sha")
    return str(commit)


def _model_record_commit(name: str, repo: str, revision: str | None, results_dir: Path) -> str:
    """The commit ``download_model`` recorded for the model, refused when it is missing or was
    recorded for another repository or revision than the config now names."""
    where = Path(results_dir) / "given" / name / "download.json"
    record = downloaded_model(where.parent) or {}
    commit = record.get("resolved_revision")
    if commit is None:
        raise ValueError(
            f"model {name!r} has no recorded commit in {where}; run its download first "
            "(snakemake ... --until download_model), or pin from the hub (leave out --from-downloads)"
        )
    hub, rec_rev = record.get("hub"), record.get("revision")
    if hub != repo or (rec_rev is not None and revision is not None and str(rec_rev) != str(revision)):
        raise ValueError(
            f"model {name!r}: {where} records {hub}@{rec_rev}, but the config names {repo}@{revision}; "
            "download it again, or pin from the hub (leave out --from-downloads)"
        )
    return commit


def resolve_pins(
    config: dict,
    results_dir: Path | None = None,
    resolver: Callable[[str, str | None], str] | None = None,
    model_resolver: Callable[[str, str | None], str] | None = None,
) -> dict[str, dict]:
    """``datasets.<name>`` / ``models.<name>`` -> {section, name, repo, revision (configured), commit}
    for each hub dataset, then each given model read from the hub.

    ``results_dir`` (the study's results folder) given: the commits the downloads recorded, under
    ``results_dir/downloads/<name>`` for datasets and ``results_dir/given/<name>`` for models (no
    network); otherwise the hub is asked: ``resolver`` (default: ``hub_commit``) for datasets,
    ``model_resolver`` (default: ``hub_model_commit``) for models. An entry already pinned keeps its
    commit."""
    resolver = resolver or hub_commit
    model_resolver = model_resolver or hub_model_commit
    pins = {}
    for name, (repo, revision) in hub_datasets(config).items():
        if revision and _SHA.match(str(revision)):
            commit = str(revision)
        elif results_dir is not None:
            commit = downloaded_commit(Path(results_dir) / "downloads" / name)
            if commit is None:
                raise ValueError(
                    f"dataset {name!r} has no recorded commit in {Path(results_dir) / 'downloads' / name / 'download.json'}; "
                    "run its download first, or pin from the hub (leave out --from-downloads)"
                )
        else:
            commit = resolver(repo, revision)
        pins[f"datasets.{name}"] = {
            "section": "datasets",
            "name": name,
            "repo": repo,
            "revision": revision,
            "commit": _checked("dataset", name, repo, revision, commit),
        }
    for name, (repo, revision) in hub_models(config).items():
        if revision and _SHA.match(str(revision)):
            commit = str(revision)
        elif results_dir is not None:
            commit = _model_record_commit(name, repo, revision, results_dir)
        else:
            commit = model_resolver(repo, revision)
        pins[f"models.{name}"] = {
            "section": "models",
            "name": name,
            "repo": repo,
            "revision": revision,
            "commit": _checked("model", name, repo, revision, commit),
        }
    return pins


def _block(lines: list[str], name: str, section: str = "datasets") -> tuple[int, int]:
    """Line range [start, end) of ``name``'s entry in the top-level ``section:`` mapping."""
    try:
        top = next(i for i, ln in enumerate(lines) if re.match(rf"^{section}:\s*(#.*)?$", ln))
    except StopIteration:
        raise ValueError(f"the config has no top-level '{section}:' block to edit") from None
    entry_indent = None
    for i in range(top + 1, len(lines)):
        ln = lines[i]
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        if not ln.startswith((" ", "\t")):
            break  # the next top-level key
        indent = len(ln) - len(ln.lstrip())
        entry_indent = indent if entry_indent is None else entry_indent
        if indent == entry_indent and re.match(rf"^\s+{re.escape(name)}:(\s|$)", ln):
            end = i + 1
            while end < len(lines):
                nxt = lines[end]
                if nxt.strip() and not nxt.lstrip().startswith("#") and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                end += 1
            return i, end
    raise ValueError(f"{_KIND.get(section, section)} {name!r} not found under '{section}:' in the config text")


def _pin_block(block: list[str], name: str, repo_key: str, commit: str, kind: str = "dataset") -> list[str]:
    text = "\n".join(block)
    if not isinstance(yaml.safe_load(commit), str):  # an all-digit sha would read back as a number
        commit = f'"{commit}"'

    def in_comment(m) -> bool:
        return "#" in text[text.rfind("\n", 0, m.start()) + 1 : m.start()]

    found = [m for m in re.finditer(r"(\brevision:[ \t]*)([^,}\s#]+|\"[^\"]*\"|'[^']*')", text) if not in_comment(m)]
    if len(found) > 1:
        raise ValueError(f"{kind} {name!r} has {len(found)} 'revision:' keys in the config text; leave one")
    if found:
        m = found[0]
        return (text[: m.start(2)] + commit + text[m.end(2) :]).split("\n")
    repo = next((m for m in re.finditer(rf"\b{repo_key}:[ \t]*([^,}}\s#]+)", text) if not in_comment(m)), None)
    if repo is None:
        raise ValueError(f"{kind} {name!r}: no '{repo_key}:' in its config text; add 'revision: {commit}' by hand")
    line_no = text[: repo.start()].count("\n")
    line = block[line_no]
    if "{" in block[0].split("#", 1)[0]:  # {source: ..., hub_id: X, ...}: insert after the repo value
        return (text[: repo.end(1)] + f", revision: {commit}" + text[repo.end(1) :]).split("\n")
    indent = line[: len(line) - len(line.lstrip())]
    return block[: line_no + 1] + [f"{indent}revision: {commit}"] + block[line_no + 1 :]


def pin_text(text: str, config: dict, pins: dict[str, dict]) -> str:
    """The config text with each pinned entry's ``revision`` set to its commit: ``datasets.<name>``
    (or a bare dataset name) edits the dataset's entry, ``models.<name>`` the given model's.

    Raises ValueError, leaving nothing changed, when the edit cannot be made safely or the result
    does not parse to the same config with only those revisions changed."""
    lines = text.split("\n")
    targets = [(split_key(key), pin["commit"]) for key, pin in pins.items()]
    for (section, name), commit in targets:
        start, end = _block(lines, name, section)
        if section == "models":
            key = MODEL_REPO_KEY
        else:
            key = REPO_KEYS[config["datasets"][name]["source"]]
        lines[start:end] = _pin_block(lines[start:end], name, key, commit, _KIND[section])
    new = "\n".join(lines)
    after, expected = yaml.safe_load(new), yaml.safe_load(text)
    for (section, name), commit in targets:
        expected[section][name]["revision"] = commit
    if after != expected:
        raise ValueError(
            "pinning would change more than the revisions; the config was left as it is. Set each "
            "dataset's and model's 'revision:' to the commits printed above by hand"
        )
    return new


def pin_config_file(path, pins: dict[str, dict], config: dict) -> bool:
    """Rewrite ``path`` atomically with the pins; False when it already had them all."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = pin_text(text, config, pins)
    if new == text:
        return False
    io.write_text(path, new)
    return True
