#!/usr/bin/env python3
"""Throughput of the CLIP backend, with the design choices it rests on measured side by side.

Runs the backend's own code paths (``finetune``, ``evaluate``, the merge-eval engine) on a randomly
initialised model and synthetic uint8 images, so nothing is downloaded:

* training images/s at the study's batch size (default 128; bf16 autocast on GPU),
* evaluation images/s, first call (cuts the split from the memory-mapped array and moves it to the
  device) against later calls (the split is cached as one device tensor): the ratio is what caching
  saves each of the 2^N - 1 merged-model evaluations of a merge-eval job,
* seconds per merged model evaluated on the target's validation split (default 2,000 images): the
  engine (fine-tuned models read once, stacked, merged into one live model) against the plain way
  (read every member's file, average the state dicts, load them, evaluate), and their ratio.

    python benchmarks/clip_throughput.py                  # ViT-B-32 (quickgelu), on the GPU if any
    python benchmarks/clip_throughput.py --tiny           # a 16 px, 2-layer ViT: checks the script on CPU

The figures for the paper's study come from a GPU run without ``--tiny``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mergemix import io, subsets  # noqa: E402
from mergemix.backends import get_backend  # noqa: E402
from mergemix.data.prepared import load_prepared  # noqa: E402
from mergemix.merge_eval import MergeEvaluator  # noqa: E402

TINY = {
    "name": "mergemix-bench-tiny",
    "config": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def write_prepared(folder: Path, name: str, sizes: dict, size: int, classes: int, seed: int) -> Path:
    """A prepared dataset in the pipeline's format: random uint8 images [N, 3, S, S] and labels."""
    rng = np.random.default_rng(seed)
    n = sum(sizes.values())
    x = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int64)
    sha = io.save_arrays(folder / "arrays.safetensors", {"x": x, "y": y})
    data = {
        "file": "arrays.safetensors",
        "sha256": sha,
        "bytes": (folder / "arrays.safetensors").stat().st_size,
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in {"x": x, "y": y}.items()},
    }
    bounds = np.cumsum([0, *sizes.values()])
    indices = {k: list(range(int(a), int(b))) for k, a, b in zip(sizes, bounds[:-1], bounds[1:])}
    io.write_json(
        folder / "splits.json",
        {
            "name": name,
            "spec": {"source": "synthetic", "templates": ["a photo of a {}."]},
            "split": {"seed": seed},
            "classes": [f"class {i}" for i in range(classes)],
            "sizes": {k: len(v) for k, v in indices.items()},
            "indices": indices,
            "info": {},
            "data": data,  # load_prepared checks the data file against it
        },
    )
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny ViT (CPU smoke run) instead of ViT-B-32")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-images", type=int, default=None, help="default: 20 batches (2 on --tiny)")
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--models", type=int, default=7, help="fine-tuned models to merge (the study's 7 candidates)")
    ap.add_argument("--merged", type=int, default=6, help="merged models timed per method")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = os.cpu_count() or 1
    n_train = args.train_images or args.batch_size * (2 if args.tiny else 20)

    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = {"precision": args.precision, "eval_batch_size": 512, "workers": min(8, threads)}
        if args.tiny:
            cfg_file = tmp / f"{TINY['name']}.json"
            cfg_file.write_text(json.dumps(TINY["config"]))
            open_clip.add_model_config(cfg_file)
            params.update(model=TINY["name"], model_config=TINY["config"])
        else:
            params.update(model="ViT-B-32-quickgelu")
        torch.manual_seed(0)
        clip = open_clip.create_model(params["model"], pretrained=None)
        size = int(
            clip.visual.image_size[0] if isinstance(clip.visual.image_size, (tuple, list)) else clip.visual.image_size
        )
        torch.save(clip.state_dict(), tmp / "random.pt")
        n_params = sum(p.numel() for p in clip.visual.parameters())
        del clip
        params["weights"] = str(tmp / "random.pt")

        backend = get_backend({"name": "clip", "params": params}, threads=threads, device=str(device))
        pre = tmp / "pretrained" / "model.safetensors"
        backend.fetch_pretrained(pre)
        warm = load_prepared(
            write_prepared(
                tmp / "warm", "warm", {"train": 2 * args.batch_size, "val": 8, "test": 8}, size, args.classes, 1
            )
        )
        train = load_prepared(
            write_prepared(tmp / "train", "train", {"train": n_train, "val": 8, "test": 8}, size, args.classes, 2)
        )
        target = load_prepared(
            write_prepared(
                tmp / "target", "target", {"train": 8, "val": args.val_images, "test": 8}, size, args.classes, 3
            )
        )
        backend.load_pretrained(pre)  # heads live beside the pre-trained model
        for d in (warm, train, target):
            backend.write_head(pre, d, backend.head_path(d.name))

        hp = {
            "epochs": 1,
            "lr": 1e-5,
            "batch_size": args.batch_size,
            "optimizer": "adamw",
            "weight_decay": 0.1,
            "schedule": "cosine",
            "warmup_frac": 0.05,
            "grad_clip": 1.0,
            "seed": 0,
        }
        model = backend.load_pretrained(pre)
        backend.finetune(model, [warm], hp)  # warm-up: kernels, autocast, allocator
        _, t_train = timed(lambda: backend.finetune(model, [train], hp), device)

        model = backend.load_pretrained(pre)
        backend.evaluate(model, warm, "val")  # warm-up
        _, t_first = timed(lambda: backend.evaluate(model, target, "val"), device)
        t_cached = min(timed(lambda: backend.evaluate(model, target, "val"), device)[1] for _ in range(3))

        # fine-tuned stand-ins: the pre-trained weights plus noise (merge cost does not depend on values)
        state = backend.state_to_save(model)
        paths = {}
        for i in range(args.models):
            g = torch.Generator().manual_seed(i)
            noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}
            paths[f"d{i}"] = str(tmp / "models" / f"d{i}.safetensors")
            provenance = {  # what a real fine-tune records (the engine checks it before merging)
                "pretrained_sha256": io.read_json(io.manifest_path(pre))["sha256"],
                "data": [{"name": f"d{i}", "sha256": "stand-in"}],
                "hyperparameters": hp,
            }
            io.save_model(paths[f"d{i}"], noisy, {"kind": "finetuned", "backend": backend.describe(), **provenance})
        names = sorted(paths)
        masks = subsets.all_masks(len(names))[-args.merged :]  # the largest subsets: the most to merge

        engine, t_setup = timed(lambda: MergeEvaluator(backend, pre, paths), device)

        def engine_run():
            for m in masks:
                engine.load_subset(m)
                backend.evaluate(engine.model, target, "val")

        _, t_engine = timed(engine_run, device)

        plain_model = backend.load_pretrained(pre)

        def plain_run():
            for m in masks:
                members = subsets.mask_to_names(m, names)
                states = [io.load_model(paths[n])[0] for n in members]
                avg = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
                backend.load_state(plain_model, avg)
                backend.evaluate(plain_model, target, "val")

        _, t_plain = timed(plain_run, device)

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    fig = {
        "model": params["model"],
        "image_encoder_params": n_params,
        "image_size": size,
        "device": dev,
        "precision": args.precision if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "threads": threads,
        "batch_size": args.batch_size,
        "train_images_per_s": n_train / t_train,
        "eval_images_per_s_first_call": args.val_images / t_first,
        "eval_images_per_s_cached": args.val_images / t_cached,
        "s_per_merged_model_engine": t_engine / len(masks),
        "s_per_merged_model_plain": t_plain / len(masks),
        "engine_setup_s": t_setup,
        "models": args.models,
        "val_images": args.val_images,
    }
    print(
        f"{fig['model']} image encoder ({n_params / 1e6:.1f}M params, {size} px) on {dev}, {fig['precision']}, "
        f"torch {torch.__version__}, {threads} threads"
    )
    print(
        f"training (batch {args.batch_size}, {n_train} images, 1 epoch incl. optimizer): "
        f"{fig['train_images_per_s']:8.1f} images/s"
    )
    print(f"evaluation, first call (memory map -> device tensor): {fig['eval_images_per_s_first_call']:8.1f} images/s")
    print(
        f"evaluation, cached split tensor:                      {fig['eval_images_per_s_cached']:8.1f} images/s"
        f"   ratio cached/first {t_first / t_cached:5.2f}x"
    )
    print(f"merged model on {args.val_images} val images, {args.models} candidates, largest {len(masks)} subsets:")
    print(
        f"  engine (models read once, merged into one live model): {fig['s_per_merged_model_engine']:8.3f} s each"
        f" (+{t_setup:.2f} s once to read {args.models} models)"
    )
    print(
        f"  plain (read members' files, average, load, evaluate):  {fig['s_per_merged_model_plain']:8.3f} s each"
        f"   ratio plain/engine {t_plain / t_engine:5.2f}x"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
