"""Bad inputs are refused: a non-zero exit, one line naming the offending key, file or value, no
traceback, and every finished output left as it was.

Every case drives the ``mergemix`` CLI in its own process on small real artifacts (tiny digits
datasets, a tiny smallcnn pre-trained and fine-tuned for one epoch) built once for the module
through the CLI too. To keep the file fast, each process is forked from a server that has already
imported mergemix and torch (the import alone takes seconds); the child runs exactly what
``python -m mergemix ARGS`` runs (``sys.exit(main(ARGS))``) with its own stdout, stderr and exit
status. ``MERGEMIX_TEST_EXEC=1`` runs every case as ``[sys.executable, "-m", "mergemix", ...]``
instead (slower, same assertions).

A case is a row of ``CASES``: an id and a function that builds the bad input in the case's folder
and returns what to run and what the error must name. Add rows to extend the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import OFFLINE_VARS, ROOT, tiny_config

REAL_EXEC = os.environ.get("MERGEMIX_TEST_EXEC") == "1"

BACKEND = {"name": "smallcnn", "params": {"channels": 4, "hidden": 16}}
BACKEND_SEED1 = {"name": "smallcnn", "params": {"channels": 4, "hidden": 16, "init_seed": 1}}
SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "max_train": 60, "max_val": 40, "max_test": 40}
PRE_HP = {"epochs": 1, "lr": 0.01, "batch_size": 32}
HP = {"epochs": 1, "lr": 0.005, "batch_size": 32, "seed": 0}
DOMAINS = {"clean": "clean", "rotate": "rotate", "mirror": "mirror", "thin": "thin"}


# --- running the CLI --------------------------------------------------------------------------

_SERVER = r"""
import json, os, sys, traceback
import mergemix.cli, mergemix.stages, mergemix.analysis, mergemix.merge_eval, mergemix.config
import mergemix.backends.smallcnn, pandas, torch  # what the cases import anyway, imported once
proto = sys.stdout
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                f = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            sys.stdin = open(os.devnull)
            os.environ.update(req["env"])
            sys.argv = ["mergemix", *req["argv"]]
            try:
                exec(req["prelude"], {})
                code = mergemix.cli.main(req["argv"])  # what `python -m mergemix` runs
            except SystemExit as e:  # as the interpreter reports it
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    proto.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    proto.flush()
"""


class Runner:
    """``run(argv, prelude="")`` -> (returncode, stdout, stderr) of one mergemix process."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.env = {**os.environ, **{v: "1" for v in OFFLINE_VARS}}
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        self.server = None
        self.n = 0
        if not REAL_EXEC:
            self.server = subprocess.Popen(
                [sys.executable, "-c", _SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=self.env,
                cwd=ROOT,
            )

    def run(self, argv, prelude: str = "", cwd=None):
        argv = [str(a) for a in argv]
        cwd = str(cwd or ROOT)
        if self.server is None:
            if prelude:
                code = prelude + "\nimport sys\nfrom mergemix.cli import main\nsys.exit(main(sys.argv[1:]))"
                cmd = [sys.executable, "-c", code, *argv]
            else:
                cmd = [sys.executable, "-m", "mergemix", *argv]
            r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=cwd, timeout=300)
            return SimpleNamespace(returncode=r.returncode, stdout=r.stdout, stderr=r.stderr, argv=argv)
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        req = {"argv": argv, "cwd": cwd, "stdout": str(out), "stderr": str(err), "env": {}, "prelude": prelude}
        self.server.stdin.write(json.dumps(req) + "\n")
        self.server.stdin.flush()
        rc = json.loads(self.server.stdout.readline())
        return SimpleNamespace(returncode=rc, stdout=out.read_text(), stderr=err.read_text(), argv=argv)

    def ok(self, argv, **kw):
        r = self.run(argv, **kw)
        assert r.returncode == 0, f"mergemix {' '.join(r.argv)} failed:\n{r.stderr[-3000:]}"
        return r

    def close(self):
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)


def js(obj) -> str:
    return json.dumps(obj, sort_keys=True)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("cli"))
    yield r
    r.close()


# --- the artifacts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def art(cli, tmp_path_factory):
    """Prepared data, pre-trained and fine-tuned models, embeddings and result tables, via the CLI."""
    root = tmp_path_factory.mktemp("artifacts")
    a = SimpleNamespace(root=root)
    a.data = {n: root / "data" / n for n in DOMAINS}
    for n, domain in DOMAINS.items():
        cli.ok(
            [
                "prepare",
                "--name",
                n,
                "--spec",
                js({"source": "digits", "domain": domain}),
                "--split",
                js(SPLIT),
                "--out",
                a.data[n],
            ]
        )

    def pretrain(out, backend=BACKEND, hp=PRE_HP):
        cli.ok(["pretrain", "--backend", js(backend), "--hparams", js(hp), "--data", a.data["clean"], "--out", out])
        return out

    def finetune(name, pre, out, backend=BACKEND, hp=HP):
        cli.ok(
            [
                "finetune",
                "--backend",
                js(backend),
                "--hparams",
                js(hp),
                "--pretrained",
                pre,
                "--data",
                a.data[name],
                "--out",
                out,
            ]
        )
        return out

    a.pre = pretrain(root / "pre/model.safetensors")
    a.pre_other = pretrain(
        root / "pre_other/model.safetensors", hp={**PRE_HP, "seed": 1}
    )  # same backend, other weights
    a.pre_seed1 = pretrain(root / "pre_seed1/model.safetensors", backend=BACKEND_SEED1)
    a.ft = {n: finetune(n, a.pre, root / f"ft/{n}/model.safetensors") for n in ("rotate", "mirror")}
    a.ft_other = finetune("mirror", a.pre_other, root / "ft_other/mirror/model.safetensors")
    a.ft_seed1 = finetune("mirror", a.pre_seed1, root / "ft_seed1/mirror/model.safetensors", backend=BACKEND_SEED1)
    a.ft_hp = finetune("mirror", a.pre, root / "ft_hp/mirror/model.safetensors", hp={**HP, "lr": 0.01})
    a.emb = {}
    for n in ("rotate", "mirror", "thin"):
        a.emb[n] = root / f"emb/{n}.safetensors"
        cli.ok(["embed", "--backend", js(BACKEND), "--pretrained", a.pre, "--data", a.data[n], "--out", a.emb[n]])
    a.emb_other = root / "emb_other/mirror.safetensors"
    cli.ok(
        [
            "embed",
            "--backend",
            js(BACKEND),
            "--pretrained",
            a.pre_other,
            "--data",
            a.data["mirror"],
            "--out",
            a.emb_other,
        ]
    )
    a.pretrained_csv = root / "pretrained.csv"
    cli.ok(
        [
            "eval-pretrained",
            "--backend",
            js(BACKEND),
            "--pretrained",
            a.pre,
            "--targets",
            f"thin={a.data['thin']}",
            "--out",
            a.pretrained_csv,
        ]
    )
    a.merge_eval = root / "merge_eval/thin.csv"
    cli.ok(merge_eval_argv(a, {"rotate": a.ft["rotate"], "mirror": a.ft["mirror"]}, a.merge_eval))
    a.similarity = root / "similarity/thin.csv"
    cli.ok(
        [
            "similarity",
            "--target",
            a.emb["thin"],
            "--candidates",
            f"rotate={a.emb['rotate']}",
            f"mirror={a.emb['mirror']}",
            "--out",
            a.similarity,
        ]
    )
    a.final = root / "final/thin.json"
    cli.ok(
        [
            "final-finetune",
            "--backend",
            js(BACKEND),
            "--hparams",
            js(HP),
            "--pretrained",
            a.pre,
            "--merge-eval",
            a.merge_eval,
            "--data",
            f"rotate={a.data['rotate']}",
            f"mirror={a.data['mirror']}",
            "--target",
            a.data["thin"],
            "--out",
            root / "final_model/thin/model.safetensors",
            "--eval-out",
            a.final,
        ]
    )
    # the good tables pass analyze (the checks refuse only what is wrong)
    cli.ok(analyze_argv(a, {}, root / "analysis"))
    a.manifests = {p: json.loads(p.with_suffix(".json").read_text()) for p in root.rglob("model.safetensors")}
    return a


def merge_eval_argv(a, models: dict, out, backend=BACKEND, pretrained=None):
    return [
        "merge-eval",
        "--backend",
        js(backend),
        "--merge",
        js({"method": "uniform"}),
        "--pretrained",
        pretrained or a.pre,
        "--models",
        *[f"{n}={p}" for n, p in models.items()],
        "--target",
        a.data["thin"],
        "--chunk",
        "0",
        "--chunks",
        "1",
        "--out",
        out,
    ]


def analyze_argv(a, replace: dict, out_dir):
    f = {
        "pretrained": a.pretrained_csv,
        "merge_eval": a.merge_eval,
        "similarity": a.similarity,
        "final": a.final,
        **replace,
    }
    return [
        "analyze",
        "--targets",
        js({"thin": ["mirror", "rotate"]}),
        "--options",
        js({"figure_formats": ["png"]}),
        "--pretrained-csv",
        f["pretrained"],
        "--merge-eval",
        f"thin={f['merge_eval']}",
        "--similarity",
        f"thin={f['similarity']}",
        "--final",
        f"thin={f['final']}",
        "--out-dir",
        out_dir,
    ]


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- building bad inputs --------------------------------------------------------------------------


def copy_model(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst_dir / "model.safetensors")
    shutil.copy(src.with_suffix(".json"), dst_dir / "model.json")
    return dst_dir / "model.safetensors"


def edit_manifest(model: Path, fn) -> Path:
    m = json.loads(model.with_suffix(".json").read_text())
    fn(m)
    model.with_suffix(".json").write_text(json.dumps(m))
    return model


def resaved_model(a, d: Path, change) -> Path:
    """The rotate model with its tensors changed by ``change(state)``, saved with its own manifest."""
    from mergemix import io

    state, manifest = io.load_model(a.ft["rotate"])
    change(state)
    keep = {k: v for k, v in manifest.items() if k not in ("sha256", "tensors", "format_version")}
    io.save_model(d / "m/model.safetensors", state, keep)
    return d / "m/model.safetensors"


def changed_data(a, d: Path, change) -> Path:
    """A copy of the prepared target ``thin`` with ``change(folder)`` applied."""
    shutil.copytree(a.data["thin"], d / "thin")
    change(d / "thin")
    return d / "thin"


def truncate(folder: Path) -> None:
    f = folder / "arrays.safetensors"
    os.truncate(f, f.stat().st_size // 2)


def overwrite_tail(folder: Path) -> None:  # same size, other bytes
    f = folder / "arrays.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + bytes([1, 2, 3, 4]))


def drop_checksum(folder: Path) -> None:  # splits.json as an older mergemix wrote it
    meta = json.loads((folder / "splits.json").read_text())
    del meta["data"]
    (folder / "splits.json").write_text(json.dumps(meta))


def eval_pretrained_on(a, data_dir: Path, d: Path):
    return [
        "eval-pretrained",
        "--backend",
        js(BACKEND),
        "--pretrained",
        a.pre,
        "--targets",
        f"thin={data_dir}",
        "--out",
        d / "out/pretrained.csv",
    ]


def edited_csv(src: Path, d: Path, fn) -> Path:
    import pandas as pd

    df = pd.read_csv(src)
    df = fn(df)
    out = d / src.name
    df.to_csv(out, index=False)
    return out


def config_file(d: Path, change=None, text=None) -> Path:
    cfg = tiny_config(d / "results")
    if change:
        change(cfg)
    path = d / "study.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(cfg, sort_keys=False))
    return path


def check_config(d: Path, change=None, text=None, replace=None):
    path = config_file(d, change, text)
    if replace:
        path.write_text(path.read_text().replace(*replace))
    return ["check-config", path]


def set_key(*keys_and_value):
    *keys, value = keys_and_value

    def change(cfg):
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    return change


@dataclass
class Case:
    id: str
    build: object  # (artifacts, case folder) -> argv, or (argv, expected) or (argv, expected, prelude)
    expect: list = field(default_factory=list)  # substrings that must appear together on one stderr line


def _sha(a, path) -> str:
    return a.manifests[Path(path)]["sha256"]


ENOSPC_PRELUDE = textwrap.dedent(
    """
    import errno, pandas
    def to_csv(self, path, *args, **kw):  # the disk fills up half-way through the write
        with open(path, "w") as f:
            f.write("target,val_acc,te")
        raise OSError(errno.ENOSPC, "No space left on device")
    pandas.DataFrame.to_csv = to_csv
    """
)

CASES = [
    # --- config values, checked before anything runs -------------------------------------------
    Case(
        "yaml-syntax-error",
        lambda a, d: check_config(d, text="study: tiny\nbackend:\n  name: smallcnn\n   params: {channels: 4}\n"),
        ["study.yaml:4:10", "YAML syntax error"],
    ),
    Case(
        "lr-nan",
        lambda a, d: check_config(d, set_key("finetune", "lr", float("nan"))),
        ["finetune.lr", "nan", "finite"],
    ),
    Case(
        "lr-inf",
        lambda a, d: check_config(d, set_key("pretrain", "hparams", "lr", float("inf"))),
        ["pretrain.hparams.lr", "inf", "finite"],
    ),
    Case("lr-zero", lambda a, d: check_config(d, set_key("finetune", "lr", 0)), ["finetune.lr", "0", "> 0"]),
    Case(
        "lr-negative", lambda a, d: check_config(d, set_key("finetune", "lr", -0.001)), ["finetune.lr", "-0.001", "> 0"]
    ),
    Case(
        "lr-read-as-string",
        lambda a, d: check_config(d, replace=("lr: 0.005", "lr: 1e-3")),
        ["finetune.lr", "'1e-3'", "write 1.0e-3"],
    ),
    Case(
        "epochs-zero", lambda a, d: check_config(d, set_key("finetune", "epochs", 0)), ["finetune.epochs", "0", ">= 1"]
    ),
    Case(
        "batch-size-negative",
        lambda a, d: check_config(d, set_key("pretrain", "hparams", "batch_size", -8)),
        ["pretrain.hparams.batch_size", "-8", ">= 1"],
    ),
    Case(
        "channels-zero",
        lambda a, d: check_config(d, set_key("backend", "params", "channels", 0)),
        ["backend.params.channels", "0", "integer >= 1"],
    ),
    Case(
        "hidden-negative",
        lambda a, d: check_config(d, set_key("backend", "params", "hidden", -16)),
        ["backend.params.hidden", "-16", "integer >= 1"],
    ),
    Case("split-negative", lambda a, d: check_config(d, set_key("split", "val", -0.1)), ["split.val", "-0.1", "> 0"]),
    Case(
        "split-no-train-left",
        lambda a, d: check_config(d, lambda c: c["split"].update(val=0.6, test=0.4)),
        ["split.val + split.test", "0.6 + 0.4", "below 1"],
    ),
    Case(
        "merge-option-unknown",
        lambda a, d: check_config(d, set_key("merge_eval", "options", {"scale": 0.5})),
        ["merge_eval.options.scale", "'uniform'", "no options"],
    ),
    Case(
        "merge-option-wrong-type",
        lambda a, d: check_config(
            d, lambda c: c["merge_eval"].update(method="task_arithmetic", options={"scale": "big"})
        ),
        ["merge_eval.options.scale", "'big'", "a number > 0"],
    ),
    Case(
        "target-twice",
        lambda a, d: check_config(d, set_key("targets", ["rotate", "noise", "rotate"])),
        ["targets", "'rotate'", "more than once"],
    ),
    Case("datasets-empty", lambda a, d: check_config(d, set_key("datasets", {})), ["datasets", "empty"]),
    # --- models that do not belong together are never merged or evaluated -----------------------
    Case(
        "model-from-another-pretrained",
        lambda a, d: (
            merge_eval_argv(a, {"rotate": a.ft["rotate"], "mirror": a.ft_other}, d / "out.csv"),
            [str(a.ft_other.with_suffix(".json")), "pretrained_sha256", _sha(a, a.pre_other), _sha(a, a.pre)],
        ),
    ),
    Case(
        "model-copied-into-another-folder",
        lambda a, d: (
            merge_eval_argv(
                a, {"rotate": a.ft["rotate"], "mirror": copy_model(a.ft["rotate"], d / "mirror")}, d / "out.csv"
            ),
            [str(d / "mirror/model.json"), "['rotate']", "'mirror'"],
        ),
    ),
    Case(
        "model-other-init-seed",
        lambda a, d: (
            merge_eval_argv(a, {"rotate": a.ft["rotate"], "mirror": a.ft_seed1}, d / "out.csv"),
            [str(a.ft_seed1.with_suffix(".json")), "pretrained_sha256"],
        ),
    ),
    Case(
        "backend-init-seed-differs-from-pretrained",
        lambda a, d: (
            merge_eval_argv(
                a, {"rotate": a.ft["rotate"], "mirror": a.ft["mirror"]}, d / "out.csv", backend=BACKEND_SEED1
            ),
            [str(a.pre.with_suffix(".json")), "backend.params.init_seed", "0", "1"],
        ),
    ),
    Case(
        "finetune-with-other-init-seed",
        lambda a, d: (
            [
                "finetune",
                "--backend",
                js(BACKEND_SEED1),
                "--hparams",
                js(HP),
                "--pretrained",
                a.pre,
                "--data",
                a.data["mirror"],
                "--out",
                d / "out/model.safetensors",
            ],
            [str(a.pre.with_suffix(".json")), "backend.params.init_seed"],
        ),
    ),
    Case(
        "model-other-hyperparameters",
        lambda a, d: (
            merge_eval_argv(a, {"rotate": a.ft["rotate"], "mirror": a.ft_hp}, d / "out.csv"),
            [str(a.ft_hp.with_suffix(".json")), "hyperparameters.lr", "0.01", "0.005"],
        ),
    ),
    Case(
        "model-from-older-mergemix",
        lambda a, d: (
            merge_eval_argv(
                a,
                {
                    "rotate": a.ft["rotate"],
                    "mirror": edit_manifest(
                        copy_model(a.ft["mirror"], d / "mirror"),
                        lambda m: [m.pop(k) for k in ("pretrained_sha256", "data")],
                    ),
                },
                d / "out.csv",
            ),
            [str(d / "mirror/model.json"), "older mergemix", "rerun"],
        ),
    ),
    Case(
        "model-tensor-shape",
        lambda a, d: (
            [
                "eval-models",
                "--backend",
                js(BACKEND),
                "--pretrained",
                a.pre,
                "--models",
                f"rotate={resaved_model(a, d, lambda s: s.update({'conv1.bias': s['conv1.bias'][:3].clone()}))}",
                "--target",
                a.data["thin"],
                "--out",
                d / "out.csv",
            ],
            [str(d / "m/model.safetensors"), "'conv1.bias'", "shape [3]", "[4]"],
        ),
    ),
    Case(
        "model-tensor-dtype",
        lambda a, d: (
            [
                "eval-models",
                "--backend",
                js(BACKEND),
                "--pretrained",
                a.pre,
                "--models",
                f"rotate={resaved_model(a, d, lambda s: s.update({'fc.weight': s['fc.weight'].double()}))}",
                "--target",
                a.data["thin"],
                "--out",
                d / "out.csv",
            ],
            [str(d / "m/model.safetensors"), "'fc.weight'", "float64", "float32"],
        ),
    ),
    Case(
        "model-extra-tensor",
        lambda a, d: (
            [
                "eval-models",
                "--backend",
                js(BACKEND),
                "--pretrained",
                a.pre,
                "--models",
                f"rotate={resaved_model(a, d, lambda s: s.update({'extra.weight': s['fc.bias'].clone()}))}",
                "--target",
                a.data["thin"],
                "--out",
                d / "out.csv",
            ],
            [str(d / "m/model.safetensors"), "unexpected ['extra.weight']"],
        ),
    ),
    Case(
        "mixture-model-of-another-subset",
        lambda a, d: (
            [
                "eval-models",
                "--backend",
                js(BACKEND),
                "--pretrained",
                a.pre,
                "--models",
                f"mirror+rotate={a.ft['rotate']}",
                "--target",
                a.data["thin"],
                "--out",
                d / "out.csv",
            ],
            [str(a.ft["rotate"].with_suffix(".json")), "['rotate']", "'mirror+rotate'"],
        ),
    ),
    Case(
        "embeddings-from-another-pretrained",
        lambda a, d: (
            [
                "similarity",
                "--target",
                a.emb["thin"],
                "--candidates",
                f"rotate={a.emb['rotate']}",
                f"mirror={a.emb_other}",
                "--out",
                d / "out.csv",
            ],
            [str(a.emb_other), "pretrained_sha256"],
        ),
    ),
    Case(
        "embeddings-of-another-dataset",
        lambda a, d: (
            [
                "similarity",
                "--target",
                a.emb["thin"],
                "--candidates",
                f"rotate={a.emb['mirror']}",
                f"mirror={a.emb['mirror']}",
                "--out",
                d / "out.csv",
            ],
            [str(a.emb["mirror"]), "'mirror'", "'rotate'"],
        ),
    ),
    # --- data and result integrity ----------------------------------------------------------------
    Case(
        "data-truncated",
        lambda a, d: (
            eval_pretrained_on(a, changed_data(a, d, truncate), d),
            [str(d / "thin/arrays.safetensors"), "truncated", f"delete {d / 'thin'}", "rerun snakemake"],
        ),
    ),
    Case(
        "data-overwritten",
        lambda a, d: (
            eval_pretrained_on(a, changed_data(a, d, overwrite_tail), d),
            [str(d / "thin/arrays.safetensors"), "sha256", "overwritten", "rerun snakemake"],
        ),
    ),
    Case(
        "data-from-older-mergemix",
        lambda a, d: (
            eval_pretrained_on(a, changed_data(a, d, drop_checksum), d),
            [str(d / "thin/splits.json"), "older mergemix", f"delete {d / 'thin'}"],
        ),
    ),
    Case(
        "training-loss-nan",
        lambda a, d: (
            [
                "finetune",
                "--backend",
                js(BACKEND),
                "--hparams",
                js({**HP, "lr": 1e20}),
                "--pretrained",
                a.pre,
                "--data",
                a.data["mirror"],
                "--out",
                d / "out/model.safetensors",
            ],
            ["training loss is nan", "at step", "learning rate 1e+20"],
        ),
    ),
    Case(
        "analyze-missing-column",
        lambda a, d: (
            analyze_argv(
                a, {"merge_eval": (p := edited_csv(a.merge_eval, d, lambda df: df.drop(columns="test_acc")))}, d / "out"
            ),
            [str(p), "test_acc"],
        ),
    ),
    Case(
        "analyze-accuracy-out-of-range",
        lambda a, d: (
            analyze_argv(
                a, {"merge_eval": (p := edited_csv(a.merge_eval, d, lambda df: df.assign(val_acc=1.7)))}, d / "out"
            ),
            [str(p), "'val_acc'", "1.7", "outside [0, 1]"],
        ),
    ),
    Case(
        "analyze-accuracy-not-a-number",
        lambda a, d: (
            analyze_argv(
                a,
                {"pretrained": (p := edited_csv(a.pretrained_csv, d, lambda df: df.assign(test_acc="high")))},
                d / "out",
            ),
            [str(p), "'test_acc'", "'high'", "not a number"],
        ),
    ),
    Case(
        "analyze-duplicate-subset",
        lambda a, d: (
            analyze_argv(
                a, {"similarity": (p := edited_csv(a.similarity, d, lambda df: df.iloc[[0, 0, 1, 2]]))}, d / "out"
            ),
            [str(p), "subset", "more than once"],
        ),
    ),
    Case(
        "final-finetune-on-a-tampered-table",
        lambda a, d: (
            [
                "final-finetune",
                "--backend",
                js(BACKEND),
                "--hparams",
                js(HP),
                "--pretrained",
                a.pre,
                "--merge-eval",
                (p := edited_csv(a.merge_eval, d, lambda df: df.assign(size=5))),
                "--data",
                f"rotate={a.data['rotate']}",
                f"mirror={a.data['mirror']}",
                "--target",
                a.data["thin"],
                "--out",
                d / "out/model.safetensors",
                "--eval-out",
                d / "out/final.json",
            ],
            [str(p), "'size'", "5"],
        ),
    ),
    Case(
        "disk-full",
        lambda a, d: (
            eval_pretrained_on(a, a.data["thin"], d),
            [str(d / "out/pretrained.csv"), "no space left on device"],
            ENOSPC_PRELUDE,
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused(case, art, cli, tmp_path):
    built = case.build(art, tmp_path)
    argv, expect, prelude = (built, case.expect, "") if isinstance(built, list) else (*built, "")[:3]
    expect = [str(e) for e in (expect or case.expect)]
    before = snapshot(art.root)
    r = cli.run(argv, prelude=prelude)
    assert r.returncode != 0, f"accepted: mergemix {' '.join(r.argv)}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if all(e in ln for e in expect)]
    assert lines, f"no stderr line names all of {expect}:\n{r.stderr[-3000:]}"
    assert snapshot(art.root) == before  # every finished output unchanged
    written = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and ("out" in p.relative_to(tmp_path).parts[0] or p.suffix == ".tmp")
    ]
    assert not written, f"outputs or temporary files left behind: {written}"


def test_verbose_adds_the_traceback(art, cli, tmp_path):
    argv = eval_pretrained_on(art, tmp_path / "nothing", tmp_path)
    quiet, verbose = cli.run(argv), cli.run(["-v", *argv])
    assert quiet.returncode == verbose.returncode == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in verbose.stderr
    assert f"{tmp_path / 'nothing' / 'splits.json'} is missing" in quiet.stderr.strip().splitlines()[-1]


def test_an_unexpected_error_is_one_line_with_the_hint(cli, tmp_path):
    prelude = "import mergemix.cli\ndef boom(args):\n    raise ZeroDivisionError('a bug')\nmergemix.cli.run = boom\n"
    r = cli.run(["show", tmp_path / "x.csv"], prelude=prelude)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "mergemix show: unexpected error: ZeroDivisionError: a bug; rerun with -v for the traceback"
    )


# --- the results-folder lock --------------------------------------------------------------------


def test_results_lock_same_checkout_dead_owner_and_release(tmp_path):
    from mergemix import runlock

    warnings = []
    lock = runlock.acquire(tmp_path / "r", ROOT, warn=warnings.append)
    assert json.loads(lock.read_text())["checkout"] == str(ROOT.resolve())
    runlock.acquire(tmp_path / "r", ROOT, warn=warnings.append)  # the same checkout takes it over
    assert not warnings
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other = {**json.loads(lock.read_text()), "checkout": "/elsewhere/clone", "pid": int(dead.stdout)}
    lock.write_text(json.dumps(other))
    runlock.acquire(tmp_path / "r", ROOT, warn=warnings.append)  # its process is gone: replaced, with a warning
    assert len(warnings) == 1 and "/elsewhere/clone" in warnings[0] and "gone" in warnings[0]
    runlock.release(tmp_path / "r", ROOT)
    assert not lock.exists()


@pytest.mark.slow
def test_a_live_run_of_another_checkout_is_refused(tmp_path):
    """A real Snakemake run refuses a results folder that another checkout's live run holds."""
    import socket

    cfg = tiny_config(tmp_path / "results", n=2, mixture=False, chunks=1)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    folder = tmp_path / "results" / cfg["study"]
    folder.mkdir(parents=True)
    lock = folder / ".mergemix.lock"
    held = {"checkout": "/srv/other-clone", "host": socket.gethostname(), "pid": os.getpid(), "started": "earlier"}
    lock.write_text(json.dumps(held))
    env = {**os.environ, **{v: "1" for v in OFFLINE_VARS}}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    r = subprocess.run(  # run in its own working directory: this checkout's .snakemake is left alone
        [
            sys.executable,
            "-m",
            "snakemake",
            "--cores",
            "1",
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--configfile",
            str(tmp_path / "study.yaml"),
            "--directory",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "/srv/other-clone" in out and "delete" in out and str(lock) in out, out
    assert "Traceback" not in out, out
    assert json.loads(lock.read_text()) == held  # left as it was
    assert sorted(p.name for p in folder.iterdir()) == [".mergemix.lock"]  # no job ran
