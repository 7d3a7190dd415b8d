"""The FP8 attention kernel of quant level 4 (engines/triton_attention.py) in Triton's interpreter on
the CPU, against its plain-PyTorch meaning: SDPA on the dequantized e4m3 q, k and v."""
import pytest
import torch

from quantdiff.engines import triton_attention as ta
from quantdiff.quant.grids import fp8_scales, quantize_fp8


def fp8_qkv(b, h, m, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, h, length, d, generator=g) * scale for length, scale in ((m, 2.0), (n, 1.5), (n, 1.0))]
    out = []
    for t in tensors:
        to_grid, back = fp8_scales(t.abs().amax())
        out += [quantize_fp8(t, to_grid), back]
    return out[0::2], out[1::2]


# self-attention (keys a multiple of the interpreter's block of 16, and not), the text's 77 keys, short
@pytest.mark.parametrize("m, n", [(48, 48), (40, 40), (37, 77), (16, 5)])
def test_fp8_attention_is_sdpa_on_the_dequantized_tensors(m, n):
    (q, k, v), scales = fp8_qkv(2, 3, m, n, 32)
    got = ta.fp8_attention(q, k, v, *scales)
    want = ta.fp8_attention_reference(q, k, v, *scales)
    assert got.shape == (2, 3, m, 32) and got.dtype == torch.float16
    assert got.transpose(1, 2).is_contiguous()  # heads merge into (b, len, h * d) without a copy
    # float32 sums in another order, p cast to fp16 for its MMA (as flash attention does)
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 2e-3
    # and the reference is torch's own SDPA on the dequantized tensors
    deq = [t.float() * s for t, s in zip((q, k, v), scales)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(*deq)
    assert torch.allclose(want.float(), sdpa, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("quantize_probs", [False, True])
def test_strided_heads_and_softmax_scale(quantize_probs, monkeypatch):
    # q, k, v as diffusers splits them: (b, len, h, d) memory viewed as (b, h, len, d); head_dim 16
    # (tiny-xl's) reaches the kernel zero-padded to Hopper's fp8 MMA k, 32, and comes back as 16
    launched, launch = [], ta.launch_kernel
    monkeypatch.setattr(ta, "launch_kernel", lambda q, k, v, *a, **kw: launched.append(v.stride()) or launch(q, k, v, *a,
                                                                                                               **kw))
    (q, k, v), scales = fp8_qkv(1, 2, 24, 24, 16, seed=1)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    got = ta.fp8_attention(q, k, v, *scales, softmax_scale=0.3, quantize_probs=quantize_probs)
    want = ta.fp8_attention_reference(q, k, v, *scales, softmax_scale=0.3, quantize_probs=quantize_probs)
    assert got.shape == (1, 2, 24, 16)
    assert ((got.float() - want.float()).norm() / want.float().norm()) < (3e-2 if quantize_probs else 2e-3)
    # v padded to (1, 2, 24, 32); with p in e4m3 its keys contiguous (stride 1 along the 24 keys)
    assert launched == [(2 * 24 * 32, 24 * 32, 1, 24) if quantize_probs else (2 * 24 * 32, 24 * 32, 32, 1)]


def test_refusals():
    (q, k, v), scales = fp8_qkv(1, 1, 8, 8, 24)
    with pytest.raises(ValueError, match="head_dim that is a power of 2 from 16 .got 24."):
        ta.fp8_attention(q, k, v, *scales)
    (q, k, v), scales = fp8_qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="float8_e4m3fn q, k and v"):
        ta.fp8_attention(q.float(), k, v, *scales)
    with pytest.raises(ValueError, match=r"3 or 4 scales \(q, k, v, out grid\), got shape \(2,\)"):
        ta.fp8_attention_scaled(q, k, v, torch.ones(2))
    assert ta.kernel_scales(*scales).shape == (3,)
    assert ta.kernel_scales(*scales, out_grid=torch.tensor(2.0, dtype=torch.float16)).tolist()[3] == 2.0


def test_quantized_probabilities():
    # both products on fp8: p through e4m3 with the fixed scale 1/448, v read key-major
    (q, k, v), scales = fp8_qkv(2, 2, 40, 77, 32, seed=2)
    got = ta.fp8_attention(q, k, v, *scales, quantize_probs=True)
    want = ta.fp8_attention_reference(q, k, v, *scales, quantize_probs=True)
    assert got.shape == (2, 2, 40, 32) and got.transpose(1, 2).is_contiguous()
    # the kernel rounds p relative to the running maximum of the key blocks seen so far, the reference
    # relative to the row's maximum: the same e4m3 precision, other roundings (0.8% here; a wrong
    # scale or v layout is off by far more)
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 0.02
    # e4m3's 3 mantissa bits on p: about a percent from the unquantized softmax, not nothing
    exact = ta.fp8_attention_reference(q, k, v, *scales).float()
    err = float((want.float() - exact).norm() / exact.norm())
    assert 5e-3 < err < 0.03, err
    assert ta.keys_contiguous(v).stride(-2) == 1 and torch.equal(ta.keys_contiguous(v), v)


def test_output_on_the_projection_grid():
    # out_grid: the output in e4m3 on the output projection's grid, heads-last, for it to read as is;
    # float32 sums in another order flip an occasional element by one e4m3 step
    (q, k, v), scales = fp8_qkv(2, 2, 40, 77, 32, seed=3)
    out_grid = torch.tensor(30.0)
    got = ta.fp8_attention(q, k, v, *scales, out_grid=out_grid)
    want = ta.fp8_attention_reference(q, k, v, *scales, out_grid=out_grid)
    assert got.dtype == torch.float8_e4m3fn and got.transpose(1, 2).is_contiguous()
    assert (got.float() != want.float()).float().mean() < 0.02
    steps = (got.float() - want.float()).abs() / want.float().abs().clamp(min=2 ** -6)
    assert steps.max() <= 2 ** -3  # at most one step of e4m3's 3-bit mantissa
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 5e-3
    exact = ta.fp8_attention_reference(q, k, v, *scales).float() * out_grid
    assert ((want.float() - exact).norm() / exact.norm()) < 0.05  # and the grid is the one asked for


STRIDES = ["stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
           "stride_vn", "stride_vd", "stride_ob", "stride_oh", "stride_om"]


@pytest.mark.parametrize("probs_fp8, head_dim", [(False, 64), (True, 64), (False, ta.MIN_MMA_K)])
def test_kernel_compiles_for_hopper_fp8_tensor_cores(probs_fp8, head_dim):
    # (without a GPU) q k^T on fp8 wgmma; p v on fp16 wgmma, or on fp8 with v key-major (its key stride
    # 1, which a launch specializes) and the output written in e4m3; no Ampere mma.sync
    from triton_compile import compile_for_hopper

    tile = ta.TILE
    unit = "stride_vn" if probs_fp8 else "stride_vd"
    ptx = compile_for_hopper({
        "module": "quantdiff.engines.triton_attention", "kernel": "_fp8_attention_kernel",
        # the softmax scale as fp64: Inductor passes a Python float so (a float64 running maximum failed
        # the kernel's first compile on the H200)
        "types": ["*fp8e4nv", "*fp8e4nv", "*fp8e4nv", "*fp32", "*fp8e4nv" if probs_fp8 else "*fp16", "i32", "i32", "i32",
                  "fp64"]
                 + ["constexpr" if s == unit else "i32" for s in STRIDES],
        "constexprs": {unit: 1, "HEAD_DIM": head_dim, "BLOCK_M": tile["BLOCK_M"], "BLOCK_N": tile["BLOCK_N"],
                       "EVEN_N": False, "PROBS_FP8": probs_fp8, "OUT_FP8": probs_fp8},
        "aligned": ["q_ptr", "k_ptr", "v_ptr", "out_ptr"] + [s for s in STRIDES if s != unit],
        "num_warps": tile["num_warps"], "num_stages": tile["num_stages"]})
    assert any(op.endswith("f32.e4m3.e4m3") for op in ptx["wgmma"]), ptx
    assert any(op.endswith("f32.f16.f16") for op in ptx["wgmma"]) != probs_fp8, ptx
    assert ptx["mma_sync"] == 0, ptx
