"""A plain, seeded training loop shared by the torch backends.

:func:`fit` can save its whole state (:class:`Checkpoint`) every few steps or minutes and resume
from it when the job is rerun after a kill (a preempted or requeued job): the trained weights are
then the same bytes as those of an uninterrupted run (on CPU; on a GPU as far as its kernels are
deterministic). While training it logs its progress (steps done, rate, ETA, recent loss) at least
every :data:`PROGRESS_SECONDS` and at the end of each epoch, with a progress bar on a terminal.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

log = logging.getLogger("mergemix.train")

PROGRESS_SECONDS = 30.0  # a progress line in the log at least this often (and after every epoch)
CHECKPOINT_FILE = "state.safetensors"  # inside the checkpoint folder (Checkpoint.path)
CHECKPOINT_FORMAT = 1
_META_KEY = "mergemix_checkpoint"


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


@dataclasses.dataclass
class Checkpoint:
    """Where and how often :func:`fit` saves the state it resumes from after a kill.

    ``path``: a folder, created when the first checkpoint is saved; it holds one file,
    :data:`CHECKPOINT_FILE` (safetensors: the trained parameters, the optimizer's moments and the
    random states as tensors; the rest, JSON, in its metadata), replaced atomically on each save.
    ``every_steps`` / ``every_seconds``: save after a step when that many steps have been taken
    (counted from the start of training) / seconds have passed since the last save (None or 0:
    not by that rule; both off: nothing is saved, but an existing checkpoint is still resumed).
    ``fingerprint``: what identifies the run besides what :func:`fit` knows itself (its
    hyperparameters, data size and groups, the parameters' shapes): the model, data and code it
    trains, JSON values; a checkpoint saved with any other fingerprint is never resumed.
    ``keep``: leave the checkpoint when training ends (the caller removes it with
    :func:`remove_checkpoint` once what it derives from the weights is saved); otherwise
    :func:`fit` removes it."""

    path: str | os.PathLike
    every_steps: int | None = None
    every_seconds: float | None = None
    fingerprint: Mapping | None = None
    keep: bool = False

    @classmethod
    def of(cls, spec) -> "Checkpoint | None":
        """A :class:`Checkpoint` from itself, a dict of its fields, or None."""
        if spec is None or isinstance(spec, Checkpoint):
            return spec
        if isinstance(spec, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(spec) - fields)
            if unknown:
                raise ValueError(f"checkpoint: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
            return cls(**spec)
        raise TypeError(f"checkpoint: expected a Checkpoint, a dict or None, got {type(spec).__name__}")

    @property
    def file(self) -> Path:
        return Path(self.path) / CHECKPOINT_FILE

    def due(self, step: int, since_save: float) -> bool:
        """Whether to save after ``step`` (1-based, counted over the whole run)."""
        if self.every_steps and step % int(self.every_steps) == 0:
            return True
        return bool(self.every_seconds) and since_save >= float(self.every_seconds)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mergemix_checkpoint", default=None)


@contextlib.contextmanager
def checkpointing(checkpoint) -> Iterator[None]:
    """The checkpoint (a :class:`Checkpoint`, a dict or None) of the next :func:`fit` called without
    one in this context: lets a stage checkpoint a backend's ``finetune`` without the backend
    passing it on. Only the first such call uses it (a second training in the same context would
    otherwise resume from the first one's state)."""
    token = _ACTIVE.set([Checkpoint.of(checkpoint)])
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _take_active() -> Checkpoint | None:
    holder = _ACTIVE.get()
    if not holder:
        return None
    ck, holder[0] = holder[0], None
    return ck


def remove_checkpoint(path) -> None:
    """Delete a checkpoint folder written by :func:`fit` (its file and any temporary file a kill
    during a save left in it); anything else found there is left, with a log line."""
    folder = Path(path)
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        if f.name == CHECKPOINT_FILE or (f.name.startswith(f".{CHECKPOINT_FILE}.") and f.name.endswith(".tmp")):
            f.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        log.warning("checkpoint folder %s holds other files; it was left in place", folder)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(ck: Checkpoint, params, hp: dict, n_samples: int, groups, steps_per_epoch: int, total: int) -> dict:
    """Each part of what identifies a run, as a short digest (the log names the parts that differ)."""
    parts = {
        "hyperparameters": hp,
        "training": {"n_samples": int(n_samples), "groups": [[str(n), int(k)] for n, k in groups or []],
                     "steps_per_epoch": steps_per_epoch, "total_steps": total},
        "parameters": [[list(p.shape), str(p.dtype)] for p in params],
        **{f"run.{k}": v for k, v in (ck.fingerprint or {}).items()},
    }
    return {k: _digest(v)[:16] for k, v in parts.items()}


def _save_checkpoint(ck: Checkpoint, fingerprint: dict, params, opt: "Optimizer", epoch_gen_state: torch.Tensor,
                     meta: dict) -> None:
    """One atomic save (temporary file, fsync, rename) of everything :func:`_resume` restores."""
    from safetensors.torch import save_file

    from mergemix import io

    tensors = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().cpu().contiguous()
        tensors[f"opt.m.{i}"] = opt.m[i].detach().cpu().contiguous()
        if opt.v is not None:
            tensors[f"opt.v.{i}"] = opt.v[i].detach().cpu().contiguous()
    tensors["rng.order"] = epoch_gen_state.clone()  # the shuffle generator at the start of the epoch
    tensors["rng.torch"] = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    for k, st in enumerate(cuda):
        tensors[f"rng.cuda.{k}"] = st.cpu()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        **meta, "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "optimizer": opt.name,
        "optimizer_steps": list(opt.steps), "cuda_rng_devices": len(cuda),
        "numpy_rng": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python_rng": [version, list(internal), gauss_next],
    }
    with io.atomic_path(ck.file) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        with open(tmp, "rb") as f:  # on disk before the rename, so a node crash cannot leave an empty file
            os.fsync(f.fileno())


def _load_checkpoint(ck: Checkpoint, fingerprint: dict, params, opt: "Optimizer", name: str):
    """The tensors and JSON of a checkpoint of this very run, or None (with a log line saying why
    a checkpoint that is there is not resumed: another run's, or unreadable)."""
    from mergemix import io

    path = ck.file
    if not path.exists():
        return None
    try:
        meta = json.loads(io.arrays_metadata(path)[_META_KEY])
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: not resuming from checkpoint %s, it cannot be read (%s); training from the start", name, path, e)
        return None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("fingerprint") != fingerprint:
        saved = meta.get("fingerprint") if isinstance(meta.get("fingerprint"), dict) else {}
        differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        why = f"format {meta.get('format')}" if meta.get("format") != CHECKPOINT_FORMAT else "different " + ", ".join(differ)
        log.warning("%s: not resuming from checkpoint %s: it belongs to another run (%s); training from the start "
                    "(it is replaced by this run's)", name, path, why)
        return None
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # a damaged file: safetensors reports it in its own exception types
        log.warning("%s: not resuming from checkpoint %s, it cannot be read (%s); training from the start", name, path, e)
        return None
    expected = {f"param.{i}": p.shape for i, p in enumerate(params)}
    expected.update({f"opt.m.{i}": p.shape for i, p in enumerate(params)})
    if opt.v is not None:
        expected.update({f"opt.v.{i}": p.shape for i, p in enumerate(params)})
    bad = [k for k, shape in expected.items() if k not in tensors or tuple(tensors[k].shape) != tuple(shape)]
    if bad or "rng.order" not in tensors or "rng.torch" not in tensors:
        log.warning("%s: not resuming from checkpoint %s: tensors missing or of other shapes (%s); training from the "
                    "start", name, path, ", ".join(bad[:3]) or "random states")
        return None
    return tensors, meta


@torch.no_grad()
def _resume(tensors: dict, meta: dict, params, opt: "Optimizer", gen: torch.Generator) -> None:
    """Put the weights, optimizer and every random state back to where the checkpoint was saved."""
    for i, p in enumerate(params):
        p.copy_(tensors[f"param.{i}"])
        opt.m[i].copy_(tensors[f"opt.m.{i}"])
        if opt.v is not None:
            opt.v[i].copy_(tensors[f"opt.v.{i}"])
    opt.steps = [int(n) for n in meta["optimizer_steps"]]
    gen.set_state(tensors["rng.order"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{k}"] for k in range(int(meta.get("cuda_rng_devices", 0)))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning("the checkpoint holds the random states of %d CUDA devices, this process sees %d: not restored",
                    len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)
    npr = meta["numpy_rng"]
    np.random.set_state((npr["kind"], tensors["rng.numpy"].numpy().astype(np.uint32), npr["pos"], npr["has_gauss"],
                         npr["cached_gaussian"]))
    version, internal, gauss_next = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss_next))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _progress_bar(stack: contextlib.ExitStack, total: int, done: int, name: str):
    """A tqdm bar when stderr is a terminal and tqdm is installed (log lines printed above it), else None."""
    isatty = getattr(sys.stderr, "isatty", None)
    if not (isatty and isatty()):
        return None
    try:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        return None
    bar = stack.enter_context(tqdm(total=total, initial=done, desc=name or "training", unit="step", leave=False,
                                   dynamic_ncols=True))
    stack.enter_context(logging_redirect_tqdm())
    return bar


def fit(
    params,
    n_samples: int,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    hp: dict,
    log_name: str = "",
    backward_done: bool = False,
    groups: Sequence[tuple[str, int]] | None = None,
    checkpoint: Checkpoint | Mapping | None = None,
) -> dict:
    """Minimise ``step_loss(batch_indices)`` over seeded shuffled mini-batches.

    With ``backward_done``, ``step_loss`` computes the gradients itself (e.g. accumulated over
    micro-batches) and returns the batch loss as a plain number; gradients are zeroed before it.
    With ``hp["mixture_weights"]`` ({dataset: weight}) the batches are drawn with replacement in
    those proportions (:func:`mixture_probabilities`; ``groups`` names the concatenated sets).
    With ``checkpoint`` (a :class:`Checkpoint` or a dict of its fields; default: the one of an
    enclosing :func:`checkpointing`) the state is saved as it says, and a checkpoint of this same
    run found there is resumed from: the weights end up as an uninterrupted run's. It holds the
    tensors in ``params`` (what is trained; buffers are not: no backend trains any), the
    optimizer, the position in the data order and the random states (the shuffle's, torch's, CUDA's,
    numpy's and Python's).
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
    name = log_name or "training"
    ck = Checkpoint.of(checkpoint) if checkpoint is not None else _take_active()
    start_epoch, start_step, resumed_losses, before = 0, 0, [], 0.0
    if ck is not None:
        fingerprint = _fingerprint(ck, params, hp, n_samples, groups, steps_per_epoch, total)
        found = _load_checkpoint(ck, fingerprint, params, opt, name)
        if found is not None:
            tensors, meta = found
            _resume(tensors, meta, params, opt, gen)
            start_epoch, start_step = int(meta["epoch"]), int(meta["step_in_epoch"])
            resumed_losses, before = [float(v) for v in meta["epoch_losses"]], float(meta.get("elapsed_seconds", 0.0))
            log.info("%s: resuming from checkpoint %s at step %d/%d (epoch %d/%d), %s trained before", name, ck.file,
                     int(meta["step"]), total, start_epoch + 1, epochs, _duration(before))
    start = time.time()
    t0 = start - before  # train_seconds counts the time of the runs before a resume too
    first_done = start_epoch * steps_per_epoch + start_step
    last_log = last_save = start
    recent: list[float] = []

    def progress(done: int, now: float) -> str:
        rate = (done - first_done) / max(now - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("nan")
        return f"step {done}/{total} ({100.0 * done / total:.0f}%), {rate:.3g} steps/s, ETA {_duration(eta)}"

    last = float("nan")
    with contextlib.ExitStack() as stack:
        bar = _progress_bar(stack, total, first_done, name)
        for epoch in range(start_epoch, epochs):
            epoch_gen_state = gen.get_state()
            if probs is None:
                order = torch.randperm(n_samples, generator=gen)
            else:  # weighted mixture: draws with replacement, seeded like the shuffle
                order = torch.multinomial(probs, draws, replacement=True, generator=gen)
            resumed = epoch == start_epoch
            losses = list(resumed_losses) if resumed else []
            for s in range(start_step if resumed else 0, steps_per_epoch):
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
                recent.append(value)
                done = epoch * steps_per_epoch + s + 1
                if bar is not None:
                    bar.update(1)
                now = time.time()
                if now - last_log >= PROGRESS_SECONDS:
                    log.info("%s: %s, loss %.4f (mean of the last %d steps)", name, progress(done, now),
                             float(np.mean(recent)), len(recent))
                    last_log, recent = now, []
                if ck is not None and done < total and ck.due(done, now - last_save):
                    meta = {"epoch": epoch, "step_in_epoch": s + 1, "step": done, "total": total,
                            "epoch_losses": losses, "elapsed_seconds": now - t0}
                    _save_checkpoint(ck, fingerprint, params, opt, epoch_gen_state, meta)
                    last_save = time.time()
                    log.debug("%s: checkpoint at step %d/%d saved to %s (%.2fs)", name, done, total, ck.file,
                              last_save - now)
            last = float(np.mean(losses))
            bad = next((i for i, p in enumerate(params) if not bool(torch.isfinite(p).all())), None)
            if bad is not None:  # a finite loss can still come with an overflowing update
                raise TrainingDiverged(
                    f"{log_name or 'training'}: the weights hold NaN or infinite values after epoch {epoch + 1} "
                    f"(step {(epoch + 1) * steps_per_epoch}, learning rate {opt.lr:g}): training diverged; lower the learning "
                    "rate (lr of finetune or pretrain.hparams) or set grad_clip"
                )
            now = time.time()
            log.info("%s epoch %d/%d loss %.4f (%.1fs), %s", log_name, epoch + 1, epochs, last, now - t0,
                     progress((epoch + 1) * steps_per_epoch, now))
            last_log, recent = now, []
    if ck is not None and not ck.keep:
        remove_checkpoint(ck.path)
    return {"train_loss": last, "steps": total, "train_seconds": round(time.time() - t0, 3)}
