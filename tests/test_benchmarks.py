"""The benchmark scripts run and report every figure (their timings are printed, never asserted)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, offline_env

pytest.importorskip("open_clip")


def test_clip_throughput_runs_the_backend_paths(tmp_path):
    out = tmp_path / "fig.json"
    with offline_env():
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "clip_throughput.py"), "--tiny",
                            "--val-images", "300", "--models", "3", "--merged", "2", "--json", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads(out.read_text())
    for key in ("train_images_per_s", "eval_images_per_s_first_call", "eval_images_per_s_cached",
                "s_per_merged_model_engine", "s_per_merged_model_plain"):
        assert fig[key] > 0, key
    assert fig["val_images"] == 300 and fig["batch_size"] == 128
    assert "ratio plain/engine" in r.stdout and "ratio cached/first" in r.stdout


def test_optimizer_benchmark_runs():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "optimizer.py"), "--device", "cpu", "--steps", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio torch.optim/ours" in r.stdout and r.stdout.count("ratio to torch.optim") == 3
