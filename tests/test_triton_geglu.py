"""The GEGLU feed-forward's middle as one Triton kernel (engines/triton_geglu.py, engine.geglu:
triton-pointwise), in Triton's interpreter on the CPU against its plain-PyTorch meaning."""
import pytest
import torch

from quantdiff.engines import triton_geglu as tg
from quantdiff.engines.triton_gemm import OUT_FLOAT, OUT_FP8, OUT_INT8


def _inputs(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (m, 2n) in fp16 as the FF-in GEMM writes it: value columns, then gate columns
    h = (3 * torch.randn(m, 2 * n, generator=g)).half()
    return h, 10 + 20 * torch.rand(n, generator=g)


@pytest.mark.parametrize("out_fmt, int8_min", [(OUT_INT8, -127), (OUT_INT8, -128), (OUT_FP8, -127)])
@pytest.mark.parametrize("m, n", [(37, 96), (5, 40)])  # partial row and column blocks (the interpreter's 4 x 32)
def test_kernel_is_its_reference(out_fmt, int8_min, m, n):
    h, grid = _inputs(m, n)
    want = tg.geglu8_reference(h, grid, out_fmt, int8_min)
    got = tg.geglu8(h, grid, out_fmt, int8_min)
    assert got.shape == (m, n) and got.dtype == want.dtype
    if out_fmt == OUT_INT8:
        # float32 on both sides; erf's last bit may move a value across a rounding midpoint
        assert (got.int() - want.int()).abs().max() <= 1 and (got != want).float().mean() < 0.01
        assert int(got.min()) >= int8_min and int(got.max()) <= 127 and int(want.min()) == int8_min
    else:
        # one e4m3 step at most (3 mantissa bits: 1/8 relative, 2**-9 among the subnormals), on few elements
        assert torch.allclose(got.float(), want.float(), rtol=0.13, atol=2e-3) and (got.float() != want.float()).float().mean() < 0.01
        assert float(got.float().abs().max()) == 448.0  # saturated, not inf or NaN


def test_per_tensor_grid_and_a_strided_input():
    h, grid = _inputs(8, 64, seed=1)
    wide = torch.zeros(8, 200, dtype=torch.float16)
    wide[:, :128] = h
    view = wide[:, :128]  # rows 200 apart, as a slice of a wider buffer
    want, got = tg.geglu8_reference(h, torch.tensor(16.0), OUT_INT8), tg.geglu8(view, torch.tensor(16.0), OUT_INT8)
    assert torch.equal(got, tg.geglu8(h, torch.tensor(16.0), OUT_INT8))
    assert (got.int() - want.int()).abs().max() <= 1


def test_refusals():
    h, grid = _inputs(4, 32)
    with pytest.raises(ValueError, match="writes int8 or fp8"):
        tg.geglu8(h, grid, OUT_FLOAT)
    with pytest.raises(ValueError, match=r"takes \(rows, 2 \* width\) value-and-gate columns, got \(4, 63\)"):
        tg.geglu8(h[:, :63], grid, OUT_INT8)


def test_kernel_compiles_for_hopper_to_16_byte_loads():
    # (without a GPU) SDXL's widths and strides are multiples of 16: each thread's 16 values and 16 gates
    # load as four 16-byte vectors (the fifth is the grid), its 16 int8 outputs store as one
    from triton_compile import compile_for_hopper

    ptx = compile_for_hopper({
        "module": "quantdiff.engines.triton_geglu", "kernel": "_geglu8_kernel",
        "types": ["*fp16", "*fp32", "*i8", "i32", "i32", "i32", "i32", "fp32"],
        "constexprs": {"OUT_FMT": OUT_INT8, **{k: v for k, v in tg.TILE.items() if k.startswith("BLOCK")}},
        "aligned": ["h_ptr", "grid_ptr", "out_ptr", "N", "stride_h", "stride_o"],
        "num_warps": tg.TILE["num_warps"], "num_stages": 1})
    assert ptx["vector_loads"] == 5 and ptx["vector_stores"] == 1 and ptx["byte_stores"] == 0, ptx
