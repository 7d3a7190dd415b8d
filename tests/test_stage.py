"""The rule scripts' glue (quantdiff.stage): what a failing stage leaves in its log."""
import subprocess
import sys

STAGE_SCRIPT = """
import ctypes, sys
from types import SimpleNamespace
from quantdiff.errors import ConfigError
from quantdiff.stage import stage

snakemake = SimpleNamespace(log=[sys.argv[1]], rule="engine_torch", wildcards={"model": "tiny-xl"})
with stage(snakemake) as log:
    log("loading the engine")
    if sys.argv[2] == "crash":
        ctypes.string_at(0)
    raise ConfigError("engine.batch: min 0 is below 1")
"""


def run_stage(tmp_path, how):
    log = tmp_path / f"{how}.log"
    proc = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(log), how], capture_output=True, text=True)
    return proc, log.read_text()


def test_a_stage_that_crashes_in_native_code_leaves_the_crash_in_its_log(tmp_path):
    """A segfault (an AOTInductor package's loader did that on an H100, docs/PERF.md) writes its kind
    and the stage's Python frames into the rule's log, after the lines logged so far."""
    proc, text = run_stage(tmp_path, "crash")
    assert proc.returncode == -11
    lines = text.splitlines()
    assert lines[0].endswith("rule engine_torch {'model': 'tiny-xl'}") and lines[1].endswith("loading the engine")
    assert "Fatal Python error: Segmentation fault" in text and 'File "<string>", line 11 in <module>' in text


def test_a_stage_error_is_one_line_and_exit_status_1(tmp_path):
    proc, text = run_stage(tmp_path, "error")
    assert proc.returncode == 1
    assert text.splitlines()[-1].endswith("ERROR: engine.batch: min 0 is below 1")
    assert "Fatal Python error" not in text
