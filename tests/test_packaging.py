"""Packaging: one software environment, every module importable on its own, thin rules, the schema in the wheel."""

import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest
import yaml

import mergemix
from conftest import ROOT, tiny_config


def test_software_is_deployed_in_one_environment():
    # no rule carries a conda: directive (the docs say jobs run the interpreter that runs Snakemake)
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        assert "conda:" not in smk.read_text(), smk.name
    assert not (ROOT / "envs").exists()
    assert "{shlex.quote(sys.executable)} -m mergemix" in (ROOT / "workflow/rules/common.smk").read_text()


# One interpreter preloads the heavy third-party libraries (never mergemix), then forks a child per
# mergemix module that imports only that module: each child starts with no mergemix module loaded,
# exactly as a fresh interpreter would, at a fraction of the cost of one interpreter per module
# (torch, open_clip and transformers took about 2 s of each of ~50 starts).
IMPORT_EACH = """
import importlib, os, sys, traceback
for lib in sys.argv[2:]:
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "mergemix"], "the parent imported mergemix"
failed = []
for name in sys.argv[1].split(","):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        failed.append(name)
print("FAILED:" + ",".join(failed))
sys.exit(1 if failed else 0)
"""
PRELOAD = [
    "numpy",
    "pandas",
    "yaml",
    "jsonschema",
    "safetensors.torch",
    "torch",
    "torchvision",
    "open_clip",
    "transformers",
    "peft",
    "sklearn",
    "optuna",
    "matplotlib.pyplot",
    "tqdm",
    "datasets",
]


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    # each module imported first in a process with no mergemix module loaded: an import cycle fails
    # whichever module is imported first
    names = [mod.name for mod in pkgutil.walk_packages(mergemix.__path__, "mergemix.")]
    assert len(names) > 30
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH, ",".join(names), *PRELOAD], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "FAILED:", (r.stdout[-2000:], r.stderr[-4000:])


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


@pytest.mark.workflow
def test_the_workflow_start_imports_no_torch(tmp_path):
    """Snakemake builds the DAG at every start, every dry run and inside every Slurm job; the
    config checks and the backends' class attributes it reads must not import torch, scipy.ndimage,
    open_clip or transformers (2.5 s of a 5.5 s start before mergemix.lazy). The jobs import them."""
    cfg = tiny_config(tmp_path / "results", n=3)
    cfg["merge_eval"] = {"methods": ["uniform", "ties", "dare"], "method_options": {"dare": {"seed": 3}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = textwrap.dedent(f"""
        import sys
        from snakemake.cli import main
        sys.argv = ["snakemake", "-n", "--cores", "1", "--configfile", {str(path)!r}]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        from mergemix.backends.base import backend_class
        for name in ("smallcnn", "clip", "causal_lm"):
            c = backend_class(name)
            assert c.check_params(dict(c.defaults)) == [] and c.pack_size >= 1, name
        print("HEAVY", sorted(m for m in ("torch", "scipy.ndimage", "open_clip", "transformers") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Job stats:" in r.stdout + r.stderr  # the DAG was built: every job planned
    assert "HEAVY []" in r.stdout, r.stdout[-2000:]


def test_a_lazy_module_imports_on_first_read_and_keeps_what_it_read(tmp_path, monkeypatch):
    from mergemix.lazy import LazyModule

    (tmp_path / "lazy_probe.py").write_text("VALUE = 1\nOTHER = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_probe", raising=False)
    probe = LazyModule("lazy_probe")
    assert "lazy_probe" not in sys.modules and "not imported yet" in repr(probe)
    assert probe.VALUE == 1 and "lazy_probe" in sys.modules
    # kept on the stand-in: the next read is a plain attribute lookup, bound at the first read
    assert vars(probe)["VALUE"] == 1 and "OTHER" not in vars(probe)
    sys.modules["lazy_probe"].VALUE = 3
    assert probe.VALUE == 1 and probe.OTHER == 2
    with pytest.raises(AttributeError, match="read-only"):
        probe.VALUE = 5
    with pytest.raises(AttributeError):
        getattr(probe, "MISSING")
