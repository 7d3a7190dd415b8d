"""The patch matrix (im2col) of a quantized NHWC image as a Triton copy kernel, for the torch
engine's convolutions-as-GEMMs on the GPU.

Why: Inductor's kernel for gemm8.image_patches (an unfold view of the padded input, copied once)
moved 1-byte values at a fraction of the memory bandwidth on an H200: 183 us for the int8 patches
of a 640-channel 64x64 input (47 MB written; docs/PERF.md), about 2.9 ms of an SDXL step. Here
each program copies a block of pixels x channels of one tap: contiguous channel runs, 16-byte
loads and stores, zeros where the window leaves the image.

`quantdiff::image_patches` is a torch.library.triton_op, so torch.compile and AOTInductor carry
it; gemm8.image_patches is its meaning, and CPU tests run the kernel in Triton's interpreter.
"""
import torch

from quantdiff.engines.gemm8 import conv_geometry
from quantdiff.engines.triton_gemm import interpreting, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _patches_kernel(x_ptr, out_ptr, n_pix, H, W, C, HO, WO, KW, stride_xb, stride_xh, stride_xw, stride_op,
                        SH, SW, PH, PW, DH, DW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # program (pixels, tap, channels): out[p, tap * C + c] = x[b, ho*SH - PH + i*DH, wo*SW - PW + j*DW, c]
        tap = tl.program_id(1)
        i, j = tap // KW, tap % KW
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        b, rest = p // (HO * WO), p % (HO * WO)
        hi = (rest // WO) * SH - PH + i * DH
        wi = (rest % WO) * SW - PW + j * DW
        inside = (p < n_pix) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        c_ok = c < C
        # offsets in int64: a patch matrix passes 2**31 bytes at 2048 px and batch 8
        src = x_ptr + (b.to(tl.int64) * stride_xb + hi * stride_xh + wi * stride_xw)[:, None] + c[None, :]
        values = tl.load(src, mask=inside[:, None] & c_ok[None, :], other=0)
        dst = out_ptr + (p.to(tl.int64) * stride_op)[:, None] + (tap * C + c)[None, :]
        tl.store(dst, values, mask=(p < n_pix)[:, None] & c_ok[None, :])

    TILE = {"BLOCK_P": 32, "BLOCK_C": 128}
    INTERPRETER_TILE = {"BLOCK_P": 16, "BLOCK_C": 16}

    def launch_kernel(xh, out, geometry, tile=None):
        """Fills `out` (b*ho*wo, kh*kw*c) from the NHWC int8 view `xh` (channels contiguous)."""
        from torch.library import wrap_triton

        (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = geometry
        b, h, w, c = xh.shape
        n_pix = b * ho * wo
        tile = tile or (INTERPRETER_TILE if interpreting() else TILE)

        def grid(meta):
            return (triton.cdiv(n_pix, meta["BLOCK_P"]), kh * kw, triton.cdiv(c, meta["BLOCK_C"]))

        args = (xh, out, n_pix, h, w, c, ho, wo, kw, xh.stride(0), xh.stride(1), xh.stride(2), out.stride(0),
                sh, sw, ph, pw, dh, dw)
        kernel = _patches_kernel if interpreting() else wrap_triton(_patches_kernel)
        kernel[grid](*args, **tile)
        return out

    @torch.library.triton_op("quantdiff::image_patches", mutates_args=())
    def image_patches_op(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                         dilation: list[int]) -> torch.Tensor:
        geometry = conv_geometry(x, kernel_size, stride, padding, dilation)
        (kh, kw), (ho, wo) = geometry[0], geometry[-1]
        out = torch.empty((x.shape[0] * ho * wo, kh * kw * x.shape[1]), device=x.device, dtype=x.dtype)
        # the kernel reads channel runs: the compiled graph may hand the op another layout than eager did
        return launch_kernel(x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1), out, geometry)


def image_patches(x, kernel_size, stride, padding, dilation):
    """gemm8.image_patches of an int8 (b, c, h, w) tensor through the Triton kernel: the same
    (b, ho, wo, kh*kw*c) patches, contiguous; the custom op on the GPU, the kernel itself under
    the interpreter. The input is made channels_last first if it is not (the kernel reads NHWC)."""
    if x.dtype != torch.int8:
        raise ValueError(f"image_patches copies bytes: view the 8-bit input as int8 (got {x.dtype})")
    x = x.contiguous(memory_format=torch.channels_last)
    args = [list(v) for v in (kernel_size, stride, padding, dilation)]
    geometry = conv_geometry(x, *args)
    (kh, kw), (ho, wo) = geometry[0], geometry[-1]
    if x.is_cuda:
        out = torch.ops.quantdiff.image_patches(x, *args)
    elif interpreting():
        out = launch_kernel(x.permute(0, 2, 3, 1), torch.empty((x.shape[0] * ho * wo, kh * kw * x.shape[1]),
                                                               dtype=x.dtype), geometry)
    else:
        raise RuntimeError("the Triton image_patches runs on the GPU, or on the CPU under TRITON_INTERPRET=1")
    return out.view(x.shape[0], ho, wo, kh * kw * x.shape[1])
