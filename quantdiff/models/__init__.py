"""The model stage library: materialize pipelines, load them, and shape UNet inputs.

- `materialize(name, model_cfg, out_dir)`: a config entry -> a local diffusers folder + info dict.
- `load_pipeline(model_dir, dtype, device)`: that folder -> a diffusers pipeline (local files only).
- `arch_unet(name, device="meta")`: a full-size published UNet without memory, for layer-set work.
- `unet_example_inputs(...)`, `UNET_INPUT_NAMES`: UNet call inputs for export, engines and tests.
"""
from .arch import arch_component, arch_names, arch_spec, arch_unet
from .builtin import BUILTINS, TINY_XL
from .inputs import (UNET_INPUT_NAMES, flatten_unet_inputs, unet_example_inputs, unet_kind,
                     unflatten_unet_inputs)
from .loading import INFO_FILE, component_parameters, load_pipeline, load_unet, read_model_info
from .stage import materialize
from .tokenizer import load_tokenizer

__all__ = [
    "BUILTINS", "INFO_FILE", "TINY_XL", "UNET_INPUT_NAMES", "arch_component", "arch_names", "arch_spec",
    "arch_unet", "component_parameters", "flatten_unet_inputs", "load_pipeline", "load_unet", "load_tokenizer",
    "materialize", "read_model_info", "unet_example_inputs", "unet_kind", "unflatten_unet_inputs",
]
