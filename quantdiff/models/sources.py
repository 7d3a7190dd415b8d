"""Where a model's weights come from: a `source:` string resolved to a kind and, for real weights, a folder.

Hub ids are read from the user's Hugging Face cache only. This workflow never downloads at run time:
jobs may run on cluster nodes without network, and a silent multi-gigabyte download inside a job is
worse than a clear message saying how to provide the weights.
"""
import json
import os
import re
from pathlib import Path

from ..errors import CorruptArtifactError, MissingWeightsError

PIPELINE_CLASSES = {"sdxl": ("StableDiffusionXLPipeline",), "sd": ("StableDiffusionPipeline",)}
# Components we never load (no quality or speed role here, and often not downloaded).
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def source_kind(source: str) -> str:
    """One of builtin, arch, local, hub. An existing path wins over a hub id of the same spelling."""
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith("arch:"):
        return "arch"
    if Path(source).expanduser().exists() or not _HUB_ID.match(source):
        return "local"
    return "hub"


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub would choose it, read from the environment at call time
    (huggingface_hub reads it once at import, so a later HF_HOME would otherwise be ignored)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "huggingface" / "hub"


def how_to_provide(repo_id: str, cache: Path) -> str:
    return (
        f"To provide them, either:\n"
        f"  - on a machine with access, run `huggingface-cli download {repo_id}` (or `hf download {repo_id}`) "
        f"and make its cache visible here, e.g. point HF_HOME at it (now looking in {cache});\n"
        f"  - or set this model's `source:` in config/config.yaml to a local diffusers folder "
        f"(one with model_index.json)."
    )


def resolve_hub(repo_id: str, revision=None) -> Path:
    """The cached snapshot folder of `repo_id`, never downloading; MissingWeightsError if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        raise MissingWeightsError(
            f"The weights of '{repo_id}' are not in the Hugging Face cache ({type(err).__name__}). "
            + how_to_provide(repo_id, cache)
        ) from err
    return Path(folder)


def resolve_local(path: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise MissingWeightsError(
            f"source '{path}' is neither an existing folder nor a hub id (owner/name). "
            f"Set `source:` to a local diffusers folder (with model_index.json) or a hub id in your HF cache."
        )
    return folder


def read_model_index(folder: Path) -> dict:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise CorruptArtifactError(folder, "no model_index.json: not a diffusers pipeline folder")
    try:
        return json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptArtifactError(index, f"not valid JSON: {err}") from err


def components(model_index: dict) -> list:
    """Component names a pipeline needs: entries [library, class] with a class, minus the skipped ones."""
    return sorted(
        name for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1]
        and name not in SKIPPED_COMPONENTS
    )


def weight_files(component_dir: Path) -> list:
    """Weight files present (broken cache symlinks do not count), shards included."""
    return sorted(p for p in component_dir.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES) and p.exists())


def variant_of(files) -> str | None:
    """'fp16' when only fp16-variant files are there (a common partial download), else None."""
    plain = [f for f in files if ".fp16." not in f.name]
    return "fp16" if files and not plain else None


def check_pipeline_folder(folder: Path, label: str) -> dict:
    """Check every needed component is there with its weights. Returns {variant, components}.

    `label` names the source in messages (hub id or path)."""
    model_index = read_model_index(folder)
    missing, variants = [], set()
    for name in components(model_index):
        sub = folder / name
        if not sub.is_dir() or not any(p.exists() for p in sub.iterdir()):
            missing.append(f"{name}/ (absent)")
            continue
        if (sub / "config.json").exists():  # a model: it needs weights, schedulers/tokenizers do not
            files = weight_files(sub)
            if not files:
                missing.append(f"{name}/ (no .safetensors or .bin weights)")
            elif variant_of(files):
                variants.add(variant_of(files))
            for index in sub.glob("*.index.json"):
                shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
                missing += [f"{name}/{s}" for s in sorted(shards) if not (sub / s).exists()]
    if missing:
        raise MissingWeightsError(f"{label} ({folder}) lacks: {', '.join(missing)}.")
    return {"variant": variants.pop() if variants else None, "components": components(model_index),
            "pipeline_class": model_index.get("_class_name")}


def link_pipeline_folder(source_folder: Path, out_dir: Path, component_names):
    """Make `out_dir` a pipeline folder whose model_index.json and component folders are symlinks.

    Real checkpoints are gigabytes, and the HF cache is already an immutable, content-addressed
    copy: linking costs nothing and the folder still loads with `from_pretrained(out_dir)`.
    Links are absolute so they survive the folder being renamed into place.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    source_folder = Path(os.path.abspath(source_folder))
    os.symlink(source_folder / "model_index.json", out_dir / "model_index.json")
    for name in component_names:
        os.symlink(source_folder / name, out_dir / name, target_is_directory=True)
