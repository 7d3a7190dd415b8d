"""The FP8 GEMMs of a CPU engine, traced into its graph as their float32 emulation.

No CPU multiplies e4m3 natively. PyTorch's CPU `_scaled_mm` widens both operands to float32,
scales them and runs a float32 matmul (`_scaled_mm_out_cpu_emulated` in ATen's Blas.cpp), except
on CPUs with AMX-INT8 (Sapphire Rapids and later), where it hands tensor-wise fp8 to oneDNN. There
oneDNN has no fp8 matmul kernel for the ISA and runs its reference one (`ref:any` under
ONEDNN_VERBOSE=1): measured ~1000x slower than the float32 GEMM (2048x64 @ 64x256: 2.8 s against
2 ms), 4.4 s per tiny-xl-shapes UNet step against 12 ms for the int8 engine. Which path runs is
decided per call by the CPU the engine lands on, so a CPU engine cannot rely on the fast one.

Exported under `EmulatedFP8Gemm`, a CPU engine traces every `torch._scaled_mm` as that emulation,
with the weight dequantized in its stored layout so the GEMM is the fake-quant formula's
(F.linear on dequantized operands) bit for bit in eager; Inductor fuses the widening into the
surrounding kernels. Weights stay stored in fp8. GPU engines are never lowered: cuBLASLt's fp8
GEMM is the point of them.
"""
import torch
from torch.overrides import TorchFunctionMode

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


class EmulatedFP8Gemm(TorchFunctionMode):
    """Within it, torch._scaled_mm runs as scaled_mm_emulated, so torch.export traces the emulation.

    Replacing the call while tracing costs nothing; rewriting an exported program instead
    (ExportedProgram.run_decompositions) retraces the whole graph: 35 s for tiny-xl-shapes on 2
    cores. `count` is how many calls were replaced.
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._scaled_mm:
            self.count += 1
            return scaled_mm_emulated(*args, **kwargs)
        return func(*args, **kwargs)
