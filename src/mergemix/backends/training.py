"""A plain, seeded training loop shared by the torch backends."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("mergemix.train")


def make_optimizer(params, hp: dict) -> torch.optim.Optimizer:
    name = hp.get("optimizer", "adamw")
    lr, wd = float(hp["lr"]), float(hp.get("weight_decay", 0.0))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(hp.get("momentum", 0.9)))
    raise ValueError(f"unknown optimizer {name!r}; allowed: adamw, adam, sgd")


def lr_factor(step: int, total: int, hp: dict) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) for the configured schedule."""
    warmup = int(round(float(hp.get("warmup_frac", 0.0)) * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    schedule = hp.get("schedule", "constant")
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}; allowed: constant, cosine, linear")


def fit(
    params,
    n_samples: int,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    hp: dict,
    log_name: str = "",
) -> dict:
    """Minimise ``step_loss(batch_indices)`` over seeded shuffled mini-batches.

    Returns the mean training loss of the last epoch and the number of steps taken.
    """
    params = [p for p in params if p.requires_grad]
    opt = make_optimizer(params, hp)
    bs = int(hp["batch_size"])
    epochs = int(hp["epochs"])
    steps_per_epoch = max(1, math.ceil(n_samples / bs))
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, hp))
    gen = torch.Generator().manual_seed(int(hp.get("seed", 0)))
    clip = hp.get("grad_clip")
    t0 = time.time()
    last = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(n_samples, generator=gen)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * bs : (s + 1) * bs]
            loss = step_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            opt.step()
            sched.step()
            losses.append(loss.item())
        last = float(np.mean(losses))
        log.info("%s epoch %d/%d loss %.4f (%.1fs)", log_name, epoch + 1, epochs, last, time.time() - t0)
    return {"train_loss": last, "steps": total, "train_seconds": round(time.time() - t0, 3)}
