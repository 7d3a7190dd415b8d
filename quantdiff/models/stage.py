"""The model stage: turn one `config.models` entry into a local diffusers pipeline folder."""
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import atomic_path, write_json
from .arch import arch_names, arch_spec
from .builtin import BUILTINS
from .generate import MODEL_COMPONENTS, write_random_pipeline
from .loading import INFO_FILE, component_parameters
from .sources import (PIPELINE_CLASSES, check_pipeline_folder, link_pipeline_folder, resolve_hub,
                      resolve_local, source_kind)

DEFAULT_SEED = 0


def _known_generated():
    return [f"builtin:{n}" for n in sorted(BUILTINS)] + [f"arch:{n}" for n in arch_names()]


def _generated_spec(kind, source):
    short = source.split(":", 1)[1]
    if kind == "builtin" and short in BUILTINS:
        return BUILTINS[short], torch.float32
    if kind == "arch" and short in arch_names():
        spec = arch_spec(short)
        return spec, getattr(torch, spec["dtype"])
    raise ConfigError(f"unknown model source '{source}'; known generated models: {', '.join(_known_generated())}")


def _check_pipeline_class(name, pipeline, pipeline_class):
    if pipeline_class not in PIPELINE_CLASSES[pipeline]:
        raise ConfigError(f"models.{name}: `pipeline: {pipeline}` expects {' or '.join(PIPELINE_CLASSES[pipeline])}, "
                          f"but its source holds a {pipeline_class}; fix `pipeline:` or `source:`.")


def materialize(name: str, model_cfg: dict, out_dir) -> dict:
    """Write model `name`'s pipeline folder at `out_dir` and return (and store there) its info dict.

    The folder appears only once complete (atomic rename). Keys of the info: name, source,
    source_kind (builtin|arch|hub|local), pipeline, pipeline_class, architecture_only, seed
    (generated models, else None), dtype (of generated weights, else None), variant, resolution,
    parameters {component: count}, resolved_from (hub/local: the folder linked to).
    """
    source = model_cfg.get("source")
    pipeline = model_cfg.get("pipeline", "sdxl")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"models.{name}.source is missing: give a hub id, a local folder, or one of "
                          f"{', '.join(_known_generated())}")
    if pipeline not in PIPELINE_CLASSES:
        raise ConfigError(f"models.{name}.pipeline is '{pipeline}'; use one of {', '.join(PIPELINE_CLASSES)}")
    kind = source_kind(source)
    info = {"name": name, "source": source, "source_kind": kind, "pipeline": pipeline,
            "resolution": model_cfg.get("resolution"), "architecture_only": kind == "arch",
            "seed": None, "dtype": None, "variant": None, "resolved_from": None}

    if kind in ("builtin", "arch"):
        spec, dtype = _generated_spec(kind, source)
        _check_pipeline_class(name, pipeline, spec["pipeline_class"])
        seed = int(model_cfg.get("seed", DEFAULT_SEED))
        info.update(pipeline_class=spec["pipeline_class"], seed=seed, dtype=str(dtype).removeprefix("torch."))
        with atomic_path(out_dir) as tmp:
            info["parameters"] = write_random_pipeline(tmp, spec, seed=seed, dtype=dtype)
            write_json(Path(tmp) / INFO_FILE, info)
        return info

    folder = resolve_hub(source, model_cfg.get("revision")) if kind == "hub" else resolve_local(source)
    check = check_pipeline_folder(folder, source)
    _check_pipeline_class(name, pipeline, check["pipeline_class"])
    info.update(pipeline_class=check["pipeline_class"], variant=check["variant"], resolved_from=str(folder))
    info["parameters"] = {c: component_parameters(folder / c, check["variant"])
                          for c in check["components"] if c in MODEL_COMPONENTS or (folder / c / "config.json").exists()}
    with atomic_path(out_dir) as tmp:
        link_pipeline_folder(folder, Path(tmp), check["components"])
        write_json(Path(tmp) / INFO_FILE, info)
    return info
