"""Example UNet inputs, shaped from `unet.config`, and the input names the export and engine stages use."""
import torch

# Names of the flat UNet inputs, in call order (ONNX input names, engine bindings).
UNET_INPUT_NAMES = {
    "sdxl": ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
    "sd": ["sample", "timestep", "encoder_hidden_states"],
}
TEXT_SEQ_LEN = 77          # CLIP context length
VAE_SCALE_FACTOR = 8       # latents are 1/8 of the image side for every SD/SDXL VAE
N_TIME_IDS = 6             # SDXL micro-conditioning: original size, crop top-left, target size


def unet_kind(unet):
    """'sdxl' for a UNet with text_time conditioning (pooled text + time ids), else 'sd'."""
    return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd"


def sdxl_time_ids(resolution, batch, dtype=torch.float32, device="cpu"):
    """SDXL's micro-conditioning for a square image seen whole: (original size, crop top-left, target size)."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype)
    return ids.repeat(batch, 1).to(device)


def unet_example_inputs(unet, batch: int, resolution: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """Named inputs for `unet(**inputs)` at `batch` images of `resolution` pixels square.

    `timestep` is a float32 vector of length `batch` (the scheduler's dtype; the UNet casts it), the
    rest are in `dtype`. SDXL UNets also get `added_cond_kwargs={text_embeds, time_ids}`. Values are
    seeded random normals; on the meta device they are empty.
    """
    cfg = unet.config
    latent = resolution // VAE_SCALE_FACTOR
    context_dim = cfg.cross_attention_dim
    if isinstance(context_dim, (list, tuple)):
        context_dim = context_dim[0]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    inputs = {
        "sample": randn(batch, cfg.in_channels, latent, latent),
        "timestep": torch.full((batch,), 500.0, dtype=torch.float32, device=device),
        "encoder_hidden_states": randn(batch, TEXT_SEQ_LEN, context_dim),
    }
    if unet_kind(unet) == "sdxl":
        pooled_dim = cfg.projection_class_embeddings_input_dim - N_TIME_IDS * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, pooled_dim),
            "time_ids": sdxl_time_ids(resolution, batch, dtype, device),
        }
    return inputs


def flatten_unet_inputs(inputs: dict) -> dict:
    """`unet_example_inputs` output as a flat dict in `UNET_INPUT_NAMES` order (for export)."""
    flat = {name: inputs[name] for name in UNET_INPUT_NAMES["sd"]}
    flat.update(inputs.get("added_cond_kwargs", {}))
    return flat


def unflatten_unet_inputs(flat: dict) -> dict:
    """The inverse: flat named tensors back into `unet(**inputs)` form."""
    inputs = {name: flat[name] for name in UNET_INPUT_NAMES["sd"]}
    if "text_embeds" in flat:
        inputs["added_cond_kwargs"] = {"text_embeds": flat["text_embeds"], "time_ids": flat["time_ids"]}
    return inputs
