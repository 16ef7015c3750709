"""The slurm profile against a real single-node Slurm (Debian's packages, started by
tests/slurm/cluster.sh). Skipped, with the reason, where that cannot run (not root, not Debian).

One sequence: a local run of a small study; a Slurm run of the same study with one dataset broken
(must exit non-zero without hanging, finishing what does not depend on it); the Slurm run again
with the dataset fixed (must resume, not redo, and produce exactly the local run's CSVs); and the
jobs' partitions and GPU requests as Slurm recorded them.
"""

import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import ROOT, tiny_config

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
GPU_RULES = {
    "pretrain",
    "finetune",
    "mixture_finetune",
    "final_finetune",
    "merge_eval",
    "mixture_eval",
    "eval_pretrained",
    "embed",
}
# group_short: the profile's job group of gather_merge_eval and similarity jobs (one sbatch for several)
CPU_RULES = {"prepare_data", "gather_merge_eval", "similarity", "analyze", "group_short"}


def _env():
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def cluster():
    check = subprocess.run(["bash", str(CLUSTER), "check"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"real-Slurm test skipped: {check.stdout.strip() or check.stderr.strip()}")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.skip(
            "real-Slurm test skipped: snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
        )
    up = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"could not start Slurm:\n{up.stdout}\n{up.stderr}"
    print(up.stdout.strip())
    yield
    subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=60)


def _config(tmp, results, broken=False):
    cfg = tiny_config(results, study="slurm", n=3, chunks=1)
    # one target (its 2 candidates): every rule still runs, at half the jobs; on Slurm each job
    # starts its own Snakemake, and each DAG level waits for the executor's status checks
    cfg["targets"] = ["mirror"]
    # exercise the GPU mapping: smallcnn needs no GPU, so ask for one explicitly
    cfg["resources"] = {"gpu": 1, "gpu_partition": "gpu", "partition": "cpu", "mem_mb": 1000, "runtime": 10}
    if broken:  # passes config validation, fails in its prepare_data job
        cfg["datasets"]["noise"]["strength"] = -1.0
    path = tmp / ("broken.yaml" if broken else "study.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _slurm(configfile, logdir, profile="workflow/profiles/slurm"):
    cmd = [
        "timeout",
        "-k",
        "10",
        "900",
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        profile,
        "--configfile",
        str(configfile),
        # this CI cluster has no slurmdbd: poll squeue (MinJobAge=600 in its slurm.conf), no accounts
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-no-account",
        "--slurm-logdir",
        str(logdir),
        # this node has 2 CPUs: a job group (group-components) runs at most 2 jobs side by side
        "--cores",
        "2",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode in (124, 137):
        subprocess.run(
            [sys.executable, "-m", "snakemake", "--configfile", str(configfile), "--unlock"],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
        )
        pytest.fail(f"snakemake on Slurm hung and was killed:\n{out[-4000:]}")
    return r.returncode, out


def _submitted(log: str) -> dict[str, list[str]]:
    """Rule (a packed rule under its family's name) or `group_<name>` -> Slurm job ids, from the
    executor's submission messages."""
    jobs: dict[str, list[str]] = {}
    for jobid, kind, name in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*?/(rule|group)_(\w+)/", log):
        # a group job's log folder is group_<group>_<its rules>, e.g. group_short_gather_merge_eval_similarity
        key = re.sub(r"_pack\d+$", "", name) if kind == "rule" else f"group_{name.split('_')[0]}"
        jobs.setdefault(key, []).append(jobid)
    return jobs


def _slurm_job(jobid: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True, check=True).stdout


def test_slurm_profile_runs_resumes_and_matches_a_local_run(cluster, tmp_path):
    # the local reference run goes on beside the first Slurm run, which mostly waits on the
    # executor's status checks (its own results folder: two Snakemakes in one working directory
    # lock only the files they write)
    local_cfg = _config(tmp_path, tmp_path / "local")
    local_run = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(local_cfg)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    # 1. a failing job: non-zero exit, no hang; independent branches still finish (keep-going). The
    # two fine-tunes (noise and rotate, mirror's candidates) are one packed job (config `pack`),
    # which needs noise's data: none runs
    try:
        code, log1 = _slurm(_config(tmp_path, tmp_path / "cluster", broken=True), tmp_path / "logs1")
    finally:
        local_out, _ = local_run.communicate(timeout=900)
    assert local_run.returncode == 0, local_out[-6000:]
    assert "executor: local (jobs run on this machine" in local_out  # never mistaken for Slurm
    local = tmp_path / "local" / "slurm"
    assert code != 0, log1[-3000:]
    out = tmp_path / "cluster" / "slurm"
    done_before = {
        p: p.stat().st_mtime_ns
        for p in [
            out / "models/pretrained/model.safetensors",
            out / "data/mirror/splits.json",
            out / "data/rotate/splits.json",
        ]
    }
    assert not (out / "models/finetuned").exists()

    # 2. fixed and rerun, with the short form users type (`--profile slurm`, found by name from
    # the project root): resumes from what finished, and matches the local run exactly
    code, log2 = _slurm(_config(tmp_path, tmp_path / "cluster"), tmp_path / "logs2", profile="slurm")
    assert code == 0, log2[-4000:]
    assert "executor: slurm" in log2 and "executor: slurm" in log1
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    jobs = _submitted(log2)
    assert "pretrain" not in jobs and len(jobs.get("prepare_data", [])) == 1  # only noise's data again
    assert len(jobs["finetune"]) == 1  # the pack of the two fine-tunes, once
    assert len(jobs["group_short"]) == 1  # the gather and the similarity job in one sbatch (group-components)
    for rel in ["pretrained.csv", "selection.csv", "correlation.csv"] + [
        f"{d}/mirror.csv" for d in ("merge_eval", "mixture", "similarity")
    ]:
        pd.testing.assert_frame_equal(pd.read_csv(out / rel), pd.read_csv(local / rel), check_exact=True, obj=rel)

    # 3. what Slurm recorded: GPU rules on the gpu partition with a GPU, CPU rules without
    all_jobs = {**_submitted(log1)}
    for rule, ids in jobs.items():
        all_jobs.setdefault(rule, []).extend(ids)
    assert GPU_RULES & set(all_jobs) and CPU_RULES & set(all_jobs)
    for rule, ids in all_jobs.items():
        for jobid in ids:
            info = _slurm_job(jobid)
            if rule in GPU_RULES:
                assert "Partition=gpu" in info and "gres:gpu:1" in info, (rule, info)
            elif rule in CPU_RULES:
                assert "Partition=cpu" in info and "gpu" not in info.split("Partition=")[1].split()[0], (rule, info)
                assert "gres:gpu" not in info, (rule, info)
