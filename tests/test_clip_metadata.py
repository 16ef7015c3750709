"""tools/check_clip_metadata.py: the shipped class names, templates and hub ids against the
fusion-bench wheel, the package of the author of the study's hub mirrors."""

import importlib.util
import subprocess
import sys
import zipfile

import pytest
import yaml

from conftest import ROOT
from mergemix.data.clip_datasets import CLASSNAMES, TEMPLATES

spec = importlib.util.spec_from_file_location("check_clip_metadata", ROOT / "tools" / "check_clip_metadata.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

STUDY = yaml.safe_load((ROOT / "config" / "clip_vit_b32.yaml").read_text())["datasets"]


def fake_wheel(path, classnames, templates, hubs):
    """A wheel laid out as fusion-bench's, from our own data (hubs: name -> (id, config))."""
    with zipfile.ZipFile(path, "w") as z:
        for ours, (module, cfg) in check.NAMES.items():
            lambdas = ",\n".join("    lambda c: f" + repr(t.replace("{}", "{c}")) for t in templates[ours])
            z.writestr(
                f"fusion_bench/tasks/clip_classification/{module}.py",
                f"classnames = {classnames[ours]!r}\n\ntemplates = [\n{lambdas}\n]\n",
            )
            hub, config = hubs[ours]
            body = {"_target_": "datasets.load_dataset", "split": "train"}
            body.update({"_args_": [hub, config]} if config else {"path": hub})
            for split in ("train", "test"):
                z.writestr(
                    f"fusion_bench_config/dataset/image_classification/{split}/{cfg}.yaml",
                    yaml.safe_dump({cfg: {**body, "split": split}}),
                )
    return path


def test_checker_reads_a_wheel_and_finds_each_kind_of_difference(tmp_path):
    hubs = {k: (v["hub_id"], v.get("config")) for k, v in STUDY.items()}
    good = fake_wheel(tmp_path / "good.whl", CLASSNAMES, TEMPLATES, hubs)
    ref = check.read_wheel(good)
    assert ref["sun397"]["classnames"] == CLASSNAMES["sun397"] and ref["dtd"]["templates"] == TEMPLATES["dtd"]
    assert check.compare(ref, CLASSNAMES, TEMPLATES, STUDY) == []

    swapped = {**CLASSNAMES, "cars": [CLASSNAMES["cars"][1], CLASSNAMES["cars"][0], *CLASSNAMES["cars"][2:]]}
    ref = check.read_wheel(fake_wheel(tmp_path / "swap.whl", swapped, TEMPLATES, hubs))
    problems = check.compare(ref, CLASSNAMES, TEMPLATES, STUDY)
    assert problems == [f"cars: class 0 is {CLASSNAMES['cars'][0]!r}, reference has {CLASSNAMES['cars'][1]!r}"]

    other = {**TEMPLATES, "gtsrb": TEMPLATES["gtsrb"][:2]}
    moved = {**hubs, "dtd": ("someone/dtd", None)}
    ref = check.read_wheel(fake_wheel(tmp_path / "other.whl", CLASSNAMES, other, moved))
    problems = check.compare(ref, CLASSNAMES, TEMPLATES, STUDY)
    assert [p.split(":")[0] for p in problems] == ["dtd", "dtd", "gtsrb"]
    assert "someone/dtd" in problems[0]


def test_shipped_metadata_matches_the_fusion_bench_wheel(tmp_path):
    # PyPI is the one network this project's machines and CI reach; without it there is nothing to check
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp_path), check.FUSION_BENCH],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"could not download {check.FUSION_BENCH} from the package index: {r.stderr[-300:]}")
    (wheel,) = tmp_path.glob("fusion_bench-*.whl")
    assert check.compare(check.read_wheel(wheel), CLASSNAMES, TEMPLATES, STUDY) == []


@pytest.mark.slow
def test_classnames_ship_in_the_built_wheel(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("mergemix-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mergemix/data/clip_classnames.json" in names and "mergemix/data/LICENSE-fusion-bench.txt" in names
