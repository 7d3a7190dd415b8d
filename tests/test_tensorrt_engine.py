"""TensorRT engine code without TensorRT.

The pure parts (profile shapes, builder flags, dtype mapping, backend choice) are checked
exactly. `build_plan` runs against `FakeTensorRT`, a recorder injected as the `tensorrt`
module: it checks which calls our code makes, in which order and with which arguments. It
builds nothing and proves nothing about TensorRT itself; its API surface mirrors the
TensorRT 10 Python bindings our code is written against.
"""
import enum
import subprocess
import sys
import types
from pathlib import Path

import pytest

from quantdiff import device, engines
from quantdiff.engines import tensorrt as trt_engine
from quantdiff.engines.profile import optimization_profile
from quantdiff.errors import ConfigError, CorruptArtifactError, MissingBackendError, UnsupportedDeviceError

SDXL_UNET = {
    "in_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 * 256 time ids
}
TINY_XL_UNET = {
    "in_channels": 4,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 32 pooled text + 6 * 8 time ids
}
SD15_UNET = {"in_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768}
BATCH = {"min": 1, "opt": 2, "max": 4}
RANGE = {"min": 0.5, "opt": 1.0, "max": 1.0}


# --------------------------------------------------------------------------- profiles


def test_profile_sdxl_1024():
    profile = optimization_profile("sdxl", SDXL_UNET, 1024, BATCH, RANGE)
    assert profile == {
        "sample": ((2, 4, 64, 64), (4, 4, 128, 128), (8, 4, 128, 128)),
        "timestep": ((1,), (1,), (1,)),
        "encoder_hidden_states": ((2, 77, 2048), (4, 77, 2048), (8, 77, 2048)),
        "text_embeds": ((2, 1280), (4, 1280), (8, 1280)),
        "time_ids": ((2, 6), (4, 6), (8, 6)),
    }


def test_profile_tiny_xl_64():
    profile = optimization_profile("sdxl", TINY_XL_UNET, 64, BATCH, RANGE)
    assert profile == {
        "sample": ((2, 4, 4, 4), (4, 4, 8, 8), (8, 4, 8, 8)),
        "timestep": ((1,), (1,), (1,)),
        "encoder_hidden_states": ((2, 77, 64), (4, 77, 64), (8, 77, 64)),
        "text_embeds": ((2, 32), (4, 32), (8, 32)),
        "time_ids": ((2, 6), (4, 6), (8, 6)),
    }


def test_profile_sd15_without_guidance_has_three_inputs_and_single_batch():
    profile = optimization_profile("sd", SD15_UNET, 512, BATCH, RANGE, guidance=False)
    assert profile == {
        "sample": ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 64, 64)),
        "timestep": ((1,), (1,), (1,)),
        "encoder_hidden_states": ((1, 77, 768), (2, 77, 768), (4, 77, 768)),
    }


def test_profile_rounds_latent_down_to_the_unet_downsampling_multiple():
    # 0.6 * 1024 = 614 px -> latent 76. SDXL (3 blocks) needs a multiple of 4: 76; SD 1.5 (4 blocks) of 8: 72.
    sdxl = optimization_profile("sdxl", SDXL_UNET, 1024, BATCH, {"min": 0.6, "opt": 1.0, "max": 1.0})
    assert sdxl["sample"][0] == (2, 4, 76, 76)
    sd15 = optimization_profile("sd", SD15_UNET, 1024, BATCH, {"min": 0.6, "opt": 1.0, "max": 1.0})
    assert sd15["sample"][0] == (2, 4, 72, 72)


@pytest.mark.parametrize(
    "batch, resolution_range, words",
    [
        ({"min": 4, "opt": 2, "max": 4}, RANGE, "min <= opt <= max"),
        ({"min": 0, "opt": 2, "max": 4}, RANGE, "positive"),
        ({"min": 1, "opt": 2}, RANGE, "min, opt and max"),
        (BATCH, {"min": 1.0, "opt": 0.5, "max": 1.0}, "min <= opt <= max"),
        (BATCH, {"min": 0.0, "opt": 1.0, "max": 1.0}, "positive"),
        (BATCH, {"min": 0.05, "opt": 1.0, "max": 1.0}, "gives no latent"),
    ],
)
def test_profile_rejects_bad_ranges(batch, resolution_range, words):
    with pytest.raises(ConfigError, match=words):
        optimization_profile("sdxl", TINY_XL_UNET, 64, batch, resolution_range)


def test_profile_rejects_unknown_pipeline():
    with pytest.raises(ConfigError, match="flux"):
        optimization_profile("flux", SDXL_UNET, 1024, BATCH, RANGE)


# --------------------------------------------------------------------------- builder settings


@pytest.mark.parametrize(
    "precision, flags", [("fp16", ["FP16"]), ("int8", ["INT8", "FP16"]), ("fp8", ["FP8", "FP16"])]
)
def test_builder_flags_per_precision(precision, flags):
    settings = trt_engine.builder_settings(precision, 4)
    assert settings == {
        "precision": precision,
        "flags": flags,
        "strongly_typed": False,
        "network_flags": [],
        "optimization_level": 4,
        "timing_cache": True,
    }


def test_strongly_typed_sets_network_flag_and_no_precision_flags():
    settings = trt_engine.builder_settings("fp8", 3, strongly_typed=True)
    assert settings["flags"] == []
    assert settings["network_flags"] == ["STRONGLY_TYPED"]
    assert settings["strongly_typed"] is True


@pytest.mark.parametrize("level", [0, 1, 2, 3, 4, 5])
def test_valid_optimization_levels(level):
    assert trt_engine.builder_settings("int8", level)["optimization_level"] == level


@pytest.mark.parametrize("level", [-1, 6, 3.5, "4", True, None])
def test_invalid_optimization_level(level):
    with pytest.raises(ConfigError, match="0..5"):
        trt_engine.builder_settings("int8", level)


def test_unknown_precision():
    with pytest.raises(ConfigError, match="int4"):
        trt_engine.builder_settings("int4", 3)


# --------------------------------------------------------------------------- dtypes, timestep


class DataType(enum.Enum):  # stands in for tensorrt.DataType: only .name is read
    HALF = 1
    FP8 = 2


@pytest.mark.parametrize(
    "trt_dtype, torch_name",
    [("HALF", "float16"), ("DataType.FLOAT", "float32"), ("BF16", "bfloat16"), ("INT64", "int64"),
     (DataType.HALF, "float16"), (DataType.FP8, "float8_e4m3fn")],
)
def test_torch_dtype_name(trt_dtype, torch_name):
    assert trt_engine.torch_dtype_name(trt_dtype) == torch_name


def test_torch_dtype_unknown():
    with pytest.raises(trt_engine.TensorRTError, match="INT4"):
        trt_engine.torch_dtype_name("INT4")


def test_timestep_shape():
    assert trt_engine.timestep_shape((), 4) == ()
    assert trt_engine.timestep_shape((1,), 4) == (1,)
    assert trt_engine.timestep_shape((-1,), 4) == (4,)


# --------------------------------------------------------------------------- backend choice


def test_require_tensorrt_missing_names_the_torch_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(MissingBackendError) as err:
        trt_engine.require_tensorrt()
    message = str(err.value)
    assert "TensorRT is not installed" in message
    assert "pip install tensorrt" in message
    assert "engine: {backend: torch}" in message
    assert "--config engine='{backend: torch}'" in message


def test_modules_import_without_tensorrt():
    code = "import sys; sys.modules['tensorrt'] = None; import quantdiff.engines, quantdiff.engines.tensorrt; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "has_trt, has_gpu, chosen",
    [(False, False, "torch"), (True, False, "torch"), (False, True, "torch"), (True, True, "tensorrt")],
)
def test_auto_backend(monkeypatch, has_trt, has_gpu, chosen):
    monkeypatch.setattr(engines, "tensorrt_available", lambda: has_trt)
    monkeypatch.setattr(device, "cuda_available", lambda: has_gpu)
    assert engines.resolve_backend("auto") == chosen


@pytest.mark.parametrize("has_gpu", [False, True])
def test_torch_backend_is_always_torch(monkeypatch, has_gpu):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(device, "cuda_available", lambda: has_gpu)
    assert engines.resolve_backend("torch") == "torch"


def test_tensorrt_requested_but_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert engines.tensorrt_available() is False
    with pytest.raises(MissingBackendError, match="not installed.*backend: torch"):
        engines.resolve_backend("tensorrt")


def test_tensorrt_requested_without_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert engines.tensorrt_available() is True
    with pytest.raises(MissingBackendError, match="needs a CUDA GPU.*backend: torch"):
        engines.resolve_backend("tensorrt")


def test_tensorrt_requested_and_present(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert engines.resolve_backend("tensorrt") == "tensorrt"


def test_unknown_backend():
    with pytest.raises(ConfigError, match="onnxruntime"):
        engines.resolve_backend("onnxruntime")


def test_engine_filename():
    assert engines.engine_filename("tensorrt") == "engine.plan"
    assert engines.engine_filename("torch") == "engine.pt2"
    with pytest.raises(ConfigError):
        engines.engine_filename("auto")


def test_tensorrt_unet_without_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingBackendError, match="backend: torch"):
        trt_engine.TensorRTUNet(tmp_path / "engine.plan", TINY_XL_UNET)


# --------------------------------------------------------------------------- build_plan with a recorder


class FakeTensorRT(types.ModuleType):
    """Records the TensorRT 10 calls `build_plan` makes. Builds nothing.

    `inputs` are the network inputs the parser would declare for the export (-1 = dynamic);
    `parse_errors` makes the parser fail with those messages; `build_result` is what
    `build_serialized_network` returns (None = TensorRT failed); `cache_mismatch` makes
    `set_timing_cache` refuse the cache read from disk.
    """

    def __init__(self, inputs=None, parse_errors=(), build_result=b"PLAN", cache_mismatch=False):
        super().__init__("tensorrt")
        self.__version__ = "10.fake"
        self.calls = []
        fake = self
        inputs = inputs or {}

        class Severity(enum.Enum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3
            VERBOSE = 4

        class ILogger:
            def __init__(self):
                fake.logger = self

        ILogger.Severity = Severity
        self.ILogger = ILogger
        self.BuilderFlag = enum.Enum("BuilderFlag", ["FP16", "INT8", "DEBUG", "FP8"])
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
        self.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])

        class Tensor(types.SimpleNamespace):
            pass

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))
                self.inputs = [Tensor(name=n, shape=s) for n, s in inputs.items()]
                self.num_layers = 0

            num_inputs = property(lambda self: len(self.inputs))
            num_outputs = 1

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return Tensor(name="out_sample", shape=(-1, 4, -1, -1))

        class ParserError:
            def __init__(self, message, node):
                self.message, self.node = message, node

            def desc(self):
                return self.message

            def node_name(self):
                return self.node

            def node_operator(self):
                return "QuantizeLinear"

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.errors = []

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                assert Path(path).is_file()
                self.errors = [ParserError(m, f"node_{i}") for i, m in enumerate(parse_errors)]
                self.network.num_layers = 0 if parse_errors else 42
                return not parse_errors

            num_errors = property(lambda self: len(self.errors))

            def get_error(self, i):
                return self.errors[i]

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, lo, opt, hi))

        class TimingCache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            def __init__(self):
                self.flags = []
                self.cache = None

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag.name))

            def __setattr__(self, name, value):
                if name == "builder_optimization_level":
                    fake.calls.append(("builder_optimization_level", value))
                object.__setattr__(self, name, value)

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool.name, size))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile",))

            def create_timing_cache(self, data):
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                if cache.data and cache_mismatch:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                fake.builder_logger = logger

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network",))
                if build_result is None:
                    fake.builder_logger.log(Severity.ERROR, "out of device memory")
                return build_result

        self.Builder, self.OnnxParser = Builder, OnnxParser

    def names(self):
        return [c[0] for c in self.calls]


SDXL_NETWORK_INPUTS = {
    "sample": (-1, 4, -1, -1),
    "timestep": (1,),
    "encoder_hidden_states": (-1, 77, 64),
    "text_embeds": (-1, 32),
    "time_ids": (-1, 6),
}


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(device, "gpu_name", lambda d="cuda": "NVIDIA H100")
    monkeypatch.setattr(device, "gpu_capability", lambda d="cuda": (9, 0))


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "export" / "unet.onnx"
    path.parent.mkdir()
    path.write_bytes(b"not read by the fake parser")
    return path


def _install(monkeypatch, **kwargs):
    fake = FakeTensorRT(inputs=SDXL_NETWORK_INPUTS, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def _build(onnx_file, tmp_path, precision="int8", level=4, **kwargs):
    profile = optimization_profile("sdxl", TINY_XL_UNET, 64, BATCH, RANGE)
    messages = []
    info = trt_engine.build_plan(
        onnx_file, tmp_path / "out" / "engine.plan", precision, profile, level,
        tmp_path / "cache" / "timing.cache", log=messages.append, **kwargs,
    )
    return info, messages


def _leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".")] if Path(folder).exists() else []


def test_build_plan_call_sequence(monkeypatch, gpu, onnx_file, tmp_path):
    fake = _install(monkeypatch)
    info, _ = _build(onnx_file, tmp_path, precision="int8", level=4, workspace_gb=2)

    assert ("parse_from_file", str(onnx_file)) in fake.calls
    assert ("create_network", 0) in fake.calls  # weakly typed
    assert [c[1] for c in fake.calls if c[0] == "set_flag"] == ["INT8", "FP16"]
    assert ("builder_optimization_level", 4) in fake.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 2 << 30) in fake.calls
    shapes = {c[1]: c[2:] for c in fake.calls if c[0] == "set_shape"}
    assert shapes == {
        "sample": ((2, 4, 4, 4), (4, 4, 8, 8), (8, 4, 8, 8)),
        "encoder_hidden_states": ((2, 77, 64), (4, 77, 64), (8, 77, 64)),
        "text_embeds": ((2, 32), (4, 32), (8, 32)),
        "time_ids": ((2, 6), (4, 6), (8, 6)),
    }  # the static timestep [1] needs no profile shape
    order = fake.names()
    assert order.index("parse_from_file") < order.index("set_flag") < order.index("add_optimization_profile")
    assert order.index("add_optimization_profile") < order.index("build_serialized_network")
    assert order.index("set_timing_cache") < order.index("build_serialized_network")

    assert (tmp_path / "out" / "engine.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "cache" / "timing.cache").read_bytes() == b"+timings"  # fresh cache, saved after the build
    assert _leftovers(tmp_path / "out") == [] and _leftovers(tmp_path / "cache") == []
    assert info["tensorrt_version"] == "10.fake"
    assert info["flags"] == ["INT8", "FP16"]
    assert info["optimization_level"] == 4
    assert info["plan_bytes"] == 4
    assert info["network_layers"] == 42
    assert info["static_inputs"] == {"timestep": [1]}
    assert info["timing_cache_reused"] is False
    assert info["outputs"] == ["out_sample"]


def test_build_plan_reuses_timing_cache(monkeypatch, gpu, onnx_file, tmp_path):
    fake = _install(monkeypatch)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "timing.cache").write_bytes(b"OLD")
    info, _ = _build(onnx_file, tmp_path, precision="fp16", level=3)
    assert ("set_timing_cache", b"OLD", False) in fake.calls
    assert info["timing_cache_reused"] is True
    assert (tmp_path / "cache" / "timing.cache").read_bytes() == b"OLD+timings"
    assert [c[1] for c in fake.calls if c[0] == "set_flag"] == ["FP16"]


def test_build_plan_replaces_mismatched_timing_cache(monkeypatch, gpu, onnx_file, tmp_path):
    _install(monkeypatch, cache_mismatch=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "timing.cache").write_bytes(b"OTHER GPU")
    info, messages = _build(onnx_file, tmp_path)
    assert info["timing_cache_reused"] is False
    assert any("starting a fresh one" in m for m in messages)
    assert (tmp_path / "cache" / "timing.cache").read_bytes() == b"+timings"


def test_build_plan_fp8_and_strongly_typed(monkeypatch, gpu, onnx_file, tmp_path):
    fake = _install(monkeypatch)
    _build(onnx_file, tmp_path, precision="fp8", level=5)
    assert [c[1] for c in fake.calls if c[0] == "set_flag"] == ["FP8", "FP16"]
    assert ("builder_optimization_level", 5) in fake.calls

    fake = _install(monkeypatch)
    info, _ = _build(onnx_file, tmp_path, precision="fp8", level=5, strongly_typed=True)
    assert ("create_network", 1 << 5) in fake.calls
    assert "set_flag" not in fake.names()
    assert info["strongly_typed"] is True


def test_build_plan_fp8_on_ampere_fails_before_tensorrt_runs(monkeypatch, gpu, onnx_file, tmp_path):
    fake = _install(monkeypatch)
    monkeypatch.setattr(device, "gpu_capability", lambda d="cuda": (8, 0))
    with pytest.raises(UnsupportedDeviceError, match="sm 8.0"):
        _build(onnx_file, tmp_path, precision="fp8")
    assert fake.calls == []


def test_build_plan_reports_every_parser_error_and_writes_nothing(monkeypatch, gpu, onnx_file, tmp_path):
    fake = _install(monkeypatch, parse_errors=["Assertion failed: scale must be positive", "unsupported data type"])
    with pytest.raises(CorruptArtifactError) as err:
        _build(onnx_file, tmp_path)
    message = str(err.value)
    assert str(onnx_file) in message
    assert "Assertion failed: scale must be positive" in message
    assert "unsupported data type" in message
    assert "node_1" in message and "QuantizeLinear" in message
    assert "build_serialized_network" not in fake.names()
    assert not (tmp_path / "out" / "engine.plan").exists()
    assert not (tmp_path / "cache" / "timing.cache").exists()


def test_build_plan_failed_build_leaves_nothing(monkeypatch, gpu, onnx_file, tmp_path):
    _install(monkeypatch, build_result=None)
    with pytest.raises(trt_engine.TensorRTError, match="out of device memory"):
        _build(onnx_file, tmp_path)
    assert not (tmp_path / "out" / "engine.plan").exists()
    assert _leftovers(tmp_path / "out") == []


def test_build_plan_profile_must_fit_the_network(monkeypatch, gpu, onnx_file, tmp_path):
    fake = FakeTensorRT(inputs={**SDXL_NETWORK_INPUTS, "encoder_hidden_states": (-1, 77, 2048)})
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(ConfigError, match="encoder_hidden_states"):
        _build(onnx_file, tmp_path)
    assert "build_serialized_network" not in fake.names()


def test_build_plan_dynamic_input_missing_from_profile(monkeypatch, gpu, onnx_file, tmp_path):
    fake = FakeTensorRT(inputs={**SDXL_NETWORK_INPUTS, "controlnet_cond": (-1, 3, -1, -1)})
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(ConfigError, match="controlnet_cond"):
        _build(onnx_file, tmp_path)


def test_build_plan_needs_tensorrt_and_a_gpu(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingBackendError, match="backend: torch"):
        _build(onnx_file, tmp_path)
    _install(monkeypatch)
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    with pytest.raises(MissingBackendError, match="CUDA GPU"):
        _build(onnx_file, tmp_path)


def test_build_plan_invalid_level_fails_before_tensorrt(monkeypatch, gpu, onnx_file, tmp_path):
    fake = _install(monkeypatch)
    with pytest.raises(ConfigError):
        _build(onnx_file, tmp_path, level=9)
    assert fake.calls == []


def test_build_plan_missing_onnx(monkeypatch, gpu, tmp_path):
    _install(monkeypatch)
    with pytest.raises(CorruptArtifactError, match="does not exist"):
        _build(tmp_path / "nope.onnx", tmp_path)
