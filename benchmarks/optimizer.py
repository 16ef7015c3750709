#!/usr/bin/env python3
"""What ``torch.optim`` (the training loop's optimizers, ``backends/training.py``) costs, side by side.

mergemix once carried its own AdamW/Adam/SGD because the first step of a ``torch.optim`` optimizer
imports TorchDynamo (1.4-2 s), which dominated one-fine-tune-per-process jobs. Fine-tunes are now
packed (16 ``smallcnn`` fine-tunes a job), so this script measures whether that cost is still felt:

* start-up: seconds from ``import torch`` done to the first AdamW step in a fresh interpreter (the
  one-time import), against a second optimizer's first step in the same process;
* jobs: one real fine-tune of the embedded study (``config/config.yaml``'s backend, split and
  ``finetune``, 1 thread, on 1 dataset: the shortest, and on 4: about the mean mixture), and an
  interpreter's start with ``import torch``; from these, the time of a packed job of ``pack_size``
  fine-tunes and of a one-fine-tune job with and without the import, as ratios;
* step time: AdamW steps of torch.optim's implementations (the default, which torch picks: a loop
  over the tensors on CPU, multi-tensor ``foreach`` kernels on CUDA; ``foreach``; ``fused``) on the
  smallcnn's tensors and on ViT-B/32 image-encoder shapes (152 tensors), as ratios to the default.

    python benchmarks/optimizer.py                 # cuda if available
    python benchmarks/optimizer.py --device cpu --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")

STARTUP = """
import time, torch
t = time.perf_counter()
p = [torch.nn.Parameter(torch.randn(64, 64))]
p[0].grad = torch.randn(64, 64)
opt = torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1)
opt.step()
first = time.perf_counter() - t
t = time.perf_counter()
opt = torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1)
opt.step()
print(first, time.perf_counter() - t)
"""


def fresh(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    ).stdout


def startup(runs: int = 3) -> tuple[float, float, float]:
    """Median over fresh interpreters of: seconds to the first AdamW step after ``import torch``,
    to a second optimizer's first step in that process, and the interpreter's start with ``import torch``."""
    first, second, start = [], [], []
    for _ in range(runs):
        a, b = map(float, fresh(STARTUP).split())
        first.append(a)
        second.append(b)
        t = time.perf_counter()
        fresh("import torch")
        start.append(time.perf_counter() - t)
    return statistics.median(first), statistics.median(second), statistics.median(start)


def finetune_seconds(folder: Path, datasets: list[str], runs: int = 3) -> float:
    """Median seconds of one fine-tune of the embedded study on the union of ``datasets`` (1 thread)."""
    sys.path.insert(0, SRC)
    from mergemix import stages
    from mergemix.backends import get_backend
    from mergemix.config import load_yaml
    from mergemix.data.prepared import load_prepared

    cfg = load_yaml(ROOT / "config" / "config.yaml")
    data = []
    for name in datasets:
        if not (folder / name).exists():
            stages.prepare(name, cfg["datasets"][name], cfg["split"], folder / name)
        data.append(load_prepared(folder / name))
    backend = get_backend(cfg["backend"], threads=1)
    backend.finetune(backend.create(), data, {**cfg["finetune"], "epochs": 1})  # warm-up (data caches, kernels)
    times = []
    for _ in range(runs):
        model = backend.create()
        t = time.perf_counter()
        backend.finetune(model, data, cfg["finetune"])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def vit_b32_shapes(blocks: int = 12):
    """The parameter shapes of open_clip's ViT-B/32 image encoder (12 blocks, width 768; fewer
    ``blocks`` only for a smoke run)."""
    w = 768
    shapes = [(w, 3, 32, 32), (w,), (50, w), (w,), (w,)]
    for _ in range(blocks):
        shapes += [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,)]
    return shapes + [(w,), (w,), (w, 512)]


def smallcnn_shapes():
    """The parameter shapes of the embedded study's smallcnn (channels 8, hidden 64, 16 px)."""
    return [(8, 1, 3, 3), (8,), (16, 8, 3, 3), (16,), (16, 16, 3, 3), (16,), (64, 256), (64,), (10, 64), (10,)]


IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_times(shapes, device, steps: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds per AdamW step of each torch.optim implementation, in alternating rounds
    (an implementation torch does not offer on this device is left out)."""
    import torch

    def make(kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, **kw)
        opt.step()  # warm-up; raises where the implementation is not supported
        return opt

    opts = {}
    for k, kw in IMPLEMENTATIONS.items():
        try:
            opts[k] = make(kw)
        except (RuntimeError, ValueError) as e:
            print(f"  ({k}: not available on {device}: {str(e).splitlines()[0][:100]})")
    times = {k: [] for k in opts}
    for _ in range(rounds):
        for k, opt in opts.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None, help="ViT-B/32 steps per round (default: 20 on cuda, 5 on cpu)")
    ap.add_argument("--pack", type=int, default=16, help="fine-tunes per packed job (smallcnn's pack_size)")
    ap.add_argument("--runs", type=int, default=3, help="fresh interpreters and fine-tunes per median (1: a smoke run)")
    ap.add_argument(
        "--vit-blocks", type=int, default=12, help="ViT-B/32 blocks in the step-time table (12; fewer: a smoke run)"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = args.steps or (20 if device.type == "cuda" else 5)

    first, second, start = startup(args.runs)
    print(
        f"torch.optim start-up, fresh interpreter after `import torch` (median of {args.runs}): first AdamW step {first:.3f} s "
        f"(imports TorchDynamo), a second optimizer's first step {second * 1e3:.2f} ms: ratio first/second "
        f"{first / second:.0f}x, once per process"
    )

    with tempfile.TemporaryDirectory() as d:
        one = finetune_seconds(Path(d), ["rotate"], args.runs)
        four = finetune_seconds(Path(d), ["rotate", "noise", "thin", "shear"], args.runs)
    print(
        f"embedded-study jobs (1 thread; interpreter start with `import torch` {start:.2f} s; "
        f"one fine-tune: 1 dataset {one:.2f} s, 4 datasets {four:.2f} s):"
    )
    for label, ft in (("1 dataset", one), ("4 datasets", four)):
        for n in (args.pack, 1):
            job = start + n * ft
            kind = f"packed job, {n} fine-tunes" if n > 1 else "one fine-tune a job"
            print(
                f"  {kind:26s} ({label:10s}) {job:7.2f} s, with torch.optim's import {job + first:7.2f} s: "
                f"ratio {(job + first) / job:.3f}x"
            )

    shown = {
        "smallcnn (10 tensors)": (smallcnn_shapes(), 200),
        f"ViT-B/32 ({len(vit_b32_shapes(args.vit_blocks))} tensors)": (vit_b32_shapes(args.vit_blocks), steps),
    }
    for name, (shapes, n) in shown.items():
        t = step_times(shapes, device, n)
        print(f"torch.optim AdamW step on {name}, {device} (median of 3 alternating rounds of {n} steps):")
        ref = t["default"]
        for k, v in t.items():
            print(
                f"  {k:8s} {v * 1e3:9.3f} ms   ratio to torch.optim default {v / ref:5.2f}x"
                + ("  <- mergemix's (torch picks)" if k == "default" else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
