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
