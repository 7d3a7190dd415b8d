"""Write a diffusers pipeline folder with random weights, deterministically, one component at a time.

Used for builtin models and architecture-only variants. Building component by component keeps peak
memory to the largest single component (the SDXL UNet: about 10 GB in fp32 while it is built), and
seeding each component on its own keeps its weights independent of build order.
"""
import importlib
from pathlib import Path

import torch

from .tokenizer import load_tokenizer

MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_SEED_OFFSET = {name: i for i, name in enumerate(MODEL_COMPONENTS)}


def _library_of(class_name):
    import diffusers
    import transformers

    if hasattr(diffusers, class_name):
        return diffusers
    if hasattr(transformers, class_name):
        return transformers
    raise ValueError(f"no diffusers or transformers class named {class_name!r}")


def build_component(config, device="cpu"):
    """Instantiate a model or scheduler from a config dict carrying `_class_name`, with the current RNG."""
    config = dict(config)
    class_name = config.pop("_class_name")
    library = _library_of(class_name)
    cls = getattr(library, class_name)
    if library.__name__ == "transformers":
        config_cls = importlib.import_module(cls.__module__).__dict__[cls.config_class.__name__]
        with torch.device(device):
            return cls(config_cls(**config))
    if issubclass(cls, torch.nn.Module):
        with torch.device(device):
            return cls.from_config(config)
    return cls.from_config(config)


def seeded_component(name, config, seed, device="cpu"):
    """Build a model component from `seed` (offset per component) without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _SEED_OFFSET.get(name, 0))
        return build_component(config, device=device)


DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def trained_component(config, relative):
    """A component whose trained weights ship in the package's data folder (fp32 in memory)."""
    from ..errors import MissingWeightsError

    folder = DATA_DIR / relative
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"the trained weights {folder} are missing from the package; regenerate them "
                                  "with `python -m quantdiff.models.train --out <that folder's parent>`")
    cls = getattr(_library_of(config["_class_name"]), config["_class_name"])
    return cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)


def _pipeline_class(class_name):
    import diffusers

    return getattr(diffusers, class_name)


def write_random_pipeline(folder, spec, seed, dtype=torch.float32):
    """Write `spec` (component configs, see builtin.TINY_XL) as a diffusers pipeline folder.

    Components are seeded random, except those `spec["trained"]` maps to shipped weights
    (builtin.TINY_XL_SHAPES). Returns the parameter count of each model component.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    # model_index.json comes from a pipeline whose models live on the meta device: it only needs
    # their classes, and this way the big ones never exist twice in memory.
    light = {name: _light_component(name, spec) for name in ("tokenizer", "tokenizer_2", "scheduler")}
    meta_models = {name: build_component(spec[name], device="meta") for name in MODEL_COMPONENTS}
    pipeline = _pipeline_class(spec["pipeline_class"])(**meta_models, **light)
    pipeline.save_config(folder)
    del pipeline, meta_models

    for name, component in light.items():
        component.save_pretrained(folder / name)

    counts = {}
    for name in MODEL_COMPONENTS:
        trained = spec.get("trained", {}).get(name)
        model = (trained_component(spec[name], trained) if trained else seeded_component(name, spec[name], seed)).eval()
        if dtype != torch.float32:
            model = model.to(dtype)
        counts[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder / name, safe_serialization=True)
        del model
    return counts


def _light_component(name, spec):
    if name.startswith("tokenizer"):
        return load_tokenizer(pad_token=spec[name]["pad_token"])
    return build_component(spec[name])
