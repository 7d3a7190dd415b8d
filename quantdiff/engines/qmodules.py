"""Real 8-bit modules built from a calibrated ModelOpt fake-quant UNet, and the conversion of a whole UNet.

ModelOpt's fake quant keeps float weights and rounds activations and weights onto the 8-bit grid
on every call. Here the static scales from calibration are frozen, weights are stored in 8 bits,
and linears and convs run 8-bit GEMMs. Each module keeps `reference_forward`: the fake-quant
formula in plain PyTorch, bit-identical to ModelOpt's CPU path, so tests can tell rounding from bugs.

The modules: qlinear (StaticQuant, Int8Linear, FP8Linear), qattention (QuantAttnProcessor), and
here the GEGLU feed-forward and the conv; then the conversion and the setters of the GPU kernels.
Quantization grids: quantdiff/quant/grids.py (ModelOpt's, bit for bit).
"""
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantdiff.engines import triton_geglu, triton_gemm
from quantdiff.engines.gemm8 import conv2d_as_gemm, int8_out_scale, resolve_conv_patches, resolve_geglu
from quantdiff.engines.qattention import QuantAttnProcessor, fp8_kernel_scales
from quantdiff.engines.qlinear import (FP8_FAST_ACCUM, FP8Linear, Int8Linear, StaticQuant, _copy_or_none,
                                       _dequantize_weight, _Linear8, _weight_8bit, quantizer_format)
from quantdiff.errors import ConfigError
from quantdiff.quant.grids import zero_pad_last_dim

__all__ = ["StaticQuant", "Int8Linear", "FP8Linear", "QuantAttnProcessor", "GEGLUFeedForward", "QuantConv2d",
           "InputQuantized", "quantizer_format", "convert_to_real_quant", "apply_kernels", "set_int8_gemm",
           "set_conv_patches", "set_fp8_attention", "set_e4m3_projections", "set_geglu",
           "remaining_modelopt_modules"]

# A conv as a GEMM first writes its patch matrix (kh*kw times the input); that costs about 1/N of
# the GEMM's own time for N output channels. On an H200 (SDXL, docs/PERF.md), with Inductor writing
# the patches, the 8-bit GEMM beat cuDNN's fp16 conv from 640 output channels up and lost at 320.
GEMM_MIN_OUT_CHANNELS = 640
# With the Triton copy writing them (half the time), fp8 running every conv as a GEMM took the UNet
# step from 26.03 to 25.66 ms (1.224x and 1.240x of fp16, each against its own baseline); int8 keeps
# 640: its GEMM at 320 columns lost to cuDNN fp16 in bench.gemm --convs (not measured in the UNet).
GEMM_MIN_OUT_CHANNELS_TRITON_PATCHES = {"fp8": 0, "int8": 640}


# ---------------------------------------------------------------- GEGLU feed-forwards

class GEGLUFeedForward(nn.Module):
    """diffusers' FeedForward with a GEGLU input (every SDXL transformer block's) whose two linears
    are 8-bit of one format. With `geglu` "triton" (gemm8.resolve_geglu) one Triton GEMM, with TMA
    loads, computes value * gelu(gate) of the input projection and writes it on the output
    projection's 8-bit grid (its smoothing folded in per column), which that linear reads as is: no
    fp16 hidden state of twice the width written and read back, no GEGLU+quantize kernel between
    the GEMMs. With "triton-pointwise" the FF-in linear writes value and gate in fp16 and one Triton
    kernel (engines/triton_geglu.py) computes and quantizes the middle, as the fused GEMM writes it.
    Otherwise ("inductor") the modules run one after the other as diffusers has them.
    Inference only: the dropouts between and after are identities."""

    geglu = "auto"  # set_geglu sets a whole model

    def __init__(self, feed_forward):
        super().__init__()
        self.net = feed_forward.net
        proj, out = self.projections()
        hidden_grid = out.act.to_grid.float().expand(out.in_features)
        if out.act.pre_quant_scale is not None:
            hidden_grid = hidden_grid * out.act.pre_quant_scale.float()
        # per column, float32, contiguous: what the kernel reads (built once, not per call)
        self.register_buffer("hidden_grid", hidden_grid.contiguous())
        self.register_buffer("proj_scale", triton_gemm.per_column(
            proj.out_scale if isinstance(proj, Int8Linear) else proj.act.back * proj.weight_scale, proj.out_features))

    @staticmethod
    def fits(feed_forward):
        """True for a FeedForward this module can take: GEGLU (exact gelu), then dropout, then a linear,
        both linears 8-bit of one format, the output reading the GEGLU's width."""
        from diffusers.models.activations import GEGLU

        net = feed_forward.net
        if len(net) not in (3, 4) or type(net[0]) is not GEGLU or not isinstance(net[1], nn.Dropout):
            return False
        if len(net) == 4 and not isinstance(net[3], nn.Dropout):
            return False
        proj, out = net[0].proj, net[2]
        return (type(proj) is type(out) and isinstance(proj, _Linear8)
                and proj.out_features == 2 * out.in_features)

    def projections(self):
        return self.net[0].proj, self.net[2]

    def forward(self, hidden_states, *args, **kwargs):
        kernel = resolve_geglu(self.geglu, hidden_states.device)
        if kernel == "inductor":
            for module in self.net:
                hidden_states = module(hidden_states)
            return hidden_states
        proj, out = self.projections()
        lead, hidden = hidden_states.shape[:-1], out.in_features
        out_fmt = triton_gemm.OUT_INT8 if isinstance(proj, Int8Linear) else triton_gemm.OUT_FP8
        if kernel == "triton-pointwise":  # the FF-in linear as it is, then one kernel for the middle
            h = proj(hidden_states).reshape(-1, 2 * hidden)
            h8 = triton_geglu.geglu8(h, self.hidden_grid, out_fmt, out.act.min_bound)
        else:
            xq = zero_pad_last_dim(proj.quantize_input(hidden_states.reshape(-1, proj.in_features)),
                                   proj.weight.shape[1])
            h8 = triton_gemm.gemm8(xq, proj.weight, self.proj_scale, proj.bias, self.hidden_grid, n=hidden,
                                   gate_offset=hidden, out_fmt=out_fmt, int8_min=out.act.min_bound, tma=True)
        return out.from_quantized(h8, hidden_states.dtype).reshape(*lead, out.out_features)


def _fuse_geglu_feed_forwards(model, counts):
    """Every FeedForward of `model` that GEGLUFeedForward fits becomes one."""
    from diffusers.models.attention import FeedForward

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is FeedForward and GEGLUFeedForward.fits(child):
                setattr(parent, child_name, GEGLUFeedForward(child))
                counts["feed_forward_geglu"] += 1


# ---------------------------------------------------------------- convolutions

class QuantConv2d(nn.Module):
    """Conv2d with an 8-bit stored weight (int8 per-channel or fp8 per-tensor) and a static
    per-tensor input quantizer.

    On the GPU it runs as one 8-bit GEMM over the input's patches (gemm8.conv2d_as_gemm) when the
    channel counts suit cuBLASLt (`gemm_ok`) and the GEMM pays (GEMM_MIN_OUT_CHANNELS); elsewhere,
    and when `use_gemm` is False, it is the exact fake-quant emulation (a float conv on the
    dequantized weight). `use_gemm` None means: decide so; True forces the GEMM where it is ok.
    The weight is kept channels_last, the layout the GEMM reads without a copy.
    """

    fast_accum = FP8_FAST_ACCUM
    int8_gemm = "auto"  # as Int8Linear's
    conv_patches = "auto"  # who writes the GEMM's patch matrix on the GPU (gemm8.resolve_conv_patches)

    def __init__(self, qconv, where="conv"):
        super().__init__()
        if qconv.padding_mode != "zeros":
            raise ConfigError(f"{where}: padding_mode {qconv.padding_mode!r} is not supported")
        self.kernel_size, self.stride, self.padding = qconv.kernel_size, qconv.stride, qconv.padding
        self.dilation, self.groups = qconv.dilation, qconv.groups
        self.in_channels, self.out_channels = qconv.in_channels, qconv.out_channels
        self.act = StaticQuant.from_quantizer(qconv.input_quantizer, f"{where}.input_quantizer")
        self.fmt, wq, factor = _weight_8bit(qconv.weight, qconv.weight_quantizer, f"{where}.weight_quantizer")
        self.register_buffer("weight", wq.contiguous(memory_format=torch.channels_last))
        self.register_buffer("weight_factor", factor.clone())  # int8: divisor; fp8: multiplier
        self.register_buffer("bias", _copy_or_none(qconv.bias))
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        # cuBLASLt: k and n multiples of 16 (fp8; int8 needs 8); string padding ("same") is not handled
        self.gemm_ok = (self.groups == 1 and k % 16 == 0 and self.out_channels % 16 == 0
                        and isinstance(self.padding, tuple))
        self.use_gemm = None
        if self.fmt == "int8":
            self.register_buffer("out_scale", int8_out_scale(self.act.to_grid, factor, self.out_channels))

    def dequantized_weight(self, dtype=torch.float32):
        return _dequantize_weight(self.fmt, self.weight, self.weight_factor, dtype)

    def runs_as_gemm(self, on_gpu):
        if self.use_gemm is None:
            if not (on_gpu and self.gemm_ok):
                return False
            if self.fmt == "int8" and self.int8_gemm == "cudnn":  # (auto never means cudnn)
                return True  # cuDNN's int8 conv beat its fp16 one on 8 of 9 SDXL shapes (docs/PERF.md)
            triton_patches = resolve_conv_patches(self.conv_patches, "cuda") == "triton"
            return self.out_channels >= (GEMM_MIN_OUT_CHANNELS_TRITON_PATCHES[self.fmt] if triton_patches
                                         else GEMM_MIN_OUT_CHANNELS)
        return self.use_gemm and self.gemm_ok

    def forward(self, x):
        if self.runs_as_gemm(x.is_cuda):
            return conv2d_as_gemm(self, x)
        return self.reference_forward(x)

    def reference_forward(self, x):
        # The weight in the input's memory format: cuDNN's fast NHWC kernels on a channels_last
        # input (the GPU); on a contiguous one the float sums run in ModelOpt's order (bit-exact).
        layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        weight = self.dequantized_weight(x.dtype).contiguous(memory_format=layout)
        return F.conv2d(self.act(x), weight, self.bias,
                        self.stride, self.padding, self.dilation, self.groups)


# ---------------------------------------------------------------- conversion

_ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer",
                         "softmax_quantizer", "bmm2_output_quantizer")


def _plain_linear(qlinear):
    """nn.Linear with the same weights; a SmoothQuant scale is folded into the weight columns
    (ModelOpt applies pre_quant_scale even when the input quantizer is disabled)."""
    linear = nn.Linear(qlinear.in_features, qlinear.out_features, bias=qlinear.bias is not None,
                       device=qlinear.weight.device, dtype=qlinear.weight.dtype)
    weight = qlinear.weight.detach()
    pqs = qlinear.input_quantizer.pre_quant_scale
    if pqs is not None:
        weight = weight * pqs.reshape(1, -1).to(weight.dtype)
    linear.weight.data.copy_(weight)
    if qlinear.bias is not None:
        linear.bias.data.copy_(qlinear.bias.detach())
    return linear


def _plain_conv(qconv):
    conv = nn.Conv2d(qconv.in_channels, qconv.out_channels, qconv.kernel_size, qconv.stride,
                     qconv.padding, qconv.dilation, qconv.groups, qconv.bias is not None,
                     qconv.padding_mode, device=qconv.weight.device, dtype=qconv.weight.dtype)
    conv.weight.data.copy_(qconv.weight.detach())
    if qconv.bias is not None:
        conv.bias.data.copy_(qconv.bias.detach())
    if qconv.input_quantizer.pre_quant_scale is not None:
        raise ConfigError("a disabled conv quantizer with a pre_quant_scale is not supported")
    return conv


def _both_or_neither(module, where):
    inp, wt = module.input_quantizer.is_enabled, module.weight_quantizer.is_enabled
    if inp != wt:
        raise ConfigError(f"{where}: input quantizer enabled={inp} but weight quantizer enabled={wt}; "
                          "the torch engine converts layers with both or neither")
    if module.output_quantizer.is_enabled:
        raise ConfigError(f"{where}: output quantizers are not supported by the torch engine")
    return inp


def _strip_modelopt(module):
    """Turn a ModelOpt dynamic module back into its original class, without its quantizers."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    module = module.export()
    for name, child in list(module.named_children()):
        if isinstance(child, TensorQuantizer):
            delattr(module, name)
    return module


class InputQuantized(nn.Module):
    """A module whose input is statically fake-quantized (e.g. a LayerNorm input quantizer)."""

    def __init__(self, module, act):
        super().__init__()
        self.module, self.act = module, act

    def forward(self, x, *args, **kwargs):
        return self.module(self.act(x), *args, **kwargs)


def _convert_attention(module, where, counts, fuse_projections=True):
    """Kept as a diffusers Attention; FP8 (or int8) static q/k/v quantizers move onto it; the
    projections reading one input become one GEMM where they can (`fuse_projections`)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    quantizers = {n: getattr(module, n) for n in _ATTENTION_QUANTIZERS}
    if quantizers["bmm2_output_quantizer"].is_enabled:
        raise ConfigError(f"{where}: bmm2_output_quantizer is not supported by the torch engine")
    qkv = [quantizers[n] for n in _ATTENTION_QUANTIZERS[:3]]
    enabled = [q.is_enabled for q in qkv]
    # The softmax quantizer only acts on the bmm path (classic AttnProcessor), as in ModelOpt.
    quantize_softmax = quantizers["softmax_quantizer"].is_enabled and type(module.processor) is AttnProcessor
    built = {}
    if all(enabled):
        for short, q in zip(("q", "k", "v"), qkv):
            built[f"{short}_quant"] = StaticQuant.from_quantizer(q, f"{where}.{short}_bmm_quantizer")
        if quantize_softmax:
            built["softmax_quant"] = StaticQuant.from_quantizer(quantizers["softmax_quantizer"],
                                                                f"{where}.softmax_quantizer")
    elif any(enabled):
        raise ConfigError(f"{where}: q/k/v bmm quantizers must be enabled together (got {enabled})")
    plain = _strip_modelopt(module)
    # the engine's processor runs this attention (quantized, or diffusers' default one): it can fuse
    ours = bool(built) or type(plain.processor) is AttnProcessor2_0
    fused = _fuse_projections(plain) if fuse_projections and ours else None
    if fused:
        counts[f"attention_{fused}"] += 1
    shared = _shared_input_quantizers(plain)
    if shared:
        counts["attention_shared_input_quantizers"] += 1
    if built:
        for name, quant in built.items():
            plain.add_module(name, quant)
        quants = [built[f"{short}_quant"] for short in ("q", "k", "v")]
        plain.set_processor(QuantAttnProcessor(quantize_softmax=quantize_softmax, shared_inputs=shared,
                                               one_qkv_grid=all(quants[0].same_grid(q) for q in quants[1:])))
        if all(q.fmt == "fp8" for q in quants):  # the fp8 attention kernel's scales, in one tensor
            plain.register_buffer("fp8_kernel_scales", fp8_kernel_scales(plain))
        fed = _feed_quantizers_from_gemms(plain, quants)
        if fed:
            counts["projections_e4m3_out"] += fed
        counts[f"attention_{built['q_quant'].fmt}"] += 1
        if quantize_softmax:
            counts["softmax_quantized"] += 1
    elif (shared or fused) and ours:  # diffusers' attention with fewer quantize kernels or GEMMs
        plain.set_processor(QuantAttnProcessor(quantize_qkv=False, shared_inputs=shared))
    return plain


# the attribute a fused projection group becomes (QuantAttnProcessor reads it)
FUSED_PROJECTIONS = {("to_q", "to_k", "to_v"): "to_qkv", ("to_k", "to_v"): "to_kv"}


def _fuse_projections(attn):
    """The projections of `attn` that read one tensor in every call (quant/fusion.projection_group)
    become one 8-bit linear computing them side by side, attn.to_qkv or attn.to_kv, where they can
    (_Linear8.concatenated: one input grid and, fp8, one weight scale, which calibration's
    `fused_scales` gives them). The members go: their weights live in the fused linear only (no
    copy kept). Returns the fused attribute's name, or None."""
    from quantdiff.quant.fusion import projection_group

    members = projection_group(attn)
    linears = [getattr(attn, name) for name in members]
    if not isinstance(linears[0], _Linear8):
        return None
    fused = type(linears[0]).concatenated(linears)
    if fused is None:
        return None
    name = FUSED_PROJECTIONS[members]
    for member in members:
        delattr(attn, member)
    attn.add_module(name, fused)
    return name


def _feed_quantizers_from_gemms(attn, quants):
    """The fp8 q/k/v projections of `attn` that can write their output in e4m3 on the q/k/v
    quantizer it feeds (FP8Linear.feeds), for the fp8 attention kernel to read: those without a
    bias, feeding fp8 quantizers without smoothing and with no norm between (norm_q, norm_k), a
    fused group only where its members feed one grid. Returns how many."""
    if attn.norm_q is not None or attn.norm_k is not None \
            or any(q.fmt != "fp8" or q.pre_quant_scale is not None for q in quants):
        return 0
    q_quant, k_quant, v_quant = quants
    fed = 0
    for name, grids in (("to_qkv", quants), ("to_kv", (k_quant, v_quant)), ("to_q", (q_quant,)),
                        ("to_k", (k_quant,)), ("to_v", (v_quant,))):
        projection = getattr(attn, name, None)
        if isinstance(projection, FP8Linear) and projection.bias is None \
                and all(grids[0].same_grid(g) for g in grids[1:]):
            projection.feeds(grids[0].to_grid)
            fed += 1
    return fed


def _shared_input_quantizers(attn):
    """Groups (tuples of names) of attn's 8-bit q/k/v projections of one type whose input
    quantizers are the same (QuantAttnProcessor.shared_inputs)."""
    projections = [(name, getattr(attn, name)) for name in ("to_q", "to_k", "to_v") if hasattr(attn, name)]
    groups = []
    for name, projection in projections:
        if not isinstance(projection, _Linear8):
            continue
        for group in groups:
            first = getattr(attn, group[0])
            if type(first) is type(projection) and first.in_features == projection.in_features \
                    and first.act.same_grid(projection.act):
                group.append(name)
                break
        else:
            groups.append([name])
    return tuple(tuple(group) for group in groups if len(group) > 1)


def _convert_module(module, where, counts, fuse_projections=True):
    """The replacement for one ModelOpt module (children already converted)."""
    from modelopt.torch.quantization.nn import QuantModule

    if not isinstance(module, QuantModule):
        return module
    if isinstance(module, nn.Linear) and hasattr(module, "weight_quantizer"):
        if not _both_or_neither(module, where):
            counts["linear_kept"] += 1
            return _plain_linear(module)
        fmt = quantizer_format(module.weight_quantizer, where)
        counts[f"linear_{fmt}"] += 1
        return Int8Linear(module, where) if fmt == "int8" else FP8Linear(module, where)
    if isinstance(module, nn.Conv2d) and hasattr(module, "weight_quantizer"):
        if not _both_or_neither(module, where):
            counts["conv_kept"] += 1
            return _plain_conv(module)
        real = QuantConv2d(module, where)
        counts[f"conv_{real.fmt}"] += 1
        return real
    if hasattr(module, "q_bmm_quantizer"):
        return _convert_attention(module, where, counts, fuse_projections)
    # Any other quantized module (LayerNorm, pooling ...): keep it, emulate its input quantizer.
    inp = getattr(module, "input_quantizer", None)
    act = StaticQuant.from_quantizer(inp, f"{where}.input_quantizer") if inp is not None and inp.is_enabled else None
    plain = _strip_modelopt(module)
    if act is None:
        return plain
    counts["input_quant_emulated"] += 1
    return InputQuantized(plain, act)


def _convert_tree(parent, prefix, counts, fuse_projections=True):
    for name, child in list(parent.named_children()):
        where = f"{prefix}{name}"
        _convert_tree(child, f"{where}.", counts, fuse_projections)
        new = _convert_module(child, where, counts, fuse_projections)
        if new is not child:
            setattr(parent, name, new)


def _set_each(holders, setting, kernel):
    """`setting` = kernel on each of `holders`; returns how many."""
    for holder in holders:
        setattr(holder, setting, kernel)
    return len(holders)


def set_int8_gemm(model, kernel):
    """Every int8 GEMM of a converted model on `kernel` (gemm8.INT8_GEMM_CHOICES); returns how many."""
    return _set_each([m for m in model.modules() if isinstance(m, (Int8Linear, QuantConv2d))], "int8_gemm", kernel)


def set_conv_patches(model, kernel):
    """Every conv of a converted model that runs as a GEMM takes its patches from `kernel`
    (gemm8.CONV_PATCHES_CHOICES); returns how many convs were set."""
    return _set_each([m for m in model.modules() if isinstance(m, QuantConv2d)], "conv_patches", kernel)


def _quantized_attention_processors(model):
    """The processors of a converted model's attentions that quantize q, k and v."""
    return [m.processor for m in model.modules() if isinstance(m.__dict__.get("processor"), QuantAttnProcessor)
            and m.processor.quantize_qkv]


def set_fp8_attention(model, kernel):
    """Every quantized attention of a converted model runs its fp8 attention on `kernel`
    (gemm8.FP8_ATTENTION_CHOICES; int8 ones ignore it); returns how many were set."""
    return _set_each(_quantized_attention_processors(model), "fp8_attention", kernel)


def set_e4m3_projections(model, on):
    """Whether the fp8 q/k/v projections set up for it (FP8Linear.feeds) write e4m3 from their GEMMs
    for the fp8 attention kernel (True, the conversion's) or fp16 that quantize kernels then read;
    returns how many quantized attentions were set."""
    return _set_each(_quantized_attention_processors(model), "e4m3_projections", on)


def set_geglu(model, kernel):
    """Every GEGLU feed-forward of a converted model on `kernel` (gemm8.GEGLU_CHOICES); returns how many."""
    return _set_each([m for m in model.modules() if isinstance(m, GEGLUFeedForward)], "geglu", kernel)


def apply_kernels(model, kernels):
    """Put resolved kernels (gemm8.resolve_kernels) on every 8-bit module of a converted model."""
    if "geglu" in kernels:
        set_geglu(model, kernels["geglu"])
    if "conv_patches" in kernels:
        set_conv_patches(model, kernels["conv_patches"])
    if "int8_gemm" in kernels:
        set_int8_gemm(model, kernels["int8_gemm"])
    if "fp8_attention" in kernels:
        set_fp8_attention(model, kernels["fp8_attention"])


def remaining_modelopt_modules(model):
    """Names of ModelOpt modules still in `model` (none after convert_to_real_quant)."""
    return [name for name, m in model.named_modules() if type(m).__module__.startswith("modelopt.")]


@torch.no_grad()
def convert_to_real_quant(unet, fuse_projections=True):
    """Replace every ModelOpt quantized module of `unet` in place with real 8-bit modules.

    Enabled Linear -> Int8Linear / FP8Linear, Conv2d -> QuantConv2d, Attention q/k/v quantizers ->
    QuantAttnProcessor; disabled ones become plain nn.Linear / nn.Conv2d / Attention; a GEGLU
    FeedForward whose linears are both 8-bit -> GEGLUFeedForward; with `fuse_projections` the
    projections of an attention reading one input -> one 8-bit linear (to_qkv, to_kv) where they
    can. Returns (unet, counts by kind), e.g. {"linear_int8": 30, "conv_int8": 20, "linear_kept": 2,
    "feed_forward_geglu": 10, "attention_to_qkv": 10, ...}.
    """
    counts = Counter()
    _convert_tree(unet, "", counts, fuse_projections)
    _fuse_geglu_feed_forwards(unet, counts)
    left = remaining_modelopt_modules(unet)
    if left:
        raise ConfigError(f"ModelOpt modules the torch engine cannot convert: {left[:5]}")
    if hasattr(unet, "_modelopt_state"):  # mto's bookkeeping; the model is no longer a ModelOpt model
        del unet._modelopt_state
    return unet, dict(sorted(counts.items()))
