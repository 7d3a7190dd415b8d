"""8-bit convolutions as implicit GEMMs in Triton, for the torch engine on the GPU.

The conv-as-GEMM path of gemm8.conv2d_as_gemm writes the patch matrix (kh*kw copies of the
input) and the GEMM reads it back: for a 3x3 conv that is 18x the quantized input's bytes
through memory, 0.42 ms of an SDXL step even with the Triton copy (docs/PERF.md). Here the GEMM
loads each block of its A operand straight from the quantized NHWC image: a k block is one tap
(i, j) and BLOCK_K channels, so each row of it is a contiguous channel run of one input pixel,
or zeros where the window leaves the image. The weight is (out, kh, kw, c), the order of
image_patches' columns, and the epilogue is triton_gemm's (per-column scale, bias, fp16 out).

`quantdiff::conv8` is a torch.library.triton_op, so torch.compile and AOTInductor carry it;
`fits` says which convs it takes (channels a multiple of the k block), the rest keep the patch
matrix. CPU tests run the kernel in Triton's interpreter against gemm8 over image_patches.
"""
from typing import Optional

import torch

from quantdiff.engines.gemm8 import conv_geometry
from quantdiff.engines.triton_gemm import interpreting, per_column, triton

INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

if triton is not None:
    import triton.language as tl

    from quantdiff.engines.triton_gemm import TILES, _scaled, _tile_rows_cols, tile_kwargs

    @triton.jit
    def _conv8_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, C, H, W, HO, WO, KW, K,
                      stride_xb, stride_xh, stride_xw, stride_wn, stride_om, SH, SW, PH, PW, DH, DW,
                      IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        rm, rn = _tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = rm < M, rn < N
        # output pixel of each row: its window's top-left input pixel, and its image (int64 offset:
        # a batch of SDXL latents passes 2**31 bytes)
        b, rest = rm // (HO * WO), rm % (HO * WO)
        top, left = (rest // WO) * SH - PH, (rest % WO) * SW - PW
        image = x_ptr + b.to(tl.int64) * stride_xb
        w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # C is a multiple of BLOCK_K (`fits`), so the block is channels c0.. of one tap
            tap = k0 // C
            c0 = k0 - tap * C
            hi = top + (tap // KW) * DH
            wi = left + (tap % KW) * DW
            inside = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a = tl.load((image + hi * stride_xh + wi * stride_xw + c0)[:, None] + rk[None, :],
                        mask=inside[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32 if IS_INT else tl.float32)
            w_ptrs += BLOCK_K
        y = _scaled(acc, rn, n_ok, scale_ptr, bias_ptr, HAS_BIAS)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    # The GEMM's tiles (the k block must divide the channels); the interpreter runs a small one.
    _conv8_tiled = {fmt: triton.autotune(configs=[tile], key=[])(_conv8_kernel) for fmt, tile in TILES.items()}
    # the tiles `python -m quantdiff.bench.gemm --convs` times the kernel with, alone (k blocks of 64:
    # SDXL's channel counts are multiples of 64, not all of 128)
    SWEEP_CONFIGS = [TILES["int8"], TILES["fp8"]] + [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, w, s in ((128, 64, 4, 5), (64, 128, 4, 5), (128, 256, 8, 4), (256, 64, 8, 4), (128, 128, 8, 4))]

    def launch_kernel(xh, w, scale, bias, out, geometry, tile=None):
        """Fills `out` (b*ho*wo, n) from the NHWC 8-bit view `xh` (channels contiguous) and the
        (n, kh*kw*c) weight. `tile`: launch keywords instead of the input type's TILES entry."""
        from torch.library import wrap_triton

        (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = geometry
        b, h, wd, c = xh.shape
        m, n = out.shape
        args = (xh, w, scale, out if bias is None else bias, out, m, n, c, h, wd, ho, wo, kw, kh * kw * c,
                xh.stride(0), xh.stride(1), xh.stride(2), w.stride(0), out.stride(0), sh, sw, ph, pw, dh, dw)
        flags = {"IS_INT": xh.dtype == torch.int8, "HAS_BIAS": bias is not None}

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        if interpreting() or tile is not None:
            _conv8_kernel[grid](*args, **flags, **(tile or INTERPRETER_TILE))
        else:
            wrap_triton(_conv8_tiled["int8" if flags["IS_INT"] else "fp8"])[grid](*args, **flags)
        return out

    @torch.library.triton_op("quantdiff::conv8", mutates_args=())
    def conv8_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                 out_dtype: torch.dtype) -> torch.Tensor:
        geometry = conv_geometry(x, kernel_size, stride, padding, dilation)
        ho, wo = geometry[-1]
        out = torch.empty((x.shape[0] * ho * wo, w.shape[0]), device=x.device, dtype=out_dtype)
        # the kernel reads channel runs: the compiled graph may hand the op another layout than eager did
        return launch_kernel(x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1), w, scale, bias,
                             out, geometry)


def k_block(fmt):
    """The k block the GPU launches an `fmt` ("int8" / "fp8") conv with (the interpreter's is 32)."""
    return INTERPRETER_TILE["BLOCK_K"] if interpreting() else tile_kwargs(TILES[fmt])["BLOCK_K"]


def fits(in_channels, fmt):
    """True when the kernel takes a conv of `in_channels` 8-bit inputs: a k block must stay in one tap."""
    return triton is not None and in_channels % k_block(fmt) == 0


def conv8(xq, weight, scale, bias, kernel_size, stride, padding, dilation, out_dtype=torch.float16):
    """The conv of the 8-bit (b, c, h, w) input `xq` with the 8-bit (n, kh*kw*c) weight (columns in
    image_patches' order), scaled per output channel (or per tensor) and biased: the same values as
    gemm8 over image_patches, as a (b*ho*wo, n) matrix (NHWC). The custom op on the GPU; the
    kernel itself under the interpreter."""
    fmt = "int8" if xq.dtype == torch.int8 else "fp8"
    if triton is None:
        raise RuntimeError("conv8 needs the triton package")
    if not fits(xq.shape[1], fmt):
        raise ValueError(f"conv8 takes channels in multiples of {k_block(fmt)} (got {xq.shape[1]})")
    xq = xq.contiguous(memory_format=torch.channels_last)
    args = [list(v) for v in (kernel_size, stride, padding, dilation)]
    scale = per_column(scale, weight.shape[0])
    bias = None if bias is None else bias.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    if xq.is_cuda:
        return torch.ops.quantdiff.conv8(xq, weight, scale, bias, *args, out_dtype)
    if not interpreting():
        raise RuntimeError("conv8 runs on the GPU, or on the CPU under TRITON_INTERPRET=1 (for tests)")
    geometry = conv_geometry(xq, *args)
    ho, wo = geometry[-1]
    out = torch.empty((xq.shape[0] * ho * wo, weight.shape[0]), dtype=out_dtype)
    return launch_kernel(xq.permute(0, 2, 3, 1), weight, scale, bias, out, geometry)
