"""The middle of an 8-bit GEGLU feed-forward as one Triton pointwise kernel (`engine.geglu: triton-pointwise`).

With `geglu: inductor` the FF-in GEMM writes value and gate side by side in fp16 and one Inductor
kernel computes value * gelu(gate) and quantizes it for the FF-out GEMM. On the H100 that kernel
moved its bytes at 0.62-0.67 of the memory bandwidth: 25.0 us for SDXL's (2048, 10240) input against
a 15.6 us floor, 46.7 against 31.3 for (8192, 5120); with 70 calls it took 2.0 ms of the int8 step
(docs/PERF.md, twelfth session). This kernel does the same work in tiles of a few rows by a wide
column block (each row's value and gate runs read as 16-byte vectors), the input read once and
evicted first. The output is what the fused GEMM (`geglu: triton`) writes: value * gelu(gate) in
float32, times the FF-out linear's grid per column (its smoothing folded in), rounded or clamped onto
it. Not yet timed on a GPU: `python -m quantdiff.bench.gemm --geglu-middle` times it against Inductor's
kernel, `python -m quantdiff.bench.unet --geglu triton-pointwise` in the UNet.

`quantdiff::geglu8` is a torch.library.triton_op (torch.compile and AOTInductor take it);
`geglu8_reference` is its meaning in plain PyTorch, which CPU tests check the kernel against in
Triton's interpreter.
"""
import torch

from quantdiff.engines.triton_gemm import (OUT_FP8, OUT_INT8, interpreting, new_output, on_grid_reference,
                                           per_column, triton)
from quantdiff.quant.grids import INT8_MAX


def geglu8_reference(h, grid, out_fmt, int8_min=-INT8_MAX):
    """h (m, 2n): value columns, then gate columns. value * gelu(gate) in float32, onto the per-column
    8-bit grid (out_fmt OUT_INT8 or OUT_FP8), as triton_gemm.on_grid_reference writes it."""
    value, gate = h.float().chunk(2, dim=-1)
    return on_grid_reference(value * torch.nn.functional.gelu(gate), grid, out_fmt, int8_min)


if triton is not None:
    import triton.language as tl

    from quantdiff.engines.triton_gemm import gelu, on_grid

    @triton.jit
    def _geglu8_kernel(h_ptr, grid_ptr, out_ptr, M, N, stride_h, stride_o, int8_min, OUT_FMT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        mask = (rm < M)[:, None] & n_ok[None, :]
        value_ptrs = h_ptr + rm.to(tl.int64)[:, None] * stride_h + rn[None, :]
        # (read once: nothing else will use these lines, so they leave the L2 first)
        value = tl.load(value_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        gate = tl.load(value_ptrs + N, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        y = on_grid(value * gelu(gate), rn, n_ok, grid_ptr, int8_min, OUT_FMT)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_o + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask)

    # 2048 elements a program, 16 per thread; a sweep on the GPU has yet to choose (see the module's doc)
    TILE = {"BLOCK_M": 4, "BLOCK_N": 512, "num_warps": 4}
    # the tiles `bench.gemm --geglu-middle` times, alone
    SWEEP_TILES = [TILE, {"BLOCK_M": 8, "BLOCK_N": 256, "num_warps": 4}, {"BLOCK_M": 2, "BLOCK_N": 1024, "num_warps": 4},
                   {"BLOCK_M": 8, "BLOCK_N": 512, "num_warps": 8}, {"BLOCK_M": 16, "BLOCK_N": 256, "num_warps": 8}]
    INTERPRETER_TILE = {"BLOCK_M": 4, "BLOCK_N": 32}

    def launch_kernel(h, grid, out, out_fmt, int8_min, tile=None):
        """Fills `out` (m, n) from h (m, 2n), its rows contiguous; grid: float32 per column."""
        from torch.library import wrap_triton

        (m, n), tile = out.shape, tile or (INTERPRETER_TILE if interpreting() else TILE)

        def blocks(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

        kernel = _geglu8_kernel if interpreting() else wrap_triton(_geglu8_kernel)
        kernel[blocks](h, grid, out, m, n, h.stride(0), out.stride(0), float(int8_min), OUT_FMT=out_fmt, **tile)
        return out

    @torch.library.triton_op("quantdiff::geglu8", mutates_args=())
    def geglu8_op(h: torch.Tensor, grid: torch.Tensor, out_fmt: int, int8_min: float) -> torch.Tensor:
        out = new_output(h, h.shape[1] // 2, out_fmt, h.dtype)
        return launch_kernel(h, grid, out, out_fmt, int8_min)


def geglu8(h, grid, out_fmt, int8_min=-INT8_MAX):
    """geglu8_reference's result through the Triton kernel: the custom op on the GPU, the kernel itself
    under the interpreter. h: (m, 2n) float, value columns then gate columns; grid: the FF-out
    linear's input scale, per column or per tensor."""
    if out_fmt not in (OUT_INT8, OUT_FP8):
        raise ValueError(f"geglu8 writes int8 or fp8 (out_fmt {OUT_INT8} or {OUT_FP8}), not {out_fmt}")
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"geglu8 takes (rows, 2 * width) value-and-gate columns, got {tuple(h.shape)}")
    if triton is None:
        raise RuntimeError("geglu8 needs the triton package")
    h, grid = (h if h.stride(1) == 1 else h.contiguous()), per_column(grid, h.shape[1] // 2)
    if h.is_cuda:
        return torch.ops.quantdiff.geglu8(h, grid, out_fmt, float(int8_min))
    if not interpreting():
        raise RuntimeError("geglu8 runs on the GPU, or on the CPU under TRITON_INTERPRET=1 (for tests)")
    return launch_kernel(h, grid, new_output(h, h.shape[1] // 2, out_fmt, h.dtype), out_fmt, int8_min)
