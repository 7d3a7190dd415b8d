"""The torch engine's self-check: its AOTInductor package, loaded in a fresh process, against the
eager model it was built from, on the build's own example inputs.

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


def packaged_output(engine_path, inputs):
    """The package's output on positional `inputs`, computed in a fresh Python process."""
    package_root = str(Path(__file__).resolve().parents[2])  # where `quantdiff` imports from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="quantdiff-engine-check-") as workdir:
        inputs_path, output_path = Path(workdir) / "inputs.pt", Path(workdir) / "output.pt"
        torch.save(tuple(inputs), inputs_path)
        proc = subprocess.run([sys.executable, "-m", "quantdiff.engines.check", str(engine_path), str(inputs_path),
                               str(output_path)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise EngineOutputError(f"{engine_path}: the packaged engine did not run on the build's example inputs "
                                    f"(exit status {proc.returncode}): {' / '.join(tail)}")
        return torch.load(output_path, map_location=inputs[0].device)


@torch.no_grad()
def check_engine(engine_path, eager, inputs, log=print, bound=CHECK_BOUND):
    """Compare the package at `engine_path` with `eager` (the module it was exported from, called
    with the positional `inputs`). Returns {"rel_err_vs_eager", "bound", "shape"}; raises
    EngineOutputError, deleting the package, when its output is not finite or past `bound`."""
    expected = eager(*inputs)
    if expected.is_cuda:
        torch.cuda.empty_cache()  # the package loads in another process, on the same GPU
    try:
        got = packaged_output(engine_path, inputs)
    except EngineOutputError:
        Path(engine_path).unlink(missing_ok=True)  # it must not look like a finished engine
        raise
    shape = list(inputs[0].shape)
    bad = int((~torch.isfinite(got)).sum())
    err = relative_error(expected, got) if not bad else float("nan")
    if bad or err > bound:
        Path(engine_path).unlink(missing_ok=True)  # it must not look like a finished engine
        why = f"{bad} non-finite values of {got.numel()}" if bad else f"relative error {err:.3g} (bound {bound})"
        raise EngineOutputError(f"{engine_path}: the packaged engine's output on the build's example inputs (sample "
                                f"{shape}) differs from the model it was built from: {why}. It was deleted; "
                                f"rebuild with the default engine.* kernel settings.")
    log(f"engine: self-check on sample {shape}: relative error {err:.2e} against the eager model")
    return {"rel_err_vs_eager": err, "bound": bound, "shape": shape}


def main(argv):
    from .torch import load_engine

    engine_path, inputs_path, output_path = argv
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        out = load_engine(engine_path)(*inputs)
    torch.save(out[0] if isinstance(out, (list, tuple)) else out, output_path)


if __name__ == "__main__":
    main(sys.argv[1:])
