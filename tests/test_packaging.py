"""Packaging: one software environment, every module importable on its own, thin rules, the schema in the wheel."""

import pkgutil
import re
import subprocess
import sys

import pytest

import mergemix
from conftest import ROOT


def test_software_is_deployed_in_one_environment():
    # no rule carries a conda: directive (the docs say jobs run the interpreter that runs Snakemake)
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        assert "conda:" not in smk.read_text(), smk.name
    assert not (ROOT / "envs").exists()
    assert "{shlex.quote(sys.executable)} -m mergemix" in (ROOT / "workflow/rules/common.smk").read_text()


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    # a fresh interpreter per module: an import cycle fails whichever module is imported first
    for mod in pkgutil.walk_packages(mergemix.__path__, "mergemix."):
        r = subprocess.run([sys.executable, "-c", f"import {mod.name}"], capture_output=True, text=True)
        assert r.returncode == 0, (mod.name, r.stderr[-2000:])


def test_rules_are_thin_calls_of_the_cli():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.findall(r"^\s*rule (\w+):", text, re.M):
            body = re.split(r"\n\s*rule \w+:|\nelse:", text.split(f"rule {rule}:")[1])[0]
            assert "log:" in body and "resources:" in body and "threads:" in body, (smk.name, rule)
            assert re.search(r'shell:\s*\n\s*"{MERGEMIX} [a-z-]+ ', body), (smk.name, rule)


@pytest.mark.slow
def test_the_schema_ships_in_the_wheel_and_check_config_works_from_it(tmp_path):
    import zipfile

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("mergemix-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "mergemix" / "schemas" / "config.schema.yaml").is_file()
    # the unpacked wheel alone (no source tree on the path) validates a study config
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    r = subprocess.run(
        [sys.executable, "-m", "mergemix", "check-config", str(ROOT / "config" / "config.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-c", "import mergemix.config as c; print(c.DEFAULT_SCHEMA)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip().startswith(str(site))
