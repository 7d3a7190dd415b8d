"""A tiny SDXL-shaped UNet (32/64 channels, text_time embedding, head_dim 16) and its inputs, for
engine tests that need the real architecture's module kinds but no weights."""
import torch


def tiny_sdxl_unet():
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
        use_linear_projection=True,
    ).eval()


def unet_inputs(batch, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, size, size, generator=g), "timestep": torch.tensor(10.0),
            "encoder_hidden_states": torch.randn(batch, 7, 64, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                                  "time_ids": torch.randn(batch, 6, generator=g)}}
