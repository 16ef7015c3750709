"""mergemix pin-revisions: hub datasets and given models pinned to commits in the config text, layout kept.

The hub cannot be reached from this project's machines, so the commit lookup is replaced by a
deterministic function; everything else (config parsing, the text edit, its check, the CLI) is real."""

import hashlib
import re
import shutil

import pytest
import yaml

from conftest import ROOT
from mergemix import cli, io, pins
from mergemix.config import load_yaml, validate_config
from mergemix.pins import _SHA


def fake_commit(repo, revision):
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


def only_revisions_changed(before: dict, after: dict, expected: dict[str, str]):
    for name, commit in expected.items():
        assert after["datasets"][name]["revision"] == commit
        after["datasets"][name].pop("revision")
        before["datasets"][name].pop("revision", None)
    assert after == before


@pytest.mark.parametrize("study", ["clip_vit_b32.yaml", "llama3_ia3_ja.yaml"])
def test_pins_a_study_config_in_place(tmp_path, monkeypatch, capsys, study):
    path = tmp_path / study
    shutil.copy(ROOT / "config" / study, path)
    monkeypatch.setattr(pins, "hub_commit", fake_commit)
    before_text = path.read_text()
    hub = pins.hub_datasets(validate_config(load_yaml(path)))
    assert len(hub) >= 6

    assert cli.main(["pin-revisions", str(path)]) == 0  # dry run: prints, writes nothing
    assert path.read_text() == before_text and "add --write" in capsys.readouterr().out

    assert cli.main(["pin-revisions", str(path), "--write"]) == 0
    out = capsys.readouterr().out
    expected = {name: fake_commit(repo, rev) for name, (repo, rev) in hub.items()}
    assert all(f"{name}: " in out and c in out for name, c in expected.items())
    text = path.read_text()
    only_revisions_changed(yaml.safe_load(before_text), yaml.safe_load(text), expected)
    # comments and the other lines are kept as they were
    kept = [ln for ln in before_text.splitlines() if "revision:" not in ln]
    assert [ln for ln in text.splitlines() if "revision:" not in ln] == kept
    validate_config(load_yaml(path))

    # pinned datasets keep their commit: the hub is not asked again and the file is unchanged
    monkeypatch.setattr(pins, "hub_commit", lambda repo, rev: pytest.fail(f"asked the hub for {repo}"))
    assert cli.main(["pin-revisions", str(path), "--write"]) == 0
    assert path.read_text() == text and "already pinned" in capsys.readouterr().out


def test_pins_from_recorded_downloads_or_says_which_is_missing(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    cfg = load_yaml(ROOT / "config" / "clip_vit_b32.yaml")
    cfg["results_dir"] = str(tmp_path / "results")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    names = sorted(cfg["datasets"])
    commits = {n: fake_commit(n, "main") for n in names}
    for n in names[:-1]:  # the record the download stage writes
        io.write_json(
            tmp_path / "results" / cfg["study"] / "downloads" / n / "download.json",
            {"name": n, "spec": cfg["datasets"][n], "info": {"resolved_revision": commits[n]}},
        )
    before = path.read_text()
    assert cli.main(["pin-revisions", str(path), "--from-downloads", "--write"]) == 2
    err = capsys.readouterr().err
    assert f"dataset {names[-1]!r} has no recorded commit" in err and "run its download first" in err
    assert path.read_text() == before

    io.write_json(
        tmp_path / "results" / cfg["study"] / "downloads" / names[-1] / "download.json",
        {"name": names[-1], "spec": {}, "info": {"resolved_revision": commits[names[-1]]}},
    )
    assert cli.main(["pin-revisions", str(path), "--from-downloads", "--write"]) == 0
    only_revisions_changed(yaml.safe_load(before), load_yaml(path), commits)


def test_refuses_unsafe_edits_and_bad_commits(tmp_path):
    text = (
        "datasets:\n"
        "  a:\n"
        "    source: hf_chat\n"
        "    path: org/a   # revision: main would be a comment\n"
        "    revision: main\n"
        "    revision: v2\n"
    )
    raw = yaml.safe_load(text)
    with pytest.raises(ValueError, match="2 'revision:' keys"):
        pins.pin_text(text, raw, {"a": {"commit": "0" * 40}})
    # a comment that looks like a key is not edited; the key after the repo is inserted
    text = "datasets:\n  a:   # {flow-looking comment}\n    source: hf_chat\n    path: org/a   # revision: main\n"
    new = pins.pin_text(text, yaml.safe_load(text), {"a": {"commit": "1" * 40}})
    assert yaml.safe_load(new)["datasets"]["a"] == {"source": "hf_chat", "path": "org/a", "revision": "1" * 40}
    assert "# revision: main" in new

    cfg = {"datasets": {"a": {"source": "hf_images", "hub_id": "org/a", "revision": "main"}}}
    with pytest.raises(ValueError, match="not a commit sha"):
        pins.resolve_pins(cfg, None, lambda repo, rev: "main")
    # local paths need no pin
    cfg["datasets"]["b"] = {"source": "hf_images", "hub_id": str(tmp_path)}
    assert list(pins.hub_datasets(cfg)) == ["a"]


# Given models (``models:``): pinned like the datasets, but resolved as *models* on the hub, recorded by
# download_model under given/<name>, and edited inside ``models:``, where the names usually repeat the
# datasets' ones.


def fake_model_commit(repo, revision):
    return hashlib.sha1(f"model:{repo}@{revision}".encode()).hexdigest()


def no_hub(repo, revision):
    pytest.fail(f"asked the hub for {repo}@{revision}")


DATASETS_TEXT = """\
datasets:
  cars:
    source: hf_images
    hub_id: org/cars-data
    revision: main
  dtd: {source: hf_images, hub_id: org/dtd-data, revision: main}
"""
MODELS_TEXT = """\
models:   # given fine-tuned models
  cars:
    hub: org/cars-model
    revision: main   # the branch, for now
    format: clip_hf
  dtd: {hub: org/dtd-model, revision: main, format: clip_hf}
  eurosat: {hub: org/eurosat-model, revision: %s}
  sun397:
    hub: org/sun397-model
  mnist: {path: %s, format: clip_hf}
"""


@pytest.mark.parametrize("models_first", [False, True])
def test_pins_a_dataset_and_the_model_of_the_same_name_each_in_its_section(tmp_path, models_first):
    pinned = "e" * 40
    models = MODELS_TEXT % (pinned, tmp_path)
    text = models + "\n" + DATASETS_TEXT if models_first else DATASETS_TEXT + "\n" + models
    raw = yaml.safe_load(text)
    assert pins.hub_models(raw) == {
        "cars": ("org/cars-model", "main"),
        "dtd": ("org/dtd-model", "main"),
        "eurosat": ("org/eurosat-model", pinned),
        "sun397": ("org/sun397-model", None),
    }

    def model_resolver(repo, revision):
        assert "-model" in repo and repo != "org/eurosat-model", repo  # the pinned one is not asked again
        return fake_model_commit(repo, revision)

    def dataset_resolver(repo, revision):
        assert "-data" in repo, repo
        return fake_commit(repo, revision)

    found = pins.resolve_pins(raw, None, dataset_resolver, model_resolver)
    assert list(found) == [
        "datasets.cars",
        "datasets.dtd",
        "models.cars",
        "models.dtd",
        "models.eurosat",
        "models.sun397",
    ]  # the local model (mnist) needs no pin
    assert found["models.cars"] == {
        "section": "models",
        "name": "cars",
        "repo": "org/cars-model",
        "revision": "main",
        "commit": fake_model_commit("org/cars-model", "main"),
    }
    assert found["datasets.cars"]["commit"] == fake_commit("org/cars-data", "main")
    assert found["models.eurosat"]["commit"] == pinned

    new = pins.pin_text(text, raw, found)
    after = yaml.safe_load(new)
    assert after["datasets"]["cars"]["revision"] == fake_commit("org/cars-data", "main")
    assert after["datasets"]["dtd"]["revision"] == fake_commit("org/dtd-data", "main")
    assert after["models"]["cars"] == {
        "hub": "org/cars-model",
        "revision": fake_model_commit("org/cars-model", "main"),
        "format": "clip_hf",
    }
    assert after["models"]["dtd"]["revision"] == fake_model_commit("org/dtd-model", "main")
    assert after["models"]["eurosat"]["revision"] == pinned
    assert after["models"]["sun397"] == {
        "hub": "org/sun397-model",  # no revision: one is added after the repo
        "revision": fake_model_commit("org/sun397-model", None),
    }
    assert after["models"]["mnist"] == {"path": str(tmp_path), "format": "clip_hf"}
    assert f"revision: {fake_model_commit('org/cars-model', 'main')}   # the branch, for now" in new
    assert "models:   # given fine-tuned models" in new
    # pinning again changes nothing
    assert pins.pin_text(new, after, pins.resolve_pins(after, None, no_hub, no_hub)) == new


def test_pins_the_given_study_config_datasets_and_models(tmp_path, monkeypatch, capsys):
    path = tmp_path / "clip_vit_b32_given.yaml"
    shutil.copy(ROOT / "config" / "clip_vit_b32_given.yaml", path)
    asked = {"datasets": [], "models": []}

    def dataset_commit(repo, revision):
        asked["datasets"].append(repo)
        return fake_commit(repo, revision)

    def model_commit(repo, revision):
        asked["models"].append(repo)
        return fake_model_commit(repo, revision)

    monkeypatch.setattr(pins, "hub_commit", dataset_commit)
    monkeypatch.setattr(pins, "hub_model_commit", model_commit)
    before_text = path.read_text()
    before = load_yaml(path)
    cfg = validate_config(before)
    datasets, models = pins.hub_datasets(cfg), pins.hub_models(cfg)
    assert len(datasets) == len(models) == 8 and set(datasets) == set(models)

    assert cli.main(["pin-revisions", str(path)]) == 0  # dry run
    out = capsys.readouterr().out
    assert path.read_text() == before_text and "add --write" in out
    assert (
        f"models.cars: tanganke/clip-vit-base-patch32_stanford-cars main -> "
        f"{fake_model_commit('tanganke/clip-vit-base-patch32_stanford-cars', 'main')}"
    ) in out
    assert f"datasets.cars: tanganke/stanford_cars main -> {fake_commit('tanganke/stanford_cars', 'main')}" in out

    assert cli.main(["pin-revisions", str(path), "--write"]) == 0
    capsys.readouterr()
    assert sorted(asked["datasets"]) == sorted([r for r, _ in datasets.values()] * 2)  # dry run + write
    assert sorted(asked["models"]) == sorted([r for r, _ in models.values()] * 2)
    text = path.read_text()
    after = load_yaml(path)
    shas = []
    for name in datasets:
        assert after["datasets"][name].pop("revision") == fake_commit(datasets[name][0], "main")
        assert after["models"][name].pop("revision") == fake_model_commit(models[name][0], "main")
        shas += [fake_commit(datasets[name][0], "main"), fake_model_commit(models[name][0], "main")]
        before["datasets"][name].pop("revision")
        before["models"][name].pop("revision")
    assert len(set(shas)) == 16
    assert after == before
    # only the revision values changed, in place: same lines, same comments, same alignment
    old_lines, new_lines = before_text.splitlines(), text.splitlines()
    assert len(old_lines) == len(new_lines)
    changed = [(o, n) for o, n in zip(old_lines, new_lines) if o != n]
    assert len(changed) == 16
    assert all(re.sub(r"revision: \"?[0-9a-f]{40}\"?", "revision: main", n) == o for o, n in changed)
    validate_config(load_yaml(path))

    monkeypatch.setattr(pins, "hub_commit", no_hub)
    monkeypatch.setattr(pins, "hub_model_commit", no_hub)
    assert cli.main(["pin-revisions", str(path), "--write"]) == 0
    assert path.read_text() == text and "already pinned" in capsys.readouterr().out


def test_a_local_model_is_left_alone(tmp_path, monkeypatch, capsys):
    path = tmp_path / "study.yaml"
    local = tmp_path / "my_cars_model"
    local.mkdir()
    given = (ROOT / "config" / "clip_vit_b32_given.yaml").read_text()
    old = next(ln for ln in given.splitlines() if ln.startswith("  cars:") and "clip-vit-base-patch32" in ln)
    local_line = f"  cars:     {{path: {local}, format: clip_hf}}   # revision: not for local models"
    path.write_text(given.replace(old, local_line))
    monkeypatch.setattr(pins, "hub_commit", fake_commit)
    monkeypatch.setattr(pins, "hub_model_commit", fake_model_commit)
    cfg = validate_config(load_yaml(path))
    assert "cars" not in pins.hub_models(cfg) and len(pins.hub_models(cfg)) == 7

    assert cli.main(["pin-revisions", str(path), "--write"]) == 0
    out = capsys.readouterr().out
    assert "models.cars:" not in out and "datasets.cars:" in out and out.count("models.") == 7
    after = load_yaml(path)
    assert after["models"]["cars"] == {"path": str(local), "format": "clip_hf"}
    assert local_line in path.read_text().splitlines()
    assert after["datasets"]["cars"]["revision"] == fake_commit("tanganke/stanford_cars", "main")
    assert all(_SHA.match(after["models"][n]["revision"]) for n in after["models"] if n != "cars")
    validate_config(after)


def test_pins_models_from_recorded_downloads(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    cfg = load_yaml(ROOT / "config" / "clip_vit_b32_given.yaml")
    cfg["results_dir"] = str(tmp_path / "results")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    results = tmp_path / "results" / cfg["study"]
    names = sorted(cfg["models"])
    data_commits = {n: fake_commit(n, "main") for n in cfg["datasets"]}
    model_commits = {n: fake_model_commit(cfg["models"][n]["hub"], "main") for n in names}
    for n, c in data_commits.items():  # the records the download stages write
        io.write_json(
            results / "downloads" / n / "download.json", {"name": n, "spec": {}, "info": {"resolved_revision": c}}
        )

    def record(n, hub=None):
        io.write_json(
            results / "given" / n / "download.json",
            {
                "hub": hub or cfg["models"][n]["hub"],
                "revision": "main",
                "resolved_revision": model_commits[n],
                "subfolder": None,
            },
        )

    for n in names[:-1]:
        record(n)
    before = path.read_text()
    assert cli.main(["pin-revisions", str(path), "--from-downloads", "--write"]) == 2
    err = capsys.readouterr().err
    assert f"model {names[-1]!r} has no recorded commit" in err and "given" in err and "download_model" in err
    assert path.read_text() == before

    record(names[-1], hub="someone/else")  # recorded for another repository: not this model's commit
    assert cli.main(["pin-revisions", str(path), "--from-downloads", "--write"]) == 2
    assert "records someone/else@main" in capsys.readouterr().err
    assert path.read_text() == before

    record(names[-1])
    assert cli.main(["pin-revisions", str(path), "--from-downloads", "--write"]) == 0
    after = load_yaml(path)
    for n in names:
        assert after["models"][n]["revision"] == model_commits[n]
        assert after["datasets"][n]["revision"] == data_commits[n]
    validate_config(after)
