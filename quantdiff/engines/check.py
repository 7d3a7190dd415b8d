"""The torch engine's self-check: its AOTInductor package, loaded in a fresh process, against the
eager model it was built from, on the build's own example inputs and, for a dynamic engine, on
the smallest inputs it takes (a batch of one runs other GEMM tiles than the example's).

A kernel can be right under torch.compile and wrong inside a package: on an H200 an int8 package
made NaN images while the same modules compiled gave the fake-quant model's output (docs/PERF.md).
Run here, such an engine fails its build, named and with its error, instead of reaching the bench.
The package is loaded in another process because loading one compiled earlier in the same process
crashed on the GPU (docs/PERF.md); it is the way the bench stage loads it, too. A package that
crashes its process while loading is compared with a one-linear package built on the spot: on an
H100 with torch 2.11 (2026-12-07) every CUDA package crashed the loader, the one-linear one too,
and the build then says so instead of blaming the engine's kernels.

    python -m quantdiff.engines.check ENGINE INPUTS OUTPUT   (what check_engine runs)
    python -m quantdiff.engines.check --probe [DEVICE]      (do packages load here at all?)
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


# What the check process prints once the package has loaded: a process that dies without it died
# loading the package, not running it.
LOADED = "quantdiff-check: package loaded"
# the check process's command line, before its three arguments
CHECK_COMMAND = [sys.executable, "-m", "quantdiff.engines.check"]


def _check_process(engine_path, input_sets, workdir):
    """Runs `python -m quantdiff.engines.check` on the package and the tuples of positional inputs in
    a fresh process; returns (the finished process, the path its outputs are saved to)."""
    package_root = str(Path(__file__).resolve().parents[2])  # where `quantdiff` imports from
    # faulthandler: a package that crashes the process (a segfault on an H200: docs/PERF.md) says where
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
               PYTHONFAULTHANDLER="1")
    inputs_path, output_path = Path(workdir) / "inputs.pt", Path(workdir) / "output.pt"
    torch.save([tuple(inputs) for inputs in input_sets], inputs_path)
    proc = subprocess.run([*CHECK_COMMAND, str(engine_path), str(inputs_path), str(output_path)], env=env,
                          capture_output=True, text=True)
    return proc, output_path


def packaged_outputs(engine_path, input_sets, name):
    """The package's output on each tuple of positional inputs, computed in a fresh Python process
    (`name`: the engine's path in messages)."""
    with tempfile.TemporaryDirectory(prefix="quantdiff-engine-check-") as workdir:
        proc, output_path = _check_process(engine_path, input_sets, workdir)
        if proc.returncode != 0:
            raise EngineOutputError(f"{name}: {failure_summary(proc, input_sets[0][0], engine_path)}")
        return torch.load(output_path, map_location=input_sets[0][0].device)


def failure_summary(proc, sample, engine_path):
    """Why the check process failed: while loading the package or while running it, with what it
    said. An AOTInductor package that a signal killed while loading gets the verdict of
    probe_package_loading (on `sample`'s device and dtype): whether any package loads here."""
    from .torch import engine_format  # (torch imports this module)

    said = " / ".join(failure_lines(proc))
    if LOADED in proc.stdout:
        return f"the packaged engine did not run on the build's example inputs (exit status {proc.returncode}): {said}"
    summary = f"the packaged engine did not load (exit status {proc.returncode}): {said}"
    # an error the loader raised (a corrupt file) says why itself; a torch.export program has no package loader
    if proc.returncode >= 0 or engine_format(engine_path, default=None) != "aoti":
        return summary
    probe = probe_package_loading(sample.device, sample.dtype)
    if probe is None:
        return (f"{summary}. A one-linear AOTInductor package built here for comparison loads, so it is this "
                f"engine's package that crashes the loader.")
    return (f"{summary}. So did a one-linear AOTInductor package built here for comparison ({probe}): torch "
            f"{torch.__version__} cannot load AOTInductor packages on this machine, whatever they hold (as on the "
            f"H100 and H200 machines with torch 2.11.0+cu130, docs/PERF.md). Set engine.torch_format: export "
            f"(the same program, compiled by torch.compile where it is loaded), or build where packages load.")


def probe_package_loading(device, dtype):
    """None if a one-linear AOTInductor package, built here on `device` in `dtype`, loads and runs in a
    fresh process (as the self-check runs an engine); else what that process said."""
    with tempfile.TemporaryDirectory(prefix="quantdiff-package-probe-") as workdir:
        linear = torch.nn.Linear(16, 16).to(device=device, dtype=dtype).eval()
        example = torch.randn(8, 16, device=device, dtype=dtype)
        with torch.no_grad():
            program = torch.export.export(linear, (example,))
        package = Path(workdir) / "probe.pt2"
        torch._inductor.aoti_compile_and_package(program, package_path=str(package))
        proc, _ = _check_process(package, [(example,)], workdir)
        return None if proc.returncode == 0 else " / ".join(failure_lines(proc))


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


def probe_main(device):
    """`--probe [DEVICE]`: whether AOTInductor packages load here at all (exit status 0 if they do)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    failure = probe_package_loading(device, dtype)
    verdict = "loads" if failure is None else f"does not load: {failure}"
    print(f"a one-linear AOTInductor package on {device} (torch {torch.__version__}) {verdict}")
    return 0 if failure is None else 1


def main(argv):
    from .torch import load_engine

    if argv[:1] == ["--probe"]:
        return probe_main(argv[1] if len(argv) > 1 else None)
    engine_path, inputs_path, output_path = argv
    runner = load_engine(engine_path)
    print(LOADED, flush=True)
    outputs = []
    with torch.no_grad():
        for inputs in torch.load(inputs_path):
            out = runner(*inputs)
            outputs.append(out[0] if isinstance(out, (list, tuple)) else out)
    torch.save(outputs, output_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
