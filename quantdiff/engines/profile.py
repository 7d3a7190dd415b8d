"""The engine's shape profile, shared by both backends: which batch sizes and latent sizes an
engine accepts, from `engine.batch` and `engine.resolution` (min, opt, max) of the config.

TensorRT builds its optimization profile from it; the torch engine exports those ranges as
torch.export dims (a range whose ends agree is a static dimension, which compiles faster and
runs the kernels Inductor picks for that one shape).
"""
from __future__ import annotations

from ..errors import ConfigError
from ..models.inputs import N_TIME_IDS, TEXT_SEQ_LEN, VAE_SCALE_FACTOR


def optimization_profile(
    pipeline: str,
    unet_config: dict,
    resolution: int,
    batch: dict,
    resolution_range: dict,
    guidance: bool = True,
    text_len: int = TEXT_SEQ_LEN,
) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per named UNet input.

    `batch` counts images per prompt batch; with classifier-free guidance the UNet sees twice
    as many. `resolution_range` holds fractions of the model's square `resolution`. Each latent
    side is pixels / VAE_SCALE_FACTOR rounded down to a multiple of 2**(downsampling blocks), so every
    down-sampled feature map keeps an integer size and the up path concatenates cleanly.
    """
    if pipeline not in ("sd", "sdxl"):
        raise ConfigError(f"pipeline {pipeline!r} has no engine profile; use sd or sdxl.")
    batch_sizes = _ordered("engine.batch", batch, int)
    if batch_sizes[0] < 1:
        raise ConfigError(f"engine.batch.min is {batch_sizes[0]}; a batch holds at least 1 image.")
    fractions = _ordered("engine.resolution", resolution_range, float)
    multiple = down_factor(unet_config)
    sides = []
    for label, fraction in zip(("min", "opt", "max"), fractions):
        side = int(resolution * fraction) // VAE_SCALE_FACTOR // multiple * multiple
        if side <= 0:
            raise ConfigError(
                f"engine.resolution.{label} = {fraction} of {resolution} px gives no latent: the side must be at "
                f"least {VAE_SCALE_FACTOR * multiple} px for this UNet ({len(unet_config['block_out_channels'])} blocks)."
            )
        sides.append(side)
    # Rounding down is monotone, so min <= opt <= max still holds for the sides.
    unet_batch = [b * (2 if guidance else 1) for b in batch_sizes]

    cross_dim = unet_config["cross_attention_dim"]
    if isinstance(cross_dim, (list, tuple)):  # per-block dims; SD/SDXL use one value throughout
        cross_dim = cross_dim[0]
    channels = unet_config["in_channels"]
    shapes = {
        "sample": [(b, channels, s, s) for b, s in zip(unet_batch, sides)],
        "timestep": [(1,)] * 3,
        "encoder_hidden_states": [(b, text_len, cross_dim) for b in unet_batch],
    }
    if pipeline == "sdxl":
        text_embeds = unet_config["projection_class_embeddings_input_dim"] - N_TIME_IDS * unet_config["addition_time_embed_dim"]
        shapes["text_embeds"] = [(b, text_embeds) for b in unet_batch]
        shapes["time_ids"] = [(b, N_TIME_IDS) for b in unet_batch]
    return {name: tuple(triple) for name, triple in shapes.items()}


def down_factor(unet_config) -> int:
    """How much the UNet shrinks a latent side (2 per down block but the last): sides are multiples of it."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


def sample_ranges(profile: dict) -> dict[str, tuple[int, int]]:
    """{'batch' | 'height' | 'width': (min, max)} of the UNet's sample input (latent units), from a profile."""
    (b_min, _, h_min, w_min), _, (b_max, _, h_max, w_max) = profile["sample"]
    return {"batch": (b_min, b_max), "height": (h_min, h_max), "width": (w_min, w_max)}


def opt_shape(profile: dict) -> tuple[int, int]:
    """(UNet batch, latent side) of the profile's opt point: the shape an engine is built and tuned at."""
    batch, _, side, _ = profile["sample"][1]
    return batch, side


def _ordered(key: str, triple: dict, kind) -> list:
    try:
        values = [kind(triple[k]) for k in ("min", "opt", "max")]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{key} must be a mapping with numeric min, opt and max; got {triple!r}.") from None
    if not values[0] <= values[1] <= values[2]:
        raise ConfigError(f"{key} {triple} must satisfy min <= opt <= max.")
    if values[0] <= 0:
        raise ConfigError(f"{key}.min is {values[0]}; it must be positive.")
    return values
