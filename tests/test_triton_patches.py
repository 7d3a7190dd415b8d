"""The torch engine's Triton patch-matrix kernel (engines/triton_patches.py) in Triton's interpreter
on the CPU: byte for byte what gemm8.image_patches (the unfold view Inductor compiles) gives."""
import pytest
import torch

from quantdiff.engines import triton_patches as tp
from quantdiff.engines.gemm8 import image_patches


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)),   # the UNet's resnet convs
    ((3, 3), (2, 2), (1, 1), (1, 1)),   # its downsamplers
    ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 2), (2, 1), (0, 1), (2, 1)),   # uneven, dilated, a window that leaves the image
])
def test_patches_are_the_unfold_views_bytes(kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(0)
    # 37 channels and 9x11 pixels leave partial blocks (the interpreter's tile is 16 x 16)
    x = torch.randint(-127, 128, (2, 37, 9, 11), generator=g, dtype=torch.int8)
    want = image_patches(x, kernel, stride, padding, dilation)
    got = tp.image_patches(x, kernel, stride, padding, dilation)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want)


def test_channels_last_input_and_refusals():
    x = torch.randint(-127, 128, (1, 16, 5, 5), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    want = image_patches(x, (3, 3), (1, 1), (1, 1), (1, 1))
    assert torch.equal(tp.image_patches(x, (3, 3), (1, 1), (1, 1), (1, 1)), want)
    with pytest.raises(ValueError, match="view the 8-bit input as int8"):
        tp.image_patches(x.float(), (3, 3), (1, 1), (1, 1), (1, 1))


def test_kernel_compiles_for_hopper_to_16_byte_copies():
    # (without a GPU) on an SDXL-like conv: 640 channels, strides multiples of 16, the copy moves
    # 16 bytes per load and store, not one byte at a time as Inductor's kernel did
    from triton_compile import compile_for_hopper

    ptx = compile_for_hopper({
        "module": "quantdiff.engines.triton_patches", "kernel": "_patches_kernel",
        "types": ["*i8", "*i8"] + ["i32"] * 17, "constexprs": tp.TILE,
        "aligned": ["x_ptr", "out_ptr", "C", "stride_xb", "stride_xh", "stride_xw", "stride_op"],
        "num_warps": 4, "num_stages": 1})
    assert ptx["vector_loads"] > 0 and ptx["vector_stores"] > 0 and ptx["byte_stores"] == 0, ptx
