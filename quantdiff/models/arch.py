"""Architecture-only variants: published architecture configs kept as data, random weights.

They exist for speed benchmarks where the real weights cannot be had: latency does not depend on
weight values, image quality does, so their reports must say quality is not meaningful.
The configs live in `quantdiff/data/arch/NAME/` (one JSON per component, `pipeline.json` for the
pipeline class and storage dtype); adding a variant is adding a folder.
"""
import json
from pathlib import Path

from ..errors import ConfigError
from .generate import MODEL_COMPONENTS, build_component

ARCH_DIR = Path(__file__).resolve().parent.parent / "data" / "arch"
_PADDING = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # our builtin tokenizer, padded like SDXL's


def arch_names():
    return sorted(p.name for p in ARCH_DIR.iterdir() if (p / "pipeline.json").is_file())


def arch_spec(name):
    """The component configs of architecture `name`, in the shape `generate.write_random_pipeline` takes."""
    folder = ARCH_DIR / name
    if not (folder / "pipeline.json").is_file():
        raise ConfigError(f"unknown architecture 'arch:{name}'; known: {', '.join('arch:' + n for n in arch_names())}")
    about = json.loads((folder / "pipeline.json").read_text())
    spec = {"pipeline_class": about["pipeline_class"], "dtype": about["dtype"], "pipeline": about["pipeline"]}
    for component in (*MODEL_COMPONENTS, "scheduler"):
        spec[component] = json.loads((folder / f"{component}.json").read_text())
    spec.update({name: {"pad_token": pad} for name, pad in _PADDING.items()})
    return spec


def arch_unet(name: str = "sdxl-base-1.0", device="meta", dtype=None):
    """The UNet of architecture `name` (float32 unless `dtype`). On the meta device (the default)
    it takes no memory: enough for layer-set and parameter-count work on the full-size graph."""
    unet = build_component(arch_spec(name)["unet"], device=device).eval()
    return unet if dtype is None else unet.to(dtype)


def arch_component(name: str, component: str, device="meta"):
    """Any model component (unet, vae, text_encoder, text_encoder_2) of architecture `name`."""
    return build_component(arch_spec(name)[component], device=device).eval()

