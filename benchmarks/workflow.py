"""The whole workflow packed (config `pack`: the backend's default) against one job per item.

Runs a study (default: the embedded digits study, config/config.yaml) twice with Snakemake, each
time from nothing in a temporary folder: once as configured (smallcnn packs 16 fine-tunes or
embeddings to a job) and once with every `pack` key set to 1 (one job, one Python start and one
torch import per fine-tune and per embedding). Checks that every CSV under the two results folders
is byte-identical and every model file has the same sha256, and prints the jobs and wall times of
both runs and their ratio.

    python benchmarks/workflow.py                     # the embedded study, --cores 2
    python benchmarks/workflow.py --tiny              # a 3-domain, 1-epoch study (a smoke test)
    python benchmarks/workflow.py --config config/digits_wide.yaml --cores 8 --json results/bench/workflow.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny(cfg: dict) -> dict:
    """A few-minute version of a digits study: 3 domains, 1 epoch, small splits."""
    cfg = copy.deepcopy(cfg)
    names = [n for n in cfg["datasets"] if n in ("rotate", "noise", "thin")][:3] or list(cfg["datasets"])[:3]
    cfg["datasets"] = {n: cfg["datasets"][n] for n in names}
    cfg["targets"] = "all"
    cfg.pop("candidates", None)
    cfg["split"] = {**cfg.get("split", {}), "max_train": 100, "max_val": 60, "max_test": 60}
    cfg["finetune"] = {**cfg["finetune"], "epochs": 1}
    if "pretrain" in cfg:
        cfg["pretrain"]["hparams"] = {**cfg["pretrain"]["hparams"], "epochs": 2}
    cfg["analysis"] = {**cfg.get("analysis", {}), "figure_formats": ["png"]}
    return cfg


def unpacked(cfg: dict) -> dict:
    """The same study with one job per item: every `pack` key of the schema set to 1."""
    schema = yaml.safe_load((ROOT / "src" / "mergemix" / "schemas" / "config.schema.yaml").read_text())
    return {**copy.deepcopy(cfg), "pack": {k: 1 for k in schema["properties"]["pack"]["properties"]}}


def run(cfg: dict, folder: Path, cores: int) -> dict:
    """One Snakemake run of ``cfg`` from nothing in ``folder``, as `make run` runs it."""
    cfg = {**cfg, "results_dir": str(folder / "results")}
    configfile = folder / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "workflow/profiles/default",
        "--cores",
        str(cores),
        "--configfile",
        str(configfile),
    ]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = r.stdout + r.stderr
    if r.returncode != 0:
        sys.exit(f"snakemake failed in {folder}:\n{log[-4000:]}")
    stats = log.split("Job stats:")[1].split("total")[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stats, re.M)}
    jobs.pop("all", None)
    return {
        "wall_s": round(wall, 1),
        "jobs": sum(jobs.values()),
        "rules": jobs,
        "out": Path(cfg["results_dir"]) / cfg["study"],
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(a: Path, b: Path) -> tuple[int, int]:
    """Every CSV byte-identical and every model file the same sha256 in both results folders.
    Returns (CSVs, models) compared; exits with the differences otherwise."""
    problems = []
    counts = []
    for pattern in ("*.csv", "*.safetensors"):
        fa = sorted(p.relative_to(a) for p in a.rglob(pattern))
        fb = sorted(p.relative_to(b) for p in b.rglob(pattern))
        if fa != fb:
            problems.append(
                f"{pattern}: only packed {sorted(set(fa) - set(fb))[:5]}, only unpacked {sorted(set(fb) - set(fa))[:5]}"
            )
        problems += [f"{rel} differs" for rel in sorted(set(fa) & set(fb)) if digest(a / rel) != digest(b / rel)]
        counts.append(len(fa))
    if problems:
        sys.exit("packed and unpacked runs differ:\n  " + "\n  ".join(problems[:20]))
    return counts[0], counts[1]


def family(rule: str) -> str:
    return re.sub(r"_pack\d+$", "", rule)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    p.add_argument("--tiny", action="store_true", help="a 3-domain, 1-epoch version of the study (smoke test)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--keep", default=None, help="run in this folder and keep it (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)

    from mergemix.config import load_yaml, pack_sizes, validate_config

    cfg = load_yaml(args.config)
    if args.tiny:
        cfg = tiny(cfg)
    sizes = pack_sizes(validate_config(cfg))
    with tempfile.TemporaryDirectory(prefix="mergemix-bench-") as tmp:
        base = Path(args.keep or tmp)
        res = {}
        for mode, c in (("packed", cfg), ("unpacked", unpacked(cfg))):
            folder = base / mode
            folder.mkdir(parents=True, exist_ok=True)
            res[mode] = run(c, folder, args.cores)
            print(f"{mode:9s} {res[mode]['jobs']:4d} jobs  {res[mode]['wall_s']:7.1f} s", flush=True)
        csvs, models = compare(res["packed"]["out"], res["unpacked"]["out"])

    print(
        f"\n{Path(args.config).name}{' (--tiny)' if args.tiny else ''}, --cores {args.cores}, pack {sizes} vs all 1; "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    print(f"identical: {csvs} CSVs byte for byte, {models} model files by sha256")
    rules = sorted({family(r) for m in res.values() for r in m["rules"]})
    print(f"\n{'rule':22s} {'packed jobs':>11s} {'unpacked jobs':>13s}")
    for r in rules:
        n = {m: sum(v for k, v in res[m]["rules"].items() if family(k) == r) for m in res}
        print(f"{r:22s} {n['packed']:11d} {n['unpacked']:13d}")
    pw, uw = res["packed"]["wall_s"], res["unpacked"]["wall_s"]
    print(f"{'total':22s} {res['packed']['jobs']:11d} {res['unpacked']['jobs']:13d}")
    print(f"\nwall time: packed {pw:.1f} s, unpacked {uw:.1f} s; ratio unpacked/packed {uw / pw:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": args.config,
                    "tiny": args.tiny,
                    "cores": args.cores,
                    "pack": sizes,
                    "csvs": csvs,
                    "models": models,
                    **{m: {k: v for k, v in r.items() if k != "out"} for m, r in res.items()},
                    "ratio": round(uw / pw, 3),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
