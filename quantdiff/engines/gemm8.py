"""8-bit GEMMs, and convolutions as 8-bit GEMMs, written in plain PyTorch ops.

The GEMMs are cuBLASLt's (torch._scaled_mm for fp8 e4m3, torch._int_mm for int8). Everything around
them is written so that torch.compile / AOTInductor can fuse it: the activation's quantization
(scale, clamp, cast) folds into the kernel that produces the activation (norm, GELU, residual add),
and a convolution's patch matrix (im2col) is one gather kernel that also quantizes. Shapes that
are known at trace time skip the cuBLASLt padding, so a statically compiled UNet has none.
"""
import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


def _known_multiple(n, multiple):
    """True when n is a plain int (static shapes) and a multiple; symbolic sizes are never known."""
    return isinstance(n, int) and n % multiple == 0


def fp8_matmul(a, weight, scale_a, scale_b, out_dtype, bias=None, fast_accum=False):
    """(m, k) e4m3 @ (n, k)^T e4m3 * scale_a * scale_b (+ bias) -> (m, n) in out_dtype.

    cuBLASLt wants k and n multiples of 16 (callers pad weights once at build time) and, on some
    versions, m too: m is padded here with zero rows by a symbolic amount (no export guard) unless
    it is statically a multiple. The bias goes into the GEMM epilogue when it can (CUDA, same dtype).
    """
    rows = a.shape[0]
    # decided on the Python side, never by comparing symbolic sizes (that would guard the export)
    padded = a.is_cuda and not _known_multiple(rows, 16)
    if padded:
        a = F.pad(a.view(torch.int8), (0, 0, 0, (-rows) % 16)).view(FP8)
    fuse_bias = bias is not None and a.is_cuda and bias.dtype == out_dtype and bias.shape[0] == weight.shape[0]
    out = torch._scaled_mm(a, weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias if fuse_bias else None,
                           out_dtype=out_dtype, use_fast_accum=fast_accum and a.is_cuda)
    if padded:
        out = out[:rows]
    if bias is not None and not fuse_bias:
        out = out[:, : bias.shape[0]] + bias.to(out_dtype)
    return out


def int8_matmul(a, w):
    """(m, k) int8 @ (n, k)^T int8 -> (m, n) int32 through torch._int_mm.

    CPU takes any shape. cuBLASLt needs m > 16 and k, n multiples of 8: k and n are padded once at
    build time, and m is padded here with zero rows (a symbolic amount, so dynamic batch exports
    without a guard) then sliced off, unless m is statically large enough.
    """
    if a.is_cuda and not (isinstance(a.shape[0], int) and a.shape[0] > 16):
        rows = a.shape[0]
        a = F.pad(a, (0, 0, 0, torch.sym_max(17 - rows, 0)))
        return torch._int_mm(a, w.t())[:rows]
    return torch._int_mm(a, w.t())


def int8_out_scale(act_to_grid, weight_divisor, out_features):
    """Per-output-channel factor from int32 sums back to float: 1 / (input grid * weight grid),
    0 where either quantizer maps to 0 (ModelOpt's amax below 2**-24). Per-tensor weights expand."""
    grid = (act_to_grid * weight_divisor.reshape(-1)).expand(out_features)
    return torch.where(grid == 0, torch.zeros_like(grid), 1 / grid)


def int8_dequantize(acc, out_scale, bias, dtype):
    """int32 sums -> dtype: one multiply per output channel, then the bias (float32 throughout)."""
    out = acc.float() * out_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


# ---------------------------------------------------------------- convolutions

def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def image_patches(x, kernel_size, stride, padding, dilation):
    """(b, ho, wo, kh*kw*c) patches of x (b, c, h, w): tap-major, channel-minor.

    That is the memory order of a channels_last conv weight (o, kh, kw, c), so the conv is
    patches @ weight.reshape(o, -1)^T. On a channels_last x every tap is a strided view and the
    concatenation is one gather kernel after Inductor fuses it.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    xh = x.permute(0, 2, 3, 1)
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return xh
    ho = conv_output_size(x.shape[2], kh, sh, ph, dh)
    wo = conv_output_size(x.shape[3], kw, sw, pw, dw)
    xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
    taps = [xh[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw, :]
            for i in range(kh) for j in range(kw)]
    return torch.cat(taps, dim=-1)


def conv2d_as_gemm(conv, x):
    """A QuantConv2d (groups 1) as one 8-bit GEMM over x's patches; output is channels_last.

    Same quantization as the module's fake-quant formula (per-tensor static input, its 8-bit
    weight); only the sums' order and precision differ (float32 / int32 accumulation).
    """
    if conv.act.pre_quant_scale is not None:
        x = x * conv.act.pre_quant_scale
    patches = image_patches(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    b, ho, wo, k = patches.shape
    a = conv.act.quantize(patches.reshape(-1, k))
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, k)  # a view when channels_last
    if conv.fmt == "fp8":
        out = fp8_matmul(a, weight, conv.act.back, conv.weight_factor, x.dtype, conv.bias, conv.fast_accum)
    else:
        out = int8_dequantize(int8_matmul(a, weight), conv.out_scale, conv.bias, x.dtype)
    return out.reshape(b, ho, wo, conv.out_channels).permute(0, 3, 1, 2)
