"""8-bit GEMMs with their epilogue fused, as Triton kernels for the torch engine on the GPU.

cuBLASLt leaves two costs in the UNet's 8-bit linears that a GEMM of our own removes:
- INT8 on Hopper: torch._int_mm runs Ampere (mma.sync) kernels and writes int32 sums that a
  second kernel scales back to fp16 (docs/PERF.md: 21.2 ms of int8 GEMMs per SDXL step against
  fp16's 14.3). Here the dot runs on Hopper's 8-bit tensor cores (Triton emits wgmma) and the
  sums are scaled, biased and cast in registers: one fp16 write.
- GEGLU feed-forwards: the FF-in GEMM writes twice the hidden width in fp16, and a second kernel
  reads it back for value * gelu(gate) and the FF-out GEMM's quantize. `gemm8` with a gate
  offset computes the value and gate tiles side by side and writes that 8-bit input directly.
  With cp.async loads it was no faster than the pair (docs/PERF.md); with TMA loads it is what
  `engine.geglu: triton` runs on Hopper (not yet timed in a UNet).
- With `tma`, the GEMM brings its operands in by Hopper's TMA (tensor descriptors) instead of
  per-thread asynchronous copies: for int8 10-16% faster alone on every large SDXL shape on an
  H200 (docs/PERF.md), where it also lets a 128-deep k tile win (`engine.int8_gemm: triton-tma`).

The kernel is the custom op `quantdiff::gemm8` (torch.library.triton_op), so torch.compile and
AOTInductor put it in the compiled graph (AOTInductor packages its compiled kernels).
`gemm8_reference` is its meaning in plain PyTorch; CPU tests run the kernel itself in Triton's
interpreter (TRITON_INTERPRET=1, set before this module is imported) against it.
"""
import os
from typing import Optional

import torch

from quantdiff.quant.grids import FP8_MAX, INT8_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the engine then keeps its plain-PyTorch GEMMs
    triton = None

# out_fmt: what the epilogue writes
OUT_FLOAT, OUT_INT8, OUT_FP8 = 0, 1, 2


def new_output(a, n, out_fmt, out_dtype):
    """The GEMM's (m, n) output tensor beside `a`: `out_dtype` for a float output, else the 8-bit type."""
    dtype = {OUT_FLOAT: out_dtype, OUT_INT8: torch.int8, OUT_FP8: torch.float8_e4m3fn}[out_fmt]
    return torch.empty((a.shape[0], n), device=a.device, dtype=dtype)


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device):
    """True where the Triton kernel can run for tensors on `device`."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreting())


def gemm8_reference(a, w, scale, bias=None, out_grid=None, n=None, gate_offset=0, out_fmt=OUT_FLOAT,
                    int8_min=-INT8_MAX, out_dtype=torch.float16):
    """What the kernel computes, in float32 PyTorch.

    a (m, k) and w (rows, k) are int8 or fp8 e4m3; y = (a @ w[:n]^T) * scale[:n] + bias[:n] for the
    first n rows of w (n: all of them). With gate_offset > 0 (GEGLU) the rows from gate_offset on
    are the gate: y = y * gelu(a @ w[gate_offset:][:n]^T * scale[gate:] + bias[gate:]). out_fmt
    OUT_FLOAT casts y to out_dtype; OUT_INT8 / OUT_FP8 quantize y * out_grid (per column) onto the
    next GEMM's 8-bit grid (int8: round half to even, clamp to [int8_min, 127]).
    """
    n = w.shape[0] if n is None else n
    sums = a.float() @ w.float().t()
    scale, bias = scale.float().expand(w.shape[0]), None if bias is None else bias.float()

    def part(start):
        y = sums[:, start:start + n] * scale[start:start + n]
        return y if bias is None else y + bias[start:start + n]

    y = part(0)
    if gate_offset:
        y = y * torch.nn.functional.gelu(part(gate_offset))
    return on_grid_reference(y, out_grid, out_fmt, int8_min, out_dtype)


def on_grid_reference(y, out_grid, out_fmt, int8_min=-INT8_MAX, out_dtype=torch.float16):
    """The float32 y as the kernels write it: OUT_FLOAT cast to out_dtype; OUT_INT8 / OUT_FP8 y * out_grid
    (per column) on the next GEMM's 8-bit grid (int8: round half to even, clamp to [int8_min, 127])."""
    if out_fmt == OUT_INT8:
        return torch.clamp(torch.round(y * out_grid.float()), int8_min, INT8_MAX).to(torch.int8)
    if out_fmt == OUT_FP8:
        return (y * out_grid.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return y.to(out_dtype)


if triton is not None:
    _SQRT_HALF = tl.constexpr(0.7071067811865476)

    @triton.jit
    def _round_half_even(y):
        """torch.round's rule without libdevice (which Triton's interpreter lacks). Not the
        (y + 1.5 * 2**23) - 1.5 * 2**23 trick: exact in the interpreter, it gave truncation-sized
        errors on an H200 (3.4e-2 relative), as if the compiler had folded it away (docs/PERF.md)."""
        r = tl.floor(y + 0.5)
        odd = r - 2.0 * tl.floor(r * 0.5)
        return tl.where((r - y == 0.5) & (odd != 0.0), r - 1.0, r)

    @triton.jit
    def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's (row block, column block). Grouped order: GROUP_M row blocks in turn take
        each weight column block while it sits in L2."""
        pid = tl.program_id(0)
        blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        first_m = (pid // (GROUP_M * blocks_n)) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        return first_m + (pid % group_rows), (pid % (GROUP_M * blocks_n)) // group_rows

    @triton.jit
    def _tile_rows_cols(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """The output rows and columns of this program's tile (_tile_ids' order)."""
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    @triton.jit
    def _scaled(acc, rn, n_ok, scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
        """The sums of columns rn in float32: times their scale, plus their bias."""
        y = acc.to(tl.float32) * tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        return y

    @triton.jit
    def _epilogue(acc, gate_acc, rn, n_ok, scale_ptr, bias_ptr, grid_ptr, gate_offset, int8_min,
                  HAS_BIAS: tl.constexpr, GEGLU: tl.constexpr, OUT_FMT: tl.constexpr):
        """The output tile from the sums (gemm8_reference): scaled and biased, for GEGLU times
        gelu(gate), and for an 8-bit output put on the next GEMM's grid."""
        y = _scaled(acc, rn, n_ok, scale_ptr, bias_ptr, HAS_BIAS)
        if GEGLU:
            y = y * gelu(_scaled(gate_acc, rn, n_ok, scale_ptr + gate_offset, bias_ptr + gate_offset, HAS_BIAS))
        return on_grid(y, rn, n_ok, grid_ptr, int8_min, OUT_FMT)

    @triton.jit
    def gelu(x):
        """The exact (erf) gelu of float32 x, as torch's default."""
        return 0.5 * x * (1.0 + tl.erf(x * _SQRT_HALF))

    @triton.jit
    def on_grid(y, rn, n_ok, grid_ptr, int8_min, OUT_FMT: tl.constexpr):
        """The float32 tile y of columns rn as written (on_grid_reference): as is for a float output,
        else times each column's grid and rounded (int8) or clamped (fp8) onto it."""
        if OUT_FMT == 1:
            y = y * tl.load(grid_ptr + rn, mask=n_ok, other=0.0)[None, :]
            # clamping first is the same as clamping the rounded value: the bounds are integers
            y = _round_half_even(tl.clamp(y, int8_min, 127.0))
        elif OUT_FMT == 2:
            y = tl.clamp(y * tl.load(grid_ptr + rn, mask=n_ok, other=0.0)[None, :], -448.0, 448.0)
        return y

    @triton.jit
    def _gemm8_kernel(a_ptr, w_ptr, scale_ptr, bias_ptr, grid_ptr, out_ptr, M, N, K, gate_offset,
                      stride_am, stride_wn, stride_om, int8_min,
                      IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr, GEGLU: tl.constexpr, OUT_FMT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        rm, rn = _tile_rows_cols(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = rm < M, rn < N
        # w is (rows, k) row-major, read as (k, n) tiles: both operands k-major, as Hopper's 8-bit MMA wants
        # row offsets in int64: an SDXL conv's patch matrix passes 2**31 bytes at 2048 px and batch 8
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
        g_ptrs = w_ptrs + gate_offset * stride_wn
        # (masked-off elements load as 0; int8 sums in int32, fp8 ones in float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
        gate_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = rk < K - k0
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32 if IS_INT else tl.float32)
            if GEGLU:
                g = tl.load(g_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                gate_acc = tl.dot(a, g, gate_acc, out_dtype=tl.int32 if IS_INT else tl.float32)
                g_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        y = _epilogue(acc, gate_acc, rn, n_ok, scale_ptr, bias_ptr, grid_ptr, gate_offset, int8_min,
                      HAS_BIAS, GEGLU, OUT_FMT)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _gemm8_tma_kernel(a_ptr, w_ptr, scale_ptr, bias_ptr, grid_ptr, out_ptr, M, N, K, gate_offset,
                          stride_am, stride_wn, stride_om, int8_min, IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          GEGLU: tl.constexpr, OUT_FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # _gemm8_kernel with both operands brought in by Hopper's TMA, not per-thread asynchronous
        # copies; blocks past the edges arrive as zeros. The tensor descriptors are made here, on the
        # device: torch.compile's wrapper (2.11) took host-side ones for constants it could not hash.
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
        if GEGLU:  # the gate rows: a third descriptor only where they are read
            g_desc = tl.make_tensor_descriptor(w_ptr + gate_offset * stride_wn, shape=[N, K], strides=[stride_wn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
        gate_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32 if IS_INT else tl.float32)
            if GEGLU:
                g = g_desc.load([pid_n * BLOCK_N, k0])
                gate_acc = tl.dot(a, g.T, gate_acc, out_dtype=tl.int32 if IS_INT else tl.float32)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        y = _epilogue(acc, gate_acc, rn, rn < N, scale_ptr, bias_ptr, grid_ptr, gate_offset, int8_min,
                      HAS_BIAS, GEGLU, OUT_FMT)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    def _launch_args(a, w, scale, bias, out_grid, out, gate_offset, out_fmt, int8_min):
        """(arguments, constexpr flags, grid) of either kernel (they take the same) into `out` (m, n);
        a missing bias or grid passes `out` in its place, never read."""
        (m, k), n = a.shape, out.shape[1]
        args = (a, w, scale, out if bias is None else bias, out if out_grid is None else out_grid, out,
                m, n, k, gate_offset, a.stride(0), w.stride(0), out.stride(0), float(int8_min))
        flags = {"IS_INT": a.dtype == torch.int8, "HAS_BIAS": bias is not None, "GEGLU": gate_offset > 0,
                 "OUT_FMT": out_fmt}

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        return args, flags, grid

    def _tma_scratch(size, alignment, stream):
        """Global memory for tensor descriptors made on the device (Triton asks its allocator)."""
        return torch.empty(size, dtype=torch.int8, device="cpu" if interpreting() else "cuda")

    def launch_tma_kernel(a, w, scale, out, tile, bias=None, tuned=None, out_grid=None, gate_offset=0,
                          out_fmt=OUT_FLOAT, int8_min=-INT8_MAX):
        """launch_kernel's GEMM (gemm8_reference's meaning; out is (m, n)) through TMA loads, with
        `tile` (launch keywords), or through `tuned`, its one-tile autotuner wrapped for
        torch.compile (the engine's form). The rows of a and w must start 16 bytes apart (tma_fits)."""
        # (compiled code sets Inductor's own allocator; this one serves eager launches)
        triton.set_allocator(_tma_scratch)
        args, flags, grid = _launch_args(a, w, scale, bias, out_grid, out, gate_offset, out_fmt, int8_min)
        if tuned is None:
            _gemm8_tma_kernel[grid](*args, **flags, **tile)
        else:
            tuned[grid](*args, **flags)
        return out

    def _config(m, n, k, warps, stages, group=8):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group},
                             num_warps=warps, num_stages=stages)

    def tile_kwargs(config):
        """A triton.Config as launch keywords (the tile and its warps and stages)."""
        return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}

    # One tile per input type, from `bench.gemm --sweep` on an H200 (docs/PERF.md): for int8,
    # 128x128x64 with 4 warps and 5 stages was the fastest of 18 tiles on all five of SDXL's linear
    # shapes; for fp8, 256x128x64 with 8 warps on four. Fixed rather than autotuned: one tile won
    # everywhere, autotuning costs build time, and what the autotuner picked under torch.compile
    # could not be seen (its compiled GEMMs were slower than the best tile alone plus a quantize).
    TILES = {"int8": _config(128, 128, 64, 4, 5), "fp8": _config(256, 128, 64, 8, 4)}
    # Few rows: SDXL's cross-attention k/v projections read the 77-token text, 154 rows at batch 2,
    # where a 128x128 tile makes 20 programs for 132 SMs (13.5 us per 154x2048x1280 int8 GEMM in
    # the H200 profile against cuBLASLt fp8's 5.4 us; docs/PERF.md). 64-row tiles (the least Hopper's
    # wgmma takes) and 32 columns make 120 programs there, each pipelining a long k.
    SMALL_M_ROWS = 256
    SMALL_M_TILES = {"int8": _config(64, 32, 128, 4, 4), "fp8": _config(64, 32, 128, 4, 4)}
    # the tiles `python -m quantdiff.bench.gemm --sweep` times one by one
    SWEEP_CONFIGS = [TILES["int8"], TILES["fp8"]] + [
        _config(128, 128, 64, 4, 6), _config(256, 128, 128, 8, 3), _config(128, 256, 128, 8, 3),
        _config(128, 128, 128, 8, 4), _config(64, 128, 128, 4, 4), _config(128, 64, 128, 4, 4),
        _config(128, 128, 128, 4, 4), _config(64, 64, 128, 4, 5), _config(128, 256, 128, 8, 4),
        _config(128, 256, 64, 8, 4), _config(64, 256, 128, 4, 3), _config(128, 128, 128, 8, 5),
        _config(128, 256, 128, 8, 3, group=16), _config(64, 128, 256, 4, 3), _config(128, 128, 64, 8, 6),
        _config(128, 64, 64, 4, 6)]
    # The TMA form's int8 tile: 128x128x128 with 8 warps and 3 stages was the fastest of the sweep's
    # five on all five large SDXL shapes on an H200 (docs/PERF.md). (fp8 GEMMs stay cuBLASLt's.)
    TMA_TILES = {"int8": _config(128, 128, 128, 8, 3)}
    # the tiles the sweep times the TMA form with (launch_tma_kernel)
    TMA_SWEEP_CONFIGS = [TILES["int8"], _config(128, 256, 64, 8, 4), TMA_TILES["int8"],
                         _config(256, 128, 64, 8, 3), _config(128, 128, 64, 8, 5)]
    # The GEGLU form with TMA loads (engine.geglu: triton), both formats: the tile that was best or
    # second with cp.async loads for both (a 128-deep k tile, which TMA made win for the plain GEMM);
    # three stages of a, value and gate blocks are 144 KB of shared memory. On an H200 it was fp8's best
    # of the sweep's five (int8's: 128x64x64), each slower than the GEMM plus Inductor's GEGLU kernel (docs/PERF.md).
    TMA_GEGLU_TILE = _config(128, 128, 128, 8, 3)
    TMA_GEGLU_SWEEP_CONFIGS = [TMA_GEGLU_TILE, _config(128, 64, 128, 4, 4), _config(128, 128, 64, 8, 4),
                               _config(128, 64, 64, 4, 5), _config(64, 128, 128, 4, 4)]
    # the tiles the sweep times on the few-row shapes (bench.gemm SMALL_M_SHAPES)
    SMALL_M_SWEEP_CONFIGS = [SMALL_M_TILES["int8"], TILES["int8"]] + [
        _config(64, 64, 128, 4, 4), _config(64, 32, 256, 4, 3), _config(64, 64, 64, 4, 5), _config(64, 128, 128, 4, 4),
        _config(64, 32, 64, 4, 6), _config(64, 16, 128, 4, 4)]
    # The GEGLU form keeps two accumulators; no tile of it has beaten the unfused pair yet (PERF.md),
    # so it is autotuned over a few and used by the GEMM bench only.
    GEGLU_CONFIGS = [_config(128, 128, 128, 8, 3), _config(128, 64, 128, 4, 4), _config(64, 128, 128, 4, 4),
                     _config(128, 128, 64, 8, 4), _config(64, 64, 128, 4, 5)]
    GEGLU_SWEEP_CONFIGS = GEGLU_CONFIGS + [_config(128, 128, 64, 8, 5), _config(64, 128, 64, 4, 5),
                                           _config(128, 64, 64, 4, 5), _config(128, 128, 64, 4, 4)]
    _gemm8_geglu_tuned = triton.autotune(configs=GEGLU_CONFIGS, key=["M", "N", "K", "OUT_FMT"])(_gemm8_kernel)
    # Each fixed tile as a one-config autotuner (which times nothing): the launch form that ran
    # under torch.compile and AOTInductor on the H200.
    _gemm8_tiled = {(fmt, small): triton.autotune(configs=[tile], key=[])(_gemm8_kernel)
                    for small, tiles in ((False, TILES), (True, SMALL_M_TILES)) for fmt, tile in tiles.items()}
    _gemm8_tma_tiled = {geglu: triton.autotune(configs=[tile], key=[])(_gemm8_tma_kernel)
                        for geglu, tile in ((False, TMA_TILES["int8"]), (True, TMA_GEGLU_TILE))}

    def small_m(m):
        """True for a GEMM of few rows (SMALL_M_TILES). Only a plain int can be: under a dynamic batch
        m is symbolic, and choosing by it would guard the batch, so it takes the large tile."""
        return isinstance(m, int) and m <= SMALL_M_ROWS

    def tile_for(fmt, m):
        """The fixed tile an `fmt` ("int8" / "fp8") GEMM of m rows launches with."""
        return (SMALL_M_TILES if small_m(m) else TILES)[fmt]
    # the interpreter runs one small tile on the CPU
    INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

    def launch_kernel(a, w, scale, bias, out_grid, out, gate_offset, out_fmt, int8_min, tile=None, tma=False):
        """Runs the kernel into `out` (m, n). `tile`: launch keywords (tile_kwargs) to use instead
        of the input type's TILES entry (or, for GEGLU, the autotuner's pick). `tma`: the TMA form
        where it fits (tma_fits), the cp.async kernel elsewhere."""
        from torch.library import wrap_triton

        if tma and tile is None and tma_fits(a, w):
            geglu = {"out_grid": out_grid, "gate_offset": gate_offset, "out_fmt": out_fmt, "int8_min": int8_min}
            if interpreting():
                return launch_tma_kernel(a, w, scale, out, INTERPRETER_TILE, bias, **geglu)
            engine_tile = TMA_GEGLU_TILE if gate_offset else TMA_TILES["int8"]
            return launch_tma_kernel(a, w, scale, out, tile_kwargs(engine_tile), bias,
                                     tuned=wrap_triton(_gemm8_tma_tiled[gate_offset > 0]), **geglu)
        args, flags, grid = _launch_args(a, w, scale, bias, out_grid, out, gate_offset, out_fmt, int8_min)
        if interpreting():
            _gemm8_kernel[grid](*args, **flags, **(tile or INTERPRETER_TILE))
        elif tile is not None:  # the sweep, eager
            _gemm8_kernel[grid](*args, **flags, **tile)
        elif gate_offset:
            wrap_triton(_gemm8_geglu_tuned)[grid](*args, **flags)
        else:
            wrap_triton(_gemm8_tiled["int8" if flags["IS_INT"] else "fp8", small_m(a.shape[0])])[grid](*args, **flags)
        return out

    @torch.library.triton_op("quantdiff::gemm8", mutates_args=())
    def gemm8_op(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 out_grid: Optional[torch.Tensor], n: int, gate_offset: int, out_fmt: int, int8_min: float,
                 out_dtype: torch.dtype, tma: bool = False) -> torch.Tensor:
        out = new_output(a, n, out_fmt, out_dtype)
        return launch_kernel(a, w, scale, bias, out_grid, out, gate_offset, out_fmt, int8_min, tma=tma)


def tma_fits(a, w):
    """True where the TMA form can take an 8-bit GEMM: enough rows for its 128-row tile (a few-row
    GEMM keeps the small cp.async tile; a symbolic count, dynamic batch, counts as many) and rows
    of a and w that start 16 bytes apart, as tensor descriptors require (k a multiple of 16: every
    SDXL linear and conv)."""
    return (not small_m(a.shape[0]) and a.stride(1) == 1 and w.stride(1) == 1
            and a.stride(0) % 16 == 0 and w.stride(0) % 16 == 0)


def per_column(scale, n):
    """The first n entries of a per-column float32 scale, contiguous, as the kernels read them
    (a single-element scale, per-tensor, repeats)."""
    scale = scale.float().reshape(-1)
    return (scale if scale.numel() > 1 else scale.expand(n))[:n].contiguous()


def gemm8(a, w, scale, bias=None, out_grid=None, n=None, gate_offset=0, out_fmt=OUT_FLOAT,
          int8_min=-INT8_MAX, out_dtype=torch.float16, tma=False):
    """gemm8_reference's result through the Triton kernel (the custom op on the GPU; the kernel
    itself under the interpreter, which the op's CPU dispatch would not reach). `tma`: int8 with a
    float output through the TMA form where it fits (tma_fits)."""
    n = w.shape[0] if n is None else n
    if gate_offset and gate_offset < n:
        raise ValueError(f"gate rows start at {gate_offset}, inside the first {n} rows")
    if out_fmt != OUT_FLOAT and out_grid is None:
        raise ValueError("an 8-bit output needs out_grid, the next GEMM's input scale per column")
    # per-column vectors, contiguous: the kernel reads element n of each (a 0-dim scale broadcasts);
    # w may have zero rows past those used (padding for cuBLASLt), which the kernel never reads
    rows = gate_offset + n if gate_offset else n
    scale = per_column(scale, rows)
    w = w if w.stride(1) == 1 else w.contiguous()
    if out_grid is not None:
        out_grid = out_grid.float().expand(n).contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if a.is_cuda:
        return torch.ops.quantdiff.gemm8(a.contiguous(), w, scale, bias, out_grid, n, gate_offset, out_fmt,
                                         float(int8_min), out_dtype, tma)
    if not interpreting():
        raise RuntimeError("gemm8 runs on the GPU, or on the CPU under TRITON_INTERPRET=1 (for tests)")
    out = new_output(a, n, out_fmt, out_dtype)
    return launch_kernel(a.contiguous(), w, scale, bias, out_grid, out, gate_offset, out_fmt, int8_min, tma=tma)
