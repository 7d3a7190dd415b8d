"""The torch engine's self-check: its AOTInductor package, loaded in a fresh process, against the
eager model it was built from, on the build's own example inputs and, for a dynamic engine, on
the smallest inputs it takes (a batch of one runs other GEMM tiles than the example's).

A kernel can be right under torch.compile and wrong inside a package: on an H200 an int8 package
made NaN images while the same modules compiled gave the fake-quant model's output (docs/PERF.md).
Run here, such an engine fails its build, named and with its error, instead of reaching the bench.
The package is loaded in another process because loading one compiled earlier in the same process
crashed on the GPU (docs/PERF.md); it is the way the bench stage loads it, too.

    python -m quantdiff.engines.check ENGINE INPUTS OUTPUT   (what check_engine runs)
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import EngineOutputError

# Relative error of the package's output against the eager model's. The compiled kernels sum and
# round in another order than eager ops, which can move an 8-bit value by one step, and random
# weights compound such flips (the tests' tiny int8 UNet on the CPU: 3.3e-2; SDXL with random
# weights on an H200: 0.07 between the compiled 8-bit model and the fake-quant one, docs/PERF.md).
# Broken kernels give NaN, or errors near 1.
CHECK_BOUND = 0.25


def relative_error(reference, test):
    """||test - reference|| / ||reference|| in float32 (bench.unet's error columns too)."""
    return float((test.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))


def smallest_inputs(inputs, shape_ranges):
    """The positional engine `inputs` cut to the smallest batch, height and width of `shape_ranges`
    (package_engine's): every input is batch-first, and the sample is (batch, channels, h, w)."""
    batch, height, width = (shape_ranges[k][0] for k in ("batch", "height", "width"))
    sample, *rest = inputs
    return (sample[:batch, :, :height, :width].contiguous(), *(t[:batch].contiguous() for t in rest))


def packaged_outputs(engine_path, input_sets, name):
    """The package's output on each tuple of positional inputs, computed in a fresh Python process
    (`name`: the engine's path in messages)."""
    package_root = str(Path(__file__).resolve().parents[2])  # where `quantdiff` imports from
    # faulthandler: a package that crashes the process (a segfault on an H200: docs/PERF.md) says where
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
               PYTHONFAULTHANDLER="1")
    with tempfile.TemporaryDirectory(prefix="quantdiff-engine-check-") as workdir:
        inputs_path, output_path = Path(workdir) / "inputs.pt", Path(workdir) / "output.pt"
        torch.save([tuple(inputs) for inputs in input_sets], inputs_path)
        proc = subprocess.run([sys.executable, "-m", "quantdiff.engines.check", str(engine_path), str(inputs_path),
                               str(output_path)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EngineOutputError(f"{name}: the packaged engine did not run on the build's example inputs "
                                    f"(exit status {proc.returncode}): {' / '.join(failure_lines(proc))}")
        return torch.load(output_path, map_location=input_sets[0][0].device)


def failure_lines(proc, count=3):
    """What a failed check process said: the last lines of a Python error, or, for a process a
    signal killed, faulthandler's kind of crash and innermost frames (it prints them first)."""
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    if proc.returncode >= 0:
        return lines[-count:]
    fatal = [line.strip() for line in lines if line.startswith("Fatal Python error")]
    frames = [line.strip() for line in lines if line.strip().startswith("File ")]
    return (fatal + frames)[: count + 1] or ["no output (killed by a signal)"]


@torch.no_grad()
def check_engine(engine_path, eager, input_sets, log=print, bound=CHECK_BOUND, name=None):
    """Compare the package at `engine_path` with `eager` (the module it was exported from) on each
    tuple of positional inputs in `input_sets`. Returns {"rel_err_vs_eager": the largest, "bound",
    "by_shape": [{"shape", "rel_err_vs_eager"}, ...]}; raises EngineOutputError, deleting the
    package, when an output is not finite or past `bound`. `name`: the engine's path in messages
    (package_engine checks it under its temporary name)."""
    name = name or engine_path
    expected = [eager(*inputs) for inputs in input_sets]
    if expected[0].is_cuda:
        torch.cuda.empty_cache()  # the package loads in another process, on the same GPU
    try:
        outputs = packaged_outputs(engine_path, input_sets, name)
    except EngineOutputError:
        Path(engine_path).unlink(missing_ok=True)  # it must not look like a finished engine
        raise
    by_shape = []
    for inputs, want, got in zip(input_sets, expected, outputs):
        shape = list(inputs[0].shape)
        bad = int((~torch.isfinite(got)).sum())
        err = relative_error(want, got) if not bad else float("nan")
        if bad or err > bound:
            Path(engine_path).unlink(missing_ok=True)  # it must not look like a finished engine
            why = f"{bad} non-finite values of {got.numel()}" if bad else f"relative error {err:.3g} (bound {bound})"
            raise EngineOutputError(f"{name}: the packaged engine's output on sample {shape} differs from the "
                                    f"model it was built from: {why}. It was deleted; rebuild with the default "
                                    f"engine.* kernel settings, or, if only a small sample fails, with a larger "
                                    f"minimum engine.batch or engine.resolution.")
        log(f"engine: self-check on sample {shape}: relative error {err:.2e} against the eager model")
        by_shape.append({"shape": shape, "rel_err_vs_eager": err})
    return {"rel_err_vs_eager": max(c["rel_err_vs_eager"] for c in by_shape), "bound": bound, "by_shape": by_shape}


def main(argv):
    from .torch import load_engine

    engine_path, inputs_path, output_path = argv
    runner = load_engine(engine_path)
    outputs = []
    with torch.no_grad():
        for inputs in torch.load(inputs_path):
            out = runner(*inputs)
            outputs.append(out[0] if isinstance(out, (list, tuple)) else out)
    torch.save(outputs, output_path)


if __name__ == "__main__":
    main(sys.argv[1:])
