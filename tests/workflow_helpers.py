"""Run the real workflow in a scratch copy of the project, so tests never touch the repo's results/."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
PROJECT_PARTS = ("Snakefile", "workflow", "config", "quantdiff")

# Small but complete settings: every stage runs, on 2 CPU cores, in about two minutes.
FAST_CONFIG = [
    "calibration={calib_size: 2, n_steps: 4}",
    "bench={n_prompts: 2, steps: 4, iters: 2, warmup: 1}",
]


def copy_project(dest):
    dest = Path(dest)
    for part in PROJECT_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / part)
    return dest


def snakemake(workdir, *args, config=(), check=True, timeout=900):
    """Run snakemake in `workdir`; returns the CompletedProcess (stdout+stderr in .stdout)."""
    cmd = [SNAKEMAKE, "--cores", "1", *args]
    if config:
        cmd += ["--config", *config]
    env = dict(os.environ, PYTHONPATH=str(workdir))  # the copy's package, so edits to it count
    proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-6000:]}")
    return proc


def planned_jobs(workdir, *targets, config=()):
    """{rule: count} that a dry run would execute (parsed from Snakemake's 'Job stats' table)."""
    out = snakemake(workdir, "--dry-run", *targets, config=config).stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not match:
            break
        if match.group(1) != "total":
            jobs[match.group(1)] = int(match.group(2))
    return jobs
