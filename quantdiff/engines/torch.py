"""The PyTorch engine: real 8-bit modules, torch.export, AOTInductor package (`engine.pt2`).

The package carries the UNet config in its metadata, so bench and users load it with
`EngineUNet.load(path)` and hand it to a diffusers pipeline without the model code.

`engine.torch_format: export` writes the same exported program as a torch.export archive instead
(also `engine.pt2`), which torch.compile compiles where it is loaded: for machines whose torch
cannot load AOTInductor packages (on an H100 with torch 2.11 none loaded, docs/PERF.md). The same
graph and kernels, compiled at load (minutes for SDXL) rather than at build.
"""
import contextlib
import json
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from quantdiff.engines import check_packageable
from quantdiff.engines.gemm8 import count_scaled_mm
from quantdiff.engines.profile import down_factor
from quantdiff.errors import ConfigError, CorruptArtifactError
from quantdiff.io import atomic_path

# diffusers' upsampler guards batch < 64, so the dynamic batch tops out at 63 (FACTS).
MAX_BATCH = 63
# Latent height/width range as multiples of the UNet's overall down factor (SDXL: 8 -> 8..1024 px/8).
MAX_SPATIAL_BLOCKS = 32
# ... and at least 2 of them: the deepest feature maps then are 2x2 or larger (usable_ranges says why).
MIN_SPATIAL_BLOCKS = 2
INPUT_NAMES_SD = ("sample", "timestep", "encoder_hidden_states")
INPUT_NAMES_SDXL = INPUT_NAMES_SD + ("text_embeds", "time_ids")
_METADATA_KEY = "quantdiff"
# engine.torch_format: an AOTInductor package, or the torch.export program (compiled when loaded)
TORCH_FORMATS = ("aoti", "export")


def is_sdxl(unet):
    return unet.config.get("addition_embed_type") == "text_time"


class _SDUNetInputs(nn.Module):
    """The UNet with explicit positional tensor inputs and a plain tensor output."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _SDXLUNetInputs(_SDUNetInputs):
    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def export_module(unet):
    """`unet` as the engine's graph takes it: positional inputs (engine_inputs), one tensor out."""
    return (_SDXLUNetInputs if is_sdxl(unet) else _SDUNetInputs)(unet)


def engine_inputs(unet, example_inputs):
    return _positional(example_inputs, is_sdxl(unet))


def _positional(example_inputs, sdxl):
    """Positional engine inputs from a dict (keys as the UNet's forward, added_cond_kwargs or flat).

    The timestep becomes a float32 vector of the batch size: the scheduler's 0-dim (or int64)
    timestep would otherwise be baked into the graph's shape and dtype.
    """
    x = dict(example_inputs)
    x.update(x.pop("added_cond_kwargs", None) or {})
    names = INPUT_NAMES_SDXL if sdxl else INPUT_NAMES_SD
    missing = [n for n in names if x.get(n) is None]
    if missing:
        raise ConfigError(f"example inputs lack {missing}; the engine takes {list(names)}")
    batch = x["sample"].shape[0]
    x["timestep"] = torch.as_tensor(x["timestep"], device=x["sample"].device).float().reshape(-1).expand(batch)
    return tuple(x[n].contiguous() for n in names)


def _down_factor(unet):
    return down_factor(unet.config)


def default_ranges(unet):
    """Shape ranges of an engine built without a profile: batch 1..63, latent sides of 2 to 32 blocks
    (usable_ranges says why not 1). (torch.export specializes a size-1 dimension only when the
    example has it: examples use batch >= 2.)"""
    factor = _down_factor(unet)
    side = (MIN_SPATIAL_BLOCKS * factor, factor * MAX_SPATIAL_BLOCKS)
    return {"batch": (1, MAX_BATCH), "height": side, "width": side}


def _example_ranges(inputs):
    batch, _, height, width = inputs[0].shape
    return {"batch": (batch, batch), "height": (height, height), "width": (width, width)}


def _check_example_fits(inputs, ranges):
    example = _example_ranges(inputs)
    outside = [f"{name} {example[name][0]} not in {lo}..{hi}" for name, (lo, hi) in ranges.items()
               if not lo <= example[name][0] <= hi]
    if outside:
        raise ConfigError(f"the engine's example input lies outside its shape ranges: {', '.join(outside)}")


def _export_dims(unet, inputs, ranges):
    """torch.export dynamic_shapes for `ranges` (batch on every input, latent height/width on the
    sample); a range whose ends agree is a static dimension."""
    lo, hi = ranges["batch"]
    batch = torch.export.Dim("batch", min=lo, max=hi) if lo < hi else None
    shapes = [{0: batch} if batch else {} for _ in inputs]
    factor = _down_factor(unet)
    for axis, name in ((2, "height"), (3, "width")):
        lo, hi = ranges[name]
        if lo < hi:
            shapes[0][axis] = factor * torch.export.Dim(f"{name}_blocks", min=lo // factor, max=hi // factor)
    return tuple(shapes)


def usable_ranges(unet, ranges):
    """`ranges` with latent sides rounded inwards to multiples of the UNet's down factor, and at least
    MIN_SPATIAL_BLOCKS of it. The engine self-check found a package (torch 2.13, CPU) wrong at batch 1
    with 1x1 feature maps at the bottom (relative error 0.57 against its model; exact at batch 2,
    and at 2x2): a range that needs those sides is an error that says so."""
    factor = _down_factor(unet)
    out = {"batch": tuple(ranges["batch"])}
    for name in ("height", "width"):
        lo, hi = ranges[name]
        out[name] = (max(-(-lo // factor), MIN_SPATIAL_BLOCKS) * factor, hi // factor * factor)
        if out[name][0] > out[name][1]:
            raise ConfigError(f"engine {name} range {lo}..{hi} latents: the engine takes latent sides of at least "
                              f"{MIN_SPATIAL_BLOCKS * factor} ({MIN_SPATIAL_BLOCKS}x its down factor {factor}: smaller, "
                              f"the deepest feature maps are 1x1, which a package computed wrongly); widen "
                              f"engine.resolution")
    return out


@contextlib.contextmanager
def _keep_dynamic_ranges():
    # mkldnn/nnpack conv lowering silently narrows the batch range (FACTS): keep both off.
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        yield


def _metadata(unet, inputs, counts):
    sdxl = is_sdxl(unet)
    meta = {
        "config": dict(unet.config),
        "inputs": list(INPUT_NAMES_SDXL if sdxl else INPUT_NAMES_SD),
        "dtype": str(inputs[0].dtype).removeprefix("torch."),
        "device": inputs[0].device.type,
        "counts": counts or {},
    }
    if sdxl:
        meta["add_embedding_in_features"] = unet.add_embedding.linear_1.in_features
    return meta


# Set by package_engine itself, or making something other than a loadable engine.pt2
_RESERVED_INDUCTOR_SETTINGS = ("aot_inductor.metadata", "aot_inductor.output_path", "aot_inductor.package",
                               "aot_inductor.package_cpp_only")


def check_inductor_settings(settings, where="engine.inductor"):
    """Raise ConfigError unless every key is a torch._inductor.config setting that an engine build may
    set, given a scalar of the setting's type. Returns the settings."""
    import difflib

    import torch._inductor.config as inductor_config

    if not isinstance(settings, dict):
        raise ConfigError(f"config key '{where}': a mapping of torch._inductor.config names to values, not {settings!r}")
    known = inductor_config.get_config_copy()
    for key, value in settings.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{where}.{key}': not a torch._inductor.config setting "
                              f"(torch {torch.__version__}){hint}")
        if key in _RESERVED_INDUCTOR_SETTINGS:
            raise ConfigError(f"config key '{where}.{key}': set by the engine stage itself")
        default = known[key]
        kind = type(default)
        fits = (default is None or (kind is bool and isinstance(value, bool))
                or (kind is int and isinstance(value, int) and not isinstance(value, bool))
                or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
                or (kind is str and isinstance(value, str)))
        if not fits:
            raise ConfigError(f"config key '{where}.{key}': takes a {kind.__name__} "
                              f"(default {default!r}), not {value!r}")
    return settings


def package_engine(unet, example_inputs, out_path, dynamic=True, log=print, counts=None, ranges=None,
                   inductor=None, self_check=False, torch_format="aoti"):
    """torch.export `unet` and write it to `out_path` (engine.pt2) atomically: as an AOTInductor package
    (`torch_format` "aoti", compiled here) or as the torch.export archive itself ("export", compiled by
    torch.compile where it is loaded).

    `example_inputs` is a dict as for the UNet's forward; Inductor tunes for its shape. With
    `dynamic`, the engine takes the batch and latent height/width `ranges` ({name: (min, max)}, the
    engine profile's; `default_ranges` when None), static where min == max. If the model does not
    export with dynamic height/width, it falls back to the example's and says so. Without
    `dynamic` every shape is the example's. `inductor`: torch._inductor.config settings for the
    build (checked by check_inductor_settings; in the `export` format, `torch_format`, they are kept
    in the archive for the compile where it is loaded). `self_check`: before the package takes its final
    name, run it on the example inputs, and on the smallest its ranges take, against `unet`
    (engines.check; a wrong package is never renamed). Returns an info dict: export/compile seconds,
    package bytes, dynamic dims, shape ranges, counts, the Inductor settings (and the self-check's).
    """
    unet = unet.eval()
    wrapper = export_module(unet)
    inputs = engine_inputs(unet, example_inputs)
    example = _example_ranges(inputs)
    ranges = usable_ranges(unet, ranges or default_ranges(unet)) if dynamic else example
    _check_example_fits(inputs, ranges)
    inductor = check_inductor_settings(dict(inductor or {}))
    if torch_format not in TORCH_FORMATS:
        raise ConfigError(f"engine.torch_format {torch_format!r} is not one of {', '.join(TORCH_FORMATS)}")
    info = {"counts": counts or {}, "inductor": inductor, "format": torch_format}
    t0 = time.perf_counter()
    with torch.no_grad(), _keep_dynamic_ranges():
        try:
            program = torch.export.export(wrapper, inputs, dynamic_shapes=_export_dims(unet, inputs, ranges))
        except Exception as err:  # noqa: BLE001 - a constraint failure: retry with the example's sides
            if ranges["height"] == example["height"] and ranges["width"] == example["width"]:
                raise
            log(f"engine: dynamic height/width did not export ({type(err).__name__}); batch only")
            ranges = dict(ranges, height=example["height"], width=example["width"])
            program = torch.export.export(wrapper, inputs, dynamic_shapes=_export_dims(unet, inputs, ranges))
        info["shape_ranges"] = {name: list(r) for name, r in ranges.items()}
        info["dynamic_dims"] = {name: list(r) for name, r in ranges.items() if r[0] < r[1]}
        info["export_s"] = round(time.perf_counter() - t0, 2)
        log(f"engine: exported in {info['export_s']} s, dynamic {info['dynamic_dims'] or 'none'}, "
            f"tuned for batch {example['batch'][0]} at {example['height'][0]}x{example['width'][0]} latents")
        # cuBLASLt fp8 GEMMs on the GPU; none on the CPU, where gemm8 emulates them in float32
        info["scaled_mm_calls"] = count_scaled_mm(program)

        t0 = time.perf_counter()
        meta = _metadata(unet, inputs, counts)
        meta.update(dynamic_dims=info["dynamic_dims"], shape_ranges=info["shape_ranges"], format=torch_format,
                    inductor=inductor)
        meta_json = json.dumps(meta, default=str)
        with atomic_path(out_path) as tmp:
            if torch_format == "export":
                torch.export.save(program, str(tmp), extra_files={_METADATA_KEY: meta_json})
            else:
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(tmp),
                    inductor_configs={**inductor, "aot_inductor.metadata": {_METADATA_KEY: meta_json}})
            info["compile_s"] = round(time.perf_counter() - t0, 2)
            if self_check:
                from quantdiff.engines.check import check_engine, smallest_inputs

                smallest = smallest_inputs(inputs, info["shape_ranges"])
                input_sets = [inputs] + ([smallest] if smallest[0].shape != inputs[0].shape else [])
                info["self_check"] = check_engine(tmp, wrapper, input_sets, log, name=out_path)
    info["package_bytes"] = Path(out_path).stat().st_size
    done = "compiled" if torch_format == "aoti" else "saved as a torch.export program (compiled where it is loaded)"
    log(f"engine: {done} in {info['compile_s']} s, {info['package_bytes'] / 1e6:.1f} MB -> {out_path}")
    return info


_NO_DEFAULT = object()


def engine_format(path, default=_NO_DEFAULT):
    """"aoti" or "export" (TORCH_FORMATS): what kind of .pt2 archive the engine at `path` is. A file
    of neither kind (or none) raises CorruptArtifactError, or returns `default` where one is given."""
    try:
        return _archive_kind(path)
    except CorruptArtifactError:
        if default is _NO_DEFAULT:
            raise
        return default


def _archive_kind(path):
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CorruptArtifactError(path, f"not a .pt2 archive: {type(err).__name__}: {err}") from err
    if any("/data/aotinductor/" in name for name in names):
        return "aoti"
    if any(name.endswith("/models/model.json") for name in names):
        return "export"
    raise CorruptArtifactError(path, "neither an AOTInductor package nor a torch.export program")


class ExportedEngine:
    """An engine in the `export` format, loaded: its torch.export program compiled by torch.compile
    (on the first call) with the Inductor settings of its build; called, and asked for its metadata,
    as an AOTInductor runner is."""

    def __init__(self, program, metadata_json):
        self.metadata_json = metadata_json
        inductor = json.loads(metadata_json).get("inductor") if metadata_json else None
        self.compiled = torch.compile(program.module(), options=inductor or None)

    def __call__(self, *inputs):
        return self.compiled(*inputs)

    def get_metadata(self):
        return {_METADATA_KEY: self.metadata_json} if self.metadata_json else {}


def _load_exported(path):
    # the project's custom ops (Triton GEMM, GEGLU, patches, conv, attention; cuDNN's int8 ops) must be registered
    # before the graph loads, or the archive reads as corrupt
    from quantdiff.engines import (cudnn_int8, triton_attention, triton_conv, triton_geglu,  # noqa: F401
                                   triton_gemm, triton_patches)

    extra = {_METADATA_KEY: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return ExportedEngine(program, extra[_METADATA_KEY])


def load_engine(path):
    """The compiled UNet of an engine.pt2 (either format): called with the positional engine inputs,
    returns a tensor."""
    path = Path(path)
    if not path.is_file():
        raise CorruptArtifactError(path, "file missing")
    if engine_format(path) == "export":
        try:
            return _load_exported(path)
        except Exception as err:  # noqa: BLE001 - archive, JSON and graph errors all mean the same here
            raise CorruptArtifactError(path, f"not a loadable torch.export program: {type(err).__name__}: {err}") from err
    try:
        # Without the runner pool's thread synchronization: its events are host calls that a CUDA
        # graph capture forbids ("operation not permitted when stream is capturing"), and a UNet is
        # called from one thread here.
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and C++ loader errors all mean the same here
        raise CorruptArtifactError(path, f"not a loadable AOTInductor package: {type(err).__name__}: {err}") from err


def engine_metadata(runner):
    raw = runner.get_metadata().get(_METADATA_KEY)
    return json.loads(raw) if raw else {}


class EngineUNet(nn.Module):
    """A loaded engine that a diffusers pipeline calls like its UNet.

    Keeps what StableDiffusionXLPipeline reads from `pipe.unet`: config, dtype, device and
    add_embedding.linear_1.in_features. Features the engine was not compiled with (timestep_cond,
    cross_attention_kwargs, ControlNet residuals) raise instead of being silently dropped.
    """

    def __init__(self, runner, config, dtype, device, add_embedding_in_features=None, shape_ranges=None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.runner = runner
        self.shape_ranges = shape_ranges or {}
        self.config = FrozenDict(config)
        self._dtype, self._device = dtype, torch.device(device)
        self.sdxl = self.config.get("addition_embed_type") == "text_time"
        if add_embedding_in_features is not None:
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=add_embedding_in_features))

    @classmethod
    def load(cls, path):
        runner = load_engine(path)
        meta = engine_metadata(runner)
        if "config" not in meta:
            raise CorruptArtifactError(path, "no quantdiff metadata in the package")
        return cls(runner, meta["config"], getattr(torch, meta["dtype"]), meta["device"],
                   meta.get("add_embedding_in_features"), meta.get("shape_ranges"))

    @classmethod
    def wrap(cls, runner, unet):
        """Adapter for a runner compiled from `unet` (keeps the original's attributes)."""
        feats = unet.add_embedding.linear_1.in_features if is_sdxl(unet) else None
        return cls(runner, dict(unet.config), unet.dtype, unet.device, feats,
                   engine_metadata(runner).get("shape_ranges"))

    def check_shape(self, sample):
        """A clear error for a sample the engine was not built for (AOTInductor would only assert)."""
        batch, _, height, width = sample.shape
        outside = []
        for name, size in (("batch", batch), ("height", height), ("width", width)):
            lo, hi = self.shape_ranges.get(name, (size, size))
            if not lo <= size <= hi:
                outside.append(f"{name} {size} (engine: {lo}..{hi})")
        if outside:
            raise ConfigError(f"the engine was not built for this UNet input: {', '.join(outside)}; UNet batch "
                              "counts both guidance halves, sizes are latents (pixels / 8). Widen engine.batch or "
                              "engine.resolution in the config and rebuild the engine.")

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True,
                timestep_cond=None, cross_attention_kwargs=None, **unsupported):
        given = [k for k, v in unsupported.items() if v is not None]
        if timestep_cond is not None or cross_attention_kwargs or given:
            raise ConfigError(f"the torch engine was compiled without {given or 'timestep_cond/cross_attention_kwargs'}")
        self.check_shape(sample)
        example = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                   "added_cond_kwargs": added_cond_kwargs if self.sdxl else None}
        out = self.runner(*_positional(example, self.sdxl))
        out = out[0] if isinstance(out, (list, tuple)) else out
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


def device_layout(unet, device):
    """channels_last on the GPU, as docs/PERF.md measured the UNet: cuDNN's fp16 convs run NHWC
    natively and a conv GEMM's patches are then strided views. The CPU keeps NCHW."""
    return unet.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else unet


def build_torch_engine(unet, precision, example_inputs, out_path, dynamic=True, log=print, ranges=None,
                       inductor=None, int8_gemm="auto", conv_patches="auto", fp8_attention="auto", geglu="auto",
                       self_check=True, torch_format="aoti"):
    """Convert (int8/fp8: ModelOpt fake quant -> real 8-bit modules; fp16: as is) and package, with
    package_engine's self-check against the converted model unless `self_check` is False.

    `int8_gemm`, `conv_patches`, `fp8_attention`, `geglu`: the settings of the 8-bit modules' GPU kernels, resolved for the
    model's device (gemm8.resolve_kernels). Returns package_engine's info dict plus precision,
    conversion counts and, for 8-bit engines, those kernels.
    """
    from quantdiff.engines.gemm8 import resolve_kernels
    from quantdiff.engines.qmodules import apply_kernels, convert_to_real_quant

    if precision not in ("fp16", "int8", "fp8"):
        raise ConfigError(f"precision {precision!r} is not one of fp16, int8, fp8")
    check_packageable({"int8_gemm": int8_gemm, "geglu": geglu}, torch_format=torch_format)
    counts, kernels = {}, {}
    if precision != "fp16":
        # resolved before conversion: a kernel that cannot run stops the build before its work
        kernels = resolve_kernels(precision, next(unet.parameters()).device, int8_gemm, conv_patches, fp8_attention,
                                  geglu, python_ops=torch_format == "export")
        unet, counts = convert_to_real_quant(unet)
        log(f"engine: converted {counts}; kernels {kernels}")
        apply_kernels(unet, kernels)
    unet = device_layout(unet, next(unet.parameters()).device)  # after conversion, which makes new modules
    info = package_engine(unet, example_inputs, out_path, dynamic=dynamic, log=log, counts=counts, ranges=ranges,
                          inductor=inductor, self_check=self_check, torch_format=torch_format)
    info["precision"] = precision
    settings = {"int8_gemm": int8_gemm, "conv_patches": conv_patches, "fp8_attention": fp8_attention, "geglu": geglu}
    for name, kernel in kernels.items():
        info[name] = {"setting": settings[name], "kernel": kernel}
    if kernels.get("int8_gemm") == "triton":  # (its TMA form is not packaged: check_packageable)
        from quantdiff.engines.triton_gemm import SMALL_M_ROWS, SMALL_M_TILES, TILES, tile_kwargs

        info["int8_gemm"]["tile"] = tile_kwargs(TILES["int8"])
        info["int8_gemm"][f"tile_up_to_{SMALL_M_ROWS}_rows"] = tile_kwargs(SMALL_M_TILES["int8"])
    return info
