"""Builtin models: small pipelines of real diffusers classes, generated offline from a seed.

They are the embedded default and the test fixture. `tiny-xl` keeps every structural feature of
SDXL that the later stages care about (two CLIP text encoders whose states concatenate, text_time
conditioning, linear-projection transformers, cross-attention heads of width 16 so FP8 attention
applies, a 4-block VAE so latents are 1/8 of the image) at widths that run in a fraction of a second.
"""
from .tokenizer import EOS, MODEL_MAX_LENGTH, N_MERGES

_VOCAB_SIZE = 2 * 256 + N_MERGES + 2  # must match quantdiff/data/tokenizer (tests check it)
_EOS_ID = _VOCAB_SIZE - 1             # end-of-text is the last id (see tokenizer.vocabulary)
_PAD2_ID = ord("!")                   # the second tokenizer pads with "!" like SDXL's; "!" is its own byte symbol

# SDXL's noise schedule, shared by tiny-xl and the architecture-only variant.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "use_karras_sigmas": False,
}

_TEXT_ENCODER_1_WIDTH = 32
_TEXT_ENCODER_2_WIDTH = 64
_TIME_EMBED_DIM = 16

TINY_XL = {
    "pipeline_class": "StableDiffusionXLPipeline",
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        # diffusers reads `attention_head_dim` as the number of heads in SDXL-style configs:
        # 4 heads over 64 channels is a head width of 16, as SDXL's 10 over 640 is 64.
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2],
        "use_linear_projection": True,
        "cross_attention_dim": _TEXT_ENCODER_1_WIDTH + _TEXT_ENCODER_2_WIDTH,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TIME_EMBED_DIM,
        # pooled text embedding of encoder 2 + 6 micro-conditioning ids, each embedded to _TIME_EMBED_DIM
        "projection_class_embeddings_input_dim": _TEXT_ENCODER_2_WIDTH + 6 * _TIME_EMBED_DIM,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    },
    "text_encoder": {
        "_class_name": "CLIPTextModel",
        "vocab_size": _VOCAB_SIZE,
        "hidden_size": _TEXT_ENCODER_1_WIDTH,
        "intermediate_size": 4 * _TEXT_ENCODER_1_WIDTH,
        "num_hidden_layers": 3,  # SDXL reads the penultimate layer's states
        "num_attention_heads": 2,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "projection_dim": _TEXT_ENCODER_1_WIDTH,
        "bos_token_id": _EOS_ID - 1,
        "eos_token_id": _EOS_ID,
        "pad_token_id": _EOS_ID,
    },
    "text_encoder_2": {
        "_class_name": "CLIPTextModelWithProjection",
        "vocab_size": _VOCAB_SIZE,
        "hidden_size": _TEXT_ENCODER_2_WIDTH,
        "intermediate_size": 4 * _TEXT_ENCODER_2_WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "gelu",
        "projection_dim": _TEXT_ENCODER_2_WIDTH,
        "bos_token_id": _EOS_ID - 1,
        "eos_token_id": _EOS_ID,
        "pad_token_id": _PAD2_ID,
    },
    "tokenizer": {"pad_token": EOS},
    "tokenizer_2": {"pad_token": "!"},
    "scheduler": SDXL_SCHEDULER,
}

# tiny-xl's architecture with a VAE and UNet trained on the shapes set (quantdiff.models.train):
# images that follow their prompts, so 8-bit quality can be judged. The weights ship as package
# data; the text encoders and tokenizers regenerate from the seed as tiny-xl's do.
TINY_XL_SHAPES = dict(TINY_XL, trained={"vae": "weights/tiny-xl-shapes/vae", "unet": "weights/tiny-xl-shapes/unet"})

BUILTINS = {"tiny-xl": TINY_XL, "tiny-xl-shapes": TINY_XL_SHAPES}
