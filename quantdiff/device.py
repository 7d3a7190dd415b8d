"""Facts about the compute device, and guards for stages that need a GPU or FP8.

`describe_device` goes into engine.json and bench.json, so a number is never reported
without the hardware and library versions that produced it. The guards raise the
project's errors with a message that names what is missing and what to do instead.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from .errors import MissingBackendError, UnsupportedDeviceError

# FP8 (e4m3) tensor cores arrive with Ada (sm 8.9) and Hopper (sm 9.0).
FP8_MIN_CAPABILITY = (8, 9)

# Distribution names to ask importlib.metadata, per library; the first one installed wins.
# Metadata avoids importing TensorRT or ONNX Runtime just to read a version string.
_DISTRIBUTIONS = {
    "diffusers": ("diffusers",),
    "nvidia-modelopt": ("nvidia-modelopt",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
}


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU. The one GPU probe: tests monkeypatch it."""
    return torch.cuda.is_available()


def fp8_supported(capability: tuple) -> bool:
    """Whether a GPU of this compute capability, e.g. (9, 0), has FP8 tensor cores."""
    return tuple(int(part) for part in capability) >= FP8_MIN_CAPABILITY


def gpu_name(device="cuda") -> str:
    return torch.cuda.get_device_name(torch.device(device))


def gpu_capability(device="cuda") -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def library_versions() -> dict:
    """Versions of the libraries that shape results; None for one not installed."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA torch was built with; None for a CPU build
    }
    for library, distributions in _DISTRIBUTIONS.items():
        versions[library] = _installed_version(distributions)
    return versions


def describe_device(device: str | None = None) -> dict:
    """Kind, name, compute capability, driver and library versions of `device`.

    `device` is "cpu", "cuda" or "cuda:N"; None picks the GPU when one is visible, else the CPU.
    """
    if device is None:
        device = "cuda" if cuda_available() else "cpu"
    kind = torch.device(device).type
    facts = {"kind": kind, "device": str(device), "name": None, "compute_capability": None, "driver": None}
    if kind == "cuda":
        require_cuda(f"describe_device({device!r})")
        major, minor = gpu_capability(device)
        facts.update(
            name=gpu_name(device),
            compute_capability=f"{major}.{minor}",
            driver=_nvidia_driver_version(),
            memory_bytes=torch.cuda.get_device_properties(torch.device(device)).total_memory,
        )
    elif kind == "cpu":
        facts.update(name=_cpu_name(), cores=_cpu_count())
    else:
        facts["name"] = str(device)
    facts["versions"] = library_versions()
    return facts


def require_cuda(stage: str) -> str:
    """Raise MissingBackendError unless a CUDA GPU is visible; return the device string."""
    if cuda_available():
        return "cuda"
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build"
    else:
        why = f"torch {torch.__version__} was built for CUDA {torch.version.cuda} but finds no device (check the driver and CUDA_VISIBLE_DEVICES)"
    raise MissingBackendError(
        f"The {stage} stage needs a CUDA GPU; none is visible: {why}. "
        "Run it on a GPU machine (the slurm profile gives it `gpu: 1`), "
        "or build the PyTorch engine, which runs on CPU by exact emulation: `engine: {backend: torch}`."
    )


def require_fp8(device="cuda") -> None:
    """Raise UnsupportedDeviceError when `device` is a GPU below sm 8.9.

    A CPU passes: the torch backend emulates FP8 exactly there (slowly). Stages that need
    a GPU call `require_cuda` first.
    """
    if torch.device(device).type != "cuda":
        return
    capability = gpu_capability(device)
    if not fp8_supported(capability):
        name = gpu_name(device)
        raise UnsupportedDeviceError(
            f"FP8 needs a GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer "
            f"(Ada, Hopper, Blackwell); {name} is sm {capability[0]}.{capability[1]}. "
            "Build the int8 precision on this GPU instead, or run fp8 on a newer GPU (L4, L40S, H100, ...)."
        )


def _installed_version(distributions) -> str | None:
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_count() -> int | None:
    """Cores this process may use: sched_getaffinity honours taskset and cgroup cpusets."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _nvidia_driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi; torch does not expose it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if lines else None
