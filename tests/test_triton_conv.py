"""The torch engine's implicit-GEMM 8-bit conv (engines/triton_conv.py) in Triton's interpreter on
the CPU: the same values as the Triton GEMM over image_patches' patch matrix, which the
conv-as-GEMM path computes (and tests/test_triton_gemm.py checks against plain PyTorch)."""
import pytest
import torch

from quantdiff.engines import triton_conv as tc
from quantdiff.engines import triton_gemm as tg
from quantdiff.engines.gemm8 import image_patches
from test_triton_gemm import quantized


def conv_operands(fmt, c, out, kernel, seed=0):
    g = torch.Generator().manual_seed(seed)
    # 9 x 11 pixels and 40 output channels leave partial row and column blocks (the interpreter's tile is 32)
    x, w = torch.randn(2, c, 9, 11, generator=g), torch.randn(out, kernel[0] * kernel[1] * c, generator=g) / c
    return quantized(fmt, x, w)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)),   # the UNet's resnet convs
    ((3, 3), (2, 2), (1, 1), (1, 1)),   # its downsamplers
    ((1, 1), (1, 1), (0, 0), (1, 1)),   # shortcuts
    ((3, 2), (2, 1), (0, 1), (2, 1)),   # uneven, dilated, windows that leave the image on one side only
])
def test_implicit_conv_is_the_gemm_over_the_patch_matrix(fmt, kernel, stride, padding, dilation):
    xq, w, scale = conv_operands(fmt, 64, 40, kernel)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(1)).half()
    got = tc.conv8(xq, w, scale, bias, kernel, stride, padding, dilation)
    patches = image_patches(xq.view(torch.int8), kernel, stride, padding, dilation)
    b, ho, wo, k = patches.shape
    want = tg.gemm8_reference(patches.reshape(-1, k).view(xq.dtype), w, tg.per_column(scale, 40), bias)
    assert got.shape == (b * ho * wo, 40) and got.dtype == torch.float16
    if fmt == "int8":  # exact int32 sums, the same float32 epilogue
        assert torch.equal(got, want)
    else:  # float32 sums in another order
        assert torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3)
    # and it is the convolution: float conv of the dequantized operands
    deq = torch.nn.functional.conv2d(xq.float(), w.float().reshape(40, *kernel, 64).permute(0, 3, 1, 2), None,
                                     stride, padding, dilation)
    deq = deq * tg.per_column(scale, 40)[:, None, None] + bias.float()[:, None, None]
    assert torch.allclose(got.float(), deq.permute(0, 2, 3, 1).reshape(-1, 40), rtol=1e-2, atol=1e-2)


def test_channels_the_kernel_takes():
    # a k block must stay inside one tap: channels in multiples of it (32 in the interpreter, 64 on the GPU)
    assert tc.fits(64, "int8") and tc.fits(96, "fp8") and not tc.fits(48, "int8")
    xq, w, scale = conv_operands("int8", 48, 8, (1, 1))
    with pytest.raises(ValueError, match="conv8 takes channels in multiples of 32 .got 48."):
        tc.conv8(xq, w, scale, None, (1, 1), (1, 1), (0, 0), (1, 1))


@pytest.mark.parametrize("fmt, mma", [("int8", "s32.s8.s8"), ("fp8", "f32.e4m3.e4m3")])
def test_kernel_compiles_for_hopper_tensor_cores(fmt, mma):
    # (without a GPU) the gathered A loads still feed Hopper's wgmma through asynchronous copies
    from triton_compile import compile_for_hopper

    elt = "i8" if fmt == "int8" else "fp8e4nv"
    tile = tg.tile_kwargs(tg.TILES[fmt])
    ptx = compile_for_hopper({
        "module": "quantdiff.engines.triton_conv", "kernel": "_conv8_kernel",
        "types": [f"*{elt}", f"*{elt}", "*fp32", "*fp16", "*fp16"] + ["i32"] * 20,
        "constexprs": {"IS_INT": fmt == "int8", "HAS_BIAS": True, **{k: v for k, v in tile.items() if k.isupper()}},
        "aligned": ["x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "out_ptr", "N", "C", "K", "stride_xb", "stride_xh",
                    "stride_xw", "stride_wn", "stride_om"],
        "num_warps": tile["num_warps"], "num_stages": tile["num_stages"]})
    assert ptx["wgmma"] and all(op.endswith(mma) for op in ptx["wgmma"]), ptx
    assert ptx["mma_sync"] == 0 and ptx["cp_async"] > 0, ptx
