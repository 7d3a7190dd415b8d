"""8-bit GEMMs, and convolutions as 8-bit GEMMs, written in plain PyTorch ops.

The GEMMs are cuBLASLt's (torch._scaled_mm for fp8 e4m3, torch._int_mm for int8), except int8 on
the GPU, which runs the project's Triton kernel (engines/triton_gemm.py), as do both formats' GEGLU
feed-forward inputs with `engine.geglu: triton` (qmodules.GEGLUFeedForward), or with
`engine.int8_gemm: cudnn` cuDNN's int8 matmul and conv (engines/cudnn_int8.py). Everything around
them is written so that torch.compile / AOTInductor can fuse it: the activation's quantization
(scale, clamp, cast) folds into the kernel that produces the activation (norm, GELU, residual add),
and a convolution's patch matrix (im2col) is one copy kernel over its already quantized input. Shapes
that are known at trace time skip the cuBLASLt padding, so a statically compiled UNet has none.
"""
import torch
import torch.nn.functional as F

from quantdiff.engines import triton_gemm
from quantdiff.errors import ConfigError, MissingBackendError

FP8 = torch.float8_e4m3fn
INT8_GEMM_CHOICES = ("auto", "triton", "triton-tma", "int_mm", "cudnn")
CONV_PATCHES_CHOICES = ("auto", "triton", "inductor", "implicit")
FP8_ATTENTION_CHOICES = ("auto", "sdpa", "triton", "triton-fp8-probs")
GEGLU_CHOICES = ("auto", "triton", "triton-pointwise", "inductor")


def _check_choice(what, choice, choices):
    if choice not in choices:
        raise ConfigError(f"{what} {choice!r} is not one of {', '.join(choices)}")


def _hopper(device):
    """Compute capability 9.0 or newer: where the Triton kernels were timed, and where TMA exists."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _require_triton(setting, choice, device, instead):
    """The error for a Triton kernel asked for by `engine.<setting>` where it cannot run."""
    if not triton_gemm.available(device):
        raise MissingBackendError(f"engine.{setting} is {choice}, but the triton package is not installed (CUDA "
                                  f"builds of torch bring it); install it or set engine.{setting}: {instead}")


def _require_hopper(setting, choice, device):
    """The error for a TMA kernel asked for by `engine.<setting>` on a GPU older than Hopper."""
    if not _hopper(device):
        raise MissingBackendError(f"engine.{setting} is {choice}, which needs Hopper's TMA (compute capability 9.0 "
                                  f"or newer; this GPU has {torch.cuda.get_device_capability(device)}); set "
                                  f"engine.{setting}: auto")


def resolve_int8_gemm(choice, device, python_ops=False):
    """The int8 GEMM kernel for `device` ("cudnn", "triton", "triton-tma" or "int_mm", i.e.
    torch._int_mm; the CPU always takes torch._int_mm): `engine.int8_gemm`.

    "auto" on Hopper and newer (sm_90+) is "cudnn" where the model may call Python ops
    (`python_ops`: torch.compile, the engine's `export` format; not an AOTInductor package) and
    the nvidia-cudnn-frontend package imports, else "triton". cuDNN's int8 matmul and convolution
    have the dequantize fused (engines/cudnn_int8.py: the convs read the image, no patch matrix):
    the int8 level 3 SDXL step was 1.204x of torch.compile fp16 with them on an H100, 1.049x with the
    Triton GEMM (docs/PERF.md, tenth and twelfth sessions). The Triton GEMM with its dequantize fused
    took 0.54-0.81 of the time of _int_mm (an Ampere kernel on Hopper) plus its dequantize on every
    SDXL shape (H200). Older GPUs keep cuBLASLt, whose int8 kernels are native there (neither
    measured against it). "triton-tma": the Triton GEMM with its operands brought in by TMA
    (Hopper and newer) where the GEMM fits (triton_gemm.tma_fits); no faster in the SDXL UNet, and
    not packaged (engines.check_packageable). Asking for a kernel where it cannot run is an error."""
    _check_choice("int8 GEMM", choice, INT8_GEMM_CHOICES)
    device = torch.device(device)
    if device.type != "cuda":
        return "int_mm"
    if choice == "auto":
        if not _hopper(device):
            return "int_mm"
        from quantdiff.engines import cudnn_int8  # (it imports this module)

        if python_ops and cudnn_int8.available(device):
            return "cudnn"
        return "triton" if triton_gemm.available(device) else "int_mm"
    if choice.startswith("triton"):
        _require_triton("int8_gemm", choice, device, "int_mm")
    if choice == "triton-tma":
        _require_hopper("int8_gemm", choice, device)
    if choice == "cudnn":
        from quantdiff.engines import cudnn_int8  # (it imports this module)

        cudnn_int8.require("int8_gemm", choice, "triton")
    return choice


def resolve_conv_patches(choice, device):
    """Who writes a conv-as-GEMM's patch matrix on `device` (`engine.conv_patches`): "inductor"
    (the unfold view of image_patches, compiled; the CPU always) or "triton" (the copy kernel of
    engines/triton_patches.py). "auto" is Triton wherever it can run: on an H200 it wrote every
    SDXL conv input's patches in 0.49-0.57 of the time of Inductor's kernel, and took the UNet step
    from 28.74 to 26.03 ms (fp8) and 35.06 to 32.48 ms (int8) (docs/PERF.md). The copy has nothing
    specific to Hopper, so older GPUs take it too (not measured there). "implicit" writes no patch
    matrix: the Triton conv kernel of engines/triton_conv.py reads the windows from the image
    (convs whose channels it does not fit keep the Triton copy)."""
    _check_choice("conv patches", choice, CONV_PATCHES_CHOICES)
    if torch.device(device).type != "cuda":
        return "inductor"
    if choice == "auto":
        return "triton" if triton_gemm.available(device) else "inductor"
    if choice in ("triton", "implicit"):
        _require_triton("conv_patches", choice, device, "inductor")
    return choice


def resolve_fp8_attention(choice, device):
    """Who runs quant level 4's fp8 attention on `device` (`engine.fp8_attention`): "sdpa" (q, k and
    v quantized and dequantized around torch's fp16 attention, cuDNN's on the GPU; the CPU always),
    "triton" (engines/triton_attention.py reads the 8-bit q, k and v) or "triton-fp8-probs" (the
    same kernel with the softmax output in e4m3 too, as TensorRT's FP8 attention has it: both
    products on fp8 tensor cores, an error the fake-quant model does not have); "auto" is "triton"
    on Hopper and newer where the triton package is installed (on the H200 the level 4 step took
    26.54 ms with it against 27.22 with SDPA, the same error: docs/PERF.md), SDPA on older GPUs,
    where the kernel has not been timed."""
    _check_choice("fp8 attention", choice, FP8_ATTENTION_CHOICES)
    if torch.device(device).type != "cuda":
        return "sdpa"
    if choice == "auto":
        return "triton" if _hopper(device) and triton_gemm.available(device) else "sdpa"
    if choice != "sdpa":
        _require_triton("fp8_attention", choice, device, "sdpa")
    return choice


def resolve_geglu(choice, device):
    """Who runs an 8-bit GEGLU feed-forward's middle on `device` (`engine.geglu`): "inductor" (the
    FF-in GEMM writes value and gate in fp16, one Inductor kernel computes value * gelu(gate) and
    quantizes it for the FF-out GEMM; the CPU always) or "triton" (one Triton GEMM with TMA loads
    does all of it and writes the 8-bit input: qmodules.GEGLUFeedForward; Hopper and newer). "auto"
    is "inductor": the fused GEMM made the SDXL UNet step slower (fp8 26.33 against 25.16 ms on an
    H200), and the engine stage does not package it (engines.check_packageable; docs/PERF.md).
    "triton-pointwise": the FF-in GEMM as for inductor, then one Triton kernel of our own for the
    middle (engines/triton_geglu.py; any GPU Triton runs on; not yet timed)."""
    _check_choice("GEGLU", choice, GEGLU_CHOICES)
    device = torch.device(device)
    if device.type != "cuda" or choice in ("auto", "inductor"):
        return "inductor"
    _require_triton("geglu", choice, device, "inductor")
    if choice == "triton":
        _require_hopper("geglu", choice, device)
    return choice


def resolve_kernels(precision, device, int8_gemm="auto", conv_patches="auto", fp8_attention="auto", geglu="auto",
                    python_ops=False):
    """The GPU kernels an 8-bit model of `precision` runs on `device`, resolved from their settings:
    {"conv_patches": ..., "geglu": ..., for int8 "int8_gemm": ..., for fp8 "fp8_attention": ...}.
    `python_ops`: whether the model may call ops written in Python (resolve_int8_gemm). Raises before
    any work for one that cannot run."""
    kernels = {"conv_patches": resolve_conv_patches(conv_patches, device), "geglu": resolve_geglu(geglu, device)}
    if precision == "int8":
        kernels["int8_gemm"] = resolve_int8_gemm(int8_gemm, device, python_ops)
    if precision == "fp8":
        kernels["fp8_attention"] = resolve_fp8_attention(fp8_attention, device)
    return kernels


def _known_multiple(n, multiple):
    """True when n is a plain int (static shapes) and a multiple; symbolic sizes are never known."""
    return isinstance(n, int) and n % multiple == 0


SCALED_MM = torch.ops.aten._scaled_mm.default
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def scaled_mm_emulated(mat_a, mat_b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None):
    """torch._scaled_mm as ATen's CPU emulation computes it (tensor-wise or row-wise scales):
    widen to float32, scale, matmul, add the bias, cast. Every e4m3 value is exact in float32.

    Why not ATen's own: on CPUs with AMX-INT8 (Sapphire Rapids and later) PyTorch hands tensor-wise
    fp8 to oneDNN, which has no fp8 matmul kernel for the ISA and runs its reference one (`ref:any`
    under ONEDNN_VERBOSE=1): measured ~1000x slower than the float32 GEMM (2048x64 @ 64x256: 2.8 s
    against 2 ms), 4.4 s per tiny-xl-shapes UNet step against 12 ms for the int8 engine.
    """
    # The weight comes as the transposed view of an (n, k) buffer: dequantized in that layout and
    # multiplied as F.linear does (A @ W^T); a contiguous (k, n) copy, as ATen makes, rounds
    # differently on some shapes (e.g. 2 rows). So it is the fake-quant formula bit for bit.
    weight = mat_b.t().float() * (scale_b.t() if scale_b.dim() == 2 else scale_b)
    out = torch.mm(mat_a.float() * scale_a, weight.t())
    if bias is not None:
        out = out + bias
    out_dtype = out_dtype or mat_a.dtype
    if out_dtype in _FP8_DTYPES:
        if scale_result is not None:
            out = out * (1 / scale_result)
        # cuBLASLt saturates an 8-bit output at the format's largest value (measured on an H200:
        # docs/PERF.md); ATen's CPU emulation casts past it to NaN
        limit = torch.finfo(out_dtype).max
        out = out.clamp(-limit, limit)
    return out.to(out_dtype)


def count_scaled_mm(program):
    """torch._scaled_mm calls in an exported program's graph."""
    return sum(node.target is SCALED_MM for node in program.graph.nodes)


def fp8_matmul(a, weight, scale_a, scale_b, out_dtype, bias=None, fast_accum=False):
    """(m, k) e4m3 @ (n, k)^T e4m3 * scale_a * scale_b (+ bias) -> (m, n) in out_dtype.

    On the GPU, cuBLASLt's fp8 GEMM: it wants k and n multiples of 16 (callers pad weights once at
    build time) and, on some versions, m too: m is padded here with zero rows by a symbolic amount
    (no export guard) unless it is statically a multiple. The bias goes into the GEMM epilogue when
    it can (same dtype). On the CPU, which has no fp8 GEMM, `scaled_mm_emulated`; eager and exported
    (a CPU engine's graph holds the float32 GEMM, which Inductor fuses with the widening).
    """
    fuse_bias = False
    if a.is_cuda:
        rows = a.shape[0]
        # decided on the Python side, never by comparing symbolic sizes (that would guard the export)
        padded = not _known_multiple(rows, 16)
        if padded:
            a = F.pad(a.view(torch.int8), (0, 0, 0, (-rows) % 16)).view(FP8)
        fuse_bias = bias is not None and bias.dtype == out_dtype and bias.shape[0] == weight.shape[0]
        out = torch._scaled_mm(a, weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias if fuse_bias else None,
                               out_dtype=out_dtype, use_fast_accum=fast_accum)
        if padded:
            out = out[:rows]
    else:
        out = scaled_mm_emulated(a, weight.t(), scale_a, scale_b, out_dtype=out_dtype)
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


def int8_linear(a, w, out_scale, bias, dtype, kernel="auto"):
    """(m, k) int8 @ (n', k)^T int8, dequantized to (m, n) in dtype, n = len(out_scale) <= n'.

    `kernel` (resolve_int8_gemm) "triton" / "triton-tma": the Triton GEMM, which scales, biases and casts the
    int32 sums in its epilogue; "cudnn": cuDNN's matmul, which does the same in its graph; else
    torch._int_mm, then int8_dequantize. Same value: the int32
    sums are exact either way and the epilogue is the same float32 arithmetic.
    """
    n = out_scale.shape[0]
    kernel = resolve_int8_gemm(kernel, a.device)
    if kernel == "cudnn":
        from quantdiff.engines import cudnn_int8

        return cudnn_int8.int8_matmul(a, w if w.shape[0] == n else w[:n], out_scale, bias, dtype)
    if kernel.startswith("triton"):
        return triton_gemm.gemm8(a, w, out_scale, bias, n=n, out_dtype=dtype, tma=kernel == "triton-tma")
    acc = int8_matmul(a, w)
    return int8_dequantize(acc if acc.shape[1] == n else acc[:, :n], out_scale, bias, dtype)


# ---------------------------------------------------------------- convolutions

def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_geometry(x, kernel_size, stride, padding, dilation):
    """((kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo)) of a conv over the (b, c, h, w) tensor x."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return ((kh, kw), (sh, sw), (ph, pw), (dh, dw),
            (conv_output_size(x.shape[2], kh, sh, ph, dh), conv_output_size(x.shape[3], kw, sw, pw, dw)))


def image_patches(x, kernel_size, stride, padding, dilation):
    """(b, ho, wo, kh*kw*c) patches of x (b, c, h, w): tap-major, channel-minor.

    That is the memory order of a channels_last conv weight (o, kh, kw, c), so the conv is
    patches @ weight.reshape(o, -1)^T. The windows are one strided view of the padded NHWC input
    (Tensor.unfold), so the patch matrix is a single copy kernel: a torch.cat of the kh*kw taps
    would be one kernel per tap once there are more than Inductor's max_pointwise_cat_inputs (8),
    which the H200 profiles showed for 3x3 convs (docs/PERF.md).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    xh = x.permute(0, 2, 3, 1)
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return xh
    b, c = x.shape[0], x.shape[1]
    ho = conv_output_size(x.shape[2], kh, sh, ph, dh)
    wo = conv_output_size(x.shape[3], kw, sw, pw, dw)
    xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
    if (dh, dw) == (1, 1):
        windows = xh.unfold(1, kh, sh).unfold(2, kw, sw)  # (b, ho, wo, c, kh, kw), a view
        return windows.permute(0, 1, 2, 4, 5, 3).reshape(b, ho, wo, kh * kw * c)
    taps = [xh[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw, :]
            for i in range(kh) for j in range(kw)]
    return torch.cat(taps, dim=-1)


def conv2d_as_gemm(conv, x):
    """A QuantConv2d (groups 1) as one 8-bit GEMM over x's patches; output is channels_last.

    Same quantization as the module's fake-quant formula (per-tensor static input, its 8-bit
    weight); only the sums' order and precision differ (float32 / int32 accumulation). The input
    is quantized before the gather: quantization is elementwise and maps the zero padding to 0,
    so the patches are the same, and the gather (kh*kw times the input) moves 1-byte values. It
    moves them as int8 bits, so padding and copying need no fp8 kernels.
    """
    # (the Triton and cuDNN modules import this one: imported here)
    from quantdiff.engines import cudnn_int8, triton_conv, triton_patches

    if conv.act.pre_quant_scale is not None:
        x = x * conv.act.pre_quant_scale
    xq = conv.act.quantize(x)
    if conv.fmt == "int8" and resolve_int8_gemm(conv.int8_gemm, x.device) == "cudnn":
        # cuDNN's int8 conv reads the NHWC image itself: no patch matrix
        return cudnn_int8.int8_conv2d(xq, conv.weight, conv.out_scale, conv.bias, conv.stride, conv.padding,
                                      conv.dilation, x.dtype)
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    b, (ho, wo) = x.shape[0], conv_geometry(x, *geometry)[-1]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # a view when channels_last
    kernel = resolve_conv_patches(conv.conv_patches, x.device)
    if kernel == "implicit" and triton_conv.fits(conv.in_channels, conv.fmt):
        scale = conv.out_scale if conv.fmt == "int8" else conv.act.back * conv.weight_factor
        out = triton_conv.conv8(xq, weight, scale, conv.bias, *geometry, out_dtype=x.dtype)
    else:
        patches_of = image_patches if kernel == "inductor" else triton_patches.image_patches
        a = patches_of(xq.view(torch.int8), *geometry).reshape(b * ho * wo, -1).view(xq.dtype)
        if conv.fmt == "fp8":
            out = fp8_matmul(a, weight, conv.act.back, conv.weight_factor, x.dtype, conv.bias, conv.fast_accum)
        else:
            out = int8_linear(a, weight, conv.out_scale, conv.bias, x.dtype, conv.int8_gemm)
    return out.reshape(b, ho, wo, conv.out_channels).permute(0, 3, 1, 2)
