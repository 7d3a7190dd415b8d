"""The torch engine's Triton 8-bit GEMM (engines/triton_gemm.py), run in Triton's interpreter on
the CPU against its plain-PyTorch meaning. Speed and the compiled path: python -m quantdiff.bench.gemm
on the GPU, which checks the same outputs there."""
import pytest
import torch

from quantdiff.engines import triton_gemm as tg
from quantdiff.quant.grids import fp8_scales, int8_scales, quantize_fp8, quantize_int8


def operands(fmt, m, k, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantized(fmt, torch.randn(m, k, generator=g), torch.randn(rows, k, generator=g) / k ** 0.5)


def quantized(fmt, x, w):
    """x and w on their 8-bit grids as the torch engine keeps them (x per tensor; w per row for
    int8, per tensor for fp8), and the factor from their sums back to float."""
    if fmt == "int8":
        x_to, _ = int8_scales(x.abs().amax())
        w_to, w_div = int8_scales(w.abs().amax(dim=1))
        return quantize_int8(x, x_to), quantize_int8(w, w_to[:, None]), 1 / (x_to * w_div)
    x_to, x_back = fp8_scales(x.abs().amax())
    w_to, w_back = fp8_scales(w.abs().amax())
    return quantize_fp8(x, x_to), quantize_fp8(w, w_to), x_back * w_back


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_gemm8_float_output_matches_reference_on_ragged_shapes(fmt):
    # m, k and n all leave partial tiles (the interpreter's tile is 32): masks must zero them
    a, w, scale = operands(fmt, 37, 70, 45)
    bias = torch.randn(45).half()
    out = tg.gemm8(a, w, scale, bias)
    ref = tg.gemm8_reference(a, w, scale, bias)
    assert out.dtype == torch.float16 and out.shape == (37, 45)
    assert torch.equal(out, ref) if fmt == "int8" else torch.allclose(out.float(), ref.float(), rtol=1e-3, atol=1e-3)
    # and the reference is the fake-quant GEMM: dequantized operands, float32 matmul
    dequant = a.float() @ w.float().t() * scale + bias.float()
    assert torch.allclose(ref.float(), dequant, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_small_m_tile_runs_a_few_row_gemm(fmt):
    # the few-row tile itself (64 x 32 x 128) on a ragged shape: rows past m, columns past n and
    # the k tail are masked
    tile = tg.tile_kwargs(tg.SMALL_M_TILES[fmt])
    assert (tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]) == (64, 32, 128)
    a, w, scale = operands(fmt, 77, 200, 40, seed=4)
    out = torch.empty(77, 40, dtype=torch.float16)
    per_column = scale.float().expand(40).contiguous()  # what gemm8 hands the kernel
    tg.launch_kernel(a, w, per_column, None, None, out, 0, tg.OUT_FLOAT, -127, tile)
    ref = tg.gemm8_reference(a, w, scale)
    assert torch.equal(out, ref) if fmt == "int8" else torch.allclose(out.float(), ref.float(), rtol=1e-3, atol=1e-3)


def test_tile_by_rows():
    # few rows take the small tile; a symbolic row count (dynamic batch) never does: choosing by
    # it would guard the batch
    assert tg.tile_for("int8", 154) is tg.SMALL_M_TILES["int8"]
    assert tg.tile_for("int8", tg.SMALL_M_ROWS) is tg.SMALL_M_TILES["int8"]
    assert tg.tile_for("int8", tg.SMALL_M_ROWS + 1) is tg.TILES["int8"]
    assert tg.tile_for("fp8", 2048) is tg.TILES["fp8"]
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    rows = ShapeEnv().create_unbacked_symint()
    assert not tg.small_m(rows) and tg.tile_for("int8", rows) is tg.TILES["int8"]


def geglu_case(fmt, out_fmt, hidden=40, rows=33, tma=False):
    a, w, scale = operands(fmt, rows, 64, 2 * hidden, seed=1)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(2 * hidden, generator=g).half()
    grid = torch.rand(hidden, generator=g) * 40 + 10  # per column: SmoothQuant's scale times the step
    kwargs = {"n": hidden, "gate_offset": hidden, "out_fmt": out_fmt}
    out = tg.gemm8(a, w, scale, bias, grid, **kwargs, tma=tma)
    ref = tg.gemm8_reference(a, w, scale, bias, grid, **kwargs)
    assert out.dtype == ref.dtype and out.shape == (rows, hidden)
    # value * gelu(gate), by hand
    sums = a.float() @ w.float().t() * scale + bias.float()
    y = sums[:, :hidden] * torch.nn.functional.gelu(sums[:, hidden:])
    return out, ref, y if out_fmt == tg.OUT_FLOAT else y * grid


@pytest.mark.parametrize("fmt,out_fmt", [("int8", tg.OUT_INT8), ("fp8", tg.OUT_FLOAT)])
def test_gemm8_geglu_is_value_times_gelu_of_gate(fmt, out_fmt):
    out, ref, y = geglu_case(fmt, out_fmt)
    if fmt == "int8":  # onto the next GEMM's grid; erf in numpy and torch may differ in the last bit
        diff = (out.float() - ref.float()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
        assert torch.equal(ref, torch.clamp(torch.round(y), -127, 127).to(torch.int8))
    else:
        assert torch.allclose(out.float(), ref.float(), rtol=2e-3, atol=1e-3)
        assert torch.allclose(ref.float(), y, rtol=2e-3, atol=1e-3)


def test_gemm8_geglu_fp8_output():
    out, ref, y = geglu_case("fp8", tg.OUT_FP8)
    assert torch.equal(ref, y.clamp(-448, 448).to(torch.float8_e4m3fn))
    # (the interpreter's e4m3 cast made exact, as the GPU's cvt.rn: tests/conftest.py) a value near a
    # rounding midpoint may land on the other neighbour: the kernel's float32 sums and erf differ from
    # torch's in the last bits
    wrong = out.float() != ref.float()
    assert wrong.float().mean() < 0.01
    got, want = out.float()[wrong], ref.float()[wrong]
    e4m3_step = torch.exp2(torch.floor(torch.log2(want.abs())).clamp(min=-6) - 3)
    assert ((got - want).abs() <= e4m3_step).all()


@pytest.mark.parametrize("fmt,out_fmt", [("int8", tg.OUT_INT8), ("fp8", tg.OUT_FP8), ("fp8", tg.OUT_FLOAT)])
def test_geglu_with_tma_loads_is_the_cp_async_kernels(fmt, out_fmt, monkeypatch):
    # engine.geglu's kernel: the GEGLU form through tensor descriptors (the gate rows their own),
    # 300 rows (more than the few-row tile's); the same tiles and sums as the cp.async kernel
    launched, tma = [], tg.launch_tma_kernel
    monkeypatch.setattr(tg, "launch_tma_kernel", lambda *a, **kw: launched.append(kw["gate_offset"]) or tma(*a, **kw))
    out, ref, _ = geglu_case(fmt, out_fmt, rows=300, tma=True)
    assert launched == [40]
    cp_async, _, _ = geglu_case(fmt, out_fmt, rows=300)
    assert launched == [40] and out.dtype == cp_async.dtype
    assert torch.equal(out.view(torch.int8), cp_async.view(torch.int8)) if out_fmt != tg.OUT_FLOAT \
        else torch.equal(out, cp_async)
    wrong = out.float() != ref.float()  # and so its reference, within what test_gemm8_geglu_* allow
    assert wrong.float().mean() < 0.01 if out_fmt != tg.OUT_FLOAT else torch.allclose(out.float(), ref.float(),
                                                                                       rtol=2e-3, atol=1e-3)


def test_int8_output_rounds_half_to_even_and_clamps_to_the_narrow_range():
    # one-column identity GEMM: y = a * scale, so the epilogue's rounding is what shows
    a = torch.tensor([[1], [3], [5], [-1], [-3], [100], [-100]], dtype=torch.int8)
    w = torch.ones(1, 1, dtype=torch.int8)
    out = tg.gemm8(a, w, torch.tensor(0.5), out_grid=torch.tensor([1.0]), out_fmt=tg.OUT_INT8)
    assert out.flatten().tolist() == [0, 2, 2, 0, -2, 50, -50]
    out = tg.gemm8(a, w, torch.tensor(4.0), out_grid=torch.tensor([1.0]), out_fmt=tg.OUT_INT8)
    assert out.flatten().tolist() == [4, 12, 20, -4, -12, 127, -127]


def test_gemm8_refuses_what_it_cannot_mean():
    a, w, scale = operands("int8", 4, 16, 8)
    with pytest.raises(ValueError, match="gate rows start at 2, inside the first 4"):
        tg.gemm8(a, w, scale, n=4, gate_offset=2)
    with pytest.raises(ValueError, match="needs out_grid"):
        tg.gemm8(a, w, scale, out_fmt=tg.OUT_INT8)


def test_gemm8_reads_only_the_rows_it_uses():
    # Int8Linear pads the weight's rows for cuBLASLt; its scale covers the real ones only
    a, w, scale = operands("int8", 20, 32, 24)
    padded = torch.cat([w, torch.full((8, 32), 99, dtype=torch.int8)])
    out = tg.gemm8(a, padded, scale, n=24)
    assert torch.equal(out, tg.gemm8_reference(a, w, scale))


@pytest.mark.parametrize("fmt,geglu,out_fmt,mma,tiles", [("int8", False, tg.OUT_FLOAT, "s32.s8.s8", tg.TILES),
                                                         ("fp8", False, tg.OUT_FLOAT, "f32.e4m3.e4m3", tg.TILES),
                                                         ("int8", True, tg.OUT_INT8, "s32.s8.s8", tg.TILES),
                                                         ("int8", False, tg.OUT_FLOAT, "s32.s8.s8", tg.SMALL_M_TILES)])
def test_kernel_compiles_for_hopper_tensor_cores(fmt, geglu, out_fmt, mma, tiles):
    # Triton compiles for sm_90 without a GPU: this catches what only its compiler refuses (the
    # interpreter runs any Python) and checks the 8-bit dot becomes Hopper's wgmma, fed by
    # pipelined asynchronous copies, not Ampere's mma.sync.
    ptx = compile_gemm_kernel("_gemm8_kernel", fmt, tg.tile_kwargs(tiles[fmt]), geglu, out_fmt)
    assert ptx["wgmma"] and all(op.endswith(mma) for op in ptx["wgmma"]), ptx
    assert ptx["mma_sync"] == 0 and ptx["cp_async"] > 0, ptx


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_tma_form_matches_reference(fmt):
    # the sweep's TMA form (tensor descriptors, edge blocks zero-filled) on ragged m and n
    a, w, scale = operands(fmt, 37, 64, 45, seed=5)
    out = torch.empty(37, 40, dtype=torch.float16)
    tile = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
    tg.launch_tma_kernel(a, w, tg.per_column(scale, 40), out, tile)  # the first 40 of w's 45 rows
    ref = tg.gemm8_reference(a, w, scale, n=40)
    assert torch.equal(out, ref) if fmt == "int8" else torch.allclose(out.float(), ref.float(), rtol=1e-3, atol=1e-3)


def test_engine_gemm_with_tma_loads(monkeypatch):
    # gemm8(tma=True), as engine.int8_gemm: triton-tma runs it: the TMA form with bias where the GEMM
    # fits (more rows than the few-row tile's, rows 16 bytes apart), the cp.async kernel elsewhere;
    # the same sums either way
    launched, tma = [], tg.launch_tma_kernel
    monkeypatch.setattr(tg, "launch_tma_kernel", lambda *a, **kw: launched.append(a[0].shape) or tma(*a, **kw))
    a, w, scale = operands("int8", 300, 80, 45, seed=6)  # k = 2.5 blocks: the last one zero-filled
    bias = torch.randn(45).half()
    out = tg.gemm8(a, w, scale, bias, n=40, tma=True)  # the first 40 of w's 45 rows
    assert torch.equal(out, tg.gemm8_reference(a, w, scale, bias, n=40)) and launched == [(300, 80)]
    for fits_not in (operands("int8", 154, 64, 45)[:2],  # few rows: the small tile
                     operands("int8", 300, 40, 45)[:2]):  # rows 40 bytes apart
        assert not tg.tma_fits(*fits_not)
    assert tg.tma_fits(*operands("fp8", 300, 64, 45)[:2])  # (the engine's fp8 takes it for GEGLU only)
    a, w, scale = operands("int8", 300, 40, 45, seed=7)
    assert torch.equal(tg.gemm8(a, w, scale, bias, tma=True), tg.gemm8_reference(a, w, scale, bias))
    assert launched == [(300, 80)]  # the cp.async kernel took that one


def test_tma_form_compiles_to_bulk_tensor_copies():
    # (without a GPU) the descriptors become Hopper's TMA loads feeding the 8-bit wgmma
    tile = tg.tile_kwargs(tg.TMA_TILES["int8"])  # the engine's (engine.int8_gemm: triton-tma)
    bm, bn, bk = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
    assert (bm, bn, bk) == (128, 128, 128)
    ptx = compile_gemm_kernel("_gemm8_tma_kernel", "int8", tile, geglu=False, out_fmt=tg.OUT_FLOAT)
    assert ptx["wgmma"] and all(op.endswith("s32.s8.s8") for op in ptx["wgmma"]), ptx
    assert ptx["tma_loads"] > 0, ptx


def compile_gemm_kernel(kernel, fmt, tile, geglu, out_fmt):
    """The PTX summary of one of the two GEMM kernels (the same arguments) compiled for sm_90."""
    from triton_compile import compile_for_hopper

    elt = "i8" if fmt == "int8" else "fp8e4nv"
    out = {tg.OUT_FLOAT: "fp16", tg.OUT_INT8: "i8", tg.OUT_FP8: "fp8e4nv"}[out_fmt]
    return compile_for_hopper({
        "module": "quantdiff.engines.triton_gemm", "kernel": kernel,
        "types": [f"*{elt}", f"*{elt}", "*fp32", "*fp16", "*fp32", f"*{out}"] + ["i32"] * 7 + ["fp32"],
        "constexprs": {"IS_INT": fmt == "int8", "HAS_BIAS": True, "GEGLU": geglu, "OUT_FMT": out_fmt,
                       **{k: v for k, v in tile.items() if k.isupper()}},
        "aligned": ["a_ptr", "w_ptr", "scale_ptr", "bias_ptr", "grid_ptr", "out_ptr", "N", "K", "gate_offset",
                    "stride_am", "stride_wn", "stride_om"],
        "num_warps": tile["num_warps"], "num_stages": tile["num_stages"]})


@pytest.mark.parametrize("fmt,out_fmt,mma", [("int8", tg.OUT_INT8, "s32.s8.s8"), ("fp8", tg.OUT_FP8, "f32.e4m3.e4m3")])
def test_tma_geglu_form_compiles_for_hopper(fmt, out_fmt, mma):
    # engine.geglu's kernel and tile: two accumulators of 128x128 and three stages of a, value and
    # gate blocks must fit Hopper's registers and 228 KB of shared memory (Triton refuses otherwise)
    ptx = compile_gemm_kernel("_gemm8_tma_kernel", fmt, tg.tile_kwargs(tg.TMA_GEGLU_TILE), geglu=True, out_fmt=out_fmt)
    assert ptx["wgmma"] and all(op.endswith(mma) for op in ptx["wgmma"]), ptx
    assert ptx["tma_loads"] > 0 and ptx["mma_sync"] == 0, ptx
