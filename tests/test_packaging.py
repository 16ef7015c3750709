"""The conda env file and pyproject agree; the package has no circular imports."""

import pkgutil
import re
import subprocess
import sys
import tomllib

import yaml

import mergemix
from conftest import ROOT


def test_conda_env_matches_pyproject_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "envs" / "mergemix.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(d for d in pip if not d.startswith("-e")) == sorted(deps)


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
