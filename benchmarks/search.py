"""How close each search strategy gets to exhaustive search, at several budgets and seeds.

On the wide digits study (config/digits_wide.yaml: 13 domains, leave-one-out, 12 candidates and
4,095 subsets per target) this script

1. builds what the search needs with Snakemake (prepared data, the pre-trained model and the 13
   fine-tuned models; nothing else of the study),
2. scores every subset of every target exhaustively once with the real merge-eval engine, keeping
   per-example correctness on the val split and accuracy on the test split (cached on disk), so
   that
3. every strategy x budget x seed runs against exactly the answers the engine would give
   (a val slice's accuracy is the mean correctness over the same seeded slice the engine's
   scorer takes), and prints, side by side:
   the share of targets whose chosen subset's val accuracy is within --tol (0.005) of the
   exhaustive best, the mean regret on val and on test (the exhaustive choice's accuracy minus
   the strategy's choice's), and the evaluations and val examples used as fractions of exhaustive.

    python benchmarks/search.py                      # all strategies, budgets 2%, 5%, 10%, seeds 0-2
    python benchmarks/search.py --budgets 0.1 --seeds 0 --json results/bench/search.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["exhaustive", "greedy", "beam", "optuna", "halving", "surrogate"]


def build_models(cfg: dict, configfile: Path, cores: int) -> Path:
    """Prepared data, θ0 and the single fine-tunes of the study, through the workflow itself."""
    out = Path(cfg["results_dir"]) / cfg["study"]
    files = [f"{out}/pretrained.csv"] + [f"{out}/models/finetuned/{d}/model.safetensors" for d in cfg["datasets"]]
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        *files,
        "--cores",
        str(cores),
        "--configfile",
        str(configfile),
        "--quiet",
        "rules",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def exhaustive_table(cfg: dict, out: Path, target: str, cands: list[str], seed: int, cache: Path) -> dict:
    """Every subset of ``target``'s candidates through the engine: per-example val correctness
    (in the order of the scorer's seeded permutation) and test accuracy. Cached by model hashes."""
    import torch

    from mergemix import io
    from mergemix.backends import get_backend
    from mergemix.data.prepared import load_prepared
    from mergemix.merge_eval import MergeEvaluator

    paths = {c: str(out / "models" / "finetuned" / c / "model.safetensors") for c in cands}
    key = {c: io.read_json(io.manifest_path(p))["sha256"] for c, p in paths.items()}
    key["_target"] = io.sha256_file(out / "data" / target / "splits.json")
    key["_seed"] = seed
    cache_file = cache / f"{target}.npz"
    meta_file = cache / f"{target}.json"
    if cache_file.exists() and meta_file.exists() and json.loads(meta_file.read_text()) == key:
        z = np.load(cache_file)
        return {"correct": z["correct"], "test": z["test"]}
    backend = get_backend(cfg["backend"])
    ev = MergeEvaluator(backend, out / "models" / "pretrained" / "model.safetensors", paths)
    data = load_prepared(out / "data" / target)
    val = data.indices["val"]
    perm = np.random.default_rng(seed).permutation(len(val))  # the scorer's slice order (MergeEvaluator.scorer)
    # channels-last images: the same convolutions, about 3x faster on this CPU than the engine's
    # default layout (float rounding may differ: checked against the engine below)
    xv, yv = (torch.from_numpy(a) for a in data.split("val"))
    xv, yv = xv[perm].contiguous(memory_format=torch.channels_last), yv[perm]
    n = len(cands)
    correct = np.zeros((2**n, len(val)), dtype=bool)
    t0 = time.time()
    with torch.inference_mode():
        for mask in range(1, 2**n):
            ev.load_subset(mask)
            correct[mask] = (ev.model(xv).argmax(1) == yv).numpy()
    # the engine's own val accuracy on a sample of subsets agrees (at most one example's
    # prediction flipped by float rounding)
    rng = np.random.default_rng(0)
    for mask in rng.choice(np.arange(1, 2**n), size=20, replace=False).tolist() + [2**n - 1]:
        ev.load_subset(mask)
        gap = abs(backend.evaluate(ev.model, data, "val") - correct[mask].mean())
        if gap > 1.5 / len(val):
            raise AssertionError(f"scoring differs from the engine by {gap:.4f} on {target}, subset {mask}")
    # test accuracy: only the subsets some strategy chooses need it (computed on demand, see test_acc)
    test = np.full(2**n, np.nan)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache_file, correct=correct, test=test)
    meta_file.write_text(json.dumps(key))
    print(f"  {target}: {2**n - 1} subsets scored exhaustively in {time.time() - t0:.0f}s", file=sys.stderr)
    return {"correct": correct, "test": test}


class TestAccuracy:
    """Test accuracy of a target's merged models through the engine, computed on first use."""

    def __init__(self, cfg, out, target, cands, table):
        self.args, self.table, self.ev = (cfg, out, target, cands), table, None

    def __getitem__(self, mask: int) -> float:
        if np.isnan(self.table["test"][mask]):
            from mergemix.backends import get_backend
            from mergemix.data.prepared import load_prepared
            from mergemix.merge_eval import MergeEvaluator

            cfg, out, target, cands = self.args
            if self.ev is None:
                paths = {c: str(out / "models" / "finetuned" / c / "model.safetensors") for c in cands}
                self.backend = get_backend(cfg["backend"])
                self.ev = MergeEvaluator(self.backend, out / "models" / "pretrained" / "model.safetensors", paths)
                self.data = load_prepared(out / "data" / target)
            self.ev.load_subset(mask)
            self.table["test"][mask] = self.backend.evaluate(self.ev.model, self.data, "test")
        return float(self.table["test"][mask])


def best_mask(values: np.ndarray, masks) -> int:
    """The mergemix selection rule: best value; ties to fewer members, then the smaller mask."""
    return min(masks, key=lambda m: (-values[m], bin(m).count("1"), m))


def run_strategy(name: str, table: dict, n: int, budget, seed: int, options: dict) -> dict:
    from mergemix.search import Objective, get_strategy, make_budget, run_search

    correct, n_val = table["correct"], table["correct"].shape[1]

    def score(mask, examples=None):
        m = n_val if examples is None else min(examples, n_val)
        return float(correct[mask, :m].mean())

    cls = get_strategy(name)
    b = make_budget(budget, n, n_val, cls.cost)
    obj = Objective(score, n, n_val, b)
    t0 = time.time()
    result = run_search(cls(n, seed=seed, **options.get(name, {})), obj)
    return {
        "best": result.best.mask if result.best else None,
        "evaluations": result.evaluations,
        "examples": result.examples_used,
        "seconds": time.time() - t0,
        "stop": result.stop_reason,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "config" / "digits_wide.yaml"))
    p.add_argument("--results-dir", default=None, help="override the config's results_dir")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.02, 0.05, 0.1], help="fractions of 2^N-1")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--targets", nargs="+", default=None)
    p.add_argument("--tol", type=float, default=0.005)
    p.add_argument("--options", default="{}", help='JSON: {"strategy": {option: value}}')
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)

    import yaml

    from mergemix.config import candidates_of, targets_of, validate_config

    configfile = Path(args.config)
    raw = yaml.safe_load(configfile.read_text())
    if args.results_dir:
        raw["results_dir"] = args.results_dir
        configfile = Path(args.results_dir) / "bench_config.yaml"
        configfile.parent.mkdir(parents=True, exist_ok=True)
        configfile.write_text(yaml.safe_dump(raw))
    cfg = validate_config(raw)
    out = build_models(cfg, configfile, args.cores)
    cache = out / "bench" / "search_exhaustive"
    targets = args.targets or targets_of(cfg)
    scorer_seed = cfg["merge_eval"]["seed"]
    tables = {t: exhaustive_table(cfg, out, t, candidates_of(cfg, t), scorer_seed, cache) for t in targets}
    options = json.loads(args.options)
    tests = {t: TestAccuracy(cfg, out, t, candidates_of(cfg, t), tables[t]) for t in targets}

    rows = []
    for name in args.strategies:
        for budget in [1.0] if name == "exhaustive" else args.budgets:
            stats = []
            for seed in [0] if name == "exhaustive" else args.seeds:
                for t in targets:
                    table = tables[t]
                    n = len(candidates_of(cfg, t))
                    val = table["correct"].mean(axis=1)
                    exh = best_mask(val, range(1, 2**n))
                    r = run_strategy(name, table, n, budget, seed, options)
                    chosen = r["best"]  # None: the budget allowed no full evaluation (counted as a miss)
                    stats.append(
                        {
                            "within": chosen is not None and val[exh] - val[chosen] <= args.tol + 1e-12,
                            "regret_val": val[exh] - val[chosen] if chosen else float("nan"),
                            "regret_test": tests[t][exh] - tests[t][chosen] if chosen else float("nan"),
                            "eval_frac": r["evaluations"] / (2**n - 1),
                            "examples_frac": r["examples"] / ((2**n - 1) * table["correct"].shape[1]),
                            "seconds": r["seconds"],
                        }
                    )
            rows.append(
                {
                    "strategy": name,
                    "budget": budget,
                    "runs": len(stats),
                    **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]},
                }
            )

    print(
        f"\n{len(targets)} targets x {len(args.seeds)} seeds; exhaustive = 2^N-1 = "
        f"{2 ** len(candidates_of(cfg, targets[0])) - 1} merged evaluations per target"
    )
    head = f"{'strategy':<11}{'budget':>8}{'within ' + str(args.tol):>14}{'regret val':>12}{'regret test':>13}{'evals/exh':>11}{'examples/exh':>14}{'s/run':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['strategy']:<11}{r['budget']:>8.2f}{r['within']:>14.0%}{r['regret_val']:>12.4f}{r['regret_test']:>13.4f}"
            f"{r['eval_frac']:>11.1%}{r['examples_frac']:>14.1%}{r['seconds']:>8.2f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
