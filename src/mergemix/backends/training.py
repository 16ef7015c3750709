"""A plain, seeded training loop shared by the torch backends.

:func:`fit` can save its whole state (:class:`Checkpoint`) every few steps or minutes and resume
from it when the job is rerun after a kill (a preempted or requeued job): the trained weights are
then the same bytes as those of an uninterrupted run (on CPU; on a GPU as far as its kernels are
deterministic). While training it logs its progress (steps done, rate, ETA, recent loss) at least
every :data:`PROGRESS_SECONDS` and at the end of each epoch, with a progress bar on a terminal.

Optimizers are ``torch.optim``'s (:func:`make_optimizer`: AdamW, Adam, SGD with momentum, as
torch picks them: a loop over the tensors on CPU, multi-tensor kernels on CUDA); the schedule
(:func:`lr_factor`) sets their parameter groups' learning rate before each step, and a checkpoint
holds ``optimizer.state_dict()`` (tensors in the safetensors file, the rest as JSON in its
metadata; no pickles). mergemix used to carry its own AdamW/Adam/SGD, with the same arithmetic,
because the first step of a ``torch.optim`` optimizer imports TorchDynamo (1.3-2 s), which
dominated jobs of one short fine-tune each. Fine-tunes are now packed (16 ``smallcnn`` fine-tunes a
job), so the import is paid once per training process: ``benchmarks/optimizer.py`` on a 2-core CPU
measured 1.3-1.5 s, 1.07x the time of a pack of 16 embedded-study fine-tunes on 4 datasets and 1.2x
on 1 dataset (about 11 training processes, 15 s of CPU time, in a study of 3-5 minutes); steps
cost 0.17 ms more on the smallcnn's 10 tensors (torch.optim's own Python overhead) and the same on
large models. Not a difference a user feels, so the hand-written optimizers were removed (the
trained bytes are unchanged on CPU). With ``pack: 1`` each fine-tune job pays the import
(1.4-1.5x a one-fine-tune job).
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
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from mergemix.lazy import LazyModule, no_grad
from mergemix.settings import HParams, WeightedHParams

torch = LazyModule("torch")  # imported by the first job that trains (mergemix.lazy)

log = logging.getLogger("mergemix.train")

PROGRESS_SECONDS = 30.0  # a progress line in the log at least this often (and after every epoch)
CHECKPOINT_FILE = "state.safetensors"  # inside the checkpoint folder (Checkpoint.path)
CHECKPOINT_FORMAT = 2  # 2: torch.optim state (1: the hand-written optimizers of before, not resumed)
_META_KEY = "mergemix_checkpoint"


class TrainingDiverged(RuntimeError):
    """The training loss or the weights became NaN or infinite: the job stops instead of saving them."""


OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}  # classes of torch.optim


def make_optimizer(params, hp: HParams | Mapping) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer the hyperparameters (:class:`mergemix.settings.HParams`; a
    mapping is converted by ``HParams.coerce``, with the schema's defaults) name, at the base
    learning rate ``lr``.

    ``adamw``: :class:`torch.optim.AdamW`, decoupled weight decay (``p *= 1 - lr * weight_decay``
    before the Adam update); ``adam``: :class:`torch.optim.Adam`, L2 weight decay (``weight_decay *
    p`` added to the gradient); both with torch's betas (0.9, 0.999) and eps 1e-8. ``sgd``:
    :class:`torch.optim.SGD` with ``momentum`` (no dampening, not Nesterov) and L2 ``weight_decay``.
    The schema's default ``weight_decay`` is 0 for all three (torch's AdamW would use 0.01).
    torch picks the implementation: multi-tensor (foreach) kernels for CUDA tensors, a loop over
    the tensors on CPU. :func:`fit` sets each step's learning rate (:func:`lr_factor`).
    """
    hp = HParams.coerce(hp, "hparams")
    if hp.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {hp.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    lr, wd = float(hp.lr), float(hp.weight_decay)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(hp.momentum), weight_decay=wd)
    return getattr(torch.optim, OPTIMIZERS[hp.optimizer])(params, lr=lr, weight_decay=wd)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group of ``opt``."""
    for group in opt.param_groups:
        group["lr"] = lr


def lr_factor(step: int, total: int, hp: HParams | Mapping) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) for the configured schedule
    (``schedule`` and ``warmup_frac`` of the hyperparameters, as :func:`make_optimizer` takes them)."""
    hp = HParams.coerce(hp, "hparams")
    warmup = int(round(float(hp.warmup_frac) * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    schedule = hp.schedule
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
    def of(cls, spec) -> Checkpoint | None:
        """A :class:`Checkpoint` from itself, a dict of its fields, or None."""
        if spec is None or isinstance(spec, Checkpoint):
            return spec
        if isinstance(spec, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(spec) - fields)
            if unknown:
                raise ValueError(
                    f"checkpoint: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
                )
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


def _fingerprint(ck: Checkpoint, params, hp: HParams, n_samples: int, groups, steps_per_epoch: int, total: int) -> dict:
    """Each part of what identifies a run, as a short digest (the log names the parts that differ).
    The hyperparameters as ``hp.to_dict()``: every key, as the validated config (and so the
    workflow's ``--hparams``) has them, ``mixture_weights`` too for a weighted mixture."""
    parts = {
        "hyperparameters": hp.to_dict(),
        "training": {
            "n_samples": int(n_samples),
            "groups": [[str(n), int(k)] for n, k in groups or []],
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
        },
        "parameters": [[list(p.shape), str(p.dtype)] for p in params],
        **{f"run.{k}": v for k, v in (ck.fingerprint or {}).items()},
    }
    return {k: _digest(v)[:16] for k, v in parts.items()}


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``opt.state_dict()`` split into tensors (for the safetensors file: ``opt.state.<param
    index>.<name>``, e.g. ``opt.state.3.exp_avg``) and JSON (the parameter groups, and each
    parameter's state: a step count as a number with its dtype, a tensor by its key)."""
    sd = opt.state_dict()
    tensors, state = {}, {}
    for index, entries in sd["state"].items():
        saved = state[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() == 0:  # step counts
                saved[key] = {"number": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
            elif isinstance(value, torch.Tensor):
                name = f"opt.state.{index}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                saved[key] = {"tensor": name}
            else:
                saved[key] = value
    return tensors, {"class": type(opt).__name__, "param_groups": sd["param_groups"], "state": state}


def _optimizer_state_dict(saved: dict, tensors: dict, opt: torch.optim.Optimizer, params) -> dict:
    """The ``state_dict`` :func:`_optimizer_state` saved, for ``opt.load_state_dict``; ValueError
    (saying what) when it does not fit ``opt`` and ``params``."""
    if saved.get("class") != type(opt).__name__:
        raise ValueError(f"optimizer {saved.get('class')}, not {type(opt).__name__}")
    groups = saved["param_groups"]
    if len(groups) != len(opt.param_groups) or any(
        len(g["params"]) != len(cur["params"]) for g, cur in zip(groups, opt.param_groups)
    ):
        raise ValueError("other parameter groups")
    state = {}
    for index, entries in saved["state"].items():
        i = int(index)
        if not 0 <= i < len(params):
            raise ValueError(f"state of parameter {index}, which is not there")
        restored = state[i] = {}
        for key, value in entries.items():
            if isinstance(value, dict) and "tensor" in value:
                t = tensors.get(value["tensor"])
                if t is None or tuple(t.shape) != tuple(params[i].shape):
                    raise ValueError(f"{value['tensor']} missing or of another shape")
                restored[key] = t
            elif isinstance(value, dict) and "number" in value:
                restored[key] = torch.tensor(value["number"], dtype=getattr(torch, value["dtype"]))
            else:
                restored[key] = value
    # JSON has no tuples: give back the types of opt's own groups (betas)
    groups = [
        {k: tuple(v) if isinstance(cur.get(k), tuple) and isinstance(v, list) else v for k, v in g.items()}
        for g, cur in zip(groups, opt.param_groups)
    ]
    return {"state": state, "param_groups": groups}


def _save_checkpoint(
    ck: Checkpoint, fingerprint: dict, params, opt: torch.optim.Optimizer, epoch_gen_state: torch.Tensor, meta: dict
) -> None:
    """One atomic save (temporary file, fsync, rename) of everything :func:`_resume` restores."""
    from safetensors.torch import save_file

    from mergemix import io

    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    opt_tensors, opt_meta = _optimizer_state(opt)
    tensors.update(opt_tensors)
    tensors["rng.order"] = epoch_gen_state.clone()  # the shuffle generator at the start of the epoch
    tensors["rng.torch"] = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    for k, st in enumerate(cuda):
        tensors[f"rng.cuda.{k}"] = st.cpu()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        **meta,
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "optimizer": opt_meta,
        "cuda_rng_devices": len(cuda),
        "numpy_rng": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python_rng": [version, list(internal), gauss_next],
    }
    with io.atomic_path(ck.file) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        with open(tmp, "rb") as f:  # on disk before the rename, so a node crash cannot leave an empty file
            os.fsync(f.fileno())


def _load_checkpoint(ck: Checkpoint, fingerprint: dict, params, opt: torch.optim.Optimizer, name: str):
    """The parameters' tensors, the optimizer's state dict and the JSON of a checkpoint of this
    very run, or None (with a log line saying why a checkpoint that is there is not resumed:
    another run's, or unreadable)."""
    from mergemix import io

    path = ck.file
    if not path.exists():
        return None
    try:
        meta = json.loads(io.arrays_metadata(path)[_META_KEY])
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except (OSError, ValueError, KeyError) as e:
        log.warning(
            "%s: not resuming from checkpoint %s, it cannot be read (%s); training from the start", name, path, e
        )
        return None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("fingerprint") != fingerprint:
        saved = meta.get("fingerprint") if isinstance(meta.get("fingerprint"), dict) else {}
        differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        why = (
            f"format {meta.get('format')}"
            if meta.get("format") != CHECKPOINT_FORMAT
            else "different " + ", ".join(differ)
        )
        log.warning(
            "%s: not resuming from checkpoint %s: it belongs to another run (%s); training from the start "
            "(it is replaced by this run's)",
            name,
            path,
            why,
        )
        return None
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # a damaged file: safetensors reports it in its own exception types
        log.warning(
            "%s: not resuming from checkpoint %s, it cannot be read (%s); training from the start", name, path, e
        )
        return None
    bad = [
        f"param.{i}"
        for i, p in enumerate(params)
        if f"param.{i}" not in tensors or tuple(tensors[f"param.{i}"].shape) != tuple(p.shape)
    ]
    if bad or "rng.order" not in tensors or "rng.torch" not in tensors:
        log.warning(
            "%s: not resuming from checkpoint %s: tensors missing or of other shapes (%s); training from the start",
            name,
            path,
            ", ".join(bad[:3]) or "random states",
        )
        return None
    try:
        opt_state = _optimizer_state_dict(meta["optimizer"], tensors, opt, params)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning(
            "%s: not resuming from checkpoint %s: its optimizer state does not fit (%s); training from the start",
            name,
            path,
            e,
        )
        return None
    return tensors, opt_state, meta


@no_grad
def _resume(
    tensors: dict, opt_state: dict, meta: dict, params, opt: torch.optim.Optimizer, gen: torch.Generator
) -> None:
    """Put the weights, optimizer and every random state back to where the checkpoint was saved."""
    for i, p in enumerate(params):
        p.copy_(tensors[f"param.{i}"])
    opt.load_state_dict(opt_state)
    gen.set_state(tensors["rng.order"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{k}"] for k in range(int(meta.get("cuda_rng_devices", 0)))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning(
            "the checkpoint holds the random states of %d CUDA devices, this process sees %d: not restored",
            len(cuda),
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )
    npr = meta["numpy_rng"]
    np.random.set_state(
        (
            npr["kind"],
            tensors["rng.numpy"].numpy().astype(np.uint32),
            npr["pos"],
            npr["has_gauss"],
            npr["cached_gaussian"],
        )
    )
    version, internal, gauss_next = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss_next))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _progress_bar(stack: contextlib.ExitStack, total: int, done: int, name: str):
    from mergemix.progress import progress_bar

    return progress_bar(stack, total, done, name or "training", unit="step")


def fit(
    params,
    n_samples: int,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    hp: HParams | Mapping,
    log_name: str = "",
    backward_done: bool = False,
    groups: Sequence[tuple[str, int]] | None = None,
    checkpoint: Checkpoint | Mapping | None = None,
) -> dict:
    """Minimise ``step_loss(batch_indices)`` over seeded shuffled mini-batches.

    ``hp``: :class:`mergemix.settings.HParams` (a mapping is converted by ``HParams.coerce``: the
    schema's defaults, unknown keys refused).
    With ``backward_done``, ``step_loss`` computes the gradients itself (e.g. accumulated over
    micro-batches) and returns the batch loss as a plain number; gradients are zeroed before it.
    With a :class:`mergemix.settings.WeightedHParams` (``mixture_weights``: {dataset: weight}) the
    batches are drawn with replacement in those proportions (:func:`mixture_probabilities`;
    ``groups`` names the concatenated sets).
    With ``checkpoint`` (a :class:`Checkpoint` or a dict of its fields; default: the one of an
    enclosing :func:`checkpointing`) the state is saved as it says, and a checkpoint of this same
    run found there is resumed from: the weights end up as an uninterrupted run's. It holds the
    tensors in ``params`` (what is trained; buffers are not: no backend trains any), the
    optimizer, the position in the data order and the random states (the shuffle's, torch's, CUDA's,
    numpy's and Python's).
    Returns the mean training loss of the last epoch and the number of steps taken.
    """
    hp = HParams.coerce(hp, "hparams")
    params = [p for p in params if p.requires_grad]
    opt = make_optimizer(params, hp)
    base_lr = float(hp.lr)
    bs = int(hp.batch_size)
    epochs = int(hp.epochs)
    probs = None
    if isinstance(hp, WeightedHParams) and hp.mixture_weights:
        if groups is None or sum(size for _, size in groups) != n_samples:
            raise ValueError(
                f"{log_name or 'training'}: mixture_weights need the training sets' names and sizes (groups)"
            )
        probs, draws = mixture_probabilities(groups, hp.mixture_weights)
    steps_per_epoch = max(1, math.ceil((n_samples if probs is None else draws) / bs))
    total = steps_per_epoch * epochs
    gen = torch.Generator().manual_seed(int(hp.seed))
    clip = hp.grad_clip
    name = log_name or "training"
    ck = Checkpoint.of(checkpoint) if checkpoint is not None else _take_active()
    start_epoch, start_step, resumed_losses, before = 0, 0, [], 0.0
    if ck is not None:
        fingerprint = _fingerprint(ck, params, hp, n_samples, groups, steps_per_epoch, total)
        found = _load_checkpoint(ck, fingerprint, params, opt, name)
        if found is not None:
            tensors, opt_state, meta = found
            _resume(tensors, opt_state, meta, params, opt, gen)
            start_epoch, start_step = int(meta["epoch"]), int(meta["step_in_epoch"])
            resumed_losses, before = [float(v) for v in meta["epoch_losses"]], float(meta.get("elapsed_seconds", 0.0))
            log.info(
                "%s: resuming from checkpoint %s at step %d/%d (epoch %d/%d), %s trained before",
                name,
                ck.file,
                int(meta["step"]),
                total,
                start_epoch + 1,
                epochs,
                _duration(before),
            )
    start = time.time()
    t0 = start - before  # train_seconds counts the time of the runs before a resume too
    first_done = start_epoch * steps_per_epoch + start_step
    last_log = last_save = start
    recent: list[float] = []

    def progress(done: int, now: float) -> str:
        rate = (done - first_done) / max(now - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("nan")
        return f"step {done}/{total} ({100.0 * done / total:.0f}%), {rate:.3g} steps/s, ETA {_duration(eta)}"

    last, lr = float("nan"), opt.param_groups[0]["lr"]
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
                lr = base_lr * lr_factor(epoch * steps_per_epoch + s, total, hp)
                set_lr(opt, lr)
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
                        f"with learning rate {lr:g}: training diverged; lower the learning rate (lr of finetune or "
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
                    log.info(
                        "%s: %s, loss %.4f (mean of the last %d steps)",
                        name,
                        progress(done, now),
                        float(np.mean(recent)),
                        len(recent),
                    )
                    last_log, recent = now, []
                if ck is not None and done < total and ck.due(done, now - last_save):
                    meta = {
                        "epoch": epoch,
                        "step_in_epoch": s + 1,
                        "step": done,
                        "total": total,
                        "epoch_losses": losses,
                        "elapsed_seconds": now - t0,
                    }
                    _save_checkpoint(ck, fingerprint, params, opt, epoch_gen_state, meta)
                    last_save = time.time()
                    log.debug(
                        "%s: checkpoint at step %d/%d saved to %s (%.2fs)", name, done, total, ck.file, last_save - now
                    )
            last = float(np.mean(losses))
            bad = next((i for i, p in enumerate(params) if not bool(torch.isfinite(p).all())), None)
            if bad is not None:  # a finite loss can still come with an overflowing update
                raise TrainingDiverged(
                    f"{log_name or 'training'}: the weights hold NaN or infinite values after epoch {epoch + 1} "
                    f"(step {(epoch + 1) * steps_per_epoch}, learning rate {lr:g}): training diverged; lower the learning "
                    "rate (lr of finetune or pretrain.hparams) or set grad_clip"
                )
            now = time.time()
            log.info(
                "%s epoch %d/%d loss %.4f (%.1fs), %s",
                log_name,
                epoch + 1,
                epochs,
                last,
                now - t0,
                progress((epoch + 1) * steps_per_epoch, now),
            )
            last_log, recent = now, []
    if ck is not None and not ck.keep:
        remove_checkpoint(ck.path)
    return {"train_loss": last, "steps": total, "train_seconds": round(time.time() - t0, 3)}
