"""Engine backends: which one to build, and what its artifact is called.

`tensorrt` builds `engine.plan` from the Q/DQ ONNX; `torch` packages real 8-bit modules with
AOTInductor as `engine.pt2`. `auto` picks TensorRT only where it can actually run (it imports
and a CUDA GPU is visible). An explicit request that cannot be met is an error, never a
silent fallback.
"""
from __future__ import annotations

from .. import device
from ..errors import ConfigError, MissingBackendError
from . import tensorrt as _tensorrt
from .tensorrt import TORCH_BACKEND_HINT

BACKENDS = ("tensorrt", "torch")
ENGINE_FILENAMES = {"tensorrt": "engine.plan", "torch": "engine.pt2"}
# GPU kernel settings the torch engine (an AOTInductor package) does not take, with the setting to
# use instead. Both kernels make their TMA descriptors on the GPU, in scratch memory their launcher
# provides: under torch.compile they give the fake-quant model's output, but an int8 tiny-xl package
# with them made NaN images on an H200 (torch 2.11, docs/PERF.md), as if its C++ launcher sized
# that scratch for one program rather than the grid (a bug of that kind: pytorch/pytorch#175385;
# the cause is not established). They were not faster either. bench.unet still times them through
# torch.compile.
UNPACKAGED_KERNELS = {"int8_gemm": ("triton-tma", "triton"), "geglu": ("triton", "inductor")}


# Kernel settings whose ops are Python code (cuDNN's graphs through its frontend): an AOTInductor package,
# which runs without Python, cannot hold them; the `export` format (torch.export, compiled where it is
# loaded) can.
PYTHON_OP_KERNELS = {"int8_gemm": ("cudnn", "triton")}


def check_packageable(kernels, where="engine", torch_format="aoti"):
    """Raise ConfigError for a kernel setting in `kernels` ({"int8_gemm": ..., "geglu": ...}) that the
    torch engine of `torch_format` does not take (UNPACKAGED_KERNELS; PYTHON_OP_KERNELS in an AOTInductor
    package); `where` names the config section."""
    for key, (refused, instead) in UNPACKAGED_KERNELS.items():
        if kernels.get(key) == refused:
            raise ConfigError(
                f"{where}.{key} is {refused}, which the torch engine (an AOTInductor package) does not take: its "
                f"kernel makes TMA descriptors on the GPU, and a package with it gave NaN images on an H200 (torch "
                f"2.11; docs/PERF.md). Use {instead} or auto; `python -m quantdiff.bench.unet` still times "
                f"{refused} through torch.compile.")
    for key, (refused, instead) in PYTHON_OP_KERNELS.items():
        if torch_format == "aoti" and kernels.get(key) == refused:
            raise ConfigError(
                f"{where}.{key} is {refused}, whose kernels are called from Python, which an AOTInductor package "
                f"(engine.torch_format: aoti) cannot hold. Set engine.torch_format: export "
                f"(config/overlays/export-format.yaml), or {where}.{key}: {instead} or auto.")


def tensorrt_available() -> bool:
    """Whether `import tensorrt` works here (not whether a GPU is present)."""
    try:
        _tensorrt.require_tensorrt()
    except MissingBackendError:
        return False
    return True


def resolve_backend(requested: str) -> str:
    """Turn the config's `engine.backend` (auto|tensorrt|torch) into the backend to build."""
    if requested == "torch":
        return "torch"
    if requested == "auto":
        # Both probes go through module attributes so tests can monkeypatch them.
        return "tensorrt" if tensorrt_available() and device.cuda_available() else "torch"
    if requested == "tensorrt":
        _tensorrt.require_tensorrt()  # raises MissingBackendError naming the torch alternative
        if not device.cuda_available():
            raise MissingBackendError(
                "engine backend 'tensorrt' needs a CUDA GPU to build and run a plan; none is visible. "
                f"Run the engine stage on a GPU machine, or build the PyTorch engine instead: {TORCH_BACKEND_HINT}."
            )
        return "tensorrt"
    raise ConfigError(f"engine.backend is {requested!r}; choose one of auto, tensorrt, torch.")


def engine_filename(backend: str) -> str:
    """The artifact name under results/{model}/{precision}/ for a resolved backend."""
    try:
        return ENGINE_FILENAMES[backend]
    except KeyError:
        raise ConfigError(
            f"no engine file for backend {backend!r}; resolve it first (resolve_backend) to one of {', '.join(BACKENDS)}."
        ) from None
