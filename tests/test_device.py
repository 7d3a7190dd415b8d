"""Device facts and the GPU/FP8 guards, checked without a GPU (the probes are monkeypatched)."""
import json
import platform

import diffusers
import pytest
import torch

from quantdiff import device
from quantdiff.errors import MissingBackendError, UnsupportedDeviceError


@pytest.mark.parametrize(
    "capability, supported",
    [((8, 9), True), ((9, 0), True), ((10, 0), True), ((12, 0), True), ((8, 6), False), ((8, 0), False), ((7, 5), False)],
)
def test_fp8_supported(capability, supported):
    assert device.fp8_supported(capability) is supported


def _gpu(monkeypatch, name, capability):
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(device, "gpu_name", lambda d="cuda": name)
    monkeypatch.setattr(device, "gpu_capability", lambda d="cuda": capability)


def test_require_fp8_names_gpu_sm_and_the_alternatives(monkeypatch):
    _gpu(monkeypatch, "NVIDIA A10", (8, 6))
    with pytest.raises(UnsupportedDeviceError) as err:
        device.require_fp8("cuda")
    message = str(err.value)
    assert "NVIDIA A10" in message
    assert "sm 8.6" in message
    assert "8.9" in message
    assert "int8" in message
    assert "newer GPU" in message


def test_require_fp8_passes_on_hopper_and_on_cpu(monkeypatch):
    _gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    device.require_fp8("cuda")
    device.require_fp8("cuda:0")
    device.require_fp8("cpu")  # the torch backend emulates FP8 on CPU


def test_require_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    with pytest.raises(MissingBackendError) as err:
        device.require_cuda("calibrate")
    message = str(err.value)
    assert "calibrate stage needs a CUDA GPU; none is visible" in message
    assert "backend: torch" in message


def test_require_cuda_with_gpu(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert device.require_cuda("bench") == "cuda"


def test_describe_cpu():
    facts = device.describe_device("cpu")
    assert facts["kind"] == "cpu"
    assert isinstance(facts["name"], str) and facts["name"]
    assert facts["compute_capability"] is None
    assert facts["driver"] is None
    versions = facts["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["cuda"] == torch.version.cuda
    assert versions["python"] == platform.python_version()
    assert versions["diffusers"] == diffusers.__version__
    for library in ("nvidia-modelopt", "onnx", "onnxruntime", "tensorrt"):
        assert library in versions
    assert versions["nvidia-modelopt"] is not None and versions["onnx"] is not None
    json.dumps(facts)  # goes into engine.json / bench.json as is


def test_describe_default_is_cpu_without_gpu(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert device.describe_device()["kind"] == "cpu"
