"""The benchmark scripts run and report every figure (their timings are printed, never asserted)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, offline_env

pytestmark = pytest.mark.slow  # each runs a benchmark script in a subprocess

pytest.importorskip("open_clip")


def test_clip_throughput_runs_the_backend_paths(tmp_path):
    out = tmp_path / "fig.json"
    with offline_env():
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "clip_throughput.py"),
                "--tiny",
                "--val-images",
                "300",
                "--models",
                "3",
                "--merged",
                "2",
                "--json",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads(out.read_text())
    for key in (
        "train_images_per_s",
        "eval_images_per_s_first_call",
        "eval_images_per_s_cached",
        "s_per_merged_model_engine",
        "s_per_merged_model_plain",
    ):
        assert fig[key] > 0, key
    assert fig["val_images"] == 300 and fig["batch_size"] == 128
    assert "ratio plain/engine" in r.stdout and "ratio cached/first" in r.stdout


def test_optimizer_benchmark_runs():
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "optimizer.py"),
            "--device",
            "cpu",
            "--steps",
            "1",
            "--runs",
            "1",
            "--vit-blocks",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio first/second" in r.stdout and "packed job, 16 fine-tunes" in r.stdout
    assert (
        r.stdout.count("ratio to torch.optim default") >= 4
    )  # default, foreach (fused where available) x 2 shape sets


def test_engine_benchmark_reports_every_ratio(tmp_path):
    """CPU tables (smallcnn, tiny clip, tiny causal_lm) and the --gpu code paths at toy sizes on CPU:
    both runs of the script's main in one interpreter (its imports, about 8 s of CPU, paid once)."""
    runs = {tmp_path / f"engine{len(extra)}.json": extra for extra in ([], ["--gpu", "--device", "cpu", "--tiny"])}
    code = "import sys; sys.path.insert(0, sys.argv[1]); import engine; " + "; ".join(
        f"assert engine.main({[*extra, '--quick', '--json', str(out)]!r}) == 0" for out, extra in runs.items()
    )
    with offline_env():
        r = subprocess.run(
            [sys.executable, "-c", code, str(ROOT / "benchmarks")], capture_output=True, text=True, timeout=600
        )
    assert r.returncode == 0, r.stderr[-3000:]
    for out, extra in runs.items():
        fig = json.loads(out.read_text())
        assert len(fig["engine"]) == (2 if extra else 3) and len(fig["batched_adapters"]) == 2
        for row in fig["engine"]:
            for key in ("merged_per_s", "engine_over_floor", "naive_over_engine", "merge_share"):
                assert row[key] > 0, (row["backend"], key)
            assert row["subsets"] == 2 ** row["candidates"] - 1
        for row in fig["batched_adapters"]:
            assert row["k"] == 8 and row["ratio"] > 0 and row["max_score_diff"] < 1e-9, row
    assert r.stdout.count("engine/floor") == 2 and r.stdout.count("batched/seq") == 2 and "naive/engine" in r.stdout


def test_engine_benchmark_gpu_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine.py"), "--gpu"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "needs CUDA" in r.stderr and "--device cpu --tiny" in r.stderr


def test_workflow_benchmark_builds_valid_studies_and_compares_results(tmp_path, default_config):
    """benchmarks/workflow.py without running Snakemake (tests/test_workflow.py runs a study both
    ways): its tiny and unpacked studies are valid configs, and its comparison refuses any
    difference between the two results folders."""
    import importlib.util

    from mergemix.config import pack_sizes, validate_config

    spec = importlib.util.spec_from_file_location("bench_workflow", ROOT / "benchmarks" / "workflow.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = validate_config(bench.tiny(default_config))
    assert sorted(tiny["datasets"]) == ["noise", "rotate", "thin"] and tiny["finetune"]["epochs"] == 1
    assert pack_sizes(validate_config(bench.unpacked(tiny))) == {k: 1 for k in pack_sizes(tiny)}
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "x").mkdir(parents=True)
        (d / "x" / "t.csv").write_text("subset,val_acc\na,0.5\n")
        (d / "x" / "m.safetensors").write_bytes(b"model")
    assert bench.compare(a, b) == (1, 1)
    (b / "x" / "t.csv").write_text("subset,val_acc\na,0.6\n")
    with pytest.raises(SystemExit, match="t.csv differs"):
        bench.compare(a, b)
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "workflow.py"), "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--tiny" in r.stdout
