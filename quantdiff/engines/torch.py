"""The PyTorch engine: real 8-bit modules, torch.export, AOTInductor package (`engine.pt2`).

The package carries the UNet config in its metadata, so bench and users load it with
`EngineUNet.load(path)` and hand it to a diffusers pipeline without the model code.
"""
import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from quantdiff.engines.cpu_lowering import EmulatedFP8Gemm
from quantdiff.errors import ConfigError, CorruptArtifactError
from quantdiff.io import atomic_path

# diffusers' upsampler guards batch < 64, so the dynamic batch tops out at 63 (FACTS).
MAX_BATCH = 63
# Latent height/width range as multiples of the UNet's overall down factor (SDXL: 8 -> 8..1024 px/8).
MAX_SPATIAL_BLOCKS = 32
INPUT_NAMES_SD = ("sample", "timestep", "encoder_hidden_states")
INPUT_NAMES_SDXL = INPUT_NAMES_SD + ("text_embeds", "time_ids")
_METADATA_KEY = "quantdiff"


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
    return 2 ** (len(unet.config.block_out_channels) - 1)


def _dynamic_shapes(unet, inputs, spatial):
    """Batch dynamic on every input (2..63); latent height/width too when `spatial`."""
    batch = torch.export.Dim("batch", min=2, max=MAX_BATCH)
    shapes = [{0: batch} for _ in inputs]
    if spatial:
        factor = _down_factor(unet)
        shapes[0] = {0: batch,
                     2: factor * torch.export.Dim("height_blocks", min=1, max=MAX_SPATIAL_BLOCKS),
                     3: factor * torch.export.Dim("width_blocks", min=1, max=MAX_SPATIAL_BLOCKS)}
    return tuple(shapes)


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


def _export(wrapper, inputs, dynamic_shapes=None):
    """(torch.export program, fp8 GEMMs traced as their float32 emulation: CPU only, see cpu_lowering)."""
    if inputs[0].device.type != "cpu":
        return torch.export.export(wrapper, inputs, dynamic_shapes=dynamic_shapes), 0
    with EmulatedFP8Gemm() as emulation:
        program = torch.export.export(wrapper, inputs, dynamic_shapes=dynamic_shapes)
    return program, emulation.count


def package_engine(unet, example_inputs, out_path, dynamic=True, log=print, counts=None):
    """torch.export + AOTInductor-package `unet` to `out_path` (engine.pt2), written atomically.

    `example_inputs` is a dict as for the UNet's forward. With `dynamic`, batch (2..63) and latent
    height/width (multiples of the down factor, up to 32 of them) are dynamic; if the model does
    not export with dynamic height/width, it falls back to dynamic batch only and says so.
    Returns an info dict: export/compile seconds, package bytes, dynamic dims, counts.
    """
    unet = unet.eval()
    wrapper = (_SDXLUNetInputs if is_sdxl(unet) else _SDUNetInputs)(unet)
    inputs = engine_inputs(unet, example_inputs)
    info = {"dynamic_dims": {}, "counts": counts or {}}
    t0 = time.perf_counter()
    with torch.no_grad(), _keep_dynamic_ranges():
        program, emulated = None, 0
        for spatial in ((True, False) if dynamic else ()):
            try:
                program, emulated = _export(wrapper, inputs, _dynamic_shapes(unet, inputs, spatial))
                info["dynamic_dims"] = {"batch": [2, MAX_BATCH]}
                if spatial:
                    factor = _down_factor(unet)
                    info["dynamic_dims"].update(height=[factor, factor * MAX_SPATIAL_BLOCKS],
                                                width=[factor, factor * MAX_SPATIAL_BLOCKS])
                break
            except Exception as err:  # noqa: BLE001 - a constraint failure: retry narrower
                if not spatial:
                    raise
                log(f"engine: dynamic height/width did not export ({type(err).__name__}); batch only")
        if program is None:
            program, emulated = _export(wrapper, inputs)
        info["export_s"] = round(time.perf_counter() - t0, 2)
        log(f"engine: exported in {info['export_s']} s, dynamic {info['dynamic_dims'] or 'none'}")
        if emulated:
            info["cpu_fp8_gemm_emulated"] = emulated
            log(f"engine: {emulated} fp8 GEMMs traced as their float32 emulation (CPU engine)")

        t0 = time.perf_counter()
        meta = _metadata(unet, inputs, counts)
        meta["dynamic_dims"] = info["dynamic_dims"]
        with atomic_path(out_path) as tmp:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(tmp),
                inductor_configs={"aot_inductor.metadata": {_METADATA_KEY: json.dumps(meta, default=str)}})
        info["compile_s"] = round(time.perf_counter() - t0, 2)
    info["package_bytes"] = Path(out_path).stat().st_size
    log(f"engine: compiled in {info['compile_s']} s, {info['package_bytes'] / 1e6:.1f} MB -> {out_path}")
    return info


def load_engine(path):
    """The compiled UNet of an engine.pt2: called with the positional engine inputs, returns a tensor."""
    path = Path(path)
    if not path.is_file():
        raise CorruptArtifactError(path, "file missing")
    try:
        return torch._inductor.aoti_load_package(str(path))
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

    def __init__(self, runner, config, dtype, device, add_embedding_in_features=None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.runner = runner
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
                   meta.get("add_embedding_in_features"))

    @classmethod
    def wrap(cls, runner, unet):
        """Adapter for a runner compiled from `unet` (keeps the original's attributes)."""
        feats = unet.add_embedding.linear_1.in_features if is_sdxl(unet) else None
        return cls(runner, dict(unet.config), unet.dtype, unet.device, feats)

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
        example = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                   "added_cond_kwargs": added_cond_kwargs if self.sdxl else None}
        out = self.runner(*_positional(example, self.sdxl))
        out = out[0] if isinstance(out, (list, tuple)) else out
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


def build_torch_engine(unet, precision, example_inputs, out_path, dynamic=True, log=print):
    """Convert (int8/fp8: ModelOpt fake quant -> real 8-bit modules; fp16: as is) and package.

    Returns package_engine's info dict plus precision and conversion counts.
    """
    from quantdiff.engines.qmodules import convert_to_real_quant

    if precision not in ("fp16", "int8", "fp8"):
        raise ConfigError(f"precision {precision!r} is not one of fp16, int8, fp8")
    counts = {}
    if precision != "fp16":
        unet, counts = convert_to_real_quant(unet)
        log(f"engine: converted {counts}")
    info = package_engine(unet, example_inputs, out_path, dynamic=dynamic, log=log, counts=counts)
    info["precision"] = precision
    return info
