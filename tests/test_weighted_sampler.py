"""The weighted mixture sampler of the final fine-tune (m2m_weighted)."""

import numpy as np
import pytest
import torch

from mergemix.backends.training import fit, mixture_probabilities

GROUPS = [("a", 300), ("b", 100), ("c", 600)]


def drawn(hp, groups=GROUPS):
    """Which set each drawn example came from, over a real fit() run (its step_loss records)."""
    w = torch.zeros(1, requires_grad=True)
    bounds = np.cumsum([0] + [n for _, n in groups])
    seen = []

    def step_loss(idx):
        seen.extend(np.searchsorted(bounds, idx.numpy(), side="right") - 1)
        return (w**2).sum()

    out = fit([w], int(bounds[-1]), step_loss, hp, groups=groups)
    return np.array(seen), out


def test_sets_are_drawn_in_the_given_proportions_over_a_fixed_number_of_steps():
    hp = {"epochs": 5, "lr": 0.1, "batch_size": 50, "seed": 0, "mixture_weights": {"a": 0.6, "b": 0.4, "c": 0.0}}
    seen, out = drawn(hp)
    share = np.bincount(seen, minlength=3) / len(seen)
    assert share == pytest.approx([0.6, 0.4, 0.0], abs=0.03)  # 2,000 draws: sd of a share ~0.011
    assert out["steps"] == 5 * (400 // 50)  # as many steps as fine-tuning on the plain union of a and b
    again, _ = drawn(hp)
    assert np.array_equal(seen, again)  # seeded
    other, _ = drawn({**hp, "seed": 1})
    assert not np.array_equal(seen, other)


def test_unweighted_training_is_unchanged_by_the_groups():
    hp = {"epochs": 2, "lr": 0.1, "batch_size": 64, "seed": 3}
    seen, out = drawn(hp)
    assert sorted(np.bincount(seen)) == [200, 600, 1200]  # every example once per epoch
    assert out["steps"] == 2 * 16


def test_probabilities_and_bad_weights():
    probs, draws = mixture_probabilities(GROUPS, {"a": 1, "b": 1})
    assert float(probs.sum()) == pytest.approx(1.0) and draws == 400
    assert float(probs[:300].sum()) == pytest.approx(0.5) and float(probs[400:].sum()) == 0
    for bad, msg in (({"a": -1, "b": 2}, ">= 0"), ({"a": 0}, "not all 0"), ({"z": 1}, "z, not among")):
        with pytest.raises(ValueError, match=msg):
            mixture_probabilities(GROUPS, bad)
    with pytest.raises(ValueError, match="groups"):
        fit(
            [torch.zeros(1, requires_grad=True)],
            10,
            lambda i: torch.zeros(()),
            {"epochs": 1, "lr": 0.1, "batch_size": 5, "mixture_weights": {"a": 1}},
        )
