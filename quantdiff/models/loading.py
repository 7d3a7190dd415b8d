"""Read back what the model stage wrote: the pipeline itself, its info record, parameter counts."""
import json
import struct
from pathlib import Path

import torch

from ..errors import CorruptArtifactError, MissingWeightsError
from .sources import SKIPPED_COMPONENTS, check_pipeline_folder, read_model_index

INFO_FILE = "quantdiff.json"  # written by materialize beside model_index.json


def read_model_info(model_dir) -> dict:
    """The info dict `materialize` returned, as stored in the model folder ({} if absent)."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptArtifactError(path, f"not valid JSON: {err}") from err


def safetensors_parameters(path) -> int:
    """Element count of a .safetensors file from its header alone (no weights read)."""
    with open(path, "rb") as fh:
        size_bytes = fh.read(8)
        if len(size_bytes) != 8:
            raise CorruptArtifactError(path, "shorter than a safetensors header")
        (size,) = struct.unpack("<Q", size_bytes)
        try:
            header = json.loads(fh.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptArtifactError(path, f"unreadable safetensors header: {err}") from err
    total = 0
    for key, entry in header.items():
        if key != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


def component_parameters(component_dir, variant=None):
    """Parameters of one model component from its safetensors headers; None if it has only .bin files."""
    files = sorted(Path(component_dir).glob("*.safetensors"))
    files = [f for f in files if (".fp16." in f.name) == (variant == "fp16")] or files
    if not files:
        return None
    return sum(safetensors_parameters(f) for f in files)


def load_pipeline(model_dir, dtype=torch.float32, device="cpu"):
    """The diffusers pipeline in `model_dir` (a folder the model stage wrote), from local files only."""
    from diffusers import DiffusionPipeline

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MissingWeightsError(f"model folder {model_dir} does not exist; build it with the workflow's model rule "
                                  f"(snakemake resources/models/<model>).")
    model_index = read_model_index(model_dir)
    check = check_pipeline_folder(model_dir, f"model folder {model_dir}")
    variant = read_model_info(model_dir).get("variant", check["variant"])
    # Skipped components are not linked or checked. The safety checker would also blank images it
    # dislikes, which would corrupt quality comparisons.
    extra = {name: None for name in SKIPPED_COMPONENTS if name in model_index}
    if "safety_checker" in model_index:
        extra["requires_safety_checker"] = False
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True, variant=variant, **extra
        )
    except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as err:
        raise CorruptArtifactError(model_dir, f"diffusers could not load it: {type(err).__name__}: {err}") from err
    except Exception as err:  # safetensors raises its own SafetensorError for truncated files
        if type(err).__name__ == "SafetensorError":
            raise CorruptArtifactError(model_dir, f"unreadable weights: {err}") from err
        raise
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def load_unet(model_dir, dtype=torch.float32, device="cpu"):
    """Only the UNet of a model folder (export and engines need nothing else)."""
    from diffusers import UNet2DConditionModel

    model_dir = Path(model_dir)
    check_pipeline_folder(model_dir, f"model folder {model_dir}")
    variant = read_model_info(model_dir).get("variant")
    try:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype,
                                                    local_files_only=True, variant=variant)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CorruptArtifactError(model_dir / "unet", f"diffusers could not load it: {type(err).__name__}: {err}") from err
    return unet.to(device).eval()
