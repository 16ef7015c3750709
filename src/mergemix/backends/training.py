"""A plain, seeded training loop shared by the torch backends."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

log = logging.getLogger("mergemix.train")


class TrainingDiverged(RuntimeError):
    """The training loss or the weights became NaN or infinite: the job stops instead of saving them."""


class Optimizer:
    """AdamW, Adam and SGD with momentum, numerically the same updates as ``torch.optim``'s.

    Written out here because constructing a ``torch.optim`` optimizer imports TorchDynamo, about
    two seconds per process, which dominates the short fine-tuning jobs of small studies. Like
    ``torch.optim``'s default, Adam and AdamW update all tensors at once with multi-tensor kernels
    on a GPU and a tensor at a time on CPU (``benchmarks/optimizer.py`` compares them).
    """

    def __init__(self, params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 betas=(0.9, 0.999), eps: float = 1e-8, foreach: bool | None = None):
        if name not in ("adamw", "adam", "sgd"):
            raise ValueError(f"unknown optimizer {name!r}; allowed: adamw, adam, sgd")
        self.params = [p for p in params if p.requires_grad]
        self.name, self.base_lr, self.lr, self.wd = name, lr, lr, weight_decay
        self.momentum, self.betas, self.eps = momentum, betas, eps
        self.steps = [0] * len(self.params)
        self.foreach = foreach  # multi-tensor kernels; None: on CUDA tensors only, as torch.optim does
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params] if name != "sgd" else None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        for i in live:  # like torch.optim, each tensor counts its own updates (bias corrections)
            self.steps[i] += 1
        if self.name == "sgd":
            self._sgd(live)
        elif self.foreach is True or (self.foreach is None and self.params[live[0]].is_cuda):
            self._adam(live)
        else:
            self._adam_loop(live)

    def _sgd(self, live) -> None:
        lr, wd = self.lr, self.wd
        for i in live:
            p = self.params[i]
            g = p.grad
            if wd:
                g = g.add(p, alpha=wd)
            buf = self.m[i]
            if self.steps[i] == 1:
                buf.copy_(g)
            else:
                buf.mul_(self.momentum).add_(g)
            p.add_(buf, alpha=-lr)

    def _corrections(self, i) -> tuple[float, float]:
        b1, b2 = self.betas
        return 1 - b1 ** self.steps[i], math.sqrt(1 - b2 ** self.steps[i])

    def _adam(self, live) -> None:
        """One update of every tensor at once (multi-tensor ``_foreach`` kernels: a few launches per
        step instead of a few per tensor, which matters for a ViT's ~150 tensors on a GPU)."""
        lr, wd = self.lr, self.wd
        b1, b2 = self.betas
        ps = [self.params[i] for i in live]
        gs = [p.grad for p in ps]
        ms, vs = [self.m[i] for i in live], [self.v[i] for i in live]
        corr = [self._corrections(i) for i in live]
        if self.name == "adamw":
            torch._foreach_mul_(ps, 1 - lr * wd)
        elif wd:
            gs = torch._foreach_add(gs, ps, alpha=wd)
        torch._foreach_lerp_(ms, gs, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [c2 for _, c2 in corr])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / c1 for c1, _ in corr])

    def _adam_loop(self, live) -> None:
        """The same update a tensor at a time (faster on CPU, where there are no launches to save)."""
        lr, wd = self.lr, self.wd
        b1, b2 = self.betas
        for i in live:
            p = self.params[i]
            g = p.grad
            if self.name == "adamw":
                p.mul_(1 - lr * wd)
            elif wd:
                g = g.add(p, alpha=wd)
            c1, c2 = self._corrections(i)
            self.m[i].lerp_(g, 1 - b1)
            self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (self.v[i].sqrt() / c2).add_(self.eps)
            p.addcdiv_(self.m[i], denom, value=-lr / c1)


def make_optimizer(params, hp: dict) -> Optimizer:
    return Optimizer(
        params, hp.get("optimizer", "adamw"), float(hp["lr"]), float(hp.get("weight_decay", 0.0)),
        float(hp.get("momentum", 0.9)),
    )


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


def mixture_probabilities(groups: Sequence[tuple[str, int]], weights: Mapping[str, float]) -> tuple[torch.Tensor, int]:
    """Per-example draw probabilities for a weighted mixture, and the draws per epoch.

    ``groups``: the training sets in the order they are concatenated, as (name, size); ``weights``:
    each set's share of the draws (any non-negative numbers, normalised; a set not named gets 0).
    Every example of set d is drawn with probability ``w_d / n_d``, so over an epoch set d supplies
    a share ``w_d`` of the examples. An epoch has as many draws as the sets with a weight > 0 have
    examples: the same number of steps as fine-tuning on their plain union (a fixed budget).
    """
    names = [n for n, _ in groups]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"mixture_weights name {', '.join(unknown)}, not among the training sets {', '.join(names)}")
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixture_weights must be finite, >= 0 and not all 0, got {dict(weights)}")
    if any(size == 0 and wi > 0 for (_, size), wi in zip(groups, w)):
        raise ValueError(f"mixture_weights give weight to an empty training set: {dict(groups)}")
    w = w / w.sum()
    probs = np.concatenate([np.full(size, wi / size if size else 0.0) for (_, size), wi in zip(groups, w)])
    draws = int(sum(size for (_, size), wi in zip(groups, w) if wi > 0))
    return torch.from_numpy(probs), draws


def fit(
    params,
    n_samples: int,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    hp: dict,
    log_name: str = "",
    backward_done: bool = False,
    groups: Sequence[tuple[str, int]] | None = None,
) -> dict:
    """Minimise ``step_loss(batch_indices)`` over seeded shuffled mini-batches.

    With ``backward_done``, ``step_loss`` computes the gradients itself (e.g. accumulated over
    micro-batches) and returns the batch loss as a plain number; gradients are zeroed before it.
    With ``hp["mixture_weights"]`` ({dataset: weight}) the batches are drawn with replacement in
    those proportions (:func:`mixture_probabilities`; ``groups`` names the concatenated sets).
    Returns the mean training loss of the last epoch and the number of steps taken.
    """
    params = [p for p in params if p.requires_grad]
    opt = make_optimizer(params, hp)
    bs = int(hp["batch_size"])
    epochs = int(hp["epochs"])
    probs = None
    if hp.get("mixture_weights"):
        if groups is None or sum(size for _, size in groups) != n_samples:
            raise ValueError(f"{log_name or 'training'}: mixture_weights need the training sets' names and sizes (groups)")
        probs, draws = mixture_probabilities(groups, hp["mixture_weights"])
    steps_per_epoch = max(1, math.ceil((n_samples if probs is None else draws) / bs))
    total = steps_per_epoch * epochs
    gen = torch.Generator().manual_seed(int(hp.get("seed", 0)))
    clip = hp.get("grad_clip")
    t0 = time.time()
    last = float("nan")
    for epoch in range(epochs):
        if probs is None:
            order = torch.randperm(n_samples, generator=gen)
        else:  # weighted mixture: draws with replacement, seeded like the shuffle
            order = torch.multinomial(probs, draws, replacement=True, generator=gen)
        losses = []
        for s in range(steps_per_epoch):
            opt.lr = opt.base_lr * lr_factor(epoch * steps_per_epoch + s, total, hp)
            idx = order[s * bs : (s + 1) * bs]
            if backward_done:
                opt.zero_grad()
                loss = step_loss(idx)
            else:
                loss = step_loss(idx)
                opt.zero_grad()
                loss.backward()
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(value):
                step = epoch * steps_per_epoch + s + 1
                raise TrainingDiverged(
                    f"{log_name or 'training'}: the training loss is {value} at step {step} of {total} (epoch {epoch + 1}) "
                    f"with learning rate {opt.lr:g}: training diverged; lower the learning rate (lr of finetune or "
                    "pretrain.hparams) or set grad_clip"
                )
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            opt.step()
            losses.append(value)
        last = float(np.mean(losses))
        bad = next((i for i, p in enumerate(params) if not bool(torch.isfinite(p).all())), None)
        if bad is not None:  # a finite loss can still come with an overflowing update
            raise TrainingDiverged(
                f"{log_name or 'training'}: the weights hold NaN or infinite values after epoch {epoch + 1} "
                f"(step {(epoch + 1) * steps_per_epoch}, learning rate {opt.lr:g}): training diverged; lower the learning "
                "rate (lr of finetune or pretrain.hparams) or set grad_clip"
            )
        log.info("%s epoch %d/%d loss %.4f (%.1fs)", log_name, epoch + 1, epochs, last, time.time() - t0)
    return {"train_loss": last, "steps": total, "train_seconds": round(time.time() - t0, 3)}
