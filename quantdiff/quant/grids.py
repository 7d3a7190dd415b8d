"""The 8-bit quantization grids, exactly as ModelOpt's fake quant computes them.

From modelopt/torch/quantization/tensor_quant.py, CPU path:
- int8: q = clamp(round_half_even(x * 127/amax), -127, 127) (narrow range; -128 when not narrow),
  dequant q / (127/amax); amax <= 2**-24 quantizes to 0.
- fp8 e4m3: q = e4m3(clamp(x * 448/amax, -448, 448)), dequant q * (1 / (448/amax)).
Both compute in float32. The torch engine's real modules and the SmoothQuant alpha search share
these, so the search ranks alphas on the rounding the engine will do.
"""
import torch

INT8_MAX = 127.0
FP8_MAX = 448.0
_TINY_AMAX = 1.0 / (1 << 24)  # ModelOpt treats amax below fp16's smallest subnormal as 0


def int8_scales(amax):
    """(multiplier onto the grid, divisor back off it), exactly as ModelOpt computes them."""
    amax = amax.detach().float()
    zero = amax <= _TINY_AMAX
    to_grid = torch.full_like(amax, INT8_MAX) / amax  # full_like/amax, not 127/amax: bit-identical
    to_grid = torch.where(zero, torch.zeros_like(amax), to_grid)
    from_grid = torch.where(zero, torch.ones_like(amax), to_grid)
    return to_grid, from_grid


def fp8_scales(amax):
    """(multiplier onto the e4m3 grid, multiplier back off it), as ModelOpt's _fp8_eager."""
    amax = amax.detach().float()
    safe = torch.where(amax <= _TINY_AMAX, torch.ones_like(amax), amax)
    to_grid = FP8_MAX / safe
    return to_grid, 1 / to_grid


def quantize_int8(x, to_grid, min_bound=-INT8_MAX):
    return torch.clamp(torch.round(x.float() * to_grid), min_bound, INT8_MAX).to(torch.int8)


def quantize_fp8(x, to_grid):
    return (x.float() * to_grid).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def zero_pad_last_dim(q, size):
    """An int8 or e4m3 tensor zero-padded along its last dim to `size` (zero is exact on both grids
    and adds nothing to a GEMM's sums; F.pad has no fp8 kernel, so through an int8 view)."""
    if q.shape[-1] == size:
        return q
    return torch.nn.functional.pad(q.view(torch.int8), (0, size - q.shape[-1])).view(q.dtype)


def fake_quant_int8(x, amax, min_bound=-INT8_MAX):
    """INT8 quantize-dequantize of x with `amax` broadcast against it (per tensor or per channel)."""
    to_grid, from_grid = int8_scales(amax)
    return quantize_int8(x, to_grid, min_bound).float() / from_grid
