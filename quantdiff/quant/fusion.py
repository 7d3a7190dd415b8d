"""One scale for the 8-bit projections that read one input, so that an engine runs them as one GEMM.

The q, k and v projections of a self-attention (k and v of a cross-attention) read the same tensor,
but calibration gives each its own scales, so each needs a GEMM of its own. Here a group gets one:

- FP8: their input scales come out equal (one tensor, per-tensor max) and their weight scales do
  not. The group takes the largest of its weight amaxes, which lets the engine concatenate the
  weights into one GEMM with one scale (the torch engine does: engines/qmodules.py; TensorRT fuses
  horizontally only what shares scales, and ModelOpt's TensorRT-LLM export takes the same maximum
  for fused QKV). What it costs: e4m3's relative step is the same at every scale, so only a
  member's values that the larger scale pushes below e4m3's normal range (under 2^-6 of the
  scale's 448) lose mantissa bits. At quant level 4 the attention's q/k/v (bmm) quantizers of the
  group are shared the same way, so that the fused output is quantized once.
- INT8: weights are per output channel, which a concatenated GEMM keeps as they are, but SmoothQuant
  gives each projection its own input smoothing, so their 8-bit inputs differ. The group gets one
  smoothing, as SmoothQuant has it for a fused QKV: s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)
  with the weight maximum taken over all the group's weights (ModelOpt's own undo and apply, so the
  checkpoint holds an ordinary SmoothQuant layer). Only with a fixed alpha: `alpha: auto` picks
  each layer's own, which one smoothing cannot keep (those groups stay as calibrated).
"""
import torch

from .recipe import FORMATS


def projection_group(attn):
    """The projections of a diffusers Attention that read one tensor in every call."""
    return ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")


def _fp8_per_tensor(quantizer):
    return (quantizer is not None and quantizer.is_enabled and quantizer.num_bits == FORMATS["fp8"]
            and getattr(quantizer, "amax", None) is not None and quantizer.amax.numel() == 1)


def _share_amax(quantizers):
    amax = torch.stack([q.amax.detach().reshape(()) for q in quantizers]).amax()
    for q in quantizers:
        q.amax = amax.clone().reshape(q.amax.shape)


def _share_fp8(attn, members, linears):
    inputs = [m.input_quantizer for m in linears]
    if not all(_fp8_per_tensor(q) and _fp8_per_tensor(m.weight_quantizer) for q, m in zip(inputs, linears)):
        return False
    if any(q.pre_quant_scale is not None or not torch.equal(q.amax, inputs[0].amax) for q in inputs):
        return False
    _share_amax([m.weight_quantizer for m in linears])
    bmm = [getattr(attn, f"{member[-1]}_bmm_quantizer", None) for member in members]
    if all(_fp8_per_tensor(q) for q in bmm):
        _share_amax(bmm)
    return True


def _smoothed_int8(linear):
    """True for an INT8 linear that ModelOpt's SmoothQuant smoothed in this process (its per-channel
    activation amax is still at hand)."""
    inp, weight = linear.input_quantizer, linear.weight_quantizer
    return (inp.is_enabled and weight.is_enabled and inp.num_bits == FORMATS["int8"] and weight.num_bits == FORMATS["int8"]
            and inp.pre_quant_scale is not None and getattr(inp, "_amax_for_smoothing", None) is not None)


@torch.no_grad()
def _share_int8_smoothing(linears, alpha):
    from modelopt.torch.quantization.model_calib import (apply_pre_quant_scale_and_smooth,
                                                         disable_pre_quant_scale_and_resmooth)

    from .smoothing import smoothing_scale

    if alpha == "auto" or not all(_smoothed_int8(m) for m in linears):
        return False
    act_amax = linears[0].input_quantizer._amax_for_smoothing.float().reshape(-1)
    if any(not torch.equal(m.input_quantizer._amax_for_smoothing.float().reshape(-1), act_amax) for m in linears):
        return False
    for m in linears:  # back to the unsmoothed weights (and weight amax, input amax)
        disable_pre_quant_scale_and_resmooth(m, delete_pre_quant_scale=True)
    weights = torch.cat([m.weight.detach().float() for m in linears])
    scale = smoothing_scale(act_amax.to(weights.device), weights, alpha)
    for m in linears:
        apply_pre_quant_scale_and_smooth(m, scale)
    return True


def share_fused_scales(unet, alpha=None):
    """Give every projection group of `unet`'s attentions (projection_group) one set of scales: FP8
    groups one weight amax and, where the attention itself is quantized (level 4), one amax for
    those members' bmm quantizers; INT8 groups smoothed by SmoothQuant at a fixed `alpha` (the one
    calibration used) one smoothing. A group whose members' inputs were calibrated differently
    (they read one tensor, so only another calibration makes them differ) is left as it is.

    Returns {attention name: [member names]} of the groups it shared, in module order."""
    from diffusers.models.attention_processor import Attention

    shared = {}
    for name, attn in unet.named_modules():
        if not isinstance(attn, Attention):
            continue
        members = projection_group(attn)
        linears = [getattr(attn, member, None) for member in members]
        if not all(hasattr(m, "input_quantizer") and hasattr(m, "weight_quantizer") for m in linears):
            continue
        if _share_fp8(attn, members, linears) or (alpha is not None and _share_int8_smoothing(linears, alpha)):
            shared[name] = list(members)
    return shared
