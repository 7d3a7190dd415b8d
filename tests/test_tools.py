"""tools/bench-on-gpus.sh: what it does before it needs a GPU (arguments, the refusal without one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workflow_helpers import copy_project

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench-on-gpus.sh"


def run(args, cwd):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [[], ["xl-1.0-arch"], ["xl-1.0-arch", "--", "--dry-run"]])
def test_usage_without_model_or_precisions(tmp_path, args):
    result = run(args, tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("usage:") and "MODEL PRECISION..." in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu_before_building_anything(tmp_path):
    result = run(["tiny-xl", "int8", "fp8"], tmp_path)
    assert result.returncode == 1 and "no GPU visible; run snakemake directly" in result.stderr
    assert not any(tmp_path.iterdir())  # no logs/, no snakemake run


def test_builds_every_engine_before_the_benches_one_per_gpu(tmp_path):
    """With two GPUs (a stand-in python3 reports them) and a dry run: shared stages once, then each
    precision's calibration and engine pinned round-robin, then one bench per GPU in the order given."""
    (tmp_path / "project").mkdir()
    project = copy_project(tmp_path / "project")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f"#!/bin/sh\ncase \"$2\" in *device_count*) echo 2;; *) exec {sys.executable} \"$@\";; esac\n")
    (shim / "python3").chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(project),
               PATH=f"{shim}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(SCRIPT), "tiny-xl", "fp8", "int8", "fp16", "--", "--dry-run"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pinned = [line for line in result.stdout.splitlines() if line.startswith("GPU ")]
    # the jobs of one phase start together, so their lines come in any order
    assert sorted(pinned[:3]) == sorted(pinned[3:]) == ["GPU 0: fp16", "GPU 0: fp8", "GPU 1: int8"]
    benches_on_gpu0 = [line for line in pinned[3:] if line.startswith("GPU 0")]
    assert benches_on_gpu0 == ["GPU 0: fp8", "GPU 0: fp16"]  # one at a time, in the order given
    for precision, engine_jobs in (("fp8", {"calibrate", "engine_torch"}), ("fp16", {"engine_torch"})):
        log = (project / "logs" / f"bench-on-gpus-{precision}.log").read_text()
        engine_run, bench_run = log.split("This was a dry-run")[:2]
        assert engine_jobs <= set(_job_names(engine_run)) and "bench" not in _job_names(engine_run)
        assert "bench" in _job_names(bench_run)


def _job_names(dry_run_text):
    """Rule names in the 'Job stats' table of one dry run."""
    table = dry_run_text.split("Job stats:")[1].split("total")[0]
    return [line.split()[0] for line in table.splitlines()[3:] if line.strip()]


def test_a_failed_engine_phase_skips_that_precisions_bench(tmp_path):
    """A stand-in snakemake that fails int8's engine phase: int8 gets no bench run (it would only
    rebuild the same engine), the others do, and the script says so and exits 1."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text("#!/bin/sh\necho 2\n")
    calls = tmp_path / "calls.txt"
    (shim / "snakemake").write_text(f"#!/bin/sh\necho \"$CUDA_VISIBLE_DEVICES $*\" >> {calls}\n"
                                    "case \"$*\" in *--until*int8*) exit 1;; esac\n")
    for tool in ("python3", "snakemake"):
        (shim / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(SCRIPT), "tiny-xl", "fp8", "int8", "fp16"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "skipped: int8 bench (its engine phase failed)" in result.stdout
    bench_runs = [line.split() for line in calls.read_text().splitlines() if "--until" not in line and "bench.json" in line]
    # (GPU, target): fp16 moves up to GPU 1, where int8 would have been
    assert sorted((run[0], run[-1]) for run in bench_runs) == [("0", "results/tiny-xl/fp8/bench.json"),
                                                               ("1", "results/tiny-xl/fp16/bench.json")]
