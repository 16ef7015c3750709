#!/usr/bin/env python3
"""Where the merge-eval engine's time goes, per backend, side by side.

For each backend the script builds a small study in a temporary folder with the pipeline's own
stages (prepared data, a pre-trained model, one real ``stages.finetune`` per candidate, so the
models carry the provenance manifests the engine checks; nothing is downloaded) and times:

* engine:  ``MergeEvaluator.run`` over the subsets (every subset's merged model on the target's
           val and test splits), reported as merged models per second;
* floor:   the same evaluations of one fixed model (no merging at all), once per subset: the
           least any engine can spend; engine/floor is the engine's overhead (1.00 = none);
* naive:   per subset, read every member's file, build a fresh model (the backend's
           ``load_pretrained``), average the state dicts, load and evaluate, as peer tools do;
           naive/engine is what reading models once and merging in place saves;
* merge share: the engine run again with the backend's evaluation stubbed out (merging,
           writing into the live model and bookkeeping only), as a share of the engine's time.

Digits (smallcnn) is exhaustive over 7 candidates (127 subsets); the tiny CLIP and causal LM run
fewer where CPU evaluation is slow (the table says how many). Ratios compare per-subset times
(naive is timed on a random sample of the subsets where it is slow; the table says how many).
A second table times the causal LM's batched adapters (``Backend.evaluate_many``, K merged
adapters per batched generation) against one adapter at a time, and checks the scores are equal.

    python benchmarks/engine.py                        # CPU: smallcnn, tiny clip, tiny causal_lm
    python benchmarks/engine.py --quick                # smaller everything (the smoke test)
    python benchmarks/engine.py --gpu                  # ViT-B-32 fp32/bf16 + Llama-width adapters, on CUDA
    python benchmarks/engine.py --gpu --device cpu --tiny --quick   # the --gpu code paths at toy sizes on CPU

``--gpu``: ViT-B-32 built by open_clip with random weights over 2,000 random 224 x 224 val images
(the target has no test images, so one subset is one pass over 2,000 images), fp32 and bf16,
exhaustive over 7 candidates: subsets per second and engine/floor (goals: <= 1.1 and >= 40 subsets
per second on an H100); and the batched-adapter ratio on a random-weight Llama-style model of
realistic width (hidden 4096, intermediate 14336, 32 heads, 8 KV heads; a few layers) with IA3
and LoRA, K = 8 (goal >= 3x).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# the synthetic prepared image dataset of the CLIP throughput benchmark (this folder is on sys.path)
from clip_throughput import write_prepared  # noqa: E402

from mergemix import io, stages, subsets  # noqa: E402
from mergemix.backends import get_backend  # noqa: E402
from mergemix.backends.base import Backend  # noqa: E402
from mergemix.data.prepared import load_prepared, prepare_dataset  # noqa: E402
from mergemix.merge_eval import MergeEvaluator  # noqa: E402

DIGITS_SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "max_train": 400}  # the embedded study's
LM_SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.25, "val_cap": 100}


# =============================================================================================
# Every call this benchmark makes to the merge-eval engine is in this section.
# =============================================================================================
def engine_masks(n: int) -> list[int]:
    """The exhaustive enumeration of n candidates, in the order the engine's exhaustive job uses
    (Gray code where ``mergemix.subsets`` has it: one add or subtract per step)."""
    if hasattr(subsets, "gray"):
        return [subsets.gray(i) for i in range(1, 2**n)]
    return list(subsets.all_masks(n))


def make_engine(backend: Backend, pretrained, paths: dict) -> MergeEvaluator:
    return MergeEvaluator(backend, pretrained, paths, method="uniform")


def run_engine(engine: MergeEvaluator, target, masks) -> None:
    """One engine pass: every subset's merged model on val and test (``run``'s default)."""
    engine.run(target, masks)


EVAL_SPLITS = ("val", "test")  # what run_engine evaluates per subset: the floor does the same


def evaluate_fixed(backend: Backend, model, target) -> None:
    """The floor's unit: the engine's evaluation of one subset, on a model that never changes."""
    ctx = backend.eval_context() if hasattr(backend, "eval_context") else contextlib.nullcontext()
    with ctx:
        for split in EVAL_SPLITS:
            backend.evaluate(model, target, split)


@contextlib.contextmanager
def evaluation_stubbed(backend: Backend):
    """The backend's evaluation made free, so an engine pass times merging and bookkeeping only."""
    backend.evaluate = lambda model, data, split: 0.0
    backend.evaluate_many = lambda model, data, split, states: [0.0] * len(list(states))
    try:
        yield
    finally:
        del backend.evaluate, backend.evaluate_many


# =============================================================================================
# timing
# =============================================================================================
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def naive(backend: Backend, pretrained, paths: dict, target, masks) -> None:
    names = sorted(paths)
    for m in masks:
        states = [io.load_model(paths[n], verify=False)[0] for n in subsets.mask_to_names(m, names)]
        model = backend.load_pretrained(pretrained)  # a fresh model per subset
        avg = {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}
        backend.load_state(model, avg)
        evaluate_fixed(backend, model, target)
        del model, states, avg


def measure(
    label: str, spec: dict, pretrained, paths: dict, target_dir, args, device: str, n_naive: int, note: str = ""
) -> dict:
    """Engine, floor, merge-only and naive times of one study; ratios of per-subset times."""
    backend = get_backend(spec, threads=args.threads, device=device)
    target = load_prepared(target_dir)
    masks = engine_masks(len(paths))
    made = []
    t_setup = timed(lambda: made.append(make_engine(backend, pretrained, paths)), device)
    engine = made.pop()
    fixed = backend.load_pretrained(pretrained)
    evaluate_fixed(backend, fixed, target)  # warm-up: split caches, kernels, allocator
    run_engine(engine, target, masks[:2])
    t_engine = t_floor = t_merge = float("inf")
    for _ in range(args.repeats):  # interleaved, best of: the machine may be shared
        t_floor = min(t_floor, timed(lambda: [evaluate_fixed(backend, fixed, target) for _ in masks], device))
        t_engine = min(t_engine, timed(lambda: run_engine(engine, target, masks), device))
        with evaluation_stubbed(backend):
            t_merge = min(t_merge, timed(lambda: run_engine(engine, target, masks), device))
    engine = fixed = None  # free both models before the naive run (the lambdas above are done)
    naive_masks = masks
    if len(masks) > n_naive:
        naive_masks = sorted(random.Random(0).sample(masks, n_naive))
    t_naive = timed(lambda: naive(backend, pretrained, paths, target, naive_masks), device)
    n = len(masks)
    examples = sum(len(target.indices[s]) for s in EVAL_SPLITS)
    return {
        "backend": label,
        "candidates": len(paths),
        "subsets": n,
        "examples_per_subset": examples,
        "naive_subsets": len(naive_masks),
        "setup_s": t_setup,
        "engine_s": t_engine,
        "floor_s": t_floor,
        "merge_only_s": t_merge,
        "naive_s": t_naive,
        "merged_per_s": n / t_engine,
        "engine_over_floor": t_engine / t_floor,
        "naive_over_engine": (t_naive / len(naive_masks)) / (t_engine / n),
        "merge_share": t_merge / t_engine,
        "note": note,
    }


def print_engine_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    head = (
        f"{'backend':<22}{'cands':>6}{'subsets':>8}{'examples':>9}{'merged/s':>10}{'engine/floor':>13}"
        f"{'naive/engine':>13}{'merge share':>12}{'setup s':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        naive_col = f"{r['naive_over_engine']:.2f}x" + (
            "" if r["naive_subsets"] == r["subsets"] else f"({r['naive_subsets']})"
        )
        print(
            f"{r['backend']:<22}{r['candidates']:>6}{r['subsets']:>8}{r['examples_per_subset']:>9}{r['merged_per_s']:>10.2f}"
            f"{r['engine_over_floor']:>13.2f}{naive_col:>13}{r['merge_share']:>12.1%}{r['setup_s']:>9.2f}"
        )
    for r in rows:
        if r.get("note"):
            print(f"  {r['backend']}: {r['note']}")
    print(
        "  examples: val + test examples evaluated per subset; naive/engine (k): naive timed on a random "
        "sample of k subsets; merge share: engine time with evaluation stubbed out / engine time"
    )


# =============================================================================================
# stand-in studies (everything built in code, nothing downloaded)
# =============================================================================================
def digits_study(tmp: Path, n_cands: int, threads: int, quick: bool) -> tuple[dict, Path, dict, Path]:
    spec = {"name": "smallcnn", "params": {"channels": 8, "hidden": 64, "init_seed": 0}}  # config/config.yaml's
    domains = ["noise", "contrast", "squeeze", "thin", "shear", "blur", "shift", "thick", "mirror"][:n_cands]
    split = {**DIGITS_SPLIT, "max_train": 100} if quick else DIGITS_SPLIT
    for name in ["clean", "rotate", *domains]:
        stages.prepare(name, {"source": "digits", "domain": name}, split, tmp / "data" / name)
    pre = tmp / "pre" / "model.safetensors"
    stages.pretrain(
        spec,
        {"epochs": 1 if quick else 3, "lr": 0.003, "batch_size": 64, "seed": 0},
        tmp / "data" / "clean",
        pre,
        threads=threads,
    )
    hp = {"epochs": 1, "lr": 0.003, "batch_size": 64, "seed": 0}
    paths = {}
    for d in domains:
        paths[d] = str(tmp / "ft" / d / "model.safetensors")
        stages.finetune(spec, hp, pre, [tmp / "data" / d], paths[d], threads=threads)
    return spec, pre, paths, tmp / "data" / "rotate"


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def clip_study(
    tmp: Path,
    n_cands: int,
    threads: int,
    *,
    tiny: bool,
    precision: str,
    val: int,
    test: int,
    train: int,
    batch_size: int,
) -> tuple[dict, Path, dict, Path]:
    """Random-weight CLIP (tiny, or ViT-B-32), zero-shot heads, one real 1-epoch fine-tune per candidate."""
    import open_clip

    tmp.mkdir(parents=True, exist_ok=True)
    params = {"precision": precision, "workers": min(8, os.cpu_count() or 1)}
    if tiny:
        params.update(model="mergemix-bench-tiny", model_config=TINY_CLIP, eval_batch_size=256)
        cfg = tmp / "mergemix-bench-tiny.json"
        cfg.write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(cfg)
    else:
        params.update(model="ViT-B-32", eval_batch_size=500)
    torch.manual_seed(0)
    weights = tmp / f"random-{params['model']}.pt"
    if not weights.exists():
        torch.save(open_clip.create_model(params["model"], pretrained=None).state_dict(), weights)
    params["weights"] = str(weights)
    spec = {"name": "clip", "params": params}
    size = TINY_CLIP["vision_cfg"]["image_size"] if tiny else 224
    root = tmp / f"clip-{precision}"
    pre = root / "pre" / "model.safetensors"
    stages.fetch_pretrained(spec, pre, threads=threads)
    names = [f"c{i}" for i in range(n_cands)]
    dirs = {
        n: write_prepared(root / "data" / n, n, {"train": train, "val": 8, "test": 8}, size, 10, i + 1)
        for i, n in enumerate(names)
    }
    dirs["target"] = write_prepared(
        root / "data" / "target", "target", {"train": 8, "val": val, "test": test}, size, 10, 99
    )
    for n, d in dirs.items():
        stages.head(spec, pre, d, pre.parent / "heads" / f"{n}.safetensors", threads=threads)
    hp = {"epochs": 1, "lr": 1e-5, "batch_size": batch_size, "optimizer": "adamw", "seed": 0}
    paths = {}
    for n in names:
        paths[n] = str(root / "ft" / n / "model.safetensors")
        stages.finetune(spec, hp, pre, [dirs[n]], paths[n], threads=threads)
    return spec, pre, paths, dirs["target"]


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges and a Llama-3 style chat template (as tests/lm_tiny.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(
        models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", additional_special_tokens=special
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    return tok


LLAMA_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def llama_dir(path: Path, shape: dict, device: str = "cpu", dtype=torch.float32) -> Path:
    """A random-weight Llama-style model and the byte tokenizer, saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    # a wide initialisation keeps a toy model's greedy outputs varied; transformers' default (0.02) at real width
    init = 0.2 if shape["hidden_size"] < 512 else 0.02
    cfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=init,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def _words(rng: random.Random, chars: int) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append("".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 7))))
    return " ".join(out)


def lm_target(folder: Path, n_val: int, n_test: int, prompt_chars: int, max_new_tokens: int, seed: int = 0) -> Path:
    """A benchmarks target: 'copy <words>' prompts scored by character F1 (greedy generation)."""
    rng = random.Random(seed)
    entry = {"name": "copy", "metric": "char_f1", "max_new_tokens": max_new_tokens}
    for split, n in (("dev", n_val), ("test", n_test)):
        rows = []
        for _ in range(n):
            w = _words(rng, prompt_chars)
            rows.append({"prompt": f"copy {w}", "references": [w]})
        io.write_jsonl(folder / "src" / f"{split}.jsonl", rows)
        entry[split] = str(folder / "src" / f"{split}.jsonl")
    prepare_dataset("target", {"source": "benchmarks", "benchmarks": [entry]}, LM_SPLIT, folder / "data")
    return folder / "data"


def lm_study(tmp: Path, n_cands: int, threads: int, adapter: str, n_val: int, n_test: int, quick: bool):
    model_dir = llama_dir(tmp / "llama", LLAMA_TINY)
    params = {"model": str(model_dir), "eval_batch_size": 8}
    if adapter == "lora":
        params.update(adapter="lora", lora_r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    spec = {"name": "causal_lm", "params": params}
    pre = tmp / "pre" / "model.safetensors"
    stages.fetch_pretrained(spec, pre, threads=threads)
    hp = {"epochs": 1, "lr": 0.01, "batch_size": 4, "optimizer": "adamw", "seed": 0}
    rng = random.Random(1)
    paths = {}
    for i in range(n_cands):
        name = f"task{i}"
        rows = []
        for _ in range(8 if quick else 16):
            w = _words(rng, 12)
            q, a = [(f"copy {w}", w), (f"reverse {w}", w[::-1]), (f"upper {w}", w.upper())][i % 3]
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        io.write_jsonl(tmp / "src" / f"{name}.jsonl", rows)
        prepare_dataset(
            name, {"source": "jsonl_chat", "path": str(tmp / "src" / f"{name}.jsonl")}, LM_SPLIT, tmp / "data" / name
        )
        paths[name] = str(tmp / "ft" / name / "model.safetensors")
        stages.finetune(spec, hp, pre, [tmp / "data" / name], paths[name], threads=threads)
    target = lm_target(tmp / "target", n_val, n_test, 20, 4)
    return spec, pre, paths, target


# =============================================================================================
# batched adapters: K merged adapters per forward pass against one at a time
# =============================================================================================
def adapter_states(backend: Backend, model, k: int, seed: int = 0) -> list[dict]:
    """K adapter states around the live one (IA3 vectors near 1; LoRA with a non-zero B)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        st = {}
        for name, p in backend.merge_params(model).items():
            noise = torch.randn(p.shape, generator=gen)
            base = p.detach().float().cpu()
            st[name] = (
                base * (1 + 0.1 * noise) if "ia3_l" in name else (base + 0.01 * noise if "lora_B" in name else base)
            )
        out.append(st)
    return out


def measure_batched(label: str, spec: dict, pretrained, target_dir, k: int, args, device: str) -> dict:
    backend = get_backend(spec, threads=args.threads, device=device)
    model = backend.load_pretrained(pretrained)
    target = load_prepared(target_dir)
    states = adapter_states(backend, model, k)
    Backend.evaluate_many(backend, model, target, "val", states[:1])  # warm-up
    backend.evaluate_many(model, target, "val", states[:2])
    t_seq = t_bat = float("inf")
    for _ in range(args.repeats):
        seq, bat = [], []
        t_seq = min(
            t_seq, timed(lambda: seq.extend(Backend.evaluate_many(backend, model, target, "val", states)), device)
        )
        t_bat = min(t_bat, timed(lambda: bat.extend(backend.evaluate_many(model, target, "val", states)), device))
    diff = max(abs(a - b) for a, b in zip(seq, bat))
    cfg = model.config
    return {
        "model": label,
        "adapter": backend.params["adapter"],
        "k": k,
        "prompts": len(target.indices["val"]),
        "eval_batch_size": backend.params["eval_batch_size"],
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "sequential_s": t_seq,
        "batched_s": t_bat,
        "sequential_per_s": k / t_seq,
        "batched_per_s": k / t_bat,
        "ratio": t_seq / t_bat,
        "max_score_diff": diff,
        "scores": seq,
    }


def print_batched_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    head = (
        f"{'model':<24}{'adapter':>8}{'K':>4}{'prompts':>8}{'seq merged/s':>14}{'batched merged/s':>18}"
        f"{'batched/seq':>12}{'max |score diff|':>18}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:<24}{r['adapter']:>8}{r['k']:>4}{r['prompts']:>8}{r['sequential_per_s']:>14.2f}"
            f"{r['batched_per_s']:>18.2f}{r['ratio']:>11.2f}x{r['max_score_diff']:>18.2g}"
        )
    print(
        "  seq: Backend.evaluate_many (load each merged adapter, evaluate); batched: the backend's evaluate_many "
        "(K adapters per batched generation, eval_batch_size prompts x K rows)"
    )


# =============================================================================================
# runs
# =============================================================================================
def run_cpu(args, device: str) -> dict:
    cands = {"smallcnn": 7, "clip": 7, "causal_lm": 4}
    naive_n = {"smallcnn": 127, "clip": 20, "causal_lm": 8}
    if args.quick:
        cands, naive_n = {"smallcnn": 4, "clip": 3, "causal_lm": 2}, {"smallcnn": 15, "clip": 3, "causal_lm": 2}
    if args.candidates:
        cands = {k: args.candidates for k in cands}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "smallcnn" in args.backends:
            spec, pre, paths, target = digits_study(tmp / "digits", cands["smallcnn"], args.threads, args.quick)
            rows.append(measure("smallcnn (digits)", spec, pre, paths, target, args, device, naive_n["smallcnn"]))
        if "clip" in args.backends:
            sizes = dict(val=100, test=50, train=16) if args.quick else dict(val=500, test=500, train=64)
            spec, pre, paths, target = clip_study(
                tmp / "clip", cands["clip"], args.threads, tiny=True, precision="fp32", batch_size=16, **sizes
            )
            rows.append(measure("clip (tiny ViT, 16px)", spec, pre, paths, target, args, device, naive_n["clip"]))
        if "causal_lm" in args.backends:
            n_val, n_test = (4, 4) if args.quick else (16, 16)
            spec, pre, paths, target = lm_study(
                tmp / "lm", cands["causal_lm"], args.threads, "ia3", n_val, n_test, args.quick
            )
            note = (
                f"{cands['causal_lm']} candidates only: greedy generation of every val and test prompt per subset "
                "is slow on CPU"
            )
            rows.append(
                measure("causal_lm (tiny, IA3)", spec, pre, paths, target, args, device, naive_n["causal_lm"], note)
            )
        batched = []
        if "causal_lm" in args.backends:
            n_prompts = 8 if args.quick else 32
            target = lm_target(tmp / "lm_batched_target", n_prompts, 4, 40, 8)
            for adapter in ("ia3", "lora"):
                spec, pre, _, _ = lm_study(tmp / f"lm_b_{adapter}", 0, args.threads, adapter, 4, 4, True)
                batched.append(measure_batched("tiny llama (hidden 64)", spec, pre, target, args.k, args, device))
    print_engine_table(
        rows,
        f"merge-eval engine on {describe(device)}, torch {torch.__version__}, {args.threads} thread(s), "
        f"best of {args.repeats}",
    )
    if batched:
        print_batched_table(batched, f"batched adapters (causal_lm) on {describe(device)}")
    return {"engine": rows, "batched_adapters": batched}


def run_gpu(args, device: str) -> dict:
    tiny = args.tiny
    n = 3 if args.quick else 7
    rows = []
    batched = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        val = 100 if tiny else args.images
        for precision in ("fp32", "bf16"):
            spec, pre, paths, target = clip_study(
                tmp / "vit",
                n,
                args.threads,
                tiny=tiny,
                precision=precision,
                val=val,
                test=0,
                train=32 if tiny else 64,
                batch_size=32,
            )
            name = "tiny ViT" if tiny else "ViT-B-32"
            rows.append(
                measure(
                    f"{name} {precision}",
                    spec,
                    pre,
                    paths,
                    target,
                    args,
                    device,
                    3 if args.quick else 10,
                    note=f"{val} random {16 if tiny else 224}px val images, no test images",
                )
            )
        shape = (
            LLAMA_TINY
            if tiny
            else {
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": args.lm_layers,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
            }
        )
        on_cuda = torch.device(device).type == "cuda"
        model_dir = llama_dir(tmp / "llama", shape, device=device, dtype=torch.bfloat16 if on_cuda else torch.float32)
        n_prompts = 8 if args.quick else args.lm_prompts
        target = lm_target(
            tmp / "lm_target", n_prompts, 4, 40 if tiny else args.lm_prompt_chars, 4 if tiny else args.lm_new_tokens
        )
        for adapter in ("ia3", "lora"):
            params = {"model": str(model_dir), "eval_batch_size": args.lm_batch}
            if adapter == "lora":
                params.update(adapter="lora", lora_r=8, target_modules=["q_proj", "v_proj", "down_proj"])
            spec = {"name": "causal_lm", "params": params}
            pre = tmp / f"lm_pre_{adapter}" / "model.safetensors"
            stages.fetch_pretrained(spec, pre, threads=args.threads)
            label = f"llama {'hidden 64' if tiny else 'hidden 4096'}, {shape['num_hidden_layers']} layers"
            batched.append(measure_batched(label, spec, pre, target, args.k, args, device))
            if on_cuda:
                torch.cuda.empty_cache()
    print_engine_table(
        rows, f"merge-eval engine on {describe(device)}, torch {torch.__version__}, best of {args.repeats}"
    )
    if not tiny:
        for r in rows:
            ok = r["engine_over_floor"] <= 1.1 and r["merged_per_s"] >= 40
            print(
                f"  {r['backend']}: {r['merged_per_s']:.1f} subsets/s, engine/floor {r['engine_over_floor']:.2f} "
                f"(goal <= 1.10 and >= 40 subsets/s on an H100: {'met' if ok else 'not met'})"
            )
    print_batched_table(
        batched,
        f"batched adapters (causal_lm) on {describe(device)}; random weights, byte-level "
        f"vocabulary ({len(byte_tokenizer())} tokens), {args.lm_prompt_chars if not tiny else 40}-byte "
        f"prompts, {args.lm_new_tokens if not tiny else 4} new tokens each",
    )
    for r in batched:
        if not tiny:
            met = "met" if r["ratio"] >= 3 else "not met"
            print(f"  {r['adapter']}: {r['ratio']:.2f}x at K = {r['k']} (goal >= 3x on a GPU: {met})")
    return {"engine": rows, "batched_adapters": batched}


def describe(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the GPU benchmark (ViT-B-32 fp32/bf16, Llama-width adapters)")
    p.add_argument("--device", default=None, help="default: cpu; with --gpu: cuda")
    p.add_argument("--tiny", action="store_true", help="with --gpu: toy model sizes (checks the code paths on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer candidates, examples and repeats (a smoke run)")
    p.add_argument(
        "--backends", nargs="+", default=["smallcnn", "clip", "causal_lm"], choices=["smallcnn", "clip", "causal_lm"]
    )
    p.add_argument("--candidates", type=int, default=None, help="candidates for every CPU backend (default 7, 7, 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes, best of (default 2; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU, all cores on CUDA)")
    p.add_argument("--k", type=int, default=8, help="merged adapters per batched forward")
    p.add_argument("--images", type=int, default=2000, help="--gpu: val images of the ViT-B-32 target")
    p.add_argument("--lm-layers", type=int, default=4, help="--gpu: decoder layers of the Llama-width model")
    p.add_argument("--lm-prompts", type=int, default=64, help="--gpu: val prompts of the adapter benchmark")
    p.add_argument("--lm-prompt-chars", type=int, default=200, help="--gpu: prompt length (byte tokens)")
    p.add_argument("--lm-new-tokens", type=int, default=16, help="--gpu: generated tokens per prompt")
    p.add_argument("--lm-batch", type=int, default=8, help="--gpu: prompts per generation (eval_batch_size)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if args.gpu else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(
            f"engine.py: device {device!r} needs CUDA, but torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}). Run --gpu on a GPU machine; to check its code paths here: "
            "python benchmarks/engine.py --gpu --device cpu --tiny --quick",
            file=sys.stderr,
        )
        return 2
    if args.gpu and torch.device(device).type != "cuda" and not args.tiny:
        print("engine.py: --gpu on a CPU device is only meaningful with --tiny (a code-path check)", file=sys.stderr)
        return 2
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.threads = args.threads or ((os.cpu_count() or 1) if torch.device(device).type == "cuda" else 1)
    logging.basicConfig(level=logging.ERROR)  # open_clip warns that the random models have no pre-trained weights
    warnings.filterwarnings("ignore", category=FutureWarning)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ[var] = "1"
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    figures = run_gpu(args, device) if args.gpu else run_cpu(args, device)
    figures.update(device=describe(device), torch=torch.__version__, threads=args.threads, repeats=args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
