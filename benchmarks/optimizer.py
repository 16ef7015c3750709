#!/usr/bin/env python3
"""mergemix's own AdamW (``backends/training.py``) against ``torch.optim.AdamW``, side by side.

Two costs matter, and they pull in opposite directions:

* start-up: a fresh process that builds and steps a ``torch.optim`` optimizer imports TorchDynamo
  (about 2 s here), which dominated the short fine-tuning jobs of the embedded study; ours does not;
* step time on a large model: ``torch.optim`` updates all tensors with multi-tensor (foreach)
  kernels, ours loops over the tensors in Python, which costs more kernel launches on a GPU.

    python benchmarks/optimizer.py                 # ViT-B/32 image-encoder shapes, cuda if available
    python benchmarks/optimizer.py --device cpu --steps 5

torch.optim picks multi-tensor kernels for CUDA tensors and a per-tensor loop on CPU; so does ours.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

STARTUP = """
import time, torch
t = time.perf_counter()
p = [torch.nn.Parameter(torch.randn(64, 64))]
p[0].grad = torch.randn(64, 64)
if {ours}:
    from mergemix.backends.training import Optimizer
    opt = Optimizer(p, "adamw", lr=1e-3, weight_decay=0.1)
else:
    opt = torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1)
opt.step()
print(time.perf_counter() - t)
"""


def startup(ours: bool) -> float:
    """Seconds from `import torch` done to one optimizer step, in a fresh interpreter (median of 3)."""
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", STARTUP.format(ours=ours)], capture_output=True, text=True,
                             check=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return sorted(runs)[1]


def vit_b32_shapes():
    """The parameter shapes of open_clip's ViT-B/32 image encoder (12 blocks, width 768)."""
    w = 768
    shapes = [(w, 3, 32, 32), (w,), (50, w), (w,), (w,)]
    for _ in range(12):
        shapes += [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,)]
    return shapes + [(w,), (w,), (w, 512)]


def step_times(device, steps: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds per AdamW step of each implementation, measured in alternating rounds."""
    import torch

    sys.path.insert(0, SRC)
    from mergemix.backends.training import Optimizer

    def make(kind):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in vit_b32_shapes()]
        for p in params:
            p.grad = torch.randn_like(p)
        if kind == "torch.optim":
            return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
        return Optimizer(params, "adamw", lr=1e-5, weight_decay=0.1, foreach=kind == "ours, multi-tensor")

    opts = {k: make(k) for k in ("ours, per tensor", "ours, multi-tensor", "torch.optim")}
    times = {k: [] for k in opts}
    for k, opt in opts.items():
        opt.step()  # warm-up
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
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    ours, theirs = startup(True), startup(False)
    print(f"start-up to first step, fresh process: ours {ours:.3f} s, torch.optim {theirs:.3f} s, "
          f"ratio torch.optim/ours {theirs / ours:.1f}x")
    n = len(vit_b32_shapes())
    t = step_times(device, args.steps)
    ref = t["torch.optim"]
    default = "ours, multi-tensor" if device.type == "cuda" else "ours, per tensor"
    print(f"AdamW step on ViT-B/32 image-encoder shapes ({n} tensors, {device}; median of 3 alternating rounds):")
    for k, v in t.items():
        mark = "  <- mergemix's default here" if k == default else ""
        print(f"  {k:20s} {v * 1e3:8.2f} ms   ratio to torch.optim {v / ref:5.2f}x{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
