"""The training loop's optimizers are torch.optim's: configured as the hyperparameters say, stepping
by their textbook formulas, driven by the schedule, and checkpointed without pickles."""

import json
import math

import pytest
import torch

from mergemix import io
from mergemix.backends import training
from mergemix.backends.training import lr_factor, make_optimizer

# the keys without a schema default (mergemix.settings.HParams): the tests below vary the others
REQUIRED = {"epochs": 1, "lr": 1.0, "batch_size": 1}


def params(*values):
    return [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in values]


@pytest.mark.parametrize(
    "hp,cls,expected",
    [
        (
            {"lr": 0.01},
            torch.optim.AdamW,  # the schema's default: AdamW without weight decay (torch's own default is 0.01)
            {"lr": 0.01, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False},
        ),
        (
            {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.1},
            torch.optim.AdamW,
            {"lr": 3e-4, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False},
        ),
        (
            {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.01},
            torch.optim.Adam,
            {
                "lr": 1e-3,
                "weight_decay": 0.01,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "amsgrad": False,
                "decoupled_weight_decay": False,
            },
        ),
        (
            {"optimizer": "sgd", "lr": 0.1},
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False, "weight_decay": 0.0},
        ),
        (
            {"optimizer": "sgd", "lr": 0.1, "momentum": 0.5, "weight_decay": 1e-4},
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.5, "dampening": 0, "nesterov": False, "weight_decay": 1e-4},
        ),
    ],
)
def test_configured_optimizer_is_torch_optim_with_the_hyperparameters(hp, cls, expected):
    ps = params([1.0, 2.0], [3.0])
    opt = make_optimizer(ps, {**REQUIRED, **hp})
    assert type(opt) is cls
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == ps
    group = opt.param_groups[0]
    assert {k: group[k] for k in expected} == expected
    assert group["foreach"] is None and group["fused"] is None  # torch picks: foreach on CUDA, a loop on CPU
    if cls is torch.optim.AdamW:
        assert group["decoupled_weight_decay"] is True


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer: 'lion' is not allowed; allowed: adamw, adam, sgd"):
        make_optimizer(params([1.0]), {**REQUIRED, "optimizer": "lion", "lr": 0.1})


def two_steps(hp, grads, lrs):
    """Two steps of the configured optimizer on p = [1, -2] (float64) with the given gradients and
    learning rates (set on the parameter group as fit does)."""
    (p,) = params([1.0, -2.0])
    opt = make_optimizer([p], {**REQUIRED, **hp})
    for g, lr in zip(grads, lrs):
        p.grad = torch.tensor(g, dtype=torch.float64)
        training.set_lr(opt, lr)
        opt.step()
    return p.detach()


G = ([0.5, -0.25], [-1.0, 0.75])
LRS = (0.1, 0.05)
B1, B2, EPS = 0.9, 0.999, 1e-8


def adam_by_hand(wd, decoupled):
    p, m, v = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.0, 0.0
    for t, (g, lr) in enumerate(zip(G, LRS), start=1):
        g = torch.tensor(g, dtype=torch.float64)
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
        p = p - lr * m_hat / (v_hat.sqrt() + EPS)
    return p


def test_adamw_step_is_decoupled_weight_decay_then_adam():
    got = two_steps({"optimizer": "adamw", "lr": 0.1, "weight_decay": 0.2}, G, LRS)
    torch.testing.assert_close(got, adam_by_hand(0.2, decoupled=True), rtol=1e-12, atol=1e-12)
    # not the L2 form
    assert not torch.allclose(got, adam_by_hand(0.2, decoupled=False), rtol=1e-6, atol=0)


def test_adam_step_adds_l2_weight_decay_to_the_gradient():
    got = two_steps({"optimizer": "adam", "lr": 0.1, "weight_decay": 0.2}, G, LRS)
    torch.testing.assert_close(got, adam_by_hand(0.2, decoupled=False), rtol=1e-12, atol=1e-12)


def test_sgd_step_is_heavy_ball_momentum_without_dampening():
    got = two_steps({"optimizer": "sgd", "lr": 0.1, "momentum": 0.8, "weight_decay": 0.2}, G, LRS)
    p = torch.tensor([1.0, -2.0], dtype=torch.float64)
    buf = None
    for g, lr in zip(G, LRS):
        g = torch.tensor(g, dtype=torch.float64) + 0.2 * p
        buf = g if buf is None else 0.8 * buf + g  # the first step's buffer is the gradient itself
        p = p - lr * buf
    torch.testing.assert_close(got, p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_steps_equal_torch_optim_itself_and_tensors_without_gradient_are_left(name):
    """The configured optimizer against torch.optim's class built by hand, on a small net whose
    last layer gets no gradient in the first steps (it is neither updated nor counted)."""
    torch.manual_seed(0)
    kw = {"lr": 0.01, "weight_decay": 0.05, **({"momentum": 0.9} if name == "sgd" else {})}
    a = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    b = torch.nn.Sequential(*[torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)])
    b.load_state_dict(a.state_dict())
    ours = make_optimizer(a.parameters(), {**REQUIRED, "optimizer": name, **kw})
    ref = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name](b.parameters(), **kw)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    last = a[3].weight.detach().clone()
    for step in range(6):
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            out = m[:3](x) if step < 3 else m[:3](x) + 0 * m[3](m[:3](x)).sum()
            ((out - y) ** 2).mean().backward()
            opt.param_groups[0]["lr"] = 0.01 * (1 + step) / 6
            opt.step()
        if step < 3:
            assert torch.equal(a[3].weight, last) and a[3].weight not in ours.state
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    if name != "sgd":
        steps = [int(ours.state[p]["step"]) for p in a.parameters()]
        assert steps == [6, 6, 6, 6, 3, 3]  # each tensor counts its own updates


@pytest.mark.parametrize(
    "hp,total,expected",
    [
        ({}, 10, {0: 1.0, 5: 1.0, 9: 1.0}),  # constant
        ({"schedule": "constant", "warmup_frac": 0.2}, 10, {0: 0.5, 1: 1.0, 2: 1.0, 9: 1.0}),
        ({"schedule": "cosine"}, 10, {0: 1.0, 5: 0.5, 9: 0.5 * (1 + math.cos(math.pi * 0.9))}),
        (
            {"schedule": "cosine", "warmup_frac": 0.2},
            10,
            {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.5, 9: 0.5 * (1 + math.cos(math.pi * 7 / 8))},
        ),
        ({"schedule": "linear"}, 4, {0: 1.0, 1: 0.75, 2: 0.5, 3: 0.25}),
        ({"schedule": "linear", "warmup_frac": 0.25}, 8, {0: 0.5, 1: 1.0, 2: 1.0, 5: 0.5, 7: 1 / 6}),
    ],
)
def test_schedule_factor_at_given_steps(hp, total, expected):
    hp = {**REQUIRED, **hp}
    assert {s: lr_factor(s, total, hp) for s in expected} == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule: 'step' is not allowed; allowed: constant, cosine, linear"):
        lr_factor(0, 10, {**REQUIRED, "schedule": "step"})


def tiny_fit(hp, monkeypatch, checkpoint=None):
    """fit on a 12-example least-squares problem; returns the weights and the learning rate of the
    optimizer's parameter group at each step."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12)
    w = torch.zeros(3, requires_grad=True)
    lrs, real = [], training.make_optimizer

    def make(ps, hp_):
        opt = real(ps, hp_)
        opt.register_step_pre_hook(lambda o, args, kwargs: lrs.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(training, "make_optimizer", make)
    training.fit([w], 12, lambda idx: ((x[idx] @ w - y[idx]) ** 2).mean(), hp, checkpoint=checkpoint)
    return w.detach(), lrs


def test_schedule_drives_the_learning_rate_of_torchs_param_groups(monkeypatch):
    hp = {"epochs": 2, "lr": 0.1, "batch_size": 3, "optimizer": "adamw", "schedule": "cosine", "warmup_frac": 0.25}
    _, lrs = tiny_fit(hp, monkeypatch)  # 4 steps an epoch, 8 in all, 2 of warmup
    assert lrs == [0.1 * lr_factor(s, 8, hp) for s in range(8)]
    assert lrs[:3] == [0.05, 0.1, 0.1] and lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_checkpoint_holds_the_optimizer_state_as_tensors_and_json(tmp_path, monkeypatch):
    """No pickles: moments as safetensors tensors named opt.state.<param index>.<name>, parameter
    groups and step counts (numbers) in the JSON metadata; they load back into a fresh optimizer."""
    from safetensors.torch import load_file

    hp = {"epochs": 1, "lr": 0.1, "batch_size": 3, "optimizer": "adam", "weight_decay": 0.01}
    ck = {"path": tmp_path / "ck", "every_steps": 1, "keep": True}
    tiny_fit(hp, monkeypatch, checkpoint=ck)
    f = tmp_path / "ck" / training.CHECKPOINT_FILE  # saved after step 3 of 4 (never after the last)
    meta = json.loads(io.arrays_metadata(f)[training._META_KEY])
    tensors = load_file(str(f))
    assert meta["format"] == training.CHECKPOINT_FORMAT == 2
    saved = meta["optimizer"]
    assert saved["class"] == "Adam"
    assert saved["state"] == {
        "0": {
            "step": {"number": 3.0, "dtype": "float32"},
            "exp_avg": {"tensor": "opt.state.0.exp_avg"},
            "exp_avg_sq": {"tensor": "opt.state.0.exp_avg_sq"},
        }
    }
    group = saved["param_groups"][0]
    assert group["params"] == [0] and group["lr"] == pytest.approx(0.1) and group["weight_decay"] == 0.01
    assert group["betas"] == [0.9, 0.999]
    assert {k for k in tensors if k.startswith("opt.")} == {"opt.state.0.exp_avg", "opt.state.0.exp_avg_sq"}
    assert tensors["opt.state.0.exp_avg"].shape == (3,)

    w = torch.zeros(3, requires_grad=True)
    opt = make_optimizer([w], hp)
    opt.load_state_dict(training._optimizer_state_dict(saved, tensors, opt, [w]))
    state = opt.state[w]
    assert state["step"].dtype == torch.float32 and float(state["step"]) == 3.0
    assert torch.equal(state["exp_avg"], tensors["opt.state.0.exp_avg"])
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again, as torch made it

    with pytest.raises(ValueError, match="optimizer Adam, not SGD"):
        training._optimizer_state_dict(saved, tensors, make_optimizer([w], {**hp, "optimizer": "sgd"}), [w])
    v = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="opt.state.0.exp_avg missing or of another shape"):
        training._optimizer_state_dict(saved, tensors, make_optimizer([v], hp), [v])


def test_sgd_checkpoint_holds_the_momentum_buffer(tmp_path, monkeypatch):
    hp = {"epochs": 1, "lr": 0.1, "batch_size": 3, "optimizer": "sgd", "momentum": 0.8}
    tiny_fit(hp, monkeypatch, checkpoint={"path": tmp_path / "ck", "every_steps": 1, "keep": True})
    f = tmp_path / "ck" / training.CHECKPOINT_FILE
    meta = json.loads(io.arrays_metadata(f)[training._META_KEY])
    assert meta["optimizer"]["state"] == {"0": {"momentum_buffer": {"tensor": "opt.state.0.momentum_buffer"}}}
    assert meta["optimizer"]["param_groups"][0]["momentum"] == 0.8
    assert {k for k in load_file_keys(f) if k.startswith("opt.")} == {"opt.state.0.momentum_buffer"}


def load_file_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_a_checkpoint_of_the_hand_written_optimizers_is_not_resumed(tmp_path, monkeypatch, caplog):
    """Format 1 (the hand-written optimizers': moments as opt.m.<i>/opt.v.<i>, step counts in
    optimizer_steps) is refused with a log line; training starts over and ends as an uninterrupted run."""
    import logging

    from safetensors.torch import load_file, save_file

    hp = {"epochs": 2, "lr": 0.1, "batch_size": 3, "optimizer": "adamw"}
    ref, _ = tiny_fit(hp, monkeypatch)
    ck = {"path": tmp_path / "ck", "every_steps": 1, "keep": True}
    tiny_fit(hp, monkeypatch, checkpoint=ck)
    f = tmp_path / "ck" / training.CHECKPOINT_FILE
    meta = json.loads(io.arrays_metadata(f)[training._META_KEY])
    t = load_file(str(f))
    old = {k: v for k, v in t.items() if not k.startswith("opt.")}
    old.update({"opt.m.0": t["opt.state.0.exp_avg"], "opt.v.0": t["opt.state.0.exp_avg_sq"]})
    meta = {
        **{k: v for k, v in meta.items() if k != "optimizer"},
        "format": 1,
        "optimizer": "adamw",
        "optimizer_steps": [7],
    }
    save_file(old, str(f), metadata={training._META_KEY: json.dumps(meta)})
    with caplog.at_level(logging.INFO, logger="mergemix"):
        got, _ = tiny_fit(hp, monkeypatch, checkpoint={**ck, "keep": False})
    assert "belongs to another run (format 1)" in caplog.text and ": resuming from" not in caplog.text
    assert torch.equal(got, ref) and not (tmp_path / "ck").exists()
