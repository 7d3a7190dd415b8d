"""One scale for the FP8 projections that read one input, so that an engine runs them as one GEMM.

The q, k and v projections of a self-attention (k and v of a cross-attention) read the same tensor.
Calibrated with FP8's per-tensor scales, their input scales come out equal and their weight scales
do not, so each needs a GEMM of its own. Giving a group the largest of its weight amaxes lets the
engine concatenate the weights into one GEMM with one scale (the torch engine does:
engines/qmodules.py; TensorRT fuses horizontally only what shares scales, and ModelOpt's TensorRT-LLM
export takes the same maximum for fused QKV). What it costs: e4m3's relative step is the same at
every scale, so only a member's values that the larger scale pushes below e4m3's normal range
(under 2^-6 of the scale's 448) lose mantissa bits. At quant level 4 the attention's q/k/v (bmm)
quantizers of the group are shared the same way, so that the fused output is quantized once.

INT8 is left alone: its weights are per output channel, which a concatenated GEMM keeps as they are,
and SmoothQuant gives each projection its own input smoothing, so their inputs are not one 8-bit
tensor (a shared smoothing per group, as SmoothQuant has for fused QKV, is not written).
"""
import torch

FP8_BITS = (4, 3)  # ModelOpt's num_bits for e4m3


def projection_group(attn):
    """The projections of a diffusers Attention that read one tensor in every call."""
    return ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")


def _fp8_per_tensor(quantizer):
    return (quantizer is not None and quantizer.is_enabled and quantizer.num_bits == FP8_BITS
            and getattr(quantizer, "amax", None) is not None and quantizer.amax.numel() == 1)


def _share_amax(quantizers):
    amax = torch.stack([q.amax.detach().reshape(()) for q in quantizers]).amax()
    for q in quantizers:
        q.amax = amax.clone().reshape(q.amax.shape)


def share_fused_scales(unet):
    """Give every FP8 projection group of `unet`'s attentions (projection_group) one weight amax
    and, where the attention itself is quantized (level 4), one amax for those members' bmm
    quantizers. A group whose input scales differ (they read one tensor, so only another
    calibration makes them differ) is left as it is.

    Returns {attention name: [member names]} of the groups it shared, in module order."""
    from diffusers.models.attention_processor import Attention

    shared = {}
    for name, attn in unet.named_modules():
        if not isinstance(attn, Attention):
            continue
        members = projection_group(attn)
        linears = [getattr(attn, member, None) for member in members]
        if not all(_fp8_per_tensor(getattr(m, "weight_quantizer", None))
                   and _fp8_per_tensor(getattr(m, "input_quantizer", None)) for m in linears):
            continue
        inputs = [m.input_quantizer for m in linears]
        if any(q.pre_quant_scale is not None or not torch.equal(q.amax, inputs[0].amax) for q in inputs):
            continue
        _share_amax([m.weight_quantizer for m in linears])
        bmm = [getattr(attn, f"{member[-1]}_bmm_quantizer", None) for member in members]
        if all(_fp8_per_tensor(q) for q in bmm):
            _share_amax(bmm)
        shared[name] = list(members)
    return shared
