"""Fine-tunes that survive preemption: checkpointed every few steps, a killed fine-tune rerun
resumes and writes the same model bytes as an uninterrupted one. Real smallcnn runs on tiny
digits data; the killed run is a real ``mergemix finetune`` process killed with SIGKILL."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DIGITS_BACKEND, ROOT
from mergemix import io, stages
from mergemix.backends import training
from mergemix.settings import Checkpoint, Split

SPLIT = Split.from_cli({"seed": 0, "val": 0.2, "test": 0.3, "max_train": 200, "max_val": 60, "max_test": 60})
HP = {
    "epochs": 4,
    "lr": 0.005,
    "batch_size": 32,
    "schedule": "cosine",
    "warmup_frac": 0.1,
    "seed": 0,
}  # 7 steps an epoch
WEIGHTED = {**HP, "epochs": 3, "mixture_weights": {"mirror": 0.7, "rotate": 0.3}}


@pytest.fixture(autouse=True)
def no_checkpoint_env(monkeypatch):
    for var in (stages.CHECKPOINT_STEPS_ENV, stages.CHECKPOINT_SECONDS_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    for n in ("clean", "mirror", "rotate"):
        stages.prepare(n, {"source": "digits", "domain": n}, SPLIT, d / "data" / n)
    stages.pretrain(
        DIGITS_BACKEND,
        {"epochs": 2, "lr": 0.01, "batch_size": 32},
        d / "data" / "clean",
        d / "pre" / "model.safetensors",
    )
    return d


def js(obj):
    return json.dumps(obj, separators=(",", ":"))


def comparable(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    m["metrics"].pop("train_seconds")
    return m


class Preempted(Exception):
    pass


def interrupt_after(monkeypatch, steps: int) -> None:
    """The fine-tunes of this process stop (an exception) at the optimizer step after ``steps``
    (counted over all of them): a step pre-hook on each optimizer :func:`training.fit` makes."""
    real, calls = training.make_optimizer, [0]

    def stop(optimizer, args, kwargs):
        calls[0] += 1
        if calls[0] > steps:
            raise Preempted(f"stopped after step {steps}")

    def make(params, hp):
        opt = real(params, hp)
        opt.register_step_pre_hook(stop)
        return opt

    monkeypatch.setattr(training, "make_optimizer", make)


# a `mergemix finetune` process slowed down (50 ms a step) so that it can be killed mid-way
SLOW_CLI = """
import sys, time
from mergemix.backends import training
real = training.make_optimizer
def make(params, hp):
    opt = real(params, hp)
    opt.register_step_post_hook(lambda *a: time.sleep(0.05))
    return opt
training.make_optimizer = make
from mergemix.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_finetune_resumes_to_the_same_bytes(study, tmp_path):
    pre, data = study / "pre" / "model.safetensors", [study / "data" / "mirror"]
    whole = stages.finetune(DIGITS_BACKEND, HP, pre, data, tmp_path / "whole" / "model.safetensors")
    assert not stages.checkpoint_path(tmp_path / "whole" / "model.safetensors").exists()  # 600 s default: none written

    out = tmp_path / "killed" / "model.safetensors"
    ckpt = stages.checkpoint_path(out) / training.CHECKPOINT_FILE
    args = [
        "finetune",
        "--backend",
        js(DIGITS_BACKEND),
        "--hparams",
        js(HP),
        "--pretrained",
        str(pre),
        "--data",
        *map(str, data),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *args, "--checkpoint-every-steps", "3"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while proc.poll() is None and not ckpt.exists() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert ckpt.exists() and not out.exists()

    # the rerun (a requeued job): checkpoint settings from the environment this time
    env = {**os.environ, stages.CHECKPOINT_STEPS_ENV: "3"}
    r = subprocess.run([sys.executable, "-m", "mergemix", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from checkpoint" in r.stderr, r.stderr[-3000:]
    step = int(r.stderr.split("resuming from checkpoint")[1].split(" at step ")[1].split("/")[0])
    assert 3 <= step < 28 and step % 3 == 0
    assert io.sha256_file(out) == whole["sha256"]
    assert comparable(io.read_json(io.manifest_path(out))) == comparable(whole)
    assert not stages.checkpoint_path(out).exists()


def test_resume_at_every_step_and_with_the_weighted_sampler(study, tmp_path, monkeypatch, caplog):
    """In-process interruptions mid-epoch and at an epoch's end, also for weighted mixtures
    (draws with replacement); a temporary file left by a kill during a save is ignored and removed."""
    pre, data = study / "pre" / "model.safetensors", [study / "data" / "mirror", study / "data" / "rotate"]
    whole = {
        "plain": stages.finetune(DIGITS_BACKEND, HP, pre, data, tmp_path / "plain" / "model.safetensors"),
        "weighted": stages.finetune(DIGITS_BACKEND, WEIGHTED, pre, data, tmp_path / "weighted" / "model.safetensors"),
    }
    steps_per_epoch = 13  # 400 training examples (plain union; the weighted draws as many) in batches of 32
    for kind, hp in (("plain", HP), ("weighted", WEIGHTED)):
        for stop in (5, steps_per_epoch, steps_per_epoch * (hp["epochs"] - 1) + 3):  # mid-epoch, epoch end, last epoch
            out = tmp_path / f"{kind}-{stop}" / "model.safetensors"
            with monkeypatch.context() as mp:
                interrupt_after(mp, stop)
                with pytest.raises(Preempted):
                    stages.finetune(DIGITS_BACKEND, hp, pre, data, out, checkpoint={"every_steps": 1})
            folder = stages.checkpoint_path(out)
            assert (folder / training.CHECKPOINT_FILE).exists() and not out.exists()
            (folder / f".{training.CHECKPOINT_FILE}.abc123.tmp").write_bytes(b"half a checkpoint")
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="mergemix"):  # both rules off: resumed, nothing more saved
                resumed = stages.finetune(DIGITS_BACKEND, hp, pre, data, out, checkpoint=Checkpoint(0, 0))
            assert f": resuming from checkpoint {folder / training.CHECKPOINT_FILE} at step {stop}/" in caplog.text
            assert io.sha256_file(out) == whole[kind]["sha256"], (kind, stop)
            assert comparable(resumed) == comparable(whole[kind]), (kind, stop)  # train_loss too
            assert not folder.exists()


def test_checkpoint_of_another_run_is_not_resumed(study, tmp_path, monkeypatch, caplog):
    pre, data = study / "pre" / "model.safetensors", [study / "data" / "mirror"]
    other = {**HP, "lr": 0.01}
    whole = stages.finetune(DIGITS_BACKEND, other, pre, data, tmp_path / "whole" / "model.safetensors")
    out = tmp_path / "run" / "model.safetensors"
    with monkeypatch.context() as mp:
        interrupt_after(mp, 10)
        with pytest.raises(Preempted):
            stages.finetune(DIGITS_BACKEND, HP, pre, data, out, checkpoint={"every_steps": 2})
    assert (stages.checkpoint_path(out) / training.CHECKPOINT_FILE).exists()
    with caplog.at_level(logging.INFO, logger="mergemix"):
        stages.finetune(DIGITS_BACKEND, other, pre, data, out, checkpoint={"every_steps": 2})
    assert "belongs to another run (different hyperparameters)" in caplog.text
    assert ": resuming from" not in caplog.text
    assert io.sha256_file(out) == whole["sha256"] and not stages.checkpoint_path(out).exists()

    # another pre-trained model (its sha256) or other data: not resumed either
    out2 = tmp_path / "data" / "model.safetensors"
    with monkeypatch.context() as mp:
        interrupt_after(mp, 4)
        with pytest.raises(Preempted):
            stages.finetune(DIGITS_BACKEND, HP, pre, [study / "data" / "rotate"], out2, checkpoint={"every_steps": 2})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mergemix"):
        stages.finetune(DIGITS_BACKEND, HP, pre, data, out2, checkpoint=Checkpoint(0, 0))
    assert "different run.data" in caplog.text and ": resuming from" not in caplog.text
    assert not stages.checkpoint_path(out2).exists()


def test_unreadable_checkpoint_is_ignored(study, tmp_path, caplog):
    pre, data = study / "pre" / "model.safetensors", [study / "data" / "mirror"]
    out = tmp_path / "model.safetensors"
    folder = stages.checkpoint_path(out)
    folder.mkdir()
    (folder / training.CHECKPOINT_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with caplog.at_level(logging.INFO, logger="mergemix"):
        m = stages.finetune(DIGITS_BACKEND, HP, pre, data, out)
    assert "not resuming from checkpoint" in caplog.text and "cannot be read" in caplog.text
    assert ": resuming from" not in caplog.text
    assert m["sha256"] == io.sha256_file(out) and not folder.exists()


def test_progress_lines_and_checkpoint_settings(study, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(training, "PROGRESS_SECONDS", 0.0)
    pre, data = study / "pre" / "model.safetensors", [study / "data" / "mirror"]
    with caplog.at_level(logging.INFO, logger="mergemix"):
        stages.finetune(DIGITS_BACKEND, {**HP, "epochs": 1}, pre, data, tmp_path / "model.safetensors")
    lines = [r.getMessage() for r in caplog.records if r.name == "mergemix.train"]
    assert any("step 3/7 (43%)" in line and "steps/s, ETA 0:00:0" in line and "loss " in line for line in lines), lines
    assert any("epoch 1/1 loss" in line and "step 7/7 (100%)" in line for line in lines), lines

    # the fine-tune stages' flags as a settings.Checkpoint: each flag, else its environment variable,
    # else the schema's checkpoint defaults (every 10 minutes, not by steps)
    assert stages.checkpoint_settings() == Checkpoint.from_cli({}) == Checkpoint(10, None)
    assert stages.checkpoint_settings().every_seconds == 600.0
    assert stages.checkpoint_settings(5, 0) == Checkpoint(0, 5)
    monkeypatch.setenv(stages.CHECKPOINT_STEPS_ENV, "50")
    monkeypatch.setenv(stages.CHECKPOINT_SECONDS_ENV, "off")
    assert stages.checkpoint_settings() == Checkpoint(0, 50)
    assert stages._checkpoint(None) == Checkpoint(0, 50)  # a stage given no settings reads the environment
    assert stages._checkpoint({"every_steps": 3}) == Checkpoint(10, 3)  # given settings: the schema's defaults
    assert stages.checkpoint_settings(7, 90) == Checkpoint(1.5, 7)  # the flags (a config key) before the environment
    assert stages.checkpoint_settings(7, 90).every_seconds == 90.0
    monkeypatch.setenv(stages.CHECKPOINT_STEPS_ENV, "ten")
    with pytest.raises(ValueError, match="MERGEMIX_CHECKPOINT_EVERY_STEPS='ten'"):
        stages.checkpoint_settings()
    with pytest.raises(ValueError, match="-1"):
        stages.checkpoint_settings(-1)
    with pytest.raises(ValueError, match="2.5"):
        stages.checkpoint_settings(2.5)
    with pytest.raises(ValueError, match="unknown key 'every_seconds'"):
        stages._checkpoint({"every_seconds": 60})


@pytest.mark.parametrize(
    "optimizer",
    [
        {"optimizer": "adam"},
        {"optimizer": "adamw", "weight_decay": 0.1},
        {"optimizer": "sgd", "momentum": 0.8, "weight_decay": 0.01},
    ],
)
def test_fit_restores_every_random_state(tmp_path, optimizer):
    """A loss drawing from torch's, numpy's and Python's global generators (as dropout or a data
    augmentation would): the resumed run still ends on the uninterrupted run's weights, with each
    optimizer (its state restored from the checkpoint's tensors and JSON)."""
    import random

    import numpy as np
    import torch

    hp = {"epochs": 3, "lr": 0.05, "batch_size": 4, "schedule": "linear", "seed": 3, **optimizer}
    x = torch.linspace(-1, 1, 40).reshape(20, 2)

    def run(stop=None, checkpoint=None):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        w = torch.zeros(2, requires_grad=True)
        calls = [0]

        def step_loss(idx):
            calls[0] += 1
            if stop is not None and calls[0] > stop:
                raise Preempted
            noise = torch.rand(len(idx), 2) * float(np.random.rand()) * random.random()
            return (((x[idx] + noise) @ w - 1.0) ** 2).mean()

        try:
            metrics = training.fit([w], 20, step_loss, hp, checkpoint=checkpoint)
        except Preempted:
            return None, None
        return w.detach().clone(), metrics

    ref, ref_metrics = run()
    ck = {"path": tmp_path / "ck", "every_steps": 2, "fingerprint": {"run": "test"}}
    assert run(stop=9, checkpoint=ck)[0] is None and (tmp_path / "ck" / training.CHECKPOINT_FILE).exists()
    got, metrics = run(checkpoint=ck)  # resumed at step 8, after the seeds were set as at the start
    assert torch.equal(got, ref) and metrics["train_loss"] == ref_metrics["train_loss"]
    assert not (tmp_path / "ck").exists()  # keep: False, fit removes it
