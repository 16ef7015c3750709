"""``mergemix <stage>``: one subcommand per pipeline stage, each with explicit paths and specs.

Specs (backend, hyperparameters, split settings) are JSON strings, exactly the slices of the
study config the stage depends on, so Snakemake sees them as params and reruns on change. The
config sections among them (--hparams, --split, --merge, --eval, --search, --tune, --weights,
analyze's --options) become typed sections of :mod:`mergemix.settings`: checked against the schema
(an unknown key is refused, naming it) and the keys left out take the schema's defaults, as in a
study. The fine-tune stages' --checkpoint-every-* flags (or their environment variables, else the
schema's defaults) become a ``settings.Checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text[:80]!r}") from None


def _pairs(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"mergemix: expected NAME=PATH, got {item!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergemix", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"mergemix {__import__('mergemix').__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="stage", required=True)

    def stage(name, help, backend=False, hparams=False, pretrained=False):
        s = sub.add_parser(name, help=help)
        s.add_argument("--threads", type=int, default=1)
        if backend:
            s.add_argument("--backend", type=_json, required=True, help="JSON: the study's backend section")
        if hparams:
            s.add_argument(
                "--hparams",
                type=_json,
                required=True,
                help="JSON: training hyperparameters (finetune or pretrain.hparams; epochs, lr and batch_size "
                "required, the other keys default to the schema's)",
            )
        if pretrained:
            s.add_argument("--pretrained", required=True, help="the pre-trained model file")
        return s

    s = stage("check-config", "validate a study config and print what the study will run")
    s.add_argument("configfile")
    s.add_argument("--schema", default=None)

    s = stage(
        "pin-revisions",
        "pin a study's hub datasets and given models to commits in its config file (local; asks the hub)",
    )
    s.add_argument("configfile")
    s.add_argument(
        "--from-downloads",
        action="store_true",
        help="take the commits the study's downloads recorded (no network) instead of asking the hub",
    )
    s.add_argument("--write", action="store_true", help="rewrite the config file (comments and layout kept)")

    s = stage("download", "fetch a dataset's files (local rule; the only data step that may download)")
    s.add_argument("--name", required=True)
    s.add_argument("--spec", type=_json, required=True)
    s.add_argument("--out", required=True, help="output folder")

    s = stage("prepare", "build one dataset and its deterministic splits")
    s.add_argument("--name", required=True)
    s.add_argument("--spec", type=_json, required=True)
    s.add_argument("--split", type=_json, required=True, help="JSON: the split section (missing keys: its defaults)")
    s.add_argument("--local", default=None, help="folder written by the download stage, if any")
    s.add_argument("--out", required=True, help="output folder")

    s = stage("fetch-pretrained", "get a backend's published pre-trained weights (local rule)", backend=True)
    s.add_argument("--out", required=True)

    s = stage(
        "head",
        "a dataset's frozen classification head from the pre-trained model (clip)",
        backend=True,
        pretrained=True,
    )
    s.add_argument("--data", required=True, help="prepared dataset folder")
    s.add_argument(
        "--templates", type=_json, default=None, help="JSON: a template-set name or list (default: the dataset spec's)"
    )
    s.add_argument("--out", required=True)

    s = stage("pretrain", "pre-train the built-in model (smallcnn)", backend=True, hparams=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)

    def checkpoint_args(s) -> None:  # the fine-tune stages' checkpoints (resumed when a killed job is rerun)
        s.add_argument(
            "--checkpoint-every-steps",
            type=int,
            default=None,
            help="save the training state to OUT.ckpt/ every N steps (0: not by steps; default: "
            "$MERGEMIX_CHECKPOINT_EVERY_STEPS, else the schema's checkpoint.every_steps)",
        )
        s.add_argument(
            "--checkpoint-every-seconds",
            type=float,
            default=None,
            help="save the training state to OUT.ckpt/ every N seconds (0: not by time; default: "
            "$MERGEMIX_CHECKPOINT_EVERY_SECONDS, else the schema's checkpoint.every_minutes x 60)",
        )

    s = stage(
        "finetune",
        "fine-tune the pre-trained model on one dataset or a mixture",
        backend=True,
        hparams=True,
        pretrained=True,
    )
    s.add_argument("--data", nargs="+", required=True, help="prepared dataset folders (several = a mixture)")
    s.add_argument("--out", required=True)
    checkpoint_args(s)

    s = stage(
        "finetune-pack",
        "several fine-tunes in one process, each as its own finetune job would write it",
        backend=True,
        hparams=True,
        pretrained=True,
    )
    s.add_argument("--data", nargs="+", required=True, help="NAME=FOLDER for every dataset the fine-tunes use")
    s.add_argument("--subsets", nargs="+", required=True, help="the datasets of each fine-tune, as subset ids (a+b+c)")
    s.add_argument("--out", nargs="+", required=True, help="each fine-tune's model file, in the order of --subsets")
    checkpoint_args(s)

    s = stage(
        "final-finetune",
        "fine-tune on the mixture selected by merge-eval and test it",
        backend=True,
        hparams=True,
        pretrained=True,
    )
    s.add_argument("--merge-eval", required=True)
    s.add_argument("--data", nargs="+", required=True, help="NAME=FOLDER for every candidate")
    s.add_argument("--target", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--eval-out", required=True)
    checkpoint_args(s)

    s = stage(
        "final-finetune-pack",
        "several targets' final-finetune in one process",
        backend=True,
        hparams=True,
        pretrained=True,
    )
    s.add_argument(
        "--candidates", type=_json, required=True, help='JSON: {"target": [candidates]} for every target of the pack'
    )
    s.add_argument("--data", nargs="+", required=True, help="NAME=FOLDER for every candidate and target")
    s.add_argument("--merge-eval", nargs="+", required=True, help="TARGET=CSV")
    s.add_argument("--out", nargs="+", required=True, help="TARGET=MODEL")
    s.add_argument("--eval-out", nargs="+", required=True, help="TARGET=JSON")
    checkpoint_args(s)

    s = stage("merge-eval", "evaluate the merged models of one chunk of subsets", backend=True, pretrained=True)
    s.add_argument("--merge", type=_json, required=True, help="JSON: merge_eval's method and options")
    s.add_argument("--models", nargs="+", required=True, help="NAME=MODEL for every candidate")
    s.add_argument("--target", required=True)
    s.add_argument("--chunk", type=int, default=0)
    s.add_argument("--chunks", type=int, default=1)
    s.add_argument("--subsets", nargs="+", default=None, help="evaluate these subset ids instead of a chunk")
    s.add_argument("--eval", type=_json, default={}, help="JSON: merge_eval's eval_batch_size and precision")
    s.add_argument(
        "--test",
        choices=["all", "selected"],
        default="all",
        help="score the test split of every subset, or only of the chunk's best and --test-subsets",
    )
    s.add_argument(
        "--test-subsets", nargs="*", default=[], help="subset ids whose test split is scored with --test selected"
    )
    s.add_argument(
        "--options-from", nargs="*", default=[], help="a tune-method JSON (or none): merge with its tuned options"
    )
    s.add_argument("--out", required=True)

    s = stage(
        "import-model",
        "check a given fine-tuned model against the pre-trained one and save it (models:)",
        backend=True,
        pretrained=True,
    )
    s.add_argument("--spec", type=_json, required=True, help="JSON: the dataset's models entry")
    s.add_argument("--dataset", required=True)
    s.add_argument("--path", default=None, help="where the model's files are (default: the entry's path)")
    s.add_argument("--out", required=True)

    s = stage("download-model", "download a given model from the hub at its revision (safetensors only)")
    s.add_argument("--spec", type=_json, required=True, help="JSON: the dataset's models entry")
    s.add_argument("--out", required=True)

    s = stage(
        "select", "rank the mixtures of given fine-tuned models for a target, no Snakemake, no training", backend=True
    )
    s.add_argument(
        "--pretrained",
        required=True,
        help="the pre-trained model: a mergemix model file, or a folder to fetch it into (hub backends)",
    )
    s.add_argument("--models", nargs="+", required=True, help="NAME=PATH of each candidate's given model (any format)")
    s.add_argument("--target", required=True, help="the target: a prepared dataset folder, or a JSON dataset spec")
    s.add_argument("--split", type=_json, default={}, help="JSON: split settings when --target is a spec")
    # left out, each takes the schema's merge_eval default (as a study does)
    s.add_argument(
        "--strategy",
        default=None,
        help="subset search: auto, exhaustive, greedy, beam, optuna, halving, surrogate (default: auto)",
    )
    s.add_argument(
        "--budget",
        type=float,
        default=None,
        help="merged evaluations (an integer, or a fraction of 2^N-1; default: null = 1023)",
    )
    s.add_argument("--seed", type=int, default=None, help="seed of the search (default: merge_eval.seed's)")
    s.add_argument("--method", default=None, help="merge method (default: merge_eval.method's)")
    s.add_argument("--options", type=_json, default=None, help="JSON: merge method options")
    s.add_argument(
        "--work-dir", default=None, help="where imported models and the prepared target go (default: beside --out)"
    )
    s.add_argument("--top", type=int, default=20, help="rows printed (the CSV has all)")
    s.add_argument("--out", required=True, help="CSV: the ranked subsets")

    s = stage(
        "tune-method",
        "tune a merge method's options on a target's val split (merge_eval.tune)",
        backend=True,
        pretrained=True,
    )
    s.add_argument("--method", required=True)
    s.add_argument(
        "--fixed", type=_json, default={}, help="JSON: the method's fixed options (merge_eval.method_options)"
    )
    s.add_argument("--space", type=_json, required=True, help="JSON: {option: [low, high] | {choices: [...]}}")
    s.add_argument("--tune", type=_json, default={}, help="JSON: merge_eval.tune's budget, seed, n_startup_trials")
    s.add_argument(
        "--search", type=_json, required=True, help="JSON: the subset search {strategy, budget, seed, options}"
    )
    s.add_argument("--models", nargs="+", required=True, help="NAME=MODEL for every candidate")
    s.add_argument("--target", required=True)
    s.add_argument("--eval", type=_json, default={}, help="JSON: merge_eval's eval_batch_size and precision")
    s.add_argument("--journal", default=None, help="optuna journal file: a rerun resumes the tuning")
    s.add_argument("--out", required=True, help="JSON: the tuned options")
    s.add_argument("--out-csv", required=True, help="CSV: every setting tried")

    s = stage(
        "search",
        "budgeted search over a target's subsets (one worker of merge_eval.strategy)",
        backend=True,
        pretrained=True,
    )
    s.add_argument("--merge", type=_json, required=True, help="JSON: merge_eval's method and options")
    s.add_argument("--search", type=_json, required=True, help="JSON: {strategy, budget, seed, options}")
    s.add_argument("--models", nargs="+", required=True, help="NAME=MODEL for every candidate")
    s.add_argument("--target", required=True)
    s.add_argument("--worker", type=int, default=0)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--journal", default=None, help="optuna journal file shared by the workers (resumable)")
    s.add_argument("--eval", type=_json, default={}, help="JSON: merge_eval's eval_batch_size and precision")
    s.add_argument(
        "--test",
        choices=["all", "selected"],
        default="all",
        help="score the test split of every full evaluation, or only of this worker's best subset",
    )
    s.add_argument("--out", required=True, help="CSV of this worker's evaluations")
    s.add_argument("--summary", required=True, help="JSON summary of this worker's search")

    s = stage("gather", "join a target's merge-eval chunks or search workers, check coverage, summarise the cost")
    s.add_argument("--candidates", nargs="+", required=True)
    s.add_argument("--chunks", nargs="+", required=True)
    s.add_argument("--summaries", nargs="*", default=[], help="the search workers' JSON summaries (none: exhaustive)")
    s.add_argument("--out", required=True)
    s.add_argument("--summary", default=None, help="JSON: strategy, evaluations and examples against exhaustive")

    s = stage("eval-models", "evaluate saved (mixture) models on a target", backend=True, pretrained=True)
    s.add_argument("--models", nargs="+", required=True, help="SUBSET=MODEL")
    s.add_argument("--target", required=True)
    s.add_argument("--out", required=True)

    s = stage("eval-pretrained", "evaluate the pre-trained model on every target", backend=True, pretrained=True)
    s.add_argument("--targets", nargs="+", required=True, help="NAME=FOLDER")
    s.add_argument("--out", required=True)

    s = stage("embed", "embed a split of a dataset with the pre-trained model", backend=True, pretrained=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="val")
    s.add_argument("--out", required=True)

    s = stage(
        "embed-pack",
        "embed a split of several datasets with the pre-trained model, in one process",
        backend=True,
        pretrained=True,
    )
    s.add_argument("--data", nargs="+", required=True, help="prepared dataset folders")
    s.add_argument("--split", default="val")
    s.add_argument("--out", nargs="+", required=True, help="each dataset's embeddings file, in the order of --data")

    s = stage("similarity", "the six similarity scores of every subset for one target")
    s.add_argument("--target", required=True, help="target embeddings")
    s.add_argument("--candidates", nargs="+", required=True, help="NAME=EMBEDDINGS")
    s.add_argument("--subsets", nargs="+", default=None, help="score only these subset ids (default: all)")
    s.add_argument("--out", required=True)

    s = stage("analyze", "correlations, baselines, the selection table and figures")
    s.add_argument("--targets", type=_json, required=True, help='{"target": [candidates]}')
    s.add_argument("--pretrained-csv", required=True)
    s.add_argument("--merge-eval", nargs="+", required=True, help="TARGET=CSV")
    s.add_argument("--search", nargs="*", default=[], help="TARGET=JSON: the search summary written by gather")
    s.add_argument(
        "--merge-eval-sampled", nargs="*", default=[], help="TARGET=CSV: merged models of the mixture sample"
    )
    s.add_argument("--mixture", nargs="*", default=[], help="TARGET=CSV")
    s.add_argument("--similarity", nargs="+", required=True, help="TARGET=CSV")
    s.add_argument("--final", nargs="*", default=[], help="TARGET=JSON (none with final.enabled: false)")
    s.add_argument("--weighted", nargs="*", default=[], help="TARGET=JSON: weighted final fine-tunes (m2m_weighted)")
    s.add_argument("--options", type=_json, default={})
    s.add_argument("--out-dir", required=True)

    s = stage(
        "weights-search",
        "search mixture weights from a target's best subset (merge_eval.strategy: weights)",
        backend=True,
        pretrained=True,
    )
    s.add_argument("--weights", type=_json, required=True, help="JSON: merge_eval.weights {sampler, budget, seed, ...}")
    s.add_argument("--models", nargs="+", required=True, help="NAME=MODEL for every candidate")
    s.add_argument("--target", required=True)
    s.add_argument(
        "--merge-eval", required=True, help="the target's gathered merge-eval CSV (its best subset is the start)"
    )
    s.add_argument("--eval", type=_json, default={}, help="JSON: merge_eval's eval_batch_size and precision")
    s.add_argument("--journal", default=None, help="optuna journal file: a rerun resumes the search")
    s.add_argument("--out", required=True, help="JSON: the chosen weights")
    s.add_argument("--out-csv", required=True, help="CSV: every weight vector evaluated")

    s = stage(
        "weighted-finetune",
        "fine-tune on the candidates in the searched proportions and test it",
        backend=True,
        hparams=True,
        pretrained=True,
    )
    s.add_argument("--weights", required=True, help="the JSON written by weights-search")
    s.add_argument("--data", nargs="+", required=True, help="NAME=FOLDER for every candidate")
    s.add_argument("--target", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--eval-out", required=True)
    checkpoint_args(s)

    s = stage(
        "weights-check",
        "sampled weight vectors: weighted merge vs weighted fine-tune (the surrogate check)",
        backend=True,
        hparams=True,
        pretrained=True,
    )
    s.add_argument("--models", nargs="+", required=True, help="NAME=MODEL for every candidate")
    s.add_argument("--data", nargs="+", required=True, help="NAME=FOLDER for every candidate")
    s.add_argument("--target", required=True)
    s.add_argument("--samples", type=int, required=True)
    s.add_argument("--seed", type=int, default=None, help="seed of the draws (default: merge_eval.weights.seed's)")
    s.add_argument("--eval", type=_json, default={}, help="JSON: merge_eval's eval_batch_size and precision")
    s.add_argument("--out", required=True)

    s = stage("weights-check-table", "per target: Pearson of weighted merged vs weighted fine-tuned accuracy")
    s.add_argument("--checks", nargs="+", required=True, help="TARGET=CSV written by weights-check")
    s.add_argument("--analysis", type=_json, default={}, help="JSON: the analysis section (its logit_eps)")
    s.add_argument("--pretrained-csv", required=True)
    s.add_argument("--out", required=True)

    s = stage("compare-methods", "per merge method: correlation with mixture fine-tuning and the M2M choice")
    s.add_argument("--merge-eval", nargs="+", required=True, help="METHOD:TARGET=CSV")
    s.add_argument("--mixture", nargs="*", default=[], help="TARGET=CSV")
    s.add_argument(
        "--options", type=_json, default={}, help="JSON: {method: fixed options} (merge_eval.method_options)"
    )
    s.add_argument("--tuned", nargs="*", default=[], help="METHOD:TARGET=JSON of tune-method")
    s.add_argument("--analysis", type=_json, default={}, help="JSON: the analysis section (its logit_eps)")
    s.add_argument("--pretrained-csv", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--figure", default=None, help="figure path without extension")
    s.add_argument("--formats", nargs="*", default=None, help="figure formats (default: --analysis's figure_formats)")

    s = stage("show", "print a selection table")
    s.add_argument("csv")
    return p


def run(args) -> None:
    from mergemix import settings, stages

    t = args.threads
    if args.stage == "check-config":
        from mergemix.config import (
            budget_evaluations,
            candidates_of,
            load_yaml,
            resolve_strategy,
            targets_of,
            validate_config,
        )
        from mergemix.search import get_strategy, strategy_names

        cfg = validate_config(load_yaml(args.configfile), args.schema)
        for tgt in targets_of(cfg):
            n = len(candidates_of(cfg, tgt))
            strategy = resolve_strategy(cfg, n)
            cost = (
                2**n - 1
                if strategy == "exhaustive"
                else min(2**n - 1, budget_evaluations(cfg["merge_eval"]["budget"], n))
            )
            charged = get_strategy(strategy).cost if strategy in strategy_names() else "evaluations"
            unit = " (in val examples: budget x val size)" if charged == "examples" else ""
            print(
                f"{tgt}: {n} candidates, {2**n - 1} subsets; {strategy} search, at most {cost} merged evaluations{unit}"
            )
    elif args.stage == "pin-revisions":
        _pin_revisions(args)
    elif args.stage == "download":
        stages.download(args.name, args.spec, args.out)
    elif args.stage == "prepare":
        stages.prepare(args.name, args.spec, settings.Split.from_cli(args.split, "--split"), args.out, args.local)
    elif args.stage == "fetch-pretrained":
        stages.fetch_pretrained(args.backend, args.out, t)
    elif args.stage == "head":
        stages.head(args.backend, args.pretrained, args.data, args.out, t, templates=args.templates)
    elif args.stage == "pretrain":
        stages.pretrain(
            args.backend, settings.PretrainHParams.from_cli(args.hparams, "--hparams"), args.data, args.out, t
        )
    elif args.stage in ("finetune", "finetune-pack", "final-finetune", "final-finetune-pack"):
        hp = settings.HParams.from_cli(args.hparams, "--hparams")
        every = {"checkpoint": stages.checkpoint_settings(args.checkpoint_every_steps, args.checkpoint_every_seconds)}
        if args.stage == "finetune":
            stages.finetune(args.backend, hp, args.pretrained, args.data, args.out, t, **every)
        elif args.stage == "finetune-pack":
            stages.finetune_pack(
                args.backend,
                hp,
                args.pretrained,
                _pack_jobs(_pairs(args.data), args.subsets, args.out),
                t,
                **every,
            )
        elif args.stage == "final-finetune":
            r = stages.final_finetune(
                args.backend,
                hp,
                args.pretrained,
                args.merge_eval,
                _pairs(args.data),
                args.target,
                args.out,
                args.eval_out,
                t,
                **every,
            )
            logging.getLogger("mergemix").info("final model: %s", r)
        else:
            stages.final_finetune_pack(args.backend, hp, args.pretrained, _final_jobs(args), t, **every)
    elif args.stage == "merge-eval":
        if len(args.options_from) > 1:
            raise SystemExit(f"mergemix: --options-from takes one tune-method JSON, got {len(args.options_from)}")
        merge = settings.Merge.from_cli(args.merge, "--merge")
        if args.options_from:
            import dataclasses

            from mergemix.tuning import tuned_options

            tuned = tuned_options(args.options_from[0])
            merge = dataclasses.replace(merge, options={**merge.options, **tuned})
        stages.merge_eval(
            args.backend,
            merge,
            args.pretrained,
            _pairs(args.models),
            args.target,
            args.chunk,
            args.chunks,
            args.out,
            t,
            subset_ids=args.subsets,
            eval_spec=settings.Eval.from_cli(args.eval, "--eval"),
            test=args.test,
            test_subsets=args.test_subsets,
        )
    elif args.stage == "import-model":
        from mergemix.given import import_model

        import_model(args.backend, args.pretrained, args.spec, args.dataset, args.out, path=args.path, threads=t)
    elif args.stage == "download-model":
        from mergemix.given.hub import download_model

        download_model(args.spec, args.out)
    elif args.stage == "select":
        from mergemix.given.select import select

        budget = args.budget
        if budget is not None and float(budget).is_integer() and budget >= 1:
            budget = int(budget)
        given = {"strategy": args.strategy, "budget": budget, "seed": args.seed}
        search = settings.Search.from_cli(
            {k: v for k, v in given.items() if v is not None}, "--strategy/--budget/--seed"
        )
        given = {"method": args.method, "options": args.options}
        merge = settings.Merge.from_cli({k: v for k, v in given.items() if v is not None}, "--method/--options")
        table = select(
            args.backend,
            args.pretrained,
            _pairs(args.models),
            args.target,
            args.out,
            split=settings.Split.from_cli(args.split, "--split"),
            search=search,
            merge=merge,
            work_dir=args.work_dir,
            threads=t,
        )
        print(table.head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"\n{len(table)} subsets ranked on val; chosen: {table.iloc[0]['subset']} -> {args.out}")
    elif args.stage == "tune-method":
        from mergemix.tuning import tune_method

        tune_method(
            args.backend,
            args.method,
            args.fixed,
            args.space,
            settings.Tuner.from_cli(args.tune, "--tune"),
            settings.Search.from_cli(args.search, "--search"),
            args.pretrained,
            _pairs(args.models),
            args.target,
            args.out,
            args.out_csv,
            journal=args.journal,
            threads=t,
            eval_spec=settings.Eval.from_cli(args.eval, "--eval"),
        )
    elif args.stage == "search":
        stages.search(
            args.backend,
            settings.Merge.from_cli(args.merge, "--merge"),
            settings.Search.from_cli(args.search, "--search"),
            args.pretrained,
            _pairs(args.models),
            args.target,
            args.out,
            args.summary,
            args.worker,
            args.workers,
            args.journal,
            t,
            eval_spec=settings.Eval.from_cli(args.eval, "--eval"),
            test=args.test,
        )
    elif args.stage == "gather":
        stages.gather(args.chunks, args.candidates, args.out, args.summaries, args.summary)
    elif args.stage == "eval-models":
        stages.eval_models(args.backend, args.pretrained, _pairs(args.models), args.target, args.out, t)
    elif args.stage == "eval-pretrained":
        stages.eval_pretrained(args.backend, args.pretrained, _pairs(args.targets), args.out, t)
    elif args.stage == "embed":
        stages.embed(args.backend, args.pretrained, args.data, args.split, args.out, t)
    elif args.stage == "embed-pack":
        if len(args.data) != len(args.out):
            raise ValueError(f"--data names {len(args.data)} datasets but --out {len(args.out)} files; give one each")
        stages.embed_pack(args.backend, args.pretrained, list(zip(args.data, args.out)), args.split, t)
    elif args.stage == "similarity":
        stages.similarity(args.target, _pairs(args.candidates), args.out, subset_ids=args.subsets)
    elif args.stage == "analyze":
        from mergemix.analysis import analyze

        # the analysis section, and mixtures: which mixture study ran (the rule's, not a config key)
        opts, mixtures = args.options, {}
        if isinstance(opts, dict) and "mixtures" in opts:
            opts = dict(opts)
            mixtures["mixtures"] = opts.pop("mixtures")
        analyze(
            args.targets,
            args.pretrained_csv,
            _pairs(args.merge_eval),
            _pairs(args.mixture),
            _pairs(args.similarity),
            _pairs(args.final),
            args.out_dir,
            settings.Analysis.from_cli(opts, "--options"),
            search=_pairs(args.search),
            merge_eval_sampled=_pairs(args.merge_eval_sampled),
            weighted=_pairs(args.weighted),
            **mixtures,
        )
    elif args.stage == "weights-search":
        from mergemix.weighting import weights_search

        weights_search(
            args.backend,
            settings.WeightsSearch.from_cli(args.weights, "--weights"),
            args.pretrained,
            _pairs(args.models),
            args.target,
            args.merge_eval,
            args.out,
            args.out_csv,
            journal=args.journal,
            threads=t,
            eval_spec=settings.Eval.from_cli(args.eval, "--eval"),
        )
    elif args.stage == "weighted-finetune":
        from mergemix.weighting import weighted_finetune

        r = weighted_finetune(
            args.backend,
            settings.HParams.from_cli(args.hparams, "--hparams"),
            args.pretrained,
            args.weights,
            _pairs(args.data),
            args.target,
            args.out,
            args.eval_out,
            t,
            checkpoint=stages.checkpoint_settings(args.checkpoint_every_steps, args.checkpoint_every_seconds),
        )
        logging.getLogger("mergemix").info("weighted model: %s", r)
    elif args.stage == "weights-check":
        from mergemix.weighting import weights_check

        weights_check(
            args.backend,
            settings.HParams.from_cli(args.hparams, "--hparams"),
            args.pretrained,
            _pairs(args.models),
            _pairs(args.data),
            args.target,
            args.samples,
            settings.Weights.from_cli({} if args.seed is None else {"seed": args.seed}, "--seed").seed,
            args.out,
            t,
            eval_spec=settings.Eval.from_cli(args.eval, "--eval"),
        )
    elif args.stage == "weights-check-table":
        from mergemix.weighting import weights_check_table

        weights_check_table(
            _pairs(args.checks),
            args.pretrained_csv,
            args.out,
            logit_eps=settings.Analysis.from_cli(args.analysis, "--analysis").logit_eps,
        )
    elif args.stage == "compare-methods":
        from mergemix.method_study import compare_methods

        per: dict = {}
        for key, path in _pairs(args.merge_eval).items():
            method, sep, target = key.partition(":")
            if not sep:
                raise SystemExit(f"mergemix: expected METHOD:TARGET=CSV, got {key}={path}")
            per.setdefault(method, {})[target] = path
        tuned: dict = {}
        for key, path in _pairs(args.tuned).items():
            method, sep, target = key.partition(":")
            if not sep:
                raise SystemExit(f"mergemix: expected METHOD:TARGET=JSON, got {key}={path}")
            tuned[(method, target)] = path
        analysis = settings.Analysis.from_cli(args.analysis, "--analysis")
        compare_methods(
            per,
            _pairs(args.mixture),
            args.pretrained_csv,
            args.out,
            args.figure,
            list(analysis.figure_formats) if args.formats is None else args.formats,
            options=args.options,
            tuned=tuned,
            logit_eps=analysis.logit_eps,
        )
    elif args.stage == "show":
        import pandas as pd

        from mergemix.analysis import format_table

        print(format_table(pd.read_csv(args.csv)))


def _pack_jobs(data: dict[str, str], subset_ids: Sequence[str], outs: Sequence[str]) -> list[tuple[list[str], str]]:
    """``finetune-pack``'s jobs: (data folders, model file) for each subset id, in order."""
    from mergemix.subsets import parse_subset

    if len(subset_ids) != len(outs):
        raise ValueError(
            f"--subsets names {len(subset_ids)} fine-tunes but --out {len(outs)} model files; give one each"
        )
    jobs = []
    for sid, out in zip(subset_ids, outs):
        names = parse_subset(sid)
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"--subsets {sid}: no --data NAME=FOLDER for {', '.join(missing)}")
        jobs.append(([data[n] for n in names], out))
    return jobs


def _final_jobs(args) -> list[dict]:
    """``final-finetune-pack``'s jobs, one per target of --candidates."""
    data, merge_eval, out, eval_out = (
        _pairs(args.data),
        _pairs(args.merge_eval),
        _pairs(args.out),
        _pairs(args.eval_out),
    )
    jobs = []
    for target, cands in args.candidates.items():
        for flag, given in (("--merge-eval", merge_eval), ("--out", out), ("--eval-out", eval_out), ("--data", data)):
            if target not in given:
                raise ValueError(f"{flag}: no {target}=PATH for target {target!r}")
        missing = [c for c in cands if c not in data]
        if missing:
            raise ValueError(f"--data: no NAME=FOLDER for candidates {', '.join(missing)} of target {target!r}")
        jobs.append(
            {
                "merge_eval_csv": merge_eval[target],
                "data_dirs": {c: data[c] for c in cands},
                "target_dir": data[target],
                "out_path": out[target],
                "eval_out": eval_out[target],
            }
        )
    return jobs


def _pin_revisions(args) -> None:
    from pathlib import Path

    from mergemix import pins
    from mergemix.config import load_yaml, validate_config

    raw = load_yaml(args.configfile)
    cfg = validate_config(raw)
    results = Path(cfg["results_dir"]) / cfg["study"] if args.from_downloads else None
    found = pins.resolve_pins(cfg, results)
    if not found:
        print("no dataset of this study is read from a hub; nothing to pin")
        return
    for name, p in found.items():
        print(f"{name}: {p['repo']} {p['revision'] or '(default branch)'} -> {p['commit']}")
    if args.write:
        changed = pins.pin_config_file(args.configfile, found, raw)
        print(f"{args.configfile}: {'pinned' if changed else 'already pinned'}")
    else:
        print(f"(dry run: add --write to set these revisions in {args.configfile})")


# Stages that may use the network (local rules on a login node); every other stage runs with
# the Hugging Face hubs set offline, so a compute job never tries to download.
ONLINE_STAGES = {"download", "fetch-pretrained", "pin-revisions"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage not in ONLINE_STAGES:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from mergemix.config import ConfigError
    from mergemix.io import ModelFileError

    # Every error is one line (a config's problems: one line each) naming the problem and the fix;
    # -v adds the traceback. Expected errors exit 2, anything else 1.
    try:
        run(args)
    except (ConfigError, ModelFileError, ValueError, KeyError, OSError, RuntimeError) as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if not isinstance(e, ConfigError):
            msg = " ".join(line.strip() for line in msg.splitlines() if line.strip())
        print(f"mergemix {args.stage}: error: {msg or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mergemix {args.stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an error of a library: still one line unless -v
        if args.verbose:
            import traceback

            traceback.print_exc()
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        tail = "" if args.verbose else "; rerun with -v for the traceback"
        print(f"mergemix {args.stage}: unexpected error: {type(e).__name__}: {msg}{tail}", file=sys.stderr)
        return 1
    return 0
