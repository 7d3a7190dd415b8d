"""The torch engine: real 8-bit modules against ModelOpt's fake quant, and the AOTInductor package.

A tiny SDXL-shaped UNet (32/64 channels, text_time embedding, head_dim 16) is quantized with
mtq.quantize (INT8 SmoothQuant; FP8 e4m3 with attention q/k/v and softmax quantizers). Bounds are
the measured errors with headroom: per module the real GEMM differs from fake quant only by
float accumulation order; through the whole net int8 rounding flips compound (see FACTS).
"""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

mtq = pytest.importorskip("modelopt.torch.quantization")
diffusers = pytest.importorskip("diffusers")

from quantdiff.engines import qattention  # noqa: E402
from quantdiff.engines import qmodules as qm  # noqa: E402
from quantdiff.engines import torch as te  # noqa: E402
from quantdiff.errors import ConfigError, CorruptArtifactError  # noqa: E402
from tiny_unets import tiny_sdxl_unet, unet_inputs  # noqa: E402


def quant_config(num_bits, weight_axis, attention):
    cfg = [{"quantizer_name": "*", "enable": False},
           {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": num_bits, "axis": weight_axis}},
           {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": num_bits, "axis": None}},
           {"quantizer_name": "*proj_out*", "enable": False}]  # left in high precision: must stay plain
    if attention:
        cfg += [{"quantizer_name": f"*{n}_quantizer", "cfg": {"num_bits": num_bits, "axis": None}}
                for n in ("q_bmm", "k_bmm", "v_bmm", "softmax")]
    return cfg


def quantized_pair(precision, fuse_projections=True):
    """(ModelOpt fake-quant UNet, its real-quant conversion, counts); fp8's projections of one
    input share their scales, as calibration's fused_scales has them."""
    from quantdiff.quant.fusion import share_fused_scales

    unet = tiny_sdxl_unet()
    if precision == "int8":
        config = {"quant_cfg": quant_config(8, 0, False), "algorithm": "smoothquant"}
    else:
        config = {"quant_cfg": quant_config((4, 3), None, True), "algorithm": "max"}
    with torch.no_grad():
        mtq.quantize(unet, config, lambda m: [m(**unet_inputs(2, seed)) for seed in range(3)])
    assert len(share_fused_scales(unet)) == (0 if precision == "int8" else 8)
    real, counts = qm.convert_to_real_quant(copy.deepcopy(unet), fuse_projections)
    return unet, real, counts


@pytest.fixture(scope="module")
def int8_pair():
    return quantized_pair("int8")


@pytest.fixture(scope="module")
def fp8_pair():
    return quantized_pair("fp8")


@pytest.fixture(scope="module")
def unfused_pairs():
    """Both precisions converted without fused projections: each q/k/v a linear of its own."""
    return {precision: quantized_pair(precision, fuse_projections=False) for precision in ("int8", "fp8")}


def rel_max(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def rel_rms(out, ref):
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def real_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (qm.Int8Linear, qm.FP8Linear, qm.QuantConv2d))]


def random_input(module, seed):
    g = torch.Generator().manual_seed(seed)
    if isinstance(module, qm.QuantConv2d):
        return 2 * torch.randn(2, module.in_channels, 8, 8, generator=g)
    return 2 * torch.randn(2, 5, module.in_features, generator=g)


def fake_output(fake_modules, name, x):
    """The fake-quant module `name`'s output, or for a fused projection (to_qkv, to_kv) its members'
    outputs side by side."""
    parent, _, leaf = name.rpartition(".")
    members = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}.get(leaf)
    if members is None:
        return fake_modules[name](x)
    return torch.cat([fake_modules[f"{parent}.{m}"](x) for m in members], dim=-1)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@torch.no_grad()
def test_each_real_module_matches_modelopt(precision, int8_pair, fp8_pair):
    fake, real, _ = int8_pair if precision == "int8" else fp8_pair
    fake_modules = dict(fake.named_modules())
    checked = {}
    for i, (name, module) in enumerate(real_modules(real)):
        x = random_input(module, i)
        expected = fake_output(fake_modules, name, x)
        # reference_forward is ModelOpt's formula: bit-identical
        assert torch.equal(module.reference_forward(x), expected), name
        if isinstance(module, qm.QuantConv2d):
            assert torch.equal(module(x), expected), name  # conv = exact emulation
        else:
            # int32 (_int_mm) / fp32 (_scaled_mm) sums vs float fake quant: measured <= 4.5e-7
            assert rel_max(module(x), expected) < 5e-6, name
        checked[type(module).__name__] = checked.get(type(module).__name__, 0) + 1
    linear = "Int8Linear" if precision == "int8" else "FP8Linear"
    assert checked[linear] > 0 and checked["QuantConv2d"] > 0


@torch.no_grad()
def test_int8_model_through_the_cudnn_ops_is_the_int_mm_one(int8_pair, monkeypatch):
    """engine.int8_gemm: cudnn routes every int8 linear and conv (convs straight from the image, no patches)
    to engines/cudnn_int8's ops; run here on their CPU implementations, the UNet's output is bit-equal to the
    int_mm + patches path's (exact int32 sums, the same float32 epilogue)."""
    from quantdiff.engines import cudnn_int8, gemm8

    real = copy.deepcopy(int8_pair[1])
    convs = [m for m in real.modules() if isinstance(m, qm.QuantConv2d) and m.gemm_ok]
    for conv in convs:
        conv.use_gemm = True
    inputs = unet_inputs(2, 7)
    expected = real(**inputs).sample
    calls = {"matmul": 0, "conv": 0}

    def counted(kind, fn):
        def call(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(gemm8, "resolve_int8_gemm", lambda choice, device: "cudnn")
    monkeypatch.setattr(cudnn_int8, "int8_matmul", counted("matmul", cudnn_int8.int8_matmul))
    monkeypatch.setattr(cudnn_int8, "int8_conv2d", counted("conv", cudnn_int8.int8_conv2d))
    assert torch.equal(real(**inputs).sample, expected)
    linears = sum(isinstance(m, qm.Int8Linear) for m in real.modules())
    assert calls == {"matmul": linears, "conv": len(convs)} and linears > 0 and len(convs) > 0


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@torch.no_grad()
def test_conv_as_8bit_gemm_matches_fake_quant(precision, int8_pair, fp8_pair):
    """The GPU conv path (patches @ 8-bit weight) run on the CPU against the exact emulation,
    on contiguous and channels_last inputs, odd sizes included."""
    _, real, _ = int8_pair if precision == "int8" else fp8_pair
    convs = [(n, m) for n, m in real.named_modules() if isinstance(m, qm.QuantConv2d)]
    gemm = [(n, m) for n, m in convs if m.gemm_ok]
    # conv_in (4 channels in) and conv_out (4 out) do not suit cuBLASLt; all others do
    assert len(gemm) == len(convs) - 2 and any(m.stride == (2, 2) for _, m in gemm)
    for i, (name, conv) in enumerate(gemm):
        g = torch.Generator().manual_seed(i)
        for x in (2 * torch.randn(2, conv.in_channels, 9, 7, generator=g),
                  (2 * torch.randn(3, conv.in_channels, 8, 8, generator=g)).contiguous(memory_format=torch.channels_last)):
            expected = conv.reference_forward(x)
            conv.use_gemm = True
            try:
                out = conv(x)
            finally:
                conv.use_gemm = None
            assert out.shape == expected.shape, name
            # int32 / float32 sums of the same 8-bit values: order only (measured <= 1e-6)
            assert rel_max(out, expected) < 5e-6, name
    assert real_modules(real) and all(not m.use_gemm and m(torch.zeros(1, m.in_channels, 4, 4)).shape[0] == 1
                                      for _, m in convs)


def test_conv_gemm_choice(int8_pair, fp8_pair, monkeypatch):
    """Auto: the GEMM path only on the GPU, only where cuBLASLt takes the shape and from
    GEMM_MIN_OUT_CHANNELS output channels (with Inductor's patches; with the Triton copy, per
    format); use_gemm forces it either way (never onto a bad shape)."""
    from quantdiff.engines import gemm8

    convs = [m for m in int8_pair[1].modules() if isinstance(m, qm.QuantConv2d)]
    fp8_convs = [m for m in fp8_pair[1].modules() if isinstance(m, qm.QuantConv2d)]
    # the tiny UNet has 32 and 64 channels
    monkeypatch.setattr(qm, "GEMM_MIN_OUT_CHANNELS", 64)
    monkeypatch.setattr(qm, "GEMM_MIN_OUT_CHANNELS_TRITON_PATCHES", {"int8": 64, "fp8": 0})
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: False)  # auto: Inductor's patches
    chosen = {(m.out_channels, m.gemm_ok, m.runs_as_gemm(on_gpu=True)) for m in convs + fp8_convs}
    # conv_in (4 -> 32) and conv_out (32 -> 4) do not suit cuBLASLt
    assert chosen == {(32, True, False), (64, True, True), (32, False, False), (4, False, False)}
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: True)  # auto: the Triton copy
    assert {(m.out_channels, m.runs_as_gemm(on_gpu=True)) for m in convs if m.gemm_ok} == {(32, False), (64, True)}
    assert all(m.runs_as_gemm(on_gpu=True) == m.gemm_ok for m in fp8_convs)  # fp8: every conv it can
    assert not any(m.runs_as_gemm(on_gpu=False) for m in convs + fp8_convs)
    monkeypatch.setattr(qm.QuantConv2d, "int8_gemm", "cudnn")  # cuDNN's int8 conv: every one it can, 32 too
    assert all(m.runs_as_gemm(on_gpu=True) == m.gemm_ok for m in convs) and any(m.out_channels == 32 for m in convs)
    assert not any(m.runs_as_gemm(on_gpu=False) for m in convs)
    monkeypatch.setattr(qm.QuantConv2d, "int8_gemm", "auto")
    try:
        for m in convs:
            m.use_gemm = True
        assert [m.runs_as_gemm(on_gpu=False) for m in convs] == [m.gemm_ok for m in convs]
        for m in convs:
            m.use_gemm = False
        assert not any(m.runs_as_gemm(on_gpu=True) for m in convs)
    finally:
        for m in convs:
            m.use_gemm = None


@torch.no_grad()
def test_int8_weights_are_stored_in_8_bits(int8_pair, fp8_pair):
    for _, module in real_modules(int8_pair[1]):
        assert module.weight.dtype == torch.int8
    for _, module in real_modules(fp8_pair[1]):
        assert module.weight.dtype == torch.float8_e4m3fn


@torch.no_grad()
def test_fp8_attention_matches_modelopt(fp8_pair):
    fake, real, counts = fp8_pair
    fake_modules = dict(fake.named_modules())
    attentions = [(n, m) for n, m in real.named_modules() if isinstance(m.__dict__.get("processor"), qm.QuantAttnProcessor)]
    assert len(attentions) == counts["attention_fp8"] == 8
    for i, (name, attn) in enumerate(attentions):
        x = torch.randn(2, 16, attn.query_dim, generator=torch.Generator().manual_seed(i))
        context = None if name.endswith("attn1") else torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(i))
        out, expected = attn(x, encoder_hidden_states=context), fake_modules[name](x, encoder_hidden_states=context)
        # q/k/v rounding is exact; the FP8 projections may flip an occasional e4m3 step: measured 0
        assert rel_rms(out, expected) < 1e-3, name


@pytest.mark.parametrize("kernel, bound", [("triton", 1e-2), ("triton-fp8-probs", 0.05)])
@torch.no_grad()
def test_fp8_attention_through_the_triton_kernel(fp8_pair, monkeypatch, kernel, bound):
    """engine.fp8_attention: triton (Triton's interpreter on the CPU here, where the setting otherwise
    resolves to SDPA): the same attention from the 8-bit q, k and v, up to float32 sums in another
    order and p in fp16 for its MMA; the kernel writes its output on the fp8 output projection's grid
    (float32 rounded once, where the fake-quant model rounds to fp16 first): a sum in another order
    can flip an e4m3 step there (measured 4.5e-3 rms at worst). With the softmax output in e4m3 too,
    that rounding adds its own error (3.4e-2 at worst: few keys here)."""
    from quantdiff.engines import triton_attention

    _, real, _ = fp8_pair
    attentions = [(n, m) for n, m in real.named_modules() if isinstance(m.__dict__.get("processor"), qm.QuantAttnProcessor)]
    assert qm.set_fp8_attention(real, kernel) == len(attentions) == 8
    calls = []
    run = triton_attention.fp8_attention_scaled
    monkeypatch.setattr(triton_attention, "fp8_attention_scaled",
                        lambda *a, **kw: calls.append((a, kw)) or run(*a, **kw))
    try:
        for i, (name, attn) in enumerate(attentions):
            x = torch.randn(2, 16, attn.query_dim, generator=torch.Generator().manual_seed(i))
            context = None if name.endswith("attn1") else torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(i))
            expected = attn(x, encoder_hidden_states=context)  # on the CPU: SDPA, whatever the setting
            with monkeypatch.context() as gpu:
                gpu.setattr(qattention, "resolve_fp8_attention", lambda choice, device: choice)  # as on a GPU
                out = attn(x, encoder_hidden_states=context)
            assert rel_rms(out, expected) < bound, name
    finally:
        qm.set_fp8_attention(real, "sdpa")
    assert len(calls) == 8 and all(t.dtype == torch.float8_e4m3fn for a, _ in calls for t in a[:3])
    # a self-attention's fused q/k/v output on one grid (fused_scales) is quantized once: three views
    # (decided at conversion: export refuses a data-dependent comparison of the grids in forward)
    assert [attn.processor.one_qkv_grid for _, attn in attentions] == [n.endswith("attn1") for n, _ in attentions]
    one_tensor = [len({t.untyped_storage().data_ptr() for t in a[:3]}) == 1 for a, _ in calls]
    assert one_tensor == [name.endswith("attn1") for name, _ in attentions]
    assert all(kw["quantize_probs"] == (kernel == "triton-fp8-probs") for _, kw in calls)
    # every output projection is an fp8 linear: each takes the kernel's output on its own grid. The
    # kernel's scales are one float32 buffer per attention, made at conversion (no stack kernel per call)
    projections = [attn.to_out[0] for _, attn in attentions]
    assert all(isinstance(p, qm.FP8Linear) for p in projections)
    assert all(a[3] is attn.fp8_kernel_scales for (a, _), (_, attn) in zip(calls, attentions))
    assert all(a[3].dtype == torch.float32 for a, _ in calls)
    assert [a[3].tolist() for a, _ in calls] == [
        [attn.q_quant.back.item(), attn.k_quant.back.item(), attn.v_quant.back.item(), attn.to_out[0].act.to_grid.item()]
        for _, attn in attentions]


@torch.no_grad()
def test_fp8_projections_write_e4m3_q_k_v_for_the_attention_kernel(fp8_pair, monkeypatch):
    """For the fp8 attention kernel, each fp8 q/k/v projection (bias-free, as diffusers' are) writes
    its output from the GEMM in e4m3 on the grid of the quantizer it feeds: no q/k/v quantize runs.
    The values are those of the fp16 output quantized, up to an occasional element one e4m3 step
    away (the GEMM's float32 sums are rounded once, not through fp16 first)."""
    from quantdiff.engines import triton_attention
    from quantdiff.engines.qlinear import StaticQuant

    _, real, counts = fp8_pair
    attentions = [(n, m) for n, m in real.named_modules() if isinstance(m.__dict__.get("processor"), qm.QuantAttnProcessor)]
    # each self-attention's to_qkv (one q/k/v grid); each cross-attention's to_q and to_kv (one k/v grid)
    assert counts["projections_e4m3_out"] == 12
    assert all(p.e4m3_out_scale.shape == () for _, a in attentions
               for p in (getattr(a, n, None) for n in ("to_qkv", "to_q", "to_kv")) if p is not None)
    with pytest.raises(ValueError, match="bias"):
        attentions[0][1].to_out[0].feeds(torch.tensor(1.0))  # diffusers' output projection has a bias
    calls, quantized = [], []
    run, quantize = triton_attention.fp8_attention_scaled, StaticQuant.quantize
    monkeypatch.setattr(triton_attention, "fp8_attention_scaled",
                        lambda *a, **kw: calls.append(a[:3]) or run(*a, **kw))
    monkeypatch.setattr(StaticQuant, "quantize", lambda self, x: quantized.append(self) or quantize(self, x))
    monkeypatch.setattr(qattention, "resolve_fp8_attention", lambda choice, device: choice)  # as on a GPU
    qm.set_fp8_attention(real, "triton")
    outputs = {}
    try:
        for e4m3 in (True, False):
            assert qm.set_e4m3_projections(real, e4m3) == 8
            calls.clear(), quantized.clear()
            for i, (name, attn) in enumerate(attentions):
                x = torch.randn(2, 16, attn.query_dim, generator=torch.Generator().manual_seed(i))
                context = None if name.endswith("attn1") else torch.randn(2, 7, 64,
                                                                          generator=torch.Generator().manual_seed(i))
                outputs[e4m3, name] = attn(x, encoder_hidden_states=context)
            qkv_quants = {id(q) for _, a in attentions for q in (a.q_quant, a.k_quant, a.v_quant)}
            assert sum(id(q) in qkv_quants for q in quantized) == (0 if e4m3 else 4 + 4 * 3), e4m3
            outputs[e4m3] = [t.clone() for qkv in calls for t in qkv]
    finally:
        qm.set_fp8_attention(real, "sdpa")
        qm.set_e4m3_projections(real, True)
    from_gemm, from_fp16 = outputs[True], outputs[False]
    assert len(from_gemm) == 24 and all(t.dtype == torch.float8_e4m3fn for t in from_gemm + from_fp16)
    same = sum((a.view(torch.uint8) == b.view(torch.uint8)).sum().item() for a, b in zip(from_gemm, from_fp16))
    total = sum(t.numel() for t in from_gemm)
    assert same / total > 0.99
    for a, b in zip(from_gemm, from_fp16):  # one e4m3 step at most (3 mantissa bits: 1/8 of the value)
        a, b = a.float(), b.float()
        assert ((a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8 + 2 ** -9).all()
    for name, _ in attentions:
        assert rel_rms(outputs[True, name], outputs[False, name]) < 1e-2, name


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@torch.no_grad()
def test_fused_projections_are_one_gemm(precision, int8_pair, fp8_pair, unfused_pairs, monkeypatch):
    """The projections reading one input (q/k/v of a self-attention, k/v of a cross-attention: one
    input grid here, int8's SmoothQuant included, and for fp8 one weight scale from fused_scales)
    become one linear, to_qkv / to_kv, and their members go: one GEMM per group, the whole UNet's
    output the same to the bit as with a linear each, no byte more of weights."""
    fake, real, counts = int8_pair if precision == "int8" else fp8_pair
    _, unfused, unfused_counts = unfused_pairs[precision]
    linear = qm.Int8Linear if precision == "int8" else qm.FP8Linear
    attentions = {n: m for n, m in real.named_modules() if n.endswith(("attn1", "attn2"))}
    assert counts["attention_to_qkv"] == counts["attention_to_kv"] == 4 and len(attentions) == 8
    assert "attention_to_qkv" not in unfused_counts and unfused_counts["attention_shared_input_quantizers"] == 8
    for name, attn in attentions.items():
        left = {p for p in ("to_q", "to_k", "to_v", "to_qkv", "to_kv") if hasattr(attn, p)}
        assert left == ({"to_qkv"} if name.endswith("attn1") else {"to_q", "to_kv"}), name
        fused = attn.to_qkv if name.endswith("attn1") else attn.to_kv
        assert type(fused) is linear and fused.split_sizes == [64] * (3 if name.endswith("attn1") else 2)
        assert attn.processor.shared_inputs == ()  # nothing left to share
    gemms = []
    run = linear.from_quantized
    monkeypatch.setattr(linear, "from_quantized", lambda self, xq, dtype: gemms.append(self) or run(self, xq, dtype))
    x = unet_inputs(2, 11)
    out = real(**x).sample
    fused_calls = [m for m in gemms if hasattr(m, "split_sizes")]
    assert len(fused_calls) == 8 and len(gemms) == counts[f"linear_{precision}"] - 4 * 3 - 4 * 2 + 8
    assert torch.equal(out, unfused(**x).sample)
    assert rel_rms(out, fake(**x).sample) < (0.05 if precision == "int8" else 1e-3)

    def stored_bytes(model):
        return sum(t.numel() * t.element_size() for t in [*model.buffers(), *model.parameters()])

    assert stored_bytes(real) <= stored_bytes(unfused)
    with pytest.raises(ValueError, match="fused into one GEMM for self-attention"):
        attentions["mid_block.attentions.0.transformer_blocks.0.attn1"](
            torch.randn(2, 16, 64), encoder_hidden_states=torch.randn(2, 7, 64))


def test_projections_fuse_only_on_one_scale(unfused_pairs):
    """fp8 linears whose weight scales differ (calibrated without fused_scales) do not concatenate;
    nor do linears on different input grids or of different classes."""
    from quantdiff.engines.qlinear import _Linear8

    fp8_fake, _, _ = quantized_pair("fp8", fuse_projections=False)
    attn = dict(fp8_fake.named_modules())["mid_block.attentions.0.transformer_blocks.0.attn1"]
    attn.to_k.weight_quantizer.amax = attn.to_k.weight_quantizer.amax * 1.5
    real, counts = qm.convert_to_real_quant(fp8_fake)
    assert counts["attention_to_qkv"] == 3 and counts["attention_shared_input_quantizers"] == 1
    kept = dict(real.named_modules())["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert all(hasattr(kept, p) for p in ("to_q", "to_k", "to_v")) and not hasattr(kept, "to_qkv")
    int8 = unfused_pairs["int8"][1].get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1")
    fp8 = unfused_pairs["fp8"][1].get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1")
    assert qm.Int8Linear.concatenated([int8.to_q, int8.to_k]) is not None
    assert qm.Int8Linear.concatenated([int8.to_q, fp8.to_k]) is None  # another class
    assert qm.Int8Linear.concatenated([int8.to_q, int8.to_out[0]]) is None  # another input grid
    assert _Linear8.concatenated([int8.to_q]) is None  # one linear is no group


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@torch.no_grad()
def test_projections_of_one_input_quantize_it_once(precision, unfused_pairs, monkeypatch):
    """q, k and v of a self-attention (k and v of a cross-attention) calibrated on one input have
    the same input quantizer (SmoothQuant's scale included); not fused, the processor quantizes that
    input once for all of them: the same output to the bit, two (one) fewer 8-bit copies written."""
    _, real, counts = unfused_pairs[precision]
    attentions = [(n, m) for n, m in real.named_modules() if isinstance(m.__dict__.get("processor"), qm.QuantAttnProcessor)]
    assert counts["attention_shared_input_quantizers"] == len(attentions) == 8
    assert {n.rsplit(".", 1)[1]: m.processor.shared_inputs for n, m in attentions} == {
        "attn1": (("to_q", "to_k", "to_v"),), "attn2": (("to_k", "to_v"),)}
    # int8 level 3 here: diffusers' attention with the shared quantize only; fp8 quantizes q/k/v too
    assert {m.processor.quantize_qkv for _, m in attentions} == {precision == "fp8"}
    quantized, quantize = [], qm.StaticQuant.quantize
    monkeypatch.setattr(qm.StaticQuant, "quantize", lambda self, x: quantized.append(self) or quantize(self, x))
    for i, (name, attn) in enumerate(attentions):
        x = torch.randn(2, 16, attn.query_dim, generator=torch.Generator().manual_seed(i))
        context = None if name.endswith("attn1") else torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(i))
        projections = [attn.to_q, attn.to_k, attn.to_v]
        quantized.clear()
        got = attn(x, encoder_hidden_states=context)
        shared = [q for q in quantized if any(q is p.act for p in projections)]
        shared_inputs, attn.processor.shared_inputs = attn.processor.shared_inputs, ()
        try:
            quantized.clear()
            expected = attn(x, encoder_hidden_states=context)
            unshared = [q for q in quantized if any(q is p.act for p in projections)]
        finally:
            attn.processor.shared_inputs = shared_inputs
        assert torch.equal(got, expected), name
        assert (len(shared), len(unshared)) == ((1, 3) if name.endswith("attn1") else (2, 3)), name


def test_same_grid_is_every_quantize_parameter():
    amax = torch.tensor(3.0)
    assert qm.StaticQuant("fp8", amax).same_grid(qm.StaticQuant("fp8", amax.clone()))
    assert not qm.StaticQuant("fp8", amax).same_grid(qm.StaticQuant("fp8", amax * 1.001))
    assert not qm.StaticQuant("fp8", amax).same_grid(qm.StaticQuant("int8", amax))
    assert not qm.StaticQuant("int8", amax).same_grid(qm.StaticQuant("int8", amax, narrow_range=False))
    smooth = torch.tensor([1.0, 2.0])
    assert qm.StaticQuant("int8", amax, pre_quant_scale=smooth).same_grid(
        qm.StaticQuant("int8", amax, pre_quant_scale=smooth.clone()))
    assert not qm.StaticQuant("int8", amax, pre_quant_scale=smooth).same_grid(qm.StaticQuant("int8", amax))
    assert not qm.StaticQuant("int8", amax, pre_quant_scale=smooth).same_grid(
        qm.StaticQuant("int8", amax, pre_quant_scale=smooth.flip(0)))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@torch.no_grad()
def test_geglu_feed_forward_through_one_triton_gemm(precision, int8_pair, fp8_pair, monkeypatch):
    """engine.geglu: triton (Triton's interpreter on the CPU here, where the setting otherwise resolves
    to inductor): the FF-in GEMM with TMA loads computes value * gelu(gate) and writes it on the
    FF-out linear's 8-bit grid, its smoothing folded in; the same feed-forward up to that rounding
    (float32 there, fp16 first in the modules' chain: a value near a grid midpoint lands on the
    other neighbour: measured at most 7e-5 rms here, none on half the feed-forwards)."""
    from quantdiff.engines import triton_gemm

    _, real, counts = int8_pair if precision == "int8" else fp8_pair
    feed_forwards = [m for m in real.modules() if isinstance(m, qm.GEGLUFeedForward)]
    assert counts["feed_forward_geglu"] == len(feed_forwards) == 4
    assert qm.set_geglu(real, "triton") == 4
    launched, launch = [], triton_gemm.launch_tma_kernel
    monkeypatch.setattr(triton_gemm, "launch_tma_kernel", lambda *a, **kw: launched.append(kw) or launch(*a, **kw))
    errors = []
    try:
        for i, ff in enumerate(feed_forwards):
            proj, out_linear = ff.projections()
            if precision == "int8":
                assert out_linear.act.pre_quant_scale is not None  # SmoothQuant's, folded into the grid
            x = torch.randn(2, 150, proj.in_features, generator=torch.Generator().manual_seed(i))  # 300 rows: TMA
            expected = ff(x)  # on the CPU: the modules' chain, whatever the setting
            with monkeypatch.context() as gpu:
                gpu.setattr(qm, "resolve_geglu", lambda choice, device: choice)  # as on a GPU
                got = ff(x)
            assert got.shape == expected.shape == (2, 150, out_linear.out_features)
            errors.append(rel_rms(got, expected))
    finally:
        qm.set_geglu(real, "auto")
    assert max(errors) < 1e-3, errors
    hidden = [ff.projections()[1].in_features for ff in feed_forwards]
    assert [kw["gate_offset"] for kw in launched] == hidden
    out_fmt = triton_gemm.OUT_INT8 if precision == "int8" else triton_gemm.OUT_FP8
    assert {kw["out_fmt"] for kw in launched} == {out_fmt}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@torch.no_grad()
def test_geglu_feed_forward_through_the_pointwise_kernel(precision, int8_pair, fp8_pair, monkeypatch):
    """engine.geglu: triton-pointwise (Triton's interpreter on the CPU here): the FF-in linear as it is,
    then engines/triton_geglu's kernel writes value * gelu(gate) on the FF-out linear's grid; the same
    feed-forward up to that rounding (float32 there, fp16 first in the modules' chain)."""
    from quantdiff.engines import triton_geglu

    _, real, _ = int8_pair if precision == "int8" else fp8_pair
    feed_forwards = [m for m in real.modules() if isinstance(m, qm.GEGLUFeedForward)]
    assert qm.set_geglu(real, "triton-pointwise") == len(feed_forwards) == 4
    launched, launch = [], triton_geglu.launch_kernel
    monkeypatch.setattr(triton_geglu, "launch_kernel", lambda h, grid, out, *a, **kw: launched.append(
        (h.shape, out.dtype)) or launch(h, grid, out, *a, **kw))
    errors = []
    try:
        for i, ff in enumerate(feed_forwards):
            hidden = ff.projections()[1].in_features
            x = torch.randn(2, 37, ff.projections()[0].in_features, generator=torch.Generator().manual_seed(i))
            expected = ff(x)  # on the CPU: the modules' chain, whatever the setting
            with monkeypatch.context() as gpu:
                gpu.setattr(qm, "resolve_geglu", lambda choice, device: choice)  # as on a GPU
                got = ff(x)
            assert got.shape == expected.shape and launched[-1][0] == (74, 2 * hidden)
            errors.append(rel_rms(got, expected))
    finally:
        qm.set_geglu(real, "auto")
    assert len(launched) == 4 and {d for _, d in launched} == {torch.int8 if precision == "int8" else torch.float8_e4m3fn}
    assert max(errors) < 1e-3, errors


def test_geglu_feed_forward_needs_two_8bit_linears(int8_pair, fp8_pair):
    from diffusers.models.attention import FeedForward

    _, real, _ = fp8_pair
    feed_forward = FeedForward(32, dim_out=32, activation_fn="geglu")
    assert not qm.GEGLUFeedForward.fits(feed_forward)  # plain linears
    fused = next(m for m in real.modules() if isinstance(m, qm.GEGLUFeedForward))
    feed_forward.net = copy.deepcopy(fused.net)
    assert qm.GEGLUFeedForward.fits(feed_forward)
    feed_forward.net[2] = nn.Linear(feed_forward.net[2].in_features, 32)  # an fp16 output projection
    assert not qm.GEGLUFeedForward.fits(feed_forward)
    feed_forward.net[2] = next(m for m in int8_pair[1].modules() if isinstance(m, qm.GEGLUFeedForward)).net[2]
    assert not qm.GEGLUFeedForward.fits(feed_forward)  # fp8 in, int8 out


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@torch.no_grad()
def test_whole_unet_matches_fake_quant(precision, int8_pair, fp8_pair):
    fake, real, counts = int8_pair if precision == "int8" else fp8_pair
    assert qm.remaining_modelopt_modules(real) == []
    assert counts[f"linear_{precision}"] == 56 and counts[f"conv_{precision}"] == 25
    assert counts["linear_kept"] == 4  # the proj_out linears the config leaves in high precision
    for name, module in real.named_modules():
        if name.endswith("proj_out"):
            assert type(module) is nn.Linear
    x = unet_inputs(2, 99)
    out, expected = real(**x).sample, fake(**x).sample
    # measured: int8 max 4.6e-2 / rms 3.4e-2 (1-LSB flips compounding); fp8 0
    assert rel_rms(out, expected) < 0.08
    assert rel_max(out, expected) < 0.12


@pytest.fixture(scope="module")
def int8_engine(int8_pair, tmp_path_factory):
    real = int8_pair[1]
    path = tmp_path_factory.mktemp("engine") / "engine.pt2"
    info = te.package_engine(real, unet_inputs(2, 5), path, log=lambda *_: None)
    return path, info


@pytest.mark.slow
@torch.no_grad()
def test_int8_engine_round_trip_dynamic(int8_pair, int8_engine):
    real = int8_pair[1]
    path, info = int8_engine
    assert path.is_file() and info["package_bytes"] == path.stat().st_size
    factor = 2 ** (len(real.config.block_out_channels) - 1)
    assert info["dynamic_dims"] == info["shape_ranges"] == {
        "batch": [1, te.MAX_BATCH], "height": [2 * factor, factor * te.MAX_SPATIAL_BLOCKS],
        "width": [2 * factor, factor * te.MAX_SPATIAL_BLOCKS]}
    engine = te.EngineUNet.load(path)
    # the config travels as JSON in the package (tuples come back as lists, as from config.json)
    assert engine.config == json.loads(json.dumps(dict(real.config))) and engine.dtype == torch.float32 and engine.device.type == "cpu"
    assert engine.add_embedding.linear_1.in_features == 80
    for batch, size in [(2, 16), (1, 16), (3, 16), (5, 24)]:  # batch 1: no guidance (turbo models)
        x = unet_inputs(batch, 7, size)
        (out,) = engine(**x, return_dict=False)
        expected = real(**x).sample
        assert out.shape == expected.shape
        # measured: exact at the traced shape; 2.9e-2 rms at 24x24 (other kernels, int8 flips)
        assert rel_rms(out, expected) < 0.08, (batch, size)


def test_usable_ranges_round_sides_inwards_to_the_down_factor(int8_pair):
    real = int8_pair[1]
    factor = 2 ** (len(real.config.block_out_channels) - 1)
    assert factor > 1
    got = te.usable_ranges(real, {"batch": (1, 8), "height": (factor + 1, 5 * factor - 1),
                                  "width": (3 * factor, 3 * factor)})
    assert got == {"batch": (1, 8), "height": (2 * factor, 4 * factor), "width": (3 * factor, 3 * factor)}
    # at least 2x the down factor: the deepest feature maps 2x2 (the self-check found 1x1 computed wrongly)
    got = te.usable_ranges(real, {"batch": (1, 8), "height": (1, 4 * factor), "width": (factor, 2 * factor)})
    assert got["height"] == (2 * factor, 4 * factor) and got["width"] == (2 * factor, 2 * factor)
    with pytest.raises(ConfigError, match=rf"engine width range 1..{factor + 1} latents: the engine takes latent "
                                          rf"sides of at least {2 * factor} .2x its down factor {factor}"):
        te.usable_ranges(real, {"batch": (1, 8), "height": (1, 4 * factor), "width": (1, factor + 1)})


def test_example_outside_the_ranges_is_refused_before_export(int8_pair, tmp_path):
    with pytest.raises(ConfigError, match=r"outside its shape ranges: batch 2 not in 4\.\.8"):
        te.package_engine(int8_pair[1], unet_inputs(2, 5), tmp_path / "engine.pt2", log=lambda *_: None,
                          ranges={"batch": (4, 8), "height": (16, 16), "width": (16, 16)})
    assert not (tmp_path / "engine.pt2").exists()


@pytest.mark.slow
@torch.no_grad()
def test_static_profile_engine_says_what_it_was_built_for(int8_pair, tmp_path):
    """engine.batch / engine.resolution with min == max give a static engine (faster to compile);
    an input it was not built for is a clear error, not an AOTInductor assertion."""
    real = int8_pair[1]
    path = tmp_path / "engine.pt2"
    info = te.package_engine(real, unet_inputs(2, 5), path, log=lambda *_: None,
                             ranges={"batch": (2, 2), "height": (16, 16), "width": (16, 16)})
    assert info["dynamic_dims"] == {} and info["shape_ranges"] == {"batch": [2, 2], "height": [16, 16],
                                                                  "width": [16, 16]}
    engine = te.EngineUNet.load(path)
    x = unet_inputs(2, 7)
    assert rel_rms(engine(**x, return_dict=False)[0], real(**x).sample) < 0.08
    with pytest.raises(ConfigError, match=r"not built for this UNet input: batch 3 \(engine: 2\.\.2\)"):
        engine(**unet_inputs(3, 7))
    with pytest.raises(ConfigError, match=r"height 24 \(engine: 16\.\.16\), width 24"):
        engine(**unet_inputs(2, 7, size=24))


@pytest.mark.slow
@torch.no_grad()
def test_fp8_engine_round_trip(fp8_pair, tmp_path):
    real = fp8_pair[1]
    info = te.package_engine(real, unet_inputs(2, 5), tmp_path / "engine.pt2", dynamic=True, log=lambda *_: None)
    engine = te.load_engine(tmp_path / "engine.pt2")
    for batch in (2, 4):
        x = unet_inputs(batch, 8)
        out = engine(*te.engine_inputs(real, x))
        out = out[0] if isinstance(out, (list, tuple)) else out
        assert rel_rms(out, real(**x).sample) < 0.08, batch
    assert info["counts"] == {}  # package_engine alone records no conversion


@pytest.mark.slow
def test_truncated_engine_is_corrupt(int8_engine, tmp_path):
    path, _ = int8_engine
    cut = tmp_path / "engine.pt2"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptArtifactError, match="engine.pt2"):
        te.load_engine(cut)


@pytest.mark.slow
@torch.no_grad()
def test_self_check_passes_a_good_package_and_deletes_a_wrong_one(int8_pair, int8_engine, tmp_path):
    """engines.check: the package, run in a fresh process on the example inputs and on the smallest
    ones its ranges take, against the module it was exported from (3.3e-2 on one CI machine, int8 1-LSB
    flips compounding as in the round trip; exactly 0 on another, whose compiled kernels round as eager
    does). A package whose output differs past the bound, or that
    does not run, is deleted and named (the H200's NaN package would have stopped here)."""
    from quantdiff.engines.check import CHECK_BOUND, check_engine, smallest_inputs
    from quantdiff.errors import EngineOutputError

    real = int8_pair[1]
    path, info = int8_engine
    eager, inputs = te.export_module(real).eval(), te.engine_inputs(real, unet_inputs(2, 5))
    smallest = smallest_inputs(inputs, info["shape_ranges"])
    factor = info["shape_ranges"]["height"][0]
    assert [t.shape[0] for t in smallest] == [1] * 5 and smallest[0].shape[2:] == (factor, factor) < (16, 16)
    assert torch.equal(smallest[0], inputs[0][:1, :, :factor, :factor])
    copy_ = tmp_path / "engine.pt2"
    copy_.write_bytes(path.read_bytes())
    said = []
    result = check_engine(copy_, eager, [inputs, smallest], log=said.append)
    assert [c["shape"] for c in result["by_shape"]] == [[2, 4, 16, 16], [1, 4, factor, factor]]
    assert 0 <= result["rel_err_vs_eager"] == max(c["rel_err_vs_eager"] for c in result["by_shape"]) < 0.08
    assert result["bound"] == CHECK_BOUND == 0.25 and copy_.is_file()
    assert said[0].startswith("engine: self-check on sample [2, 4, 16, 16]: relative error") and len(said) == 2

    doubled = lambda *x: 2 * eager(*x)  # noqa: E731 - the package then gives half of "its" model's output
    with pytest.raises(EngineOutputError, match=r"engine.pt2: the packaged engine's output on sample \[2, 4, 16, 16\] "
                                                r"differs from the model it was built from: relative error 0.[45]\d* "
                                                r".bound 0.25.. It was deleted"):
        check_engine(copy_, doubled, [inputs], log=said.append)
    assert not copy_.exists()

    copy_.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # one that does not load
    with pytest.raises(EngineOutputError, match=r"the packaged engine did not load "
                                                r"\(exit status 1\): .*CorruptArtifactError"):
        check_engine(copy_, eager, [inputs], log=said.append)
    assert not copy_.exists()


def test_garbage_engine_is_corrupt(tmp_path):
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a package")
    with pytest.raises(CorruptArtifactError, match=r"garbage.pt2 is corrupt or incomplete \(not a .pt2 archive: BadZipFile"):
        te.EngineUNet.load(garbage)
    import zipfile

    with zipfile.ZipFile(garbage, "w") as archive:  # a zip, but neither kind of engine
        archive.writestr("engine/data/notes.txt", "hello")
    with pytest.raises(CorruptArtifactError, match="neither an AOTInductor package nor a torch.export program"):
        te.load_engine(garbage)


@pytest.mark.slow
@torch.no_grad()
def test_int8_engine_in_the_export_format(int8_pair, tmp_path):
    """engine.torch_format: export: the same exported program saved as a torch.export archive and
    compiled by torch.compile where it is loaded (for machines where AOTInductor packages do not
    load, docs/PERF.md); the build's self-check runs it like a package, dynamic shapes included."""
    real = int8_pair[1]
    path = tmp_path / "engine.pt2"
    said = []
    info = te.package_engine(real, unet_inputs(2, 5), path, log=said.append, self_check=True, torch_format="export",
                             inductor={"max_autotune": False})
    assert info["format"] == "export" and te.engine_format(path) == "export"
    assert len(info["self_check"]["by_shape"]) == 2 and info["self_check"]["rel_err_vs_eager"] < 0.08
    assert said[-1].startswith("engine: saved as a torch.export program (compiled where it is loaded) in ")
    engine = te.EngineUNet.load(path)
    assert isinstance(engine.runner, te.ExportedEngine)
    assert te.engine_metadata(engine.runner)["inductor"] == {"max_autotune": False}
    assert engine.shape_ranges == info["shape_ranges"] and engine.add_embedding.linear_1.in_features == 80
    for batch, size in [(2, 16), (3, 24)]:
        x = unet_inputs(batch, 7, size)
        (out,) = engine(**x, return_dict=False)
        assert rel_rms(out, real(**x).sample) < 0.08, (batch, size)
    with pytest.raises(ConfigError, match="engine.torch_format 'onnx' is not one of aoti, export"):
        te.package_engine(real, unet_inputs(2, 5), tmp_path / "other.pt2", torch_format="onnx")


def test_device_layout_is_channels_last_on_the_gpu_only():
    def conv_weight_is_channels_last(module):
        # a 1x1 kernel's strides are the same in both layouts
        weights = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        assert weights
        return {w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights}

    unet = tiny_sdxl_unet()
    assert conv_weight_is_channels_last(te.device_layout(unet, "cpu")) == {False}
    assert conv_weight_is_channels_last(te.device_layout(unet, torch.device("cuda"))) == {True}


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 2), (1, 2), (0, 1), (1, 1)), ((3, 3), (1, 1), (2, 2), (2, 2))])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_image_patches_are_torch_im2col(kernel, stride, padding, dilation, layout):
    """Tap-major, channel-minor patches (the channels_last weight's order), on int8 values as the
    conv GEMM gathers them; F.unfold is torch's own im2col (channel-major)."""
    from quantdiff.engines.gemm8 import image_patches

    x = torch.randint(-127, 128, (2, 5, 9, 7), dtype=torch.int8).contiguous(memory_format=layout)
    patches = image_patches(x, kernel, stride, padding, dilation)
    b, ho, wo, k = patches.shape
    expected = F.unfold(x.float(), kernel, dilation, padding, stride)  # (b, c*kh*kw, ho*wo)
    expected = expected.reshape(b, 5, kernel[0] * kernel[1], ho, wo).permute(0, 3, 4, 2, 1).reshape(b, ho, wo, k)
    assert patches.dtype == torch.int8 and torch.equal(patches.float(), expected)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@torch.no_grad()
def test_conv_gemm_exports_with_dynamic_shapes(precision, int8_pair, fp8_pair):
    """The GPU engine exports the conv GEMM (quantize, int8-bit gather, GEMM) with dynamic batch and
    sides: it must trace without guards that pin them, and agree with eager at other sizes."""
    _, real, _ = int8_pair if precision == "int8" else fp8_pair
    conv = next(m for m in real.modules() if isinstance(m, qm.QuantConv2d) and m.gemm_ok and m.kernel_size == (3, 3))
    conv.use_gemm = True
    try:
        x = torch.randn(2, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
        dims = {0: torch.export.Dim("b", min=1, max=8), 2: 2 * torch.export.Dim("h", min=2, max=16),
                3: 2 * torch.export.Dim("w", min=2, max=16)}
        program = torch.export.export(conv, (x,), dynamic_shapes=({**dims},))
        for shape in [(2, 8, 8), (3, 12, 6), (1, 4, 32)]:
            y = torch.randn(shape[0], conv.in_channels, *shape[1:], generator=torch.Generator().manual_seed(2))
            assert torch.equal(program.module()(y), conv(y)), shape
    finally:
        conv.use_gemm = None


def test_engine_loads_without_the_runner_pools_thread_sync(tmp_path, monkeypatch):
    """The default AOTInductor runner pool records and waits on CUDA events around each call, which a
    CUDA graph capture forbids (on the H200: 'operation not permitted when stream is capturing')."""
    calls = []
    monkeypatch.setattr(te.torch._inductor, "aoti_load_package", lambda path, **kw: calls.append(kw) or "runner")
    import zipfile

    with zipfile.ZipFile(tmp_path / "engine.pt2", "w") as archive:  # a stand-in AOTInductor package
        archive.writestr("engine/data/aotinductor/model/x.so", "")
    assert te.load_engine(tmp_path / "engine.pt2") == "runner"
    assert calls == [{"run_single_threaded": True}]


def test_inductor_settings_go_to_the_aotinductor_build(tmp_path, monkeypatch):
    """engine.inductor reaches aoti_compile_and_package beside the stage's own metadata, and is recorded."""
    seen = {}

    def fake_build(program, package_path, inductor_configs):
        seen.update(inductor_configs)
        Path(package_path).write_bytes(b"package")

    monkeypatch.setattr(te.torch._inductor, "aoti_compile_and_package", fake_build)
    unet = tiny_sdxl_unet()
    info = te.package_engine(unet, unet_inputs(2, 1), tmp_path / "engine.pt2", dynamic=False, log=lambda *_: None,
                             inductor={"max_autotune": True})
    assert seen["max_autotune"] is True and set(seen) == {"max_autotune", "aot_inductor.metadata"}
    assert info["inductor"] == {"max_autotune": True} and (tmp_path / "engine.pt2").read_bytes() == b"package"
    with pytest.raises(ConfigError, match="'engine.inductor.max_autotune': takes a bool"):
        te.package_engine(unet, unet_inputs(2, 1), tmp_path / "other.pt2", dynamic=False, inductor={"max_autotune": 1})
    assert not (tmp_path / "other.pt2").exists()


@pytest.mark.parametrize("choice, capability, has_triton, kernel", [
    ("auto", (9, 0), True, "triton"),     # Hopper: cuBLASLt's int8 GEMM is an Ampere kernel there
    ("auto", (10, 0), True, "triton"),
    ("auto", (8, 0), True, "int_mm"),     # Ampere keeps cuBLASLt's native kernel
    ("auto", (9, 0), False, "int_mm"),
    ("triton", (8, 0), True, "triton"),
    ("triton-tma", (9, 0), True, "triton-tma"),
    ("int_mm", (9, 0), True, "int_mm"),
])
def test_int8_gemm_kernel_for_a_gpu(monkeypatch, choice, capability, has_triton, kernel):
    from quantdiff.engines import gemm8

    monkeypatch.setattr(gemm8.torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: has_triton)
    assert gemm8.resolve_int8_gemm(choice, "cuda") == kernel


@pytest.mark.parametrize("capability, python_ops, has_cudnn, kernel", [
    ((9, 0), True, True, "cudnn"),     # torch.compile or the export format, the frontend installed
    ((9, 0), False, True, "triton"),   # an AOTInductor package cannot hold cuDNN's Python ops
    ((9, 0), True, False, "triton"),   # no nvidia-cudnn-frontend: auto is Triton, not an error
    ((8, 0), True, True, "int_mm"),    # cuDNN's int8 is not measured before Hopper
])
def test_int8_gemm_auto_is_cudnn_where_python_ops_run(monkeypatch, capability, python_ops, has_cudnn, kernel):
    from quantdiff.engines import cudnn_int8, gemm8

    monkeypatch.setattr(gemm8.torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: True)
    monkeypatch.setattr(cudnn_int8, "available", lambda device: has_cudnn)
    assert gemm8.resolve_int8_gemm("auto", "cuda", python_ops) == kernel
    assert gemm8.resolve_kernels("int8", "cuda", python_ops=python_ops)["int8_gemm"] == kernel
    assert gemm8.resolve_int8_gemm("auto", "cpu", python_ops) == "int_mm"


def test_int8_gemm_refusals_and_the_cpu(monkeypatch):
    from quantdiff.engines import gemm8
    from quantdiff.errors import MissingBackendError

    assert {gemm8.resolve_int8_gemm(c, "cpu") for c in gemm8.INT8_GEMM_CHOICES} == {"int_mm"}
    with pytest.raises(ConfigError, match="int8 GEMM 'cutlass' is not one of auto, triton, triton-tma, int_mm"):
        gemm8.resolve_int8_gemm("cutlass", "cpu")
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: False)
    with pytest.raises(MissingBackendError, match="engine.int8_gemm is triton, but the triton package is not "
                                                  "installed .* or set engine.int8_gemm: int_mm"):
        gemm8.resolve_int8_gemm("triton", "cuda")
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: True)
    monkeypatch.setattr(gemm8.torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    with pytest.raises(MissingBackendError, match=r"triton-tma, which needs Hopper's TMA .compute capability 9.0 or "
                                                  r"newer; this GPU has \(8, 9\)."):
        gemm8.resolve_int8_gemm("triton-tma", "cuda")


def test_fp8_engine_build_records_its_attention(tmp_path, monkeypatch, fp8_pair):
    """engine.fp8_attention reaches engine_torch.json; on the CPU the attention is SDPA whatever the setting."""
    monkeypatch.setattr(te.torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path, inductor_configs: Path(package_path).write_bytes(b"package"))
    info = te.build_torch_engine(copy.deepcopy(fp8_pair[0]), "fp8", unet_inputs(2, 1), tmp_path / "engine.pt2",
                                 dynamic=False, log=lambda *_: None, fp8_attention="triton", self_check=False)
    assert info["fp8_attention"] == {"setting": "triton", "kernel": "sdpa"}
    assert "int8_gemm" not in info and info["counts"]["attention_fp8"] == 8


def test_int8_engine_build_sets_and_records_its_gemm(tmp_path, monkeypatch, int8_pair):
    """engine.int8_gemm and engine.conv_patches reach the 8-bit modules and engine_torch.json; on the
    CPU the kernels are torch._int_mm and Inductor's patches whatever the setting."""
    monkeypatch.setattr(te.torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path, inductor_configs: Path(package_path).write_bytes(b"package"))
    fake = copy.deepcopy(int8_pair[0])
    info = te.build_torch_engine(fake, "int8", unet_inputs(2, 1), tmp_path / "engine.pt2", dynamic=False,
                                 log=lambda *_: None, int8_gemm="triton", conv_patches="triton", self_check=False)
    assert info["int8_gemm"] == {"setting": "triton", "kernel": "int_mm"}
    assert info["conv_patches"] == {"setting": "triton", "kernel": "inductor"}
    assert "fp8_attention" not in info  # an int8 engine has none
    real = copy.deepcopy(int8_pair[1])
    assert qm.set_int8_gemm(real, "int_mm") == len(real_modules(real)) > 0
    assert {m.int8_gemm for _, m in real_modules(real)} == {"int_mm"}
    for bad, message in (({"int8_gemm": "fast"}, "'fast' is not one of"), ({"conv_patches": "fast"}, "'fast' is not one of"),
                         ({"int8_gemm": "triton-tma"}, "engine.int8_gemm is triton-tma, which the torch engine .an "
                                                       "AOTInductor package. does not take"),
                         ({"geglu": "triton"}, "engine.geglu is triton, which the torch engine")):
        with pytest.raises(ConfigError, match=message):
            te.build_torch_engine(copy.deepcopy(int8_pair[0]), "int8", unet_inputs(2, 1), tmp_path / "other.pt2",
                                  dynamic=False, log=lambda *_: None, self_check=False, **bad)
    assert not (tmp_path / "other.pt2").exists()


def test_engine_build_lets_auto_take_python_ops_in_the_export_format_only(tmp_path, monkeypatch, int8_pair):
    """engine.int8_gemm: auto may resolve to cuDNN's Python ops in the export format, never for an
    AOTInductor package (gemm8.resolve_int8_gemm's python_ops)."""
    from quantdiff.engines import gemm8

    seen = []

    def resolve(precision, device, *settings, python_ops=False):
        seen.append(python_ops)
        return {"conv_patches": "inductor", "geglu": "inductor", "int8_gemm": "cudnn" if python_ops else "triton"}
    monkeypatch.setattr(gemm8, "resolve_kernels", resolve)
    monkeypatch.setattr(te, "package_engine", lambda unet, *a, **kw: {"format": kw["torch_format"]})
    for torch_format, kernel in (("export", "cudnn"), ("aoti", "triton")):
        info = te.build_torch_engine(copy.deepcopy(int8_pair[0]), "int8", unet_inputs(2, 1), tmp_path / "engine.pt2",
                                     log=lambda *_: None, torch_format=torch_format)
        assert info["int8_gemm"]["setting"] == "auto" and info["int8_gemm"]["kernel"] == kernel
        assert ("tile" in info["int8_gemm"]) == (kernel == "triton")  # the Triton GEMM's tile is recorded
    assert seen == [True, False]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("kernel", ["triton", "implicit"])
@torch.no_grad()
def test_conv_gemm_with_the_triton_kernels_is_the_same(precision, kernel, int8_pair, fp8_pair, monkeypatch):
    """engine.conv_patches: triton swaps only who writes the patch matrix, implicit has the Triton
    conv read the windows from the image (Triton's interpreter on the CPU here, where the setting
    otherwise resolves to Inductor's view): the same output, bit for bit for int8 (exact sums)."""
    from quantdiff.engines import gemm8, triton_conv

    _, real, _ = int8_pair if precision == "int8" else fp8_pair
    convs = [m for m in real.modules() if isinstance(m, qm.QuantConv2d) and m.gemm_ok]
    assert qm.set_conv_patches(real, "inductor") == len(convs) + 2  # conv_in and conv_out too
    resolve = gemm8.resolve_conv_patches
    monkeypatch.setattr(gemm8, "resolve_conv_patches", lambda choice, device: choice)  # as on a GPU
    chosen = convs[:1] + [m for m in convs if m.stride == (2, 2)][:1]
    if kernel == "implicit":
        assert {triton_conv.fits(c.in_channels, precision) for c in chosen} == {True}  # not the fallback
    for conv in chosen:
        x = torch.randn(2, conv.in_channels, 9, 7, generator=torch.Generator().manual_seed(3))
        conv.use_gemm = True
        try:
            expected = conv(x)
            conv.conv_patches = kernel
            out = conv(x)
        finally:
            conv.use_gemm, conv.conv_patches = None, "inductor"
        if precision == "int8" or kernel == "triton":
            assert torch.equal(out, expected)
        else:  # Triton's fp8 MMA against the emulated cuBLASLt GEMM: float32 sums in another order
            assert torch.allclose(out, expected, rtol=1e-3, atol=1e-3)
    qm.set_conv_patches(real, "auto")  # the fixture's setting, as built
    assert resolve("triton", "cpu") == "inductor"


def test_conv_patches_choice(monkeypatch):
    from quantdiff.engines import gemm8
    from quantdiff.errors import MissingBackendError

    assert {gemm8.resolve_conv_patches(c, "cpu") for c in gemm8.CONV_PATCHES_CHOICES} == {"inductor"}
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: True)
    assert gemm8.resolve_conv_patches("triton", "cuda") == "triton"
    assert gemm8.resolve_conv_patches("inductor", "cuda") == "inductor"
    assert gemm8.resolve_conv_patches("auto", "cuda") == "triton"
    assert gemm8.resolve_conv_patches("implicit", "cuda") == "implicit"
    with pytest.raises(ConfigError, match="conv patches 'cuda' is not one of auto, triton, inductor, implicit"):
        gemm8.resolve_conv_patches("cuda", "cpu")
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: False)
    with pytest.raises(MissingBackendError, match="engine.conv_patches is triton, but the triton package"):
        gemm8.resolve_conv_patches("triton", "cuda")
    with pytest.raises(MissingBackendError, match="engine.conv_patches is implicit, but the triton package"):
        gemm8.resolve_conv_patches("implicit", "cuda")


def test_fp8_attention_choice(monkeypatch):
    from quantdiff.engines import gemm8
    from quantdiff.errors import MissingBackendError

    assert {gemm8.resolve_fp8_attention(c, "cpu") for c in gemm8.FP8_ATTENTION_CHOICES} == {"sdpa"}
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: True)
    monkeypatch.setattr(gemm8.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert [gemm8.resolve_fp8_attention(c, "cuda") for c in gemm8.FP8_ATTENTION_CHOICES] == [
        "triton", "sdpa", "triton", "triton-fp8-probs"]
    monkeypatch.setattr(gemm8.torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert gemm8.resolve_fp8_attention("auto", "cuda") == "sdpa"  # Ada: fp8, but the kernel is untimed there
    assert gemm8.resolve_fp8_attention("triton", "cuda") == "triton"
    with pytest.raises(ConfigError, match="fp8 attention 'flash' is not one of auto, sdpa, triton, triton-fp8-probs"):
        gemm8.resolve_fp8_attention("flash", "cpu")
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: False)
    with pytest.raises(MissingBackendError, match="engine.fp8_attention is triton, but the triton package"):
        gemm8.resolve_fp8_attention("triton", "cuda")
    with pytest.raises(MissingBackendError, match="engine.fp8_attention is triton-fp8-probs, but the triton"):
        gemm8.resolve_fp8_attention("triton-fp8-probs", "cuda")
    assert gemm8.resolve_kernels("fp8", "cpu", fp8_attention="triton") == {"conv_patches": "inductor",
                                                                           "fp8_attention": "sdpa", "geglu": "inductor"}
    assert "fp8_attention" not in gemm8.resolve_kernels("int8", "cpu")
    assert gemm8.resolve_conv_patches("auto", "cuda") == "inductor"  # the defaults never fail for want of triton
    assert gemm8.resolve_fp8_attention("auto", "cuda") == "sdpa"


def test_geglu_choice(monkeypatch):
    from quantdiff.engines import gemm8
    from quantdiff.errors import MissingBackendError

    assert {gemm8.resolve_geglu(c, "cpu") for c in gemm8.GEGLU_CHOICES} == {"inductor"}
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: True)
    monkeypatch.setattr(gemm8.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert [gemm8.resolve_geglu(c, "cuda") for c in gemm8.GEGLU_CHOICES] == ["inductor", "triton", "triton-pointwise",
                                                                              "inductor"]
    with pytest.raises(ConfigError, match="GEGLU 'fused' is not one of auto, triton, triton-pointwise, inductor"):
        gemm8.resolve_geglu("fused", "cpu")
    monkeypatch.setattr(gemm8.torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert gemm8.resolve_geglu("triton-pointwise", "cuda") == "triton-pointwise"  # nothing of Hopper's in it
    with pytest.raises(MissingBackendError, match=r"engine.geglu is triton, which needs Hopper's TMA .compute "
                                                  r"capability 9.0 or newer; this GPU has \(8, 9\)\); set engine.geglu"):
        gemm8.resolve_geglu("triton", "cuda")
    monkeypatch.setattr(gemm8.triton_gemm, "available", lambda device: False)
    with pytest.raises(MissingBackendError, match="engine.geglu is triton, but the triton package"):
        gemm8.resolve_geglu("triton", "cuda")
    with pytest.raises(MissingBackendError, match="engine.geglu is triton-pointwise, but the triton package"):
        gemm8.resolve_geglu("triton-pointwise", "cuda")
    assert gemm8.resolve_kernels("int8", "cuda", int8_gemm="int_mm", conv_patches="inductor")["geglu"] == "inductor"


def test_a_crashing_check_process_says_where(tmp_path):
    """The engine self-check's process runs with faulthandler: one that a segfault kills (as an int8
    package did on an H200) reports the crash and its innermost Python frames, not an empty tail."""
    import os
    import subprocess
    import sys

    from quantdiff.engines.check import failure_lines

    script = tmp_path / "crash.py"
    script.write_text("import ctypes\n\ndef run_package():\n    ctypes.string_at(0)\n\nrun_package()\n")
    proc = subprocess.run([sys.executable, str(script)], env=dict(os.environ, PYTHONFAULTHANDLER="1"),
                          capture_output=True, text=True)
    assert proc.returncode == -11
    said = failure_lines(proc)
    assert said[0] == "Fatal Python error: Segmentation fault"
    assert any("line 4 in run_package" in line for line in said), said
    plain = subprocess.run([sys.executable, "-c", "raise SystemExit('no engine here')"], capture_output=True, text=True)
    assert failure_lines(plain) == ["no engine here"]


# Stands in for the check process: dies of a segfault, before the package could have loaded where
# CRASH is "load" (for every package, or only for the one named engine.pt2), after where it is
# "run"; otherwise it is the real check process.
FAKE_CHECK = """
import ctypes, os, runpy, sys
crash, only_engine = os.environ["CRASH"], os.environ.get("ONLY_ENGINE") == "1"
if crash == "load" and (sys.argv[1].endswith("engine.pt2") or not only_engine):
    ctypes.string_at(0)
if crash == "run":
    print("quantdiff-check: package loaded", flush=True)
    ctypes.string_at(0)
sys.argv[0] = "check"
runpy.run_module("quantdiff.engines.check", run_name="__main__")
"""


@pytest.mark.parametrize("crash, only_engine, kind, verdict", [
    ("run", False, "aoti", r"did not run on the build's example inputs \(exit status -11\): Fatal Python error: "
                           r"Segmentation"),
    ("load", True, "aoti", r"did not load \(exit status -11\): Fatal Python error: Segmentation fault.*\. A one-linear "
                           r"AOTInductor package built here for comparison loads, so it is this engine's package"),
    ("load", False, "aoti", r"did not load \(exit status -11\).*\. So did a one-linear AOTInductor package built here "
                            r"for comparison \(Fatal Python error: Segmentation fault.*\): torch .* cannot load "
                            r"AOTInductor packages on this machine, whatever they hold.*Set engine.torch_format: export"),
    # a torch.export program has no package loader to blame: no comparison
    ("load", False, "export", r"did not load \(exit status -11\): Fatal Python error: Segmentation fault / File .*fake_check.py\", "
                              r"line 5 in <module>$"),
])
def test_a_check_process_that_crashes_says_whether_loading_or_running(tmp_path, monkeypatch, crash, only_engine,
                                                                        kind, verdict):
    """A package that kills the check process while loading is told apart from one that kills it
    running, and compared with a one-linear package built on the spot (on an H100 with torch 2.11
    every CUDA package crashed the loader, docs/PERF.md): the error says whether it is the engine or
    this machine's torch. A crash while running needs no probe."""
    import sys

    from quantdiff.engines import check
    from quantdiff.errors import EngineOutputError

    fake = tmp_path / "fake_check.py"
    fake.write_text(FAKE_CHECK)
    monkeypatch.setattr(check, "CHECK_COMMAND", [sys.executable, str(fake)])
    monkeypatch.setenv("CRASH", crash)
    monkeypatch.setenv("ONLY_ENGINE", "1" if only_engine else "0")
    probes = []
    real_probe = check.probe_package_loading
    monkeypatch.setattr(check, "probe_package_loading", lambda *a: probes.append(a) or real_probe(*a))
    import zipfile

    engine = tmp_path / "engine.pt2"
    with zipfile.ZipFile(engine, "w") as archive:  # what engine_format reads of either kind
        archive.writestr("engine/data/aotinductor/model/x.so" if kind == "aoti" else "engine/models/model.json", "")
    with pytest.raises(EngineOutputError, match=r"engine\.pt2: the packaged engine " + verdict):
        check.packaged_outputs(engine, [(torch.zeros(2, 3),)], engine)
    assert probes == ([(torch.device("cpu"), torch.float32)] if crash == "load" and kind == "aoti" else [])


def test_probe_says_whether_packages_load_here():
    """`python -m quantdiff.engines.check --probe`: the one-linear package of the self-check's
    comparison, as a command to run on a new machine before building engines there."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "quantdiff.engines.check", "--probe", "cpu"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"a one-linear AOTInductor package on cpu (torch {torch.__version__}) loads"
