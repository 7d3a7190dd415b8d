"""Quant levels: which UNet layers an 8-bit build quantizes.

| level | quantized                                  |
| 1     | convs                                      |
| 2     | + feed-forward linears                     |
| 2.5   | + attention q/k/v projections              |
| 3     | + every other linear                       |
| 4     | 3 + FP8 attention (q/k/v bmm, softmax)     |

Layers whose name matches the exclusion regex (embeddings, conv_in/out, shortcuts) never are.
"""
import re

import torch.nn as nn

from ..errors import ConfigError

LEVEL_KINDS = {
    1: ("conv",),
    2: ("conv", "ff"),
    2.5: ("conv", "ff", "qkv"),
    3: ("conv", "ff", "qkv", "linear"),
    4: ("conv", "ff", "qkv", "linear"),
}
FP8_ATTENTION_LEVEL = 4
# The config's default `calibration.exclude`, for tools that quantize without a config.
EXCLUDE_DEFAULT = "(time_embedding|add_embedding|conv_in|conv_out|conv_shortcut|time_emb_proj)"
ATTENTION_HEAD_DIM_MULTIPLE = 16  # FP8 attention kernels need head_dim % 16 == 0


def check_level(level, precision):
    if level not in LEVEL_KINDS:
        raise ConfigError(f"quant level {level} does not exist; choose one of {sorted(LEVEL_KINDS)}")
    if level == FP8_ATTENTION_LEVEL and precision != "fp8":
        raise ConfigError(f"quant level 4 adds FP8 attention and exists for fp8 only, not {precision}")


def layer_kind(name, module):
    """'conv', 'ff', 'qkv', 'linear' or None (not a quantizable layer)."""
    if isinstance(module, nn.Conv2d):
        return "conv"
    if not isinstance(module, nn.Linear):
        return None
    return linear_kind(name)


def linear_kind(name):
    """'ff' (feed-forward), 'qkv' (attention projections) or 'linear' (every other linear)."""
    leaf = name.rsplit(".", 1)[-1]
    if ".ff." in f".{name}.":
        return "ff"
    if leaf in ("to_q", "to_k", "to_v"):
        return "qkv"
    return "linear"


def quantized_layers(unet, level, exclude):
    """{module name: kind} of the layers quantized at `level`, in module order."""
    kinds = LEVEL_KINDS[level]
    skip = re.compile(exclude) if exclude else None
    out = {}
    for name, module in unet.named_modules():
        kind = layer_kind(name, module)
        if kind in kinds and not (skip and skip.search(name)):
            out[name] = kind
    return out


def attention_head_dim(attn):
    return attn.to_q.out_features // attn.heads


def fp8_attention_layers(unet, level):
    """Attention modules that get FP8 q/k/v/softmax quantizers: level 4 only, head_dim % 16 == 0."""
    if level != FP8_ATTENTION_LEVEL:
        return []
    from diffusers.models.attention_processor import Attention

    return [name for name, m in unet.named_modules()
            if isinstance(m, Attention) and attention_head_dim(m) % ATTENTION_HEAD_DIM_MULTIPLE == 0]


def count_by_kind(layers):
    counts = {}
    for kind in layers.values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts
