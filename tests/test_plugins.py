"""Plugins: other packages add backends, dataset sources, merge methods and search strategies
through entry points.

A tiny plugin distribution is written into a temporary folder without pip (a package plus a
``*.dist-info`` folder with ``METADATA`` and ``entry_points.txt``); ``importlib.metadata`` finds it
once the folder is on ``sys.path`` / ``PYTHONPATH``. It is used in-process, by ``mergemix
check-config`` and by a real tiny study run through Snakemake.
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, tiny_config
from mergemix import merging, plugins, search
from mergemix.backends import base as backends_base
from mergemix.data import registry as data_registry
from mergemix.search import base as search_base

PLUGIN_FILES = {
    "mm_plugin/__init__.py": '"""A tiny mergemix plugin for the tests."""\n',
    # a backend: the smallcnn backend under another name, nothing else changed (not registered on
    # import: the entry point names the class)
    "mm_plugin/backend.py": """
        from mergemix.backends.smallcnn import SmallCNNBackend


        class PluginCNN(SmallCNNBackend):
            name = "plugin_cnn"
    """,
    # a source registered by its decorator on import, wrapping digits: labels moved by one
    "mm_plugin/data.py": """
        from mergemix.data.registry import get_source, register_source


        @register_source("plus_one", params={"domain": None, "strength": None})
        def plus_one(spec, seed, local_dir=None):
            raw = get_source("digits")({**spec, "source": "digits"}, seed, local_dir)
            raw.y = (raw.y + 1) % len(raw.classes)
            raw.info = {**raw.info, "plugin": "plus_one"}
            return raw
    """,
    # a module that registers its source on import (the entry point names the module)
    "mm_plugin/more_data.py": """
        from mergemix.data.registry import get_source, register_source


        @register_source("minus_one", params={"domain": None})
        def minus_one(spec, seed, local_dir=None):
            raw = get_source("digits")({**spec, "source": "digits"}, seed, local_dir)
            raw.y = (raw.y - 1) % len(raw.classes)
            return raw
    """,
    # a plain merge function: the elementwise median of the selected models
    "mm_plugin/merge.py": """
        def median(thetas, theta0=None):
            return thetas.median(dim=0).values
    """,
    # a search strategy (not registered on import: the entry point names the class): every subset,
    # the largest mask first, until the budget or its option stop_after is spent
    "mm_plugin/search.py": """
        from mergemix.search import BudgetExhausted, Option, SearchStrategy


        class Descending(SearchStrategy):
            name = "descending"
            options = {"stop_after": Option(None, (int, type(None)), lambda v: v >= 1, "null or an integer >= 1")}

            def run(self, objective):
                stop = self.opts["stop_after"]
                try:
                    for i, mask in enumerate(range((1 << self.n_candidates) - 1, 0, -1)):
                        if stop is not None and i == stop:
                            return "stopped"
                        objective(mask)
                except BudgetExhausted:
                    return "budget exhausted"
                return "all subsets evaluated"
    """,
}
ENTRY_POINTS = """
    [mergemix.backends]
    plugin_cnn = mm_plugin.backend:PluginCNN

    [mergemix.datasets]
    plus_one = mm_plugin.data:plus_one
    minus_one = mm_plugin.more_data

    [mergemix.merge_methods]
    median = mm_plugin.merge:median

    [mergemix.search_strategies]
    descending = mm_plugin.search:Descending
"""


def write_distribution(root: Path, name: str, files: dict, entry_points: str, version: str = "0.1") -> Path:
    """A distribution "installed" in ``root`` by hand: its files and ``<name>-<version>.dist-info``."""
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip())
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip())
    return root


@pytest.fixture
def plugin_root(tmp_path):
    return write_distribution(tmp_path / "site", "mm-plugin", PLUGIN_FILES, ENTRY_POINTS)


def _forget_plugin_modules():
    for m in [m for m in sys.modules if m.split(".")[0] in ("mm_plugin", "mm_clash", "mm_other")]:
        del sys.modules[m]


@pytest.fixture
def on_path(monkeypatch):
    """``on_path(folder)``: ``folder`` on sys.path with the registries' caches dropped; undone after."""

    def add(folder):
        monkeypatch.syspath_prepend(str(folder))
        plugins.refresh()

    yield add
    _forget_plugin_modules()
    plugins.refresh()


def env_with(*folders) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, folders), *filter(None, [env.get("PYTHONPATH")])])
    return env


def plugin_study(results_dir, study="plugged"):
    """tiny_config's study (3 datasets, no mixtures) on the plugin's backend, source, merge method
    and search strategy (which scores every subset of a target's 2 candidates)."""
    cfg = tiny_config(results_dir, study=study, n=3, mixture=False, chunks=1)
    cfg["backend"]["name"] = "plugin_cnn"
    cfg["datasets"] = {d: {"source": "plus_one", "domain": d} for d in cfg["datasets"]}
    cfg["merge_eval"]["method"] = "median"
    cfg["merge_eval"]["strategy"] = "descending"
    cfg["targets"] = ["rotate"]  # one target: every rule runs on the plugin, at a third of the per-target jobs
    return cfg


# --- the registries without plugins --------------------------------------------------------------------
def test_builtin_tables_match_what_the_modules_register():
    """Each built-in table names exactly what its modules register (a new built-in goes in its table)."""
    mods = {importlib.import_module(t.partition(":")[0]) for t in data_registry.BUILTIN_SOURCES.values()}
    from_mods = {n for n, fn in data_registry.SOURCES.loaded().items() if fn.__module__ in {m.__name__ for m in mods}}
    assert from_mods == set(data_registry.BUILTIN_SOURCES)
    for name, target in data_registry.BUILTIN_SOURCES.items():
        assert data_registry.SOURCES[name] is plugins.import_target(target)
    for name, target in backends_base.BUILTIN_BACKENDS.items():
        cls = backends_base.BACKENDS[name]
        assert cls is plugins.import_target(target) and cls.name == name
    from mergemix import merge_methods

    assert set(merging.BUILTIN_METHODS) == set(merge_methods.METHODS)
    assert merging.get_merge_method("ties").options is merge_methods.METHODS["ties"].options
    assert merging.linear_coefficients("uniform", 4) == (0.25, 0.0)
    mods = {importlib.import_module(t.partition(":")[0]) for t in search_base.BUILTIN_STRATEGIES.values()}
    from_mods = {n for n, c in search_base.STRATEGIES.loaded().items() if c.__module__ in {m.__name__ for m in mods}}
    assert from_mods == set(search_base.BUILTIN_STRATEGIES)
    for name, target in search_base.BUILTIN_STRATEGIES.items():
        cls = search.get_strategy(name)
        assert cls is plugins.import_target(target) and cls.name == name


def test_a_config_check_imports_only_what_the_study_uses(tmp_path):
    """Names are listed from the tables and the metadata: a smallcnn study on digits imports neither
    the other backends nor the other dataset modules (nor open_clip, transformers)."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path / "results", n=3)))
    code = textwrap.dedent(f"""
        import sys
        from mergemix import plugins
        from mergemix.config import load_yaml, validate_config
        validate_config(load_yaml({str(cfg)!r}))
        assert plugins.names("backends") == ["causal_lm", "clip", "smallcnn"], plugins.names("backends")
        assert "digits" in plugins.names("datasets") and "ties" in plugins.names("merge_methods")
        assert "optuna" in plugins.names("search_strategies")
        heavy = [m for m in ("mergemix.backends.clip", "mergemix.backends.causal_lm", "mergemix.data.text",
                             "mergemix.data.images", "open_clip", "transformers", "peft", "datasets",
                             "mergemix.search.optuna_tpe", "mergemix.search.surrogate", "optuna", "sklearn")
                 if m in sys.modules]
        assert not heavy, heavy
        assert "mergemix.backends.smallcnn" in sys.modules and "mergemix.data.digits" in sys.modules
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_unknown_names_list_the_available_ones():
    with pytest.raises(KeyError, match="unknown backend 'nope'; available: causal_lm, clip, smallcnn"):
        backends_base.backend_class("nope")
    with pytest.raises(KeyError, match="unknown dataset source 'nope'; available: benchmarks, digits"):
        data_registry.get_source("nope")
    problems = data_registry.check_spec("x", {"source": "nope"})
    assert problems[0].startswith("datasets.x.source: unknown source 'nope'; allowed: benchmarks, digits")
    with pytest.raises(KeyError, match="unknown merge method 'nope'; registered: dare, dare_ties"):
        merging.get_merge_method("nope")
    with pytest.raises(KeyError, match="unknown search strategy 'nope'; registered: beam, exhaustive, greedy"):
        search.get_strategy("nope")


def test_run_time_registration_cannot_take_a_builtin_name():
    from mergemix.backends.smallcnn import SmallCNNBackend

    class Impostor(SmallCNNBackend):
        pass  # name "smallcnn", inherited

    with pytest.raises(
        plugins.PluginError,
        match=r"backend 'smallcnn' of .*Impostor clashes with mergemix's built-in "
        r"backend 'smallcnn' \(mergemix.backends.smallcnn:SmallCNNBackend\)",
    ):
        backends_base.register_backend(Impostor)
    assert backends_base.backend_class("smallcnn") is SmallCNNBackend
    with pytest.raises(plugins.PluginError, match="built-in merge method 'ties'"):
        merging.register_merge_method("ties")(lambda thetas, theta0=None: thetas[0])
    with pytest.raises(plugins.PluginError, match="built-in dataset source 'digits'"):
        data_registry.register_source("digits")(lambda spec, seed, local_dir=None: None)
    assert data_registry.get_source("digits").__module__ == "mergemix.data.digits"

    class Greedier(search.SearchStrategy):
        name = "greedy"

        def run(self, objective):
            return "done"

    with pytest.raises(
        plugins.PluginError,
        match=r"search strategy 'greedy' of .*Greedier clashes with mergemix's built-in search strategy "
        r"'greedy' \(mergemix.search.greedy:Greedy\)",
    ):
        search.register_strategy(Greedier)
    assert search.get_strategy("greedy").__module__ == "mergemix.search.greedy"
    Greedier.name = "weights"  # merge_eval.strategy: weights is not a registry name
    with pytest.raises(plugins.PluginError, match="clashes with mergemix's reserved name 'weights'"):
        search.register_strategy(Greedier)
    assert "weights" not in search.strategy_names()


# --- a plugin distribution ------------------------------------------------------------------------------
def test_plugin_names_resolve_in_process(plugin_root, on_path):
    assert "plugin_cnn" not in backends_base.BACKENDS
    on_path(plugin_root)
    # listed without importing the plugin
    assert "plugin_cnn" in backends_base.backend_names() and "plugin_cnn" in backends_base.BACKENDS
    assert {"plus_one", "minus_one"} <= set(data_registry.source_names())
    assert "median" in merging.method_names() and "median" in plugins.names("merge_methods")
    assert "mm_plugin" not in sys.modules
    assert "mm-plugin 0.1" in backends_base.BACKENDS.origin("plugin_cnn")

    cls = backends_base.backend_class("plugin_cnn")
    from mergemix.backends.smallcnn import SmallCNNBackend

    assert cls.__module__ == "mm_plugin.backend" and issubclass(cls, SmallCNNBackend) and cls.name == "plugin_cnn"
    backend = backends_base.get_backend({"name": "plugin_cnn", "params": {"channels": 2, "hidden": 8}}, device="cpu")
    assert backend.describe()["name"] == "plugin_cnn"

    spec = {"source": "plus_one", "domain": "rotate"}
    assert data_registry.check_spec("rot", spec) == []
    assert data_registry.check_spec("rot", {**spec, "bogus": 1})[0].startswith(
        "datasets.rot.bogus: not a parameter of source 'plus_one'"
    )
    assert not data_registry.needs_download(spec)
    raw = data_registry.get_source("plus_one")(spec, 0, None)
    ref = data_registry.get_source("digits")({"source": "digits", "domain": "rotate"}, 0, None)
    assert ((ref.y + 1) % len(ref.classes) == raw.y).all() and raw.info["plugin"] == "plus_one"
    assert data_registry.check_spec("m", {"source": "minus_one", "domain": "noise"}) == []  # a module entry point
    assert data_registry.get_source("minus_one").__module__ == "mm_plugin.more_data"

    thetas = torch.tensor([[1.0, 5.0], [2.0, -1.0], [9.0, 0.0]])
    assert torch.equal(merging.merge("median", thetas, torch.zeros(2)), torch.tensor([2.0, 0.0]))
    assert merging.linear_coefficients("median", 3) is None  # not linear: merged from scratch per subset


def test_plugin_search_strategy_in_process(plugin_root, on_path, tmp_path):
    assert "descending" not in search.strategy_names()
    on_path(plugin_root)
    # listed without importing the plugin
    assert "descending" in search.strategy_names() and "descending" in plugins.names("search_strategies")
    assert "mm_plugin" not in sys.modules
    assert "mm-plugin 0.1" in search_base.STRATEGIES.origin("descending")
    cls = search.get_strategy("descending")
    assert cls.__module__ == "mm_plugin.search" and issubclass(cls, search.SearchStrategy)

    # its options are checked like a built-in's (merge_eval.strategy_options)
    assert search.check_options("descending", {"stop_after": 2}) == []
    assert search.check_options("descending", {"stop_after": 0, "width": 3}) == [
        "merge_eval.strategy_options.stop_after: must be null or an integer >= 1, got 0",
        "merge_eval.strategy_options.width: unknown option for strategy 'descending'; allowed: stop_after",
    ]

    # run_search drives it through the cached, budget-charging objective like any strategy
    def run(budget, **options):
        objective = search.Objective(
            lambda mask, examples: mask / 7, 3, 10, search.make_budget(budget, 3, 10, cls.cost)
        )
        return search.run_search(cls(3, seed=0, **options), objective)

    result = run(None)
    assert [r.mask for r in result.records] == [7, 6, 5, 4, 3, 2, 1] and result.stop_reason == "all subsets evaluated"
    assert result.best.mask == 7 and result.evaluations == 7
    result = run(3)
    assert [r.mask for r in result.records] == [7, 6, 5] and result.stop_reason == "budget exhausted"
    assert run(None, stop_after=2).stop_reason == "stopped"

    # a study config may name it and its options are checked; a name no registry has is refused
    from mergemix.config import ConfigError, validate_config

    def check(strategy, **options):
        cfg = plugin_study(tmp_path / "results")
        cfg["merge_eval"].update(strategy=strategy, strategy_options=options)
        return validate_config(cfg)

    assert check("descending", stop_after=3)["merge_eval"]["strategy"] == "descending"
    with pytest.raises(ConfigError, match="strategy_options.stop_after: must be null or an integer >= 1, got True"):
        check("descending", stop_after=True)
    with pytest.raises(
        ConfigError,
        match="merge_eval.strategy: unknown search strategy 'ascending'; allowed: auto, weights, beam, descending, ",
    ):
        check("ascending")


@pytest.mark.slow
def test_check_config_accepts_a_study_on_the_plugin(plugin_root, tmp_path):
    cfg = tmp_path / "plugged.yaml"
    cfg.write_text(yaml.safe_dump(plugin_study(tmp_path / "results")))
    cmd = [sys.executable, "-m", "mergemix", "check-config", str(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env_with(plugin_root))
    assert r.returncode == 0, r.stderr
    assert "rotate: 2 candidates, 3 subsets; descending search" in r.stdout
    # without the plugin on the path, the same config names what is missing and what is allowed
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env_with())
    assert r.returncode != 0
    assert "backend.name: unknown backend 'plugin_cnn'; allowed: causal_lm, clip, smallcnn" in r.stderr
    assert "datasets.rotate.source: unknown source 'plus_one'" in r.stderr
    assert "merge_eval.method: unknown merge method 'median'" in r.stderr
    assert "merge_eval.strategy: unknown search strategy 'descending'; allowed: auto, weights, beam," in r.stderr


@pytest.mark.slow
def test_the_search_stage_runs_the_plugin_strategy(plugin_root, tmp_path):
    """``mergemix search`` (a Snakemake job's command) in a new process finds the strategy by its entry point."""
    from conftest import DIGITS_BACKEND, train_digits

    models = train_digits(tmp_path, ["mirror", "noise"], pretrain_epochs=2)
    cmd = [sys.executable, "-m", "mergemix", "search", "--backend", json.dumps(DIGITS_BACKEND)]
    cmd += ["--pretrained", str(tmp_path / "pre/model.safetensors"), "--target", str(tmp_path / "data/shift")]
    cmd += ["--merge", json.dumps({"method": "uniform", "options": {}}), "--models"]
    cmd += [f"{name}={path}" for name, path in models.items()]
    search_spec = {"strategy": "descending", "budget": 2, "seed": 0, "options": {}}
    cmd += ["--search", json.dumps(search_spec), "--out", "w0.csv", "--summary", "w0.json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env_with(plugin_root))
    assert r.returncode == 0, r.stderr
    import pandas as pd

    from mergemix import io

    summary = io.read_json(tmp_path / "w0.json")
    assert summary["strategy"] == "descending" and summary["options"] == {"stop_after": None}
    assert summary["evaluations"] == 2 and summary["stop_reason"] == "budget exhausted"
    rows = pd.read_csv(tmp_path / "w0.csv")
    assert rows["subset"].tolist() == ["mirror+noise", "noise"]  # the largest mask first
    assert rows["val_acc"].between(0, 1).all()
    # without the plugin the job names the strategies it knows
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env_with())
    assert r.returncode != 0 and "unknown search strategy 'descending'; registered: beam," in r.stderr


@pytest.mark.workflow
def test_a_study_runs_on_the_plugin_through_snakemake(plugin_root, tmp_path, on_path):
    cfg = plugin_study(tmp_path / "results")
    path = tmp_path / "plugged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env_with(plugin_root))
    assert r.returncode == 0, f"snakemake failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    import pandas as pd

    from mergemix import io
    from mergemix.data.prepared import load_prepared
    from mergemix.merge_eval import MergeEvaluator

    out = Path(cfg["results_dir"]) / cfg["study"]
    assert io.read_json(out / "models/pretrained/model.json")["backend"]["name"] == "plugin_cnn"
    for name in cfg["datasets"]:
        assert io.read_json(out / "data" / name / "splits.json")["info"]["plugin"] == "plus_one"
    for name in ("mirror", "noise"):  # the target's candidates
        assert io.read_json(out / "models/finetuned" / name / "model.json")["backend"]["name"] == "plugin_cnn"
    for target in cfg["targets"]:
        me = pd.read_csv(out / "merge_eval" / f"{target}.csv")
        assert len(me) == 3 and me[["val_acc", "test_acc"]].stack().between(0, 1).all()
        # searched by the plugin's strategy, in its order: the largest mask first
        assert io.read_json(out / "merge_eval" / f"{target}.json")["strategy"] == "descending"
        assert me.sort_values("order")["size"].tolist() == [2, 1, 1]
    # the pair was merged by the plugin's median: the same score in-process
    on_path(plugin_root)
    me = pd.read_csv(out / "merge_eval/rotate.csv").set_index("subset")
    models = {c: str(out / "models/finetuned" / c / "model.safetensors") for c in ("mirror", "noise")}
    ev = MergeEvaluator(
        backends_base.get_backend(cfg["backend"], device="cpu"),
        out / "models/pretrained/model.safetensors",
        models,
        "median",
    )
    assert ev.evaluate(load_prepared(out / "data/rotate"), "val", 0b11) == pytest.approx(
        me.loc["mirror+noise", "val_acc"]
    )


def test_a_plugin_cannot_replace_a_builtin(tmp_path, on_path):
    root = write_distribution(
        tmp_path / "site",
        "mm-clash",
        {
            "mm_clash/__init__.py": "",
            "mm_clash/backend.py": """
            from mergemix.backends.smallcnn import SmallCNNBackend


            class Fake(SmallCNNBackend):
                pass
        """,
        },
        "[mergemix.backends]\nsmallcnn = mm_clash.backend:Fake\n",
    )
    on_path(root)
    message = (
        r"backend 'smallcnn' of plugin mm-clash 0.1 \(entry point smallcnn = 'mm_clash.backend:Fake' in group "
        r"'mergemix.backends'\) clashes with mergemix's built-in backend 'smallcnn' "
        r"\(mergemix.backends.smallcnn:SmallCNNBackend\)"
    )
    with pytest.raises(plugins.PluginError, match=message):
        backends_base.backend_class("smallcnn")
    with pytest.raises(plugins.PluginError, match=message):
        backends_base.backend_names()
    assert "mm_clash" not in sys.modules  # refused before anything of it ran
    # the other registries are not affected
    assert "ties" in merging.method_names()
    # and so is a study config, with the same message
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path / "results", n=3)))
    r = subprocess.run(
        [sys.executable, "-m", "mergemix", "check-config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env_with(root),
    )
    assert r.returncode != 0 and "clashes with mergemix's built-in backend 'smallcnn'" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "name, taken",
    [
        ("greedy", r"mergemix's built-in search strategy 'greedy' \(mergemix.search.greedy:Greedy\)"),
        ("weights", r"mergemix's reserved name 'weights' \(merge_eval.strategy: weights searches mixture weights"),
    ],
)
def test_a_plugin_strategy_cannot_replace_a_builtin(tmp_path, on_path, name, taken):
    files = {
        "mm_clash/__init__.py": "",
        "mm_clash/search.py": """
            from mergemix.search.greedy import Greedy


            class Fake(Greedy):
                pass
        """,
    }
    root = write_distribution(
        tmp_path / "site", "mm-clash", files, f"[mergemix.search_strategies]\n{name} = mm_clash.search:Fake\n"
    )
    on_path(root)
    message = (
        rf"search strategy '{name}' of plugin mm-clash 0.1 \(entry point {name} = 'mm_clash.search:Fake' in group "
        rf"'mergemix.search_strategies'\) clashes with {taken}"
    )
    with pytest.raises(plugins.PluginError, match=message):
        search.get_strategy("greedy")
    with pytest.raises(plugins.PluginError, match=message):
        search.strategy_names()
    assert "mm_clash" not in sys.modules  # refused before anything of it ran
    assert "ties" in merging.method_names() and "smallcnn" in backends_base.backend_names()  # the others work
    # a study config that searches is refused with the same message
    cfg = tiny_config(tmp_path / "results", n=3)
    cfg["merge_eval"]["strategy"] = "beam"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "mergemix", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env_with(root),
    )
    assert r.returncode != 0 and f"search strategy '{name}' of plugin mm-clash 0.1" in r.stderr, r.stderr
    assert "clashes with " + taken.replace("\\", "") in r.stderr


def test_two_plugins_with_one_name_are_refused_naming_both(tmp_path, plugin_root, on_path):
    other = write_distribution(
        tmp_path / "other",
        "mm-other",
        {"mm_other/__init__.py": "def median(thetas, theta0=None):\n    return thetas[0]\n"},
        "[mergemix.merge_methods]\nmedian = mm_other:median\n",
        version="2.0",
    )
    on_path(plugin_root)
    on_path(other)
    with pytest.raises(
        plugins.PluginError,
        match=r"merge method 'median' is declared by two plugins: plugin mm-.* and "
        r"plugin mm-.*; uninstall one or rename its entry point",
    ) as e:
        merging.get_merge_method("median")
    assert "mm-plugin 0.1" in str(e.value) and "mm-other 2.0" in str(e.value)


def test_an_entry_point_must_give_what_its_group_registers(tmp_path, on_path):
    root = write_distribution(
        tmp_path / "site",
        "mm-other",
        {
            "mm_other/__init__.py": """
            from mergemix.backends.smallcnn import SmallCNNBackend
            from mergemix.search import SearchStrategy


            class Unnamed(SmallCNNBackend):
                name = "something_else"


            NOT_A_FUNCTION = 3


            class Misnamed(SearchStrategy):
                name = "something_else"

                def run(self, objective):
                    return "done"
        """
        },
        "[mergemix.backends]\nbad_cnn = mm_other:Unnamed\nmissing = mm_other:Nowhere\n"
        "[mergemix.merge_methods]\nthree = mm_other:NOT_A_FUNCTION\n"
        "[mergemix.datasets]\nsilent = mm_other\n"
        "[mergemix.search_strategies]\nthree_again = mm_other:NOT_A_FUNCTION\nmisnamed = mm_other:Misnamed\n",
    )
    on_path(root)
    with pytest.raises(
        plugins.PluginError,
        match=r"backend 'bad_cnn': class mm_other.Unnamed has name 'something_else'; "
        r"set its class attribute name = 'bad_cnn'",
    ):
        backends_base.backend_class("bad_cnn")
    with pytest.raises(ImportError, match=r"backend 'missing': cannot import plugin mm-other 0.1 .*Nowhere"):
        backends_base.backend_class("missing")
    with pytest.raises(plugins.PluginError, match="merge method 'three': 3 is not a function"):
        merging.get_merge_method("three")
    with pytest.raises(
        plugins.PluginError, match="dataset source 'silent': .* gave module mm_other, which registered no"
    ):
        data_registry.get_source("silent")
    with pytest.raises(
        plugins.PluginError,
        match="search strategy 'three_again': 3 is not a subclass of mergemix.search.SearchStrategy",
    ):
        search.get_strategy("three_again")
    with pytest.raises(
        plugins.PluginError,
        match=r"search strategy 'misnamed': class mm_other.Misnamed has name 'something_else'; "
        r"set its class attribute name = 'misnamed'",
    ):
        search.get_strategy("misnamed")
