"""The cluster path for real: the workflow through a single-node Slurm (tests/slurm_cluster.py).

A copy of the workflow (Snakefile, workflow/, config/, quantdiff/) in a temporary folder runs
the documented command, `snakemake --workflow-profile workflow/profiles/slurm <target>`, with the
copy's slurm profile clamped to the test node (no GPUs, few cores): every job is an `sbatch`.
The repository's own results/ are never touched.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import PARTITION, SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TARGET = "results/tiny-xl/int8/calib.pt"
MODEL = Path("resources/models/tiny-xl")
# 20x the prompts and 5x the steps of the default: 100x the UNet calls, several minutes on 2 cores,
# far past a 1-minute limit (Slurm's smallest: it counts whole minutes, and its controller
# enforces limits every 30 s, so the kill comes 60-90 s in; 64 x 50 finished at 67 s and raced it). A --configfile, merged over
# config/config.yaml (`--config calibration={...}` would hand the schema strings, not integers).
SLOW_CALIBRATION = "calibration:\n  calib_size: 160\n  n_steps: 100\n"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no local Slurm: {err}")
    yield c
    c.stop()


def _clamp_profile(path: Path, cluster: SlurmCluster):
    """The repo's slurm profile, with each request cut to what the one test node has: no GPU
    (`gpu: 0` drops `--gpus`), at most its cores, at most half its memory. All else as shipped."""
    profile = yaml.safe_load(path.read_text())
    for res in [profile["default-resources"], *profile["set-resources"].values()]:
        if "gpu" in res:
            res["gpu"] = 0
        if "cpus_per_task" in res:
            res["cpus_per_task"] = min(res["cpus_per_task"], cluster.cpus)
        if "mem_mb" in res:
            res["mem_mb"] = min(res["mem_mb"], cluster.memory_mb // 2)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return profile


@pytest.fixture(scope="module")
def workdir(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copy2(REPO / "Snakefile", work / "Snakefile")
    for folder in ("workflow", "config", "quantdiff"):
        shutil.copytree(REPO / folder, work / folder, ignore=ignore)
    _clamp_profile(work / "workflow/profiles/slurm/config.yaml", cluster)
    return work


def snakemake(work, *args, timeout=300):
    env = dict(os.environ, QUANTDIFF_SLURM_PARTITION=PARTITION)
    env.pop("SLURM_CONF", None)  # the jobs must find /etc/slurm/slurm.conf like a real cluster's
    cmd = [sys.executable, "-m", "snakemake", "--workflow-profile", "workflow/profiles/slurm", *args]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def slurm_jobs(work, rule):
    """Job ids of `rule`, from the plugin's per-job logs (.snakemake/slurm_logs/rule_R/WILDCARDS/ID.log)."""
    logs = sorted((work / ".snakemake/slurm_logs" / f"rule_{rule}").rglob("*.log"))
    return {int(p.stem): p for p in logs if p.stem.isdigit()}


def file_times(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def built(workdir):
    """model + calibrate through sbatch, once for the module."""
    start = time.monotonic()
    run = snakemake(workdir, TARGET)
    took = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-4000:]
    return run, took


def test_calibration_runs_as_slurm_jobs(cluster, workdir, built):
    run, took = built
    assert "Using workflow specific profile workflow/profiles/slurm" in run.stderr
    assert "Falling back to 'sacct'" not in run.stderr  # squeue, as the profile says (no slurmdbd here)
    assert (workdir / TARGET).stat().st_size > 0
    assert (workdir / "results/tiny-xl/int8/calib.json").exists()
    assert (workdir / MODEL / "model_index.json").exists()
    for rule in ("model", "calibrate"):
        jobs = slurm_jobs(workdir, rule)
        assert len(jobs) == 1, f"{rule}: {jobs}"
        job_id = next(iter(jobs))
        assert f"SLURM jobid {job_id}" in run.stderr, run.stderr[-3000:]
        info = cluster.job(job_id)
        assert info["JobState"] == "COMPLETED", info
        assert info["Partition"] == cluster.partition
        assert info["WorkDir"] == str(workdir)
        assert info["Comment"].startswith(f"rule_{rule}")
        # the profile's per-rule request, clamped: no GPU asked of a GPU-less node
        assert "gpu" not in info.get("TRES", "") and "gpu" not in info.get("TresPerNode", ""), info
    calib = cluster.job(next(iter(slurm_jobs(workdir, "calibrate"))))
    assert calib["TimeLimit"] == "02:00:00"  # runtime: 120 from the profile
    print(f"model + calibrate through Slurm: {took:.0f} s")


def test_time_limit_leaves_no_complete_output_and_rerun_resumes(cluster, workdir, built):
    calib = workdir / TARGET
    model_before = file_times(workdir / MODEL)
    before = set(slurm_jobs(workdir, "calibrate"))

    # 1. A calibration that needs minutes, under a 1-minute limit: Slurm kills it.
    start = time.monotonic()
    # (The target goes first: --configfile and --set-resources take every word after them.) Slurm
    # kills it 60-90 s in; the executor's status checks back off, so Snakemake sees it at ~125 s.
    (workdir / "slow.yaml").write_text(SLOW_CALIBRATION)
    run = snakemake(workdir, TARGET, "--configfile", "slow.yaml", "--set-resources", "calibrate:runtime=1",
                    "calibrate:gpu=0", f"calibrate:cpus_per_task={cluster.cpus}", "calibrate:mem_mb=4000",
                    timeout=400)
    killed_after = time.monotonic() - start
    assert run.returncode != 0, run.stderr[-3000:]
    (job_id,) = set(slurm_jobs(workdir, "calibrate")) - before
    info = cluster.job(job_id)
    assert info["JobState"] == "TIMEOUT", info
    assert info["TimeLimit"] == "00:01:00"
    assert "DUE TO TIME LIMIT" in slurm_jobs(workdir, "calibrate")[job_id].read_text()
    assert "TIMEOUT" in run.stderr and str(job_id) in run.stderr
    # Nothing that looks complete: the old checkpoint was removed before the job ran, the killed
    # job wrote none, and Snakemake holds no metadata claiming one.
    # (Snakemake even removes the folder when it is left empty.)
    leftovers = sorted(p.name for p in calib.parent.iterdir()) if calib.parent.exists() else []
    assert not calib.exists() and not (calib.parent / "calib.json").exists(), leftovers
    assert all(name.endswith(".partial") or name.startswith(".") for name in leftovers), leftovers
    # The model folder, complete before, is untouched.
    assert file_times(workdir / MODEL) == model_before

    # 2. The same target again with the profile's normal runtime: only calibrate is (re)scheduled.
    dry = snakemake(workdir, "--dry-run", TARGET)
    assert dry.returncode == 0, dry.stderr
    scheduled = set(re.findall(r"^rule (\w+):", dry.stdout + dry.stderr, re.M))
    assert scheduled == {"calibrate"}, dry.stdout + dry.stderr
    start = time.monotonic()
    rerun = snakemake(workdir, TARGET)
    resumed_after = time.monotonic() - start
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert calib.stat().st_size > 0
    assert file_times(workdir / MODEL) == model_before
    assert len(slurm_jobs(workdir, "model")) == 1  # no second model job was ever submitted
    (rerun_id,) = set(slurm_jobs(workdir, "calibrate")) - before - {job_id}
    assert cluster.job(rerun_id)["JobState"] == "COMPLETED"
    print(f"killed at the time limit after {killed_after:.0f} s; resumed in {resumed_after:.0f} s")
