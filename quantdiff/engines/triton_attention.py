"""FP8 attention for quant level 4, as a Triton flash-attention kernel (`engine.fp8_attention: auto`,
the default, takes it where the triton package is installed).

Level 4 quantizes q, k and v to fp8 e4m3 with static per-tensor scales; the softmax output stays
unquantized (ModelOpt's plugin runs plain SDPA on the fake-quantized q, k, v). The torch engine
so far runs that as quantize-dequantize kernels around cuDNN's fp16 attention, which makes level 4
slower than level 3 (docs/PERF.md). Here one kernel reads the 8-bit q, k and v: q k^T runs on
Hopper's fp8 tensor cores (products of e4m3 values, exact, summed in float32), the online softmax
in float32, and p v in fp16 (p unquantized, as the fake-quant model has it; v's e4m3 values are
exact in fp16). Half the bytes of k and v, half the time of the first MMA. On an H200 it ran as fast
as cuDNN's fp16 attention alone and took the level 4 step from 27.22 to 26.54 ms (docs/PERF.md).
With quantize_probs the softmax output passes through e4m3 too and p v runs on fp8 tensor cores, as
TensorRT's FP8 attention has it: measured no faster, with 2% more error (`triton-fp8-probs`).
With out_grid the kernel writes its output in e4m3 on the output projection's grid, which that fp8
linear reads as is (QuantAttnProcessor): half the bytes written, and no quantize kernel between
them (on the H200 that kernel took 0.5 ms of the level 4 step after this one; not yet timed fused).

`quantdiff::fp8_attention` is a torch.library.triton_op; `fp8_attention_reference` is its meaning in
plain PyTorch, and CPU tests run the kernel in Triton's interpreter against it. `python -m
quantdiff.bench.gemm --attention` times it against cuDNN's fp16 attention on SDXL's shapes, and
`python -m quantdiff.bench.unet --level 4 --precisions fp8 --fp8-attention sdpa,triton` in the UNet.
(It has run inside the workflow's tiny-xl engines on a GPU, as an AOTInductor package and as an export archive.)
"""
import math

import torch

from quantdiff.engines.triton_gemm import interpreting, triton
from quantdiff.quant.grids import FP8_MAX, quantize_fp8, zero_pad_last_dim


# Softmax probabilities lie in [0, 1] (before the normalization too, relative to the running
# maximum): quantized, they take e4m3's whole range with the fixed scale 1/448, as TensorRT's FP8
# attention has them.
PROBS_TO_GRID = 448.0


def fp8_attention_reference(q, k, v, q_scale, k_scale, v_scale, softmax_scale=None, out_dtype=torch.float16,
                            quantize_probs=False, out_grid=None):
    """softmax(q k^T * softmax_scale) v on the dequantized (b, h, len, d) e4m3 tensors, in float32;
    with quantize_probs the softmax output too passes through e4m3 (before the normalization, as the
    kernel's online softmax has it: the row sums are of the unquantized values). With out_grid (the
    output projection's input scale) the result is that projection's e4m3 input."""
    softmax_scale = 1 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    q, k, v = (t.float() * s.float() for t, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
    scores = q @ k.transpose(-1, -2) * softmax_scale
    unnormalized = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    sums = unnormalized.sum(dim=-1, keepdim=True)
    if quantize_probs:
        unnormalized = (unnormalized * PROBS_TO_GRID).to(torch.float8_e4m3fn).float() / PROBS_TO_GRID
    out = unnormalized @ v / sums
    return out.to(out_dtype) if out_grid is None else quantize_fp8(out, out_grid.float())


if triton is not None:
    import triton.language as tl

    _PROBS_TO_GRID = tl.constexpr(PROBS_TO_GRID)
    _FP8_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _fp8_attention_kernel(q_ptr, k_ptr, v_ptr, scales_ptr, out_ptr, H, M, N, softmax_scale,
                              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              EVEN_N: tl.constexpr, PROBS_FP8: tl.constexpr, OUT_FP8: tl.constexpr):
        # program (query block, batch * head); head_dim contiguous in q, k and out, and in v unless
        # PROBS_FP8 (then its keys are)
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + rm[:, None] * stride_qm + rd[None, :],
                    mask=(rm < M)[:, None], other=0.0)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
        # q's and k's scales and the softmax scale fold into one factor, in base 2 for exp2
        qk_scale = (tl.load(scales_ptr) * tl.load(scales_ptr + 1) * softmax_scale * 1.4426950408889634).to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        for start in range(0, N, BLOCK_N):
            rn = start + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            # k as a (head_dim, BLOCK_N) tile, head_dim contiguous: both fp8 operands k-major, as wgmma wants
            kt = tl.load(k_base + rn[None, :] * stride_kn + rd[:, None], mask=n_ok[None, :], other=0.0)
            s = tl.dot(q, kt, out_dtype=tl.float32) * qk_scale
            if not EVEN_N:  # (self-attention's key count is a multiple of the block: no masking there)
                s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + rn[:, None] * stride_vn + rd[None, :] * stride_vd, mask=n_ok[:, None], other=0.0)
            if PROBS_FP8:  # p v on the fp8 tensor cores too: v must then be key-major (stride_vn == 1)
                pv = tl.dot((p * _PROBS_TO_GRID).to(tl.float8e4nv), v, out_dtype=tl.float32) / _PROBS_TO_GRID
            else:
                pv = tl.dot(p.to(tl.float16), v.to(tl.float16), out_dtype=tl.float32)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None] * tl.load(scales_ptr + 2)
        if OUT_FP8:  # onto the output projection's e4m3 grid (scales_ptr[3]): it reads 8 bits, not 16
            out = tl.clamp(out * tl.load(scales_ptr + 3), -_FP8_MAX, _FP8_MAX)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + rm[:, None] * stride_om + rd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None])

    # the fastest of SWEEP_TILES on SDXL's self-attention on an H200 (185 against 259 us for 128x64 with
    # 4 warps, the first tile) and of ten on an H100 (186 us; docs/PERF.md)
    TILE = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
    # the tiles `bench.gemm --attention` times, alone
    SWEEP_TILES = [TILE, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
                   {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
                   {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                   {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                   # tried on the H100 (TILE no faster than cuDNN's fp16 there): none beat it on the self-attentions
                   {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
                   {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4},
                   {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4},
                   {"BLOCK_M": 64, "BLOCK_N": 256, "num_warps": 4, "num_stages": 2},
                   {"BLOCK_M": 128, "BLOCK_N": 256, "num_warps": 8, "num_stages": 2}]
    INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16}

    def launch_kernel(q, k, v, scales, out, softmax_scale, tile=None, quantize_probs=False):
        """Fills `out` (b, h, m, d) from the e4m3 (b, h, len, d) q, k, v; scales: float32 [q, k, v],
        and a fourth, the grid an e4m3 `out` is quantized onto. quantize_probs: p v in fp8 as well; v
        then has its keys contiguous (`keys_contiguous`)."""
        from torch.library import wrap_triton

        b, h, m, d = q.shape
        tile = tile or (INTERPRETER_TILE if interpreting() else TILE)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), b * h)

        args = (q, k, v, scales, out, h, m, k.shape[2], float(softmax_scale), *q.stride()[:3], *k.stride()[:3],
                *v.stride(), *out.stride()[:3])
        kernel = _fp8_attention_kernel if interpreting() else wrap_triton(_fp8_attention_kernel)
        # unmasked keys only for a plain int count (a symbolic one, dynamic resolution, would be guarded)
        even = isinstance(k.shape[2], int) and k.shape[2] % tile["BLOCK_N"] == 0
        kernel[grid](*args, HEAD_DIM=d, EVEN_N=even, PROBS_FP8=quantize_probs, OUT_FP8=out.dtype == torch.float8_e4m3fn,
                     **tile)
        return out

    @torch.library.triton_op("quantdiff::fp8_attention", mutates_args=())
    def fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: torch.Tensor,
                         softmax_scale: float, quantize_probs: bool = False, out_fp8: bool = False) -> torch.Tensor:
        out = heads_last_output(q, torch.float8_e4m3fn if out_fp8 else torch.float16)
        return launch_kernel(q, k, v, scales, out, softmax_scale, quantize_probs=quantize_probs)


def heads_last_output(q, dtype=torch.float16):
    """A (b, h, len, d) output stored as (b, len, h, d): merging the heads after it (for the output
    projection) is then a view, as after cuDNN's attention."""
    b, h, m, d = q.shape
    return torch.empty((b, m, h, d), device=q.device, dtype=dtype).transpose(1, 2)


# Hopper's fp8 MMA takes a k of at least 32: q k^T over a head_dim of 16 does not compile for sm_90
# (tiny-xl's, on the H200: docs/PERF.md), so a smaller head_dim is zero-padded to it (adding nothing)
MIN_MMA_K = 32


def supports(head_dim):
    """True for a head_dim the kernel takes: a power of 2 from 16 (below MIN_MMA_K, padded)."""
    return triton is not None and head_dim >= 16 and not head_dim & (head_dim - 1)


def keys_contiguous(v):
    """v (b, h, len, d) laid out with len contiguous, as fp8 p v wants its operand (k-major)."""
    return v if v.stride(-2) == 1 else v.transpose(-1, -2).contiguous().transpose(-1, -2)


def kernel_scales(q_scale, k_scale, v_scale, out_grid=None):
    """The kernel's scale operand, one float32 tensor: [q, k, v] dequantize multipliers and, for an
    e4m3 output, the output grid. Made once per attention at conversion (qmodules), it spares the
    UNet step a stack kernel per call (140 of ~2 us for SDXL)."""
    return torch.stack([s.float().reshape(()) for s in (q_scale, k_scale, v_scale)]
                       + ([out_grid.float().reshape(())] if out_grid is not None else []))


def fp8_attention(q, k, v, q_scale, k_scale, v_scale, softmax_scale=None, quantize_probs=False, out_grid=None):
    """fp8_attention_reference's result (fp16) through the Triton kernel: the custom op on the GPU,
    the kernel itself under the interpreter. q, k, v: e4m3 (b, h, len, d), head_dim a power of 2
    of at least 16 (padded to MIN_MMA_K); the scales per tensor. quantize_probs: the softmax output in e4m3
    too, both products on the fp8 tensor cores (not the fake-quant model's semantics: its error is
    measured, `bench.gemm --attention`). out_grid: the output quantized onto that e4m3 grid (the
    output projection's input scale) and returned as e4m3, so that projection reads 8 bits."""
    return fp8_attention_scaled(q, k, v, kernel_scales(q_scale, k_scale, v_scale, out_grid), softmax_scale,
                                quantize_probs)


def fp8_attention_scaled(q, k, v, scales, softmax_scale=None, quantize_probs=False):
    """fp8_attention with its scales already in one tensor (kernel_scales): three entries give an
    fp16 output, four an e4m3 one on the fourth's grid."""
    if triton is None:
        raise RuntimeError("fp8_attention needs the triton package")
    d = q.shape[-1]
    if not supports(d):
        raise ValueError(f"fp8_attention takes a head_dim that is a power of 2 from 16 (got {d})")
    if any(t.dtype != torch.float8_e4m3fn for t in (q, k, v)):
        raise ValueError("fp8_attention takes float8_e4m3fn q, k and v")
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    v = keys_contiguous(v) if quantize_probs else v if v.stride(-1) == 1 else v.contiguous()
    if scales.shape not in ((3,), (4,)):
        raise ValueError(f"fp8_attention takes 3 or 4 scales (q, k, v, out grid), got shape {tuple(scales.shape)}")
    scales, out_fp8 = scales.float(), scales.shape[0] == 4  # .float(): no kernel for a float32 buffer
    softmax_scale = 1 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if d < MIN_MMA_K:
        q, k, v = (zero_pad_last_dim(t, MIN_MMA_K) for t in (q, k, v))
        if quantize_probs:
            v = keys_contiguous(v)
    if q.is_cuda:
        out = torch.ops.quantdiff.fp8_attention(q, k, v, scales, softmax_scale, quantize_probs, out_fp8)
    elif interpreting():
        out = launch_kernel(q, k, v, scales, heads_last_output(q, torch.float8_e4m3fn if out_fp8 else torch.float16),
                            softmax_scale, quantize_probs=quantize_probs)
    else:
        raise RuntimeError("fp8_attention runs on the GPU, or on the CPU under TRITON_INTERPRET=1 (for tests)")
    return out[..., :d]
