"""mergemix pin-revisions: hub datasets pinned to commits in the config text, layout kept.

The hub cannot be reached from this project's machines, so the commit lookup is replaced by a
deterministic function; everything else (config parsing, the text edit, its check, the CLI) is real."""

import hashlib
import shutil

import pytest
import yaml

from conftest import ROOT
from mergemix import cli, io, pins
from mergemix.config import load_yaml, validate_config


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
        io.write_json(tmp_path / "results" / cfg["study"] / "downloads" / n / "download.json",
                      {"name": n, "spec": cfg["datasets"][n], "info": {"resolved_revision": commits[n]}})
    before = path.read_text()
    assert cli.main(["pin-revisions", str(path), "--from-downloads", "--write"]) == 2
    err = capsys.readouterr().err
    assert f"dataset {names[-1]!r} has no recorded commit" in err and "run its download first" in err
    assert path.read_text() == before

    io.write_json(tmp_path / "results" / cfg["study"] / "downloads" / names[-1] / "download.json",
                  {"name": names[-1], "spec": {}, "info": {"resolved_revision": commits[names[-1]]}})
    assert cli.main(["pin-revisions", str(path), "--from-downloads", "--write"]) == 0
    only_revisions_changed(yaml.safe_load(before), load_yaml(path), commits)


def test_refuses_unsafe_edits_and_bad_commits(tmp_path):
    text = ("datasets:\n"
            "  a:\n"
            "    source: hf_chat\n"
            "    path: org/a   # revision: main would be a comment\n"
            "    revision: main\n"
            "    revision: v2\n")
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
