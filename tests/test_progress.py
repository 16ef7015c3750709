"""Progress a person can see in a job log: merge-eval says done/total, rate, ETA and best so far."""

import logging
import re

from conftest import DIGITS_BACKEND, train_digits
from mergemix import merge_eval, stages


def test_merge_eval_logs_progress_with_eta_and_best(tmp_path, caplog, monkeypatch):
    models = train_digits(tmp_path, ["rotate", "noise", "thin"], pretrain_epochs=2)
    monkeypatch.setattr(merge_eval, "PROGRESS_SECONDS", 0.0)  # a line per step instead of every 30 s
    with caplog.at_level(logging.INFO, logger="mergemix"):
        df = stages.merge_eval(
            DIGITS_BACKEND,
            {"method": "uniform"},
            tmp_path / "pre/model.safetensors",
            models,
            tmp_path / "data/shift",
            0,
            1,
            tmp_path / "me.csv",
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("merge-eval:")]
    assert len(lines) == 7
    last = re.match(
        r"merge-eval: (\d+)/(\d+) merged models \(([\d.]+)/s, ETA (\d+)s\), best val_acc so far ([\d.]+) \((\S+)\)",
        lines[-1],
    )
    assert last and last.group(1) == last.group(2) == "7" and last.group(4) == "0"
    best = stages.select_best(df)
    assert float(last.group(5)) == round(df["val_acc"].max(), 4)
    assert df.loc[df["subset"] == last.group(6), "val_acc"].iloc[0] == best["val_acc"]


def test_a_terminal_gets_a_bar_and_a_log_does_not(monkeypatch):
    import contextlib
    import io as stdio
    import sys

    from mergemix.progress import progress_bar

    class Tty(stdio.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", stdio.StringIO())
    with contextlib.ExitStack() as stack:
        assert progress_bar(stack, 10, 0, "merge-eval") is None  # a job log: lines only
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    with contextlib.ExitStack() as stack:
        bar = progress_bar(stack, 10, 0, "merge-eval", unit="model")
        bar.update(4)
        bar.refresh()  # tqdm redraws at most every 0.1 s by itself
    assert "merge-eval" in tty.getvalue() and "4/10" in tty.getvalue()


def test_log_every_is_due_at_most_every_period_and_at_the_end(monkeypatch):
    from mergemix import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    every = progress.LogEvery(30.0)
    assert every.due(1, 10)  # the first item logs
    now[0] += 10
    assert not every.due(2, 10)
    now[0] += 25
    assert every.due(3, 10)
    assert every.due(10, 10)  # the last item always logs
    rate, eta = every.rate_eta(5, 10)
    assert rate == 5 / 35 and eta == 5 / rate
