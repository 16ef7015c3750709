"""Results are written with the permissions a plain write would give (the umask), not mkstemp's 0600."""

import os
import stat

import pandas as pd
import pytest
import torch

from mergemix import io


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_csv(tmp_path / "a.csv", pd.DataFrame({"x": [1]}))
    io.write_text(tmp_path / "a.txt", "hi")
    io.save_model(tmp_path / "m" / "model.safetensors", {"w": torch.zeros(2)}, {"kind": "test"})
    import matplotlib

    from mergemix.figures import _save

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _save(plt.figure(), tmp_path / "fig", ["png"])
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what a plain write gives under this umask
    assert mode(plain) == expected
    for f in ["a.json", "a.csv", "a.txt", "m/model.safetensors", "m/model.json", "fig.png"]:
        assert mode(tmp_path / f) == expected, f
