"""Real 8-bit linears, and the frozen activation quantizer every real 8-bit module uses.

A ModelOpt fake-quant linear keeps float weights and rounds activations and weights onto the 8-bit
grid on every call. Here the static scales from calibration are frozen, the weight is stored in 8
bits, and the layer runs an 8-bit GEMM (gemm8). Each keeps `reference_forward`: the fake-quant
formula in plain PyTorch, bit-identical to ModelOpt's CPU path, so tests can tell rounding from bugs.

Quantization grids: quantdiff/quant/grids.py (ModelOpt's, bit for bit).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantdiff.engines.gemm8 import FP8, fp8_matmul, int8_linear, int8_out_scale
from quantdiff.errors import ConfigError
from quantdiff.quant.grids import INT8_MAX, fp8_scales, int8_scales, quantize_fp8, quantize_int8, zero_pad_last_dim

# cuBLASLt's fp8 fast accumulation on the GPU (fewer promotions of the partial sums to float32):
# measured 7e-4 to 1.5e-3 relative error per GEMM on SDXL's shapes (docs/PERF.md, bench.gemm).
FP8_FAST_ACCUM = True


def quantizer_format(quantizer, where):
    """'int8' or 'fp8' for an enabled, calibrated ModelOpt TensorQuantizer; ConfigError otherwise."""
    if quantizer.block_sizes:
        raise ConfigError(f"{where}: block quantization is not supported by the torch engine")
    if quantizer.amax is None:
        raise ConfigError(f"{where}: quantizer has no amax; calibrate the model first")
    if quantizer.num_bits == (4, 3):
        return "fp8"
    if quantizer.num_bits == 8 and not quantizer.unsigned:
        return "int8"
    raise ConfigError(f"{where}: num_bits={quantizer.num_bits} unsigned={quantizer.unsigned} "
                      "is not an 8-bit format the torch engine supports (int8 signed, fp8 e4m3)")


def _copy_or_none(t):
    return None if t is None else t.detach().clone()


# ---------------------------------------------------------------- activations

class StaticQuant(nn.Module):
    """Quantize->dequantize with a frozen per-tensor scale: exact emulation of a ModelOpt quantizer."""

    def __init__(self, fmt, amax, narrow_range=True, pre_quant_scale=None):
        super().__init__()
        self.fmt = fmt
        self.min_bound = -INT8_MAX if narrow_range else -INT8_MAX - 1
        to_grid, back = (int8_scales if fmt == "int8" else fp8_scales)(amax)
        self.register_buffer("to_grid", to_grid)
        self.register_buffer("back", back)  # int8: divisor; fp8: multiplier (as ModelOpt does)
        self.register_buffer("pre_quant_scale", _copy_or_none(pre_quant_scale))

    @classmethod
    def from_quantizer(cls, quantizer, where):
        fmt = quantizer_format(quantizer, where)
        return cls(fmt, quantizer.amax, quantizer.narrow_range, quantizer.pre_quant_scale)

    def same_grid(self, other):
        """True when `other` quantizes every input to the same 8-bit tensor (format, bounds, scale
        and smoothing all equal): e.g. q, k and v projections calibrated on one input."""
        smoothing = (self.pre_quant_scale, other.pre_quant_scale)
        return (self.fmt == other.fmt and self.min_bound == other.min_bound
                and torch.equal(self.to_grid, other.to_grid) and torch.equal(self.back, other.back)
                and (smoothing == (None, None)
                     or None not in smoothing and smoothing[0].shape == smoothing[1].shape
                     and torch.equal(*smoothing)))

    def quantize(self, x):
        """8-bit tensor on the grid (pre_quant_scale not applied: callers do that)."""
        if self.fmt == "int8":
            return quantize_int8(x, self.to_grid, self.min_bound)
        return quantize_fp8(x, self.to_grid)

    def dequantize(self, q, dtype):
        if self.fmt == "int8":
            return (q.float() / self.back).to(dtype)
        return (q.float() * self.back).to(dtype)

    def forward(self, x):
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        return self.dequantize(self.quantize(x), x.dtype)


def _weight_8bit(weight, quantizer, where):
    """(fmt, 8-bit weight, per-channel or per-tensor dequant factor) from a weight quantizer."""
    fmt = quantizer_format(quantizer, where)
    amax = quantizer.amax.float()
    if fmt == "int8":
        to_grid, divisor = int8_scales(amax)
        min_bound = -INT8_MAX if quantizer.narrow_range else -INT8_MAX - 1
        return fmt, quantize_int8(weight.detach(), to_grid, min_bound), divisor
    if amax.numel() != 1:
        raise ConfigError(f"{where}: fp8 weights must be per-tensor (axis=None) for the torch engine")
    to_grid, back = fp8_scales(amax.reshape(()))
    return fmt, quantize_fp8(weight.detach(), to_grid), back


def _dequantize_weight(fmt, q, factor, dtype):
    if fmt == "int8":
        return (q.float() / factor).to(dtype)
    return (q.float() * factor).to(dtype)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------- linears

class _Linear8(nn.Module):
    """What the two 8-bit linears share: quantize the input (its smoothing applied) onto `act`'s grid,
    then `from_quantized`, the GEMM, which each defines."""

    def forward(self, x):
        lead = x.shape[:-1]
        out = self.from_quantized(self.quantize_input(x.reshape(-1, self.in_features)), x.dtype)
        return out.reshape(*lead, self.out_features)

    def quantize_input(self, x):
        """x (m, in_features) on this layer's 8-bit grid (its pre-quant scale, SmoothQuant's, applied)."""
        if self.act.pre_quant_scale is not None:
            x = x * self.act.pre_quant_scale
        return self.act.quantize(x)

    def _from_modelopt(self, qlinear, where, fmt, fmt_name):
        """Sizes and the frozen input quantizer from a ModelOpt linear whose quantizers are both `fmt`;
        returns its 8-bit weight and the weight's dequantize factor."""
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.act = StaticQuant.from_quantizer(qlinear.input_quantizer, f"{where}.input_quantizer")
        weight_fmt, wq, factor = _weight_8bit(qlinear.weight, qlinear.weight_quantizer, f"{where}.weight_quantizer")
        if weight_fmt != fmt or self.act.fmt != fmt:
            raise ConfigError(f"{where}: {type(self).__name__} needs {fmt_name} weight and input quantizers")
        return wq, factor

    @classmethod
    def concatenated(cls, linears):
        """One linear of this class computing `linears` side by side (their outputs concatenated), for
        linears of it reading one input on one 8-bit grid (StaticQuant.same_grid), each with a bias or
        none: one GEMM instead of several, the same sums column by column. None where they cannot be
        (fp8: weight scales that differ, which quant/fusion.py makes equal at calibration). Its
        `split_sizes` are the members' widths, in order."""
        first = linears[0]
        if (len(linears) < 2 or any(type(m) is not cls or m.in_features != first.in_features
                                    or not first.act.same_grid(m.act) or (m.bias is None) != (first.bias is None)
                                    for m in linears)
                or not cls._scales_concatenate(linears)):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = first.in_features, sum(m.out_features for m in linears)
        fused.split_sizes = [m.out_features for m in linears]
        fused.act = first.act
        weight = torch.cat([m.weight[: m.out_features] for m in linears])
        n_pad = _round_up(fused.out_features, cls.N_MULTIPLE) - fused.out_features
        fused.register_buffer("weight", F.pad(weight.view(torch.int8), (0, 0, 0, n_pad)).view(weight.dtype))
        bias = None if first.bias is None else torch.cat([m.bias for m in linears])
        fused.register_buffer("bias", bias)
        fused._concatenate_scales(linears)
        return fused


class Int8Linear(_Linear8):
    """INT8 weight (per-channel) x INT8 activation (per-tensor static) linear, int32 accumulate."""

    int8_gemm = "auto"  # the GPU kernel (gemm8.resolve_int8_gemm); set_int8_gemm sets a whole model
    N_MULTIPLE = 8  # cuBLASLt int8 wants k and n multiples of 8

    def __init__(self, qlinear, where="linear"):
        super().__init__()
        wq, w_div = self._from_modelopt(qlinear, where, "int8", "int8")
        w_div = w_div.reshape(-1) if w_div.numel() > 1 else w_div.reshape(()).expand(self.out_features)
        # Zero-pad k and n to multiples of 8 (cuBLASLt int8); zeros add nothing to the sums.
        k_pad, n_pad = _round_up(self.in_features, 8), _round_up(self.out_features, 8)
        self.register_buffer("weight", F.pad(wq, (0, k_pad - self.in_features, 0, n_pad - self.out_features)))
        self.register_buffer("weight_divisor", w_div.clone())  # weight_int8 / divisor = fake-quant weight
        self.register_buffer("out_scale", int8_out_scale(self.act.to_grid, w_div, self.out_features))
        self.register_buffer("bias", _copy_or_none(qlinear.bias))

    @staticmethod
    def _scales_concatenate(linears):
        return True  # per output channel: each column keeps its own

    def _concatenate_scales(self, linears):
        self.register_buffer("weight_divisor", torch.cat([m.weight_divisor for m in linears]))
        self.register_buffer("out_scale", torch.cat([m.out_scale[: m.out_features] for m in linears]))

    def from_quantized(self, xq, dtype):
        """The (m, out_features) output in dtype from an input already on this layer's grid."""
        xq = zero_pad_last_dim(xq, self.weight.shape[1])
        return int8_linear(xq, self.weight, self.out_scale, self.bias, dtype, self.int8_gemm)

    def dequantized_weight(self, dtype=torch.float32):
        w = self.weight[: self.out_features, : self.in_features]
        return _dequantize_weight("int8", w, self.weight_divisor[:, None], dtype)

    def reference_forward(self, x):
        """ModelOpt's fake-quant formula: linear(fakequant(x * pqs), fakequant(W)) + b."""
        return F.linear(self.act(x), self.dequantized_weight(x.dtype), self.bias)


class FP8Linear(_Linear8):
    """FP8 e4m3 per-tensor weight x activation linear through torch._scaled_mm."""

    fast_accum = FP8_FAST_ACCUM
    N_MULTIPLE = 16  # cuBLASLt fp8 wants k and n multiples of 16

    def __init__(self, qlinear, where="linear"):
        super().__init__()
        wq, w_back = self._from_modelopt(qlinear, where, "fp8", "fp8 (4, 3)")
        # cuBLASLt fp8 wants k and n multiples of 16: pad once here (zeros are exact in e4m3).
        k_pad, n_pad = _round_up(self.in_features, 16), _round_up(self.out_features, 16)
        wq = F.pad(wq.view(torch.int8), (0, k_pad - self.in_features, 0, n_pad - self.out_features))
        self.register_buffer("weight", wq.view(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", w_back.reshape(()).clone())  # 0-dim: export wants both
        self.register_buffer("bias", _copy_or_none(qlinear.bias))

    @staticmethod
    def _scales_concatenate(linears):
        return all(torch.equal(m.weight_scale, linears[0].weight_scale) for m in linears)  # one per tensor

    def _concatenate_scales(self, linears):
        self.register_buffer("weight_scale", linears[0].weight_scale.clone())

    def from_quantized(self, xq, dtype, e4m3=False):
        """The (m, out_features) output in dtype from an input (m, in_features) already on this
        layer's e4m3 grid (self.act.to_grid): what an fp8 producer hands over (fp8 attention).

        With `e4m3` the output comes in e4m3 instead, on the grid of the quantizer it feeds: its
        `e4m3_out_scale` (the input's dequantize factor times that grid, set at conversion where
        the layer has no bias: qmodules._feed_quantizers_from_gemms) scales the float32 sums, which
        cuBLASLt casts once, saturating at 448 as the quantizer clamps. No fp16 output is written,
        and no quantize kernel runs after the GEMM. The fake-quant model rounds to fp16 first, so an
        occasional element lands one e4m3 step away (0.2% of them on an H200, SDXL's q/k/v shape:
        docs/PERF.md). The scale goes in as scale_a, not as _scaled_mm's scale_result, which
        Inductor's lowering of _scaled_mm does not pass on (torch 2.11 and 2.13)."""
        xq = zero_pad_last_dim(xq, self.weight.shape[1])
        if e4m3:
            out = fp8_matmul(xq, self.weight, self.e4m3_out_scale, self.weight_scale, FP8, None, self.fast_accum)
        else:
            out = fp8_matmul(xq, self.weight, self.act.back, self.weight_scale, dtype, self.bias, self.fast_accum)
        return out if out.shape[1] == self.out_features else out[:, : self.out_features]

    def feeds(self, grid):
        """From now on this layer can write its output in e4m3 on `grid` (a quantizer's to_grid):
        from_quantized(..., e4m3=True). Not for a layer with a bias (the GEMM would add it unscaled)."""
        if self.bias is not None:
            raise ValueError("an fp8 linear with a bias cannot write its output onto a quantizer's grid")
        self.register_buffer("e4m3_out_scale", (self.act.back * grid).reshape(()))

    def e4m3_output(self, x):
        """forward(x) on the grid set by `feeds`, in e4m3 (from_quantized with e4m3)."""
        lead = x.shape[:-1]
        out = self.from_quantized(self.quantize_input(x.reshape(-1, self.in_features)), None, e4m3=True)
        return out.reshape(*lead, self.out_features)

    def dequantized_weight(self, dtype=torch.float32):
        w = self.weight[: self.out_features, : self.in_features]
        return _dequantize_weight("fp8", w, self.weight_scale, dtype)

    def reference_forward(self, x):
        return F.linear(self.act(x), self.dequantized_weight(x.dtype), self.bias)
