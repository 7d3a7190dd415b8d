"""tools/bench-on-gpus.sh: what it does before it needs a GPU (arguments, the refusal without one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
