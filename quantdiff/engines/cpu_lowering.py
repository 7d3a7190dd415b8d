"""The FP8 GEMM of a CPU engine, written into the graph as PyTorch's own float32 emulation.

No CPU multiplies e4m3 natively. PyTorch's CPU `_scaled_mm` widens both operands to float32,
scales them and runs a float32 matmul (`_scaled_mm_out_cpu_emulated` in ATen's Blas.cpp), except
on CPUs with AMX-INT8 (Sapphire Rapids and later), where it hands tensor-wise fp8 to oneDNN. There
oneDNN has no fp8 matmul kernel for the ISA and runs its reference one (`ref:any` under
ONEDNN_VERBOSE=1): measured ~1000x slower than the float32 GEMM (2048x64 @ 64x256: 2.8 s against
2 ms), 4.4 s per tiny-xl-shapes UNet step against 12 ms for the int8 engine. Which path runs is
decided per call by the CPU the engine lands on, so a CPU engine cannot rely on the fast one.

`lower_fp8_gemm` replaces every `aten._scaled_mm` of an exported program with that emulation,
with the weight dequantized in its stored layout so the GEMM is the fake-quant formula's
(F.linear on dequantized operands) bit for bit in eager; Inductor fuses the widening into the
surrounding kernels. Weights stay stored in fp8. GPU engines are never lowered: cuBLASLt's fp8
GEMM is the point of them.
"""
import torch

SCALED_MM = torch.ops.aten._scaled_mm.default
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def scaled_mm_emulated(mat_a, mat_b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
                       use_fast_accum=False):
    """torch._scaled_mm as ATen's CPU emulation computes it (tensor-wise or row-wise scales):
    widen to float32, scale, matmul, add the bias, cast. Every e4m3 value is exact in float32.
    `use_fast_accum` is a cuBLASLt option the CPU ignores too.
    """
    # The weight comes as the transposed view of an (n, k) buffer: dequantized in that layout and
    # multiplied as F.linear does (A @ W^T); a contiguous (k, n) copy, as ATen makes, rounds
    # differently on some shapes (e.g. 2 rows).
    weight = mat_b.t().float() * (scale_b.t() if scale_b.dim() == 2 else scale_b)
    out = torch.mm(mat_a.float() * scale_a, weight.t())
    if bias is not None:
        out = out + bias
    out_dtype = out_dtype or mat_a.dtype
    if scale_result is not None and out_dtype in _FP8_DTYPES:
        out = out * (1 / scale_result)
    return out.to(out_dtype)


def count_scaled_mm(program):
    return sum(node.target is SCALED_MM for node in program.graph.nodes)


def lower_fp8_gemm(program):
    """(program with every _scaled_mm emulated in float32, how many were replaced).

    The program comes back unchanged when it has none (int8, fp16): the decomposition retraces
    the whole graph (30 s for tiny-xl-shapes on 2 cores, more than its export).
    """
    found = count_scaled_mm(program)
    if not found:
        return program, 0
    return program.run_decompositions({SCALED_MM: scaled_mm_emulated}), found
