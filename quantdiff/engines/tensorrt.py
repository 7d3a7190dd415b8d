"""Every TensorRT call of the project, in one module.

Written against the TensorRT 10 Python API and reviewed, not run: no TensorRT exists where
this project is developed. So the module imports `tensorrt` only inside `require_tensorrt()`,
and everything decidable without it (optimization profile shapes, builder flags, the dtype
mapping) is a pure function with plain-data results that the tests pin down.

Decisions:
- Timestep. The export stage names the inputs `sample, timestep, encoder_hidden_states,
  text_embeds, time_ids` and makes only batch, height and width dynamic, so the timestep is a
  static one-element float tensor, shape [1]. The profile lists it with that shape; `build_plan`
  only sets profile shapes for inputs the network declares dynamic, so a 0-d export builds too.
  `TensorRTUNet` reshapes the pipeline's timestep to whatever the engine declares ([], [1] or [B]).
- Precision. The export is FP32-typed with Q/DQ nodes (explicit quantization), so the network
  is weakly typed: FP16 lets TensorRT run unquantized layers in half precision, and INT8/FP8
  let it honour the Q/DQ scales. INT8 needs no calibrator because the scales are in the graph.
  TensorRT 10 wants BuilderFlag.FP8 (+ FP16) for FP8 Q/DQ in a weakly typed network; a strongly
  typed network obeys the ONNX types instead, which only pays off for an FP16-typed export, and
  is the only mode TensorRT 11 keeps (it removes the precision flags). `strongly_typed=True`
  selects it.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path
from types import SimpleNamespace

from ..device import require_cuda, require_fp8
from ..errors import ConfigError, CorruptArtifactError, MissingBackendError, QuantdiffError
from ..io import atomic_path

TORCH_BACKEND_HINT = (
    "set `engine: {backend: torch}` in config/config.yaml or run snakemake with "
    "`--config engine='{backend: torch}'`"
)

PRECISION_FLAGS = {
    "fp16": ("FP16",),
    "int8": ("INT8", "FP16"),  # Q/DQ layers in INT8, everything else may run in FP16
    "fp8": ("FP8", "FP16"),
}
OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT's builder_optimization_level: 0 fastest build, 5 most tactics
OUTPUT_NAME = "out_sample"

# TensorRT DataType member names -> torch dtype attribute names.
_TORCH_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}


class TensorRTError(QuantdiffError):
    """TensorRT accepted the inputs but failed to build or run; its own messages are included."""


# --------------------------------------------------------------------------- pure functions


def builder_settings(precision: str, optimization_level: int, strongly_typed: bool | None = None) -> dict:
    """Builder flags (BuilderFlag member names), optimization level and network typing for a precision.

    `strongly_typed=None` means weakly typed, the right mode for this project's FP32-typed Q/DQ
    export on TensorRT 10 (see the module docstring). A strongly typed network takes its
    precisions from the ONNX, and TensorRT rejects precision flags on it, so it gets none.
    """
    if precision not in PRECISION_FLAGS:
        raise ConfigError(f"precision {precision!r} has no TensorRT settings; use one of {', '.join(PRECISION_FLAGS)}.")
    if isinstance(optimization_level, bool) or not isinstance(optimization_level, int) or optimization_level not in OPTIMIZATION_LEVELS:
        raise ConfigError(
            f"engine.optimization_level.{precision} is {optimization_level!r}; TensorRT accepts an integer 0..5 "
            "(0 builds fastest, 5 searches the most tactics; 3 is TensorRT's default)."
        )
    strongly_typed = bool(strongly_typed)
    return {
        "precision": precision,
        "flags": [] if strongly_typed else list(PRECISION_FLAGS[precision]),
        "strongly_typed": strongly_typed,
        "network_flags": ["STRONGLY_TYPED"] if strongly_typed else [],
        "optimization_level": optimization_level,
        "timing_cache": True,
    }


def torch_dtype_name(trt_dtype) -> str:
    """torch dtype attribute name for a TensorRT DataType, given as the enum or its name
    ("HALF", "DataType.HALF")."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype)
    name = name.rsplit(".", 1)[-1].upper()
    try:
        return _TORCH_DTYPE_NAMES[name]
    except KeyError:
        raise TensorRTError(f"the engine uses TensorRT data type {name}, which has no torch equivalent here.") from None


def torch_dtype(trt_dtype):
    import torch

    return getattr(torch, torch_dtype_name(trt_dtype))


def timestep_shape(engine_shape: tuple, batch: int) -> tuple:
    """The shape to feed the engine's timestep input: 0-d, [1], or [B] when it is dynamic."""
    engine_shape = tuple(engine_shape)
    if len(engine_shape) == 0:
        return ()
    if len(engine_shape) == 1:
        return (batch,) if engine_shape[0] < 0 else engine_shape
    raise TensorRTError(f"the engine's timestep input has shape {engine_shape}; expected [], [1] or [batch].")


# --------------------------------------------------------------------------- TensorRT itself


def require_tensorrt():
    """Import and return the `tensorrt` module, or raise MissingBackendError naming the alternative."""
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError, RuntimeError) as err:  # OSError/RuntimeError: a wheel without its libraries
        raise MissingBackendError(
            f"TensorRT is not installed or does not load ({type(err).__name__}: {err}). "
            "Install it on a CUDA machine with `pip install tensorrt` (wheels come from NVIDIA's index, pypi.nvidia.com), "
            f"or build the PyTorch engine instead: {TORCH_BACKEND_HINT}."
        ) from err


def build_plan(
    onnx_path,
    plan_path,
    precision,
    profile,
    optimization_level,
    timing_cache_path,
    workspace_gb=None,
    log=print,
    strongly_typed=None,
) -> dict:
    """Build a TensorRT plan from a Q/DQ ONNX file; write it atomically; return what was done.

    The timing cache at `timing_cache_path` is reused when it matches this TensorRT and GPU and
    is saved back (atomically) after a successful build.
    """
    onnx_path, plan_path, timing_cache_path = Path(onnx_path), Path(plan_path), Path(timing_cache_path)
    settings = builder_settings(precision, optimization_level, strongly_typed)
    if not onnx_path.is_file():
        raise CorruptArtifactError(onnx_path, "the file does not exist; the export stage writes it")
    trt = require_tensorrt()
    require_cuda("engine (TensorRT build)")  # TensorRT times tactics on the GPU it builds for
    if precision == "fp8":
        require_fp8("cuda")
    missing_flags = [f for f in settings["flags"] if not hasattr(trt.BuilderFlag, f)]
    if missing_flags:
        raise MissingBackendError(
            f"TensorRT {trt.__version__} has no BuilderFlag {', '.join(missing_flags)} (TensorRT 11 removed the precision "
            "flags in favour of strongly typed networks). Use TensorRT 10, or build with strongly_typed=True "
            f"from an FP16-typed export; or {TORCH_BACKEND_HINT}."
        )

    logger = _logger(trt, log)
    builder = trt.Builder(logger)
    network_flags = 0
    for name in settings["network_flags"]:
        network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    # From the file, not from bytes: the parser then finds external weight files beside it.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or ["(no parser message)"]
        raise CorruptArtifactError(onnx_path, "TensorRT's ONNX parser rejected it:\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    for name in settings["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    config.builder_optimization_level = optimization_level
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))

    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    trt_profile = builder.create_optimization_profile()
    applied = {}
    for name, network_shape in inputs.items():
        if all(d >= 0 for d in network_shape):
            continue  # static input (the timestep): nothing to choose
        if name not in profile:
            raise ConfigError(
                f"{onnx_path} has a dynamic input {name!r} {network_shape} that the optimization profile does not cover "
                f"(profile inputs: {', '.join(profile)}). Is the export for another pipeline?"
            )
        shapes = tuple(tuple(int(d) for d in s) for s in profile[name])
        _check_profile_fits(name, network_shape, shapes)
        trt_profile.set_shape(name, *shapes)
        applied[name] = dict(zip(("min", "opt", "max"), shapes))
    unknown = sorted(set(profile) - set(inputs))
    if unknown:
        raise ConfigError(
            f"the optimization profile names inputs {unknown} that {onnx_path} lacks (its inputs: {', '.join(inputs)})."
        )
    config.add_optimization_profile(trt_profile)

    cache_reused = _load_timing_cache(config, timing_cache_path, log)

    log(f"building TensorRT {trt.__version__} plan: {precision}, flags {settings['flags']}, "
        f"optimization level {optimization_level}, strongly typed {settings['strongly_typed']}")
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - started
    if serialized is None:
        raise TensorRTError(
            f"TensorRT could not build an engine from {onnx_path} ({precision}). TensorRT said:\n  "
            + "\n  ".join(logger.errors or ["(nothing; rerun with a verbose logger)"])
        )

    with atomic_path(plan_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(memoryview(serialized))
    _save_timing_cache(config, timing_cache_path)

    return {
        "backend": "tensorrt",
        "tensorrt_version": trt.__version__,
        "precision": precision,
        "flags": settings["flags"],
        "strongly_typed": settings["strongly_typed"],
        "optimization_level": optimization_level,
        "workspace_gb": workspace_gb,
        "profile": applied,
        "static_inputs": {n: list(s) for n, s in inputs.items() if n not in applied},
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "network_layers": network.num_layers,
        "build_seconds": round(build_seconds, 3),
        "plan_bytes": plan_path.stat().st_size,
        "timing_cache": str(timing_cache_path),
        "timing_cache_reused": cache_reused,
    }


class TensorRTUNet:
    """A TensorRT plan that stands in for `pipe.unet` in a diffusers SD/SDXL pipeline.

    The pipelines read `unet.config` (sample_size, in_channels, addition_time_embed_dim,
    time_cond_proj_dim), `unet.dtype` and, for SDXL, `unet.add_embedding.linear_1.in_features`;
    `unet_config` is the UNet's config.json as a dict. Not an nn.Module, so `pipe.to()` leaves it
    where it is: on the GPU it was loaded on.
    """

    def __init__(self, plan_path, unet_config: dict, device="cuda"):
        import torch
        from diffusers.configuration_utils import FrozenDict

        trt = require_tensorrt()
        require_cuda("TensorRT UNet")
        self.plan_path = Path(plan_path)
        self.device = torch.device(device)
        self.config = FrozenDict({"time_cond_proj_dim": None, **unet_config})
        if "projection_class_embeddings_input_dim" in unet_config:
            in_features = unet_config["projection_class_embeddings_input_dim"]
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=in_features))

        self._trt = trt
        self._logger = _logger(trt, print)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise CorruptArtifactError(
                    self.plan_path, "TensorRT could not deserialize it: truncated, or built by another TensorRT version or GPU"
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.dtype = self.dtypes.get("sample", torch.float16)

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=False, **kw):
        import torch

        unsupported = sorted(k for k, v in kw.items() if v is not None)
        if unsupported:
            raise ConfigError(
                f"the TensorRT UNet cannot take {', '.join(unsupported)} (LoRA scales, ControlNet residuals, guidance "
                f"embeddings are baked out of the plan). Use the torch backend: {TORCH_BACKEND_HINT}."
            )
        batch = sample.shape[0]
        feeds = {"sample": sample, "encoder_hidden_states": encoder_hidden_states}
        feeds.update({k: v for k, v in (added_cond_kwargs or {}).items() if k in self.input_names})
        if "timestep" in self.input_names:
            timestep = torch.as_tensor(timestep, device=self.device)
            shape = timestep_shape(self.engine.get_tensor_shape("timestep"), batch)
            feeds["timestep"] = timestep.reshape(-1)[:1].expand(shape) if shape else timestep.reshape(())
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ConfigError(f"the TensorRT UNet needs inputs {missing}; the pipeline passed {sorted(feeds)}.")

        keep = []  # the cast tensors must live until the enqueued work is done
        for name in self.input_names:
            tensor = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise ConfigError(
                    f"input {name} of shape {tuple(tensor.shape)} lies outside the plan's profile "
                    f"({tuple(lo)} .. {tuple(hi)}); rebuild the engine with a wider engine.batch / engine.resolution."
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError(f"TensorRT failed to run {self.plan_path}; see its messages above.")
        out = outputs.get(OUTPUT_NAME, next(iter(outputs.values()))).to(sample.dtype)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)


# --------------------------------------------------------------------------- helpers


def _check_profile_fits(name, network_shape, shapes):
    """Each profile shape has the network's rank and agrees with its static dimensions."""
    for shape in shapes:
        fits = len(shape) == len(network_shape) and all(n < 0 or n == s for n, s in zip(network_shape, shape))
        if not fits:
            raise ConfigError(
                f"profile shape {shape} for input {name!r} does not fit the ONNX input shape {network_shape} "
                "(-1 is dynamic); the UNet config and the export disagree."
            )


def _describe_parser_error(error) -> str:
    """One line per ONNX parser error: description, node and operator where TensorRT reports them."""
    try:
        text = error.desc()
        node, op = error.node_name(), error.node_operator()
    except AttributeError:  # older bindings: only __str__
        return str(error)
    where = f" (node {node!r}, op {op})" if node or op else ""
    return f"{text}{where}"


def _logger(trt, log):
    """A TensorRT logger that forwards warnings and errors to `log` and keeps the errors."""
    severity = trt.ILogger.Severity
    failing = (severity.INTERNAL_ERROR, severity.ERROR)
    shown = failing + (severity.WARNING,)

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, level, message):
            if level in failing:
                self.errors.append(message)
            if level in shown:
                log(f"[TensorRT] {message}")

    return Logger()


def _load_timing_cache(config, path: Path, log) -> bool:
    """Attach the timing cache at `path` (or a fresh one). True when an existing cache was accepted.

    A cache from another TensorRT version or GPU is refused (ignore_mismatch False) rather than
    trusted: mismatched timings can pick wrong tactics.
    """
    data = path.read_bytes() if path.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except (RuntimeError, TypeError, ValueError):  # an unreadable cache file
            cache = None
        if cache is not None and config.set_timing_cache(cache, False):
            return True
        log(f"timing cache {path} is unreadable or from another TensorRT/GPU; starting a fresh one")
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def _save_timing_cache(config, path: Path) -> None:
    serialized = config.get_timing_cache().serialize()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(memoryview(serialized))
