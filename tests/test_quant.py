"""Quant levels, the step-range percentile calibrator, calibration records and save/restore."""

import pytest
import torch
import torch.nn as nn

from quantdiff.errors import ConfigError, CorruptArtifactError
from quantdiff.quant.calibrators import StepClock, StepRangePercentileCalibrator, step_range_amax
from quantdiff.quant.levels import check_level, count_by_kind, fp8_attention_layers, quantized_layers

from conftest import quick_settings, restored_twice

EXCLUDE = "(time_embedding|add_embedding|conv_in|conv_out|conv_shortcut|time_emb_proj)"
NEVER = ("conv_in", "conv_out", "conv_shortcut", "time_embedding", "add_embedding", "time_emb_proj")


@pytest.fixture(scope="module")
def tiny_unet(tiny_xl_dir):
    from quantdiff.models import load_unet

    return load_unet(tiny_xl_dir)


@pytest.fixture(scope="module")
def sdxl_meta_unet():
    from quantdiff.models import arch_unet

    return arch_unet("sdxl-base-1.0", device="meta")


# tiny-xl: 2 + 3 + 3 resnets' convs plus resamplers; 8 transformer blocks (ff: 2 linears,
# attn1/attn2: 3 projections each, to_out) and 3 transformer models (proj_in, proj_out).
TINY_XL_COUNTS = {1: {"conv": 26}, 2: {"conv": 26, "ff": 24}, 2.5: {"conv": 26, "ff": 24, "qkv": 72},
                  3: {"conv": 26, "ff": 24, "qkv": 72, "linear": 36}}
# SDXL base: 70 transformer blocks in 11 transformer models; 19 resnets (38 convs) less
# shortcuts, plus 2 downsamplers and 2 upsamplers.
SDXL_COUNTS = {1: {"conv": 38}, 2: {"conv": 38, "ff": 140}, 2.5: {"conv": 38, "ff": 140, "qkv": 420},
               3: {"conv": 38, "ff": 140, "qkv": 420, "linear": 162}}


@pytest.mark.parametrize("level", [1, 2, 2.5, 3, 4])
def test_tiny_xl_layer_sets(tiny_unet, level):
    layers = quantized_layers(tiny_unet, level, EXCLUDE)
    assert count_by_kind(layers) == TINY_XL_COUNTS[min(level, 3)]
    assert not [n for n in layers if any(word in n for word in NEVER)]
    assert all(isinstance(tiny_unet.get_submodule(n), nn.Conv2d) == (k == "conv") for n, k in layers.items())


@pytest.mark.parametrize("level", [1, 2, 2.5, 3, 4])
def test_sdxl_layer_sets_on_meta(sdxl_meta_unet, level):
    layers = quantized_layers(sdxl_meta_unet, level, EXCLUDE)
    assert count_by_kind(layers) == SDXL_COUNTS[min(level, 3)]
    assert len(fp8_attention_layers(sdxl_meta_unet, level)) == (140 if level == 4 else 0)


def test_level_kinds_are_exact(tiny_unet):
    """Level 2.5 adds exactly to_q/to_k/to_v; level 2 exactly the ff linears."""
    l2, l25 = quantized_layers(tiny_unet, 2, EXCLUDE), quantized_layers(tiny_unet, 2.5, EXCLUDE)
    added = set(l25) - set(l2)
    assert {n.rsplit(".", 1)[1] for n in added} == {"to_q", "to_k", "to_v"}
    assert {n.split(".ff.", 1)[1] for n, k in l2.items() if k == "ff"} == {"net.0.proj", "net.2"}


def test_fp8_attention_needs_head_dim_multiple_of_16():
    from diffusers.models.attention_processor import Attention

    holder = nn.Module()
    holder.wide = Attention(query_dim=64, heads=4, dim_head=16)   # head_dim 16: kept
    holder.narrow = Attention(query_dim=64, heads=8, dim_head=8)  # head_dim 8: left in fp16
    assert fp8_attention_layers(holder, 4) == ["wide"]
    assert fp8_attention_layers(holder, 3) == []


def test_level_errors():
    with pytest.raises(ConfigError, match="exists for fp8 only"):
        check_level(4, "int8")
    with pytest.raises(ConfigError, match="quant level 5 does not exist"):
        check_level(5, "fp8")


# Per-step amax of one quantizer over two calibration batches, hand-made.
PER_STEP = {0: [3.0, 5.0], 1: [4.0, 2.0], 2: [1.0, 1.0], 3: [10.0, 10.0]}


@pytest.mark.parametrize("percentile, method, expected", [
    (0.5, "min-mean", 3.0),   # steps 0,1: means 4, 3 -> min 3
    (0.5, "min-max", 4.0),    # maxes 5, 4 -> min 4
    (0.5, "mean-max", 4.5),   # maxes 5, 4 -> mean 4.5
    (0.5, "max-max", 5.0),
    (1.0, "min-mean", 1.0),   # all four steps: means 4, 3, 1, 10 -> 1
    (0.25, "min-mean", 4.0),  # ceil(0.25 * 4) = 1 step
    (0.3, "min-mean", 3.0),   # ceil(1.2) = 2 steps
    (1.0, "max-max", 10.0),   # the plain max calibrator's answer
])
def test_step_range_amax_hand_values(percentile, method, expected):
    per_step = {s: [torch.tensor(v) for v in values] for s, values in PER_STEP.items()}
    assert step_range_amax(per_step, 4, percentile, method).item() == pytest.approx(expected)


def test_calibrator_collects_by_clock_step():
    clock = StepClock()
    calib = StepRangePercentileCalibrator(num_bits=8, axis=None, n_steps=4, percentile=0.5,
                                          collect_method="min-mean", clock=clock)
    for batch in range(2):
        clock.start_image()
        for step in range(4):
            clock.tick()
            x = torch.zeros(2, 3, 4, 4)
            x[0, 0, 0, 0] = -PER_STEP[step][batch]  # abs max is what counts
            calib.collect(x)
    assert sorted(calib.per_step) == [0, 1, 2, 3]
    assert calib.compute_amax().item() == pytest.approx(3.0)
    assert calib._calib_amax.item() == pytest.approx(10.0)  # the global max it replaces
    calib.reset()
    assert calib.per_step == {}


def test_calibrator_rejects_unknown_method():
    with pytest.raises(ValueError, match="collect_method"):
        StepRangePercentileCalibrator(collect_method="median")


@pytest.fixture(scope="module")
def calibrated(tiny_xl_dir, tmp_path_factory):
    from quantdiff.quant.calibrate import calibrate

    out = tmp_path_factory.mktemp("calib")
    record = calibrate(tiny_xl_dir, quick_settings("int8", 3), out / "calib.pt", out / "calib.json", log=lambda *a: None)
    return out, record


def test_calibration_record(calibrated):
    out, record = calibrated
    assert record["counts"] == {"conv": 26, "ff": 24, "qkv": 72, "linear": 36, "fp8_attention": 0}
    assert len(record["fused_scales"]) == 24  # one smoothing for each attention's q/k/v (k/v)
    assert len(record["layers"]) == 158 and (out / "calib.json").is_file()
    conv = record["layers"]["down_blocks.0.resnets.0.conv1"]
    assert conv["kind"] == "conv" and len(conv["input_amax_by_step"]) == 4
    # percentile 1.0, min-mean, one batch per step: amax is the smallest per-step amax.
    assert conv["input_amax"] == pytest.approx(min(conv["input_amax_by_step"]), rel=1e-6)
    assert conv["input_amax"] <= conv["input_amax_global_max"]
    q = record["layers"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q["kind"] == "qkv" and q["smoothquant"] is True and q["weight_amax_channels"] == 64
    assert record["settings"]["alpha"] == 0.8


def calibrated_with_and_without_fused_scales(model_dir, precision, level):
    """{fused_scales: (calibrated UNet, its fused groups)} for both settings, one seed."""
    from quantdiff.models import load_pipeline
    from quantdiff.quant.calibrate import quantize_unet

    out = {}
    for fused_scales in (True, False):
        torch.manual_seed(0)
        pipe = load_pipeline(model_dir, dtype=torch.float32, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        result = quantize_unet(pipe, quick_settings(precision, level, fused_scales=fused_scales), log=lambda *a: None)
        out[fused_scales] = pipe.unet, result[3]
    return out


@pytest.fixture(scope="module")
def fp8_level4_unets(tiny_xl_dir):
    return calibrated_with_and_without_fused_scales(tiny_xl_dir, "fp8", 4)


@pytest.fixture(scope="module")
def int8_level3_unets(tiny_xl_dir):
    return calibrated_with_and_without_fused_scales(tiny_xl_dir, "int8", 3)


def test_int8_projections_of_one_input_share_one_smoothing(int8_level3_unets):
    """fused_scales with SmoothQuant at a fixed alpha: each group gets one smoothing, SmoothQuant's
    formula over all its weights (ModelOpt's undo and apply), so its members quantize one input
    tensor: equal pre-quant scales and input amax. The function stays: smoothed weight times
    smoothing is the unsmoothed weight, as in the layer smoothed alone; per-channel weights."""
    from quantdiff.quant.smoothing import smoothing_scale

    (shared_unet, groups), (own_unet, _) = int8_level3_unets[True], int8_level3_unets[False]
    assert len(groups) == 24
    shared, own = dict(shared_unet.named_modules()), dict(own_unet.named_modules())
    differed = 0
    for name, members in groups.items():
        linears = [shared[f"{name}.{m}"] for m in members]
        alone = [own[f"{name}.{m}"] for m in members]
        scales = [m.input_quantizer.pre_quant_scale for m in linears]
        assert all(torch.equal(s, scales[0]) for s in scales), name
        assert all(torch.equal(m.input_quantizer.amax, linears[0].input_quantizer.amax) for m in linears), name
        differed += any(not torch.equal(a.input_quantizer.pre_quant_scale, alone[0].input_quantizer.pre_quant_scale)
                        for a in alone)
        unsmoothed = [a.weight * a.input_quantizer.pre_quant_scale for a in alone]
        for m, weight in zip(linears, unsmoothed):
            assert torch.allclose(m.weight * scales[0], weight, rtol=1e-5, atol=1e-6), name
            assert m.weight_quantizer.amax.numel() == m.out_features  # per output channel
            assert torch.equal(m.weight_quantizer.amax.reshape(-1), m.weight.abs().amax(dim=1)), name
        act_amax = alone[0].input_quantizer._amax_for_smoothing
        assert torch.allclose(scales[0], smoothing_scale(act_amax, torch.cat(unsmoothed), 0.8), rtol=1e-4), name
    assert differed == len(groups)  # each projection had its own smoothing before


def test_alpha_auto_keeps_each_layers_smoothing(tiny_xl_dir):
    """With `alpha: auto` every layer has its own alpha, which one smoothing cannot keep: int8
    groups are left as calibrated."""
    from quantdiff.models import load_pipeline
    from quantdiff.quant.calibrate import quantize_unet

    pipe = load_pipeline(tiny_xl_dir, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    _, _, alphas, fused = quantize_unet(pipe, quick_settings("int8", 2.5, alpha="auto"), log=lambda *a: None)
    assert len(alphas) == 24 + 72 and fused == {}


def test_fp8_projections_of_one_input_share_one_scale(fp8_level4_unets):
    """fused_scales: each self-attention's q/k/v (cross-attention's k/v) get the largest of their
    weight amaxes, and at level 4 the largest of their attention (bmm) amaxes; the input amaxes
    were equal already (one input); everything else is as calibrated without it."""
    (shared_unet, groups), (own_unet, none) = fp8_level4_unets[True], fp8_level4_unets[False]
    assert none == {}
    assert len(groups) == 24 and {tuple(v) for v in groups.values()} == {("to_q", "to_k", "to_v"), ("to_k", "to_v")}
    shared, own = dict(shared_unet.named_modules()), dict(own_unet.named_modules())
    for name, members in groups.items():
        assert members == (["to_k", "to_v"] if name.endswith("attn2") else ["to_q", "to_k", "to_v"])
        for role in ("weight_quantizer", "input_quantizer"):
            before = [getattr(own[f"{name}.{m}"], role).amax for m in members]
            after = [getattr(shared[f"{name}.{m}"], role).amax for m in members]
            assert all(torch.equal(a, torch.stack(before).amax()) for a in after), (name, role)
        before = [getattr(own[name], f"{m[-1]}_bmm_quantizer").amax for m in members]
        after = {float(getattr(shared[name], f"{m[-1]}_bmm_quantizer").amax) for m in members}
        assert after == {float(max(before))}, name
        if len(members) == 2:  # a cross-attention's query reads the image: its own scales
            assert torch.equal(shared[f"{name}.to_q"].weight_quantizer.amax, own[f"{name}.to_q"].weight_quantizer.amax)
    # the weight amaxes really differed: sharing changed something
    assert any(len({float(own[f"{n}.{m}"].weight_quantizer.amax) for m in ms}) > 1 for n, ms in groups.items())
    ff = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    assert torch.equal(shared[ff].weight_quantizer.amax, own[ff].weight_quantizer.amax)


def test_restore_is_bit_identical(calibrated, tiny_xl_dir):
    out, _ = calibrated
    _, _, (a, b, plain) = restored_twice(tiny_xl_dir, out / "calib.pt")
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)  # the fake quant is really there
    assert 0 < (a - plain).norm() / plain.norm() < 0.2


def test_truncated_checkpoint_is_a_clear_error(calibrated, tiny_xl_dir, tmp_path):
    from quantdiff.models import load_unet
    from quantdiff.quant.calibrate import restore_calibrated_unet

    out, _ = calibrated
    broken = tmp_path / "calib.pt"
    broken.write_bytes((out / "calib.pt").read_bytes()[:5000])
    with pytest.raises(CorruptArtifactError, match=r"calib.pt is corrupt or incomplete.*Delete it and rerun"):
        restore_calibrated_unet(load_unet(tiny_xl_dir), broken)


@pytest.fixture
def modelopt_extensions():
    from modelopt.torch.quantization import extensions

    loaders = (extensions.get_cuda_ext, extensions.get_cuda_ext_fp8)
    saved = [loader.__dict__.pop("extension", "unset") for loader in loaders]
    yield loaders
    for loader, value in zip(loaders, saved):
        loader.__dict__.pop("extension", None)
        if value != "unset":
            loader.extension = value


@pytest.mark.parametrize("env, builds", [(None, True), ("1", True), ("0", False)])
def test_modelopt_cuda_extension_switch(monkeypatch, modelopt_extensions, env, builds):
    from quantdiff.quant.recipe import MODELOPT_CUDA_EXT_ENV, modelopt_cuda_extensions_from_env

    if env is None:
        monkeypatch.delenv(MODELOPT_CUDA_EXT_ENV, raising=False)
    else:
        monkeypatch.setenv(MODELOPT_CUDA_EXT_ENV, env)
    said = []
    assert modelopt_cuda_extensions_from_env(said.append) is builds
    # Skipped: the loaders already hold "no extension", so ModelOpt never tries a build.
    assert [hasattr(loader, "extension") for loader in modelopt_extensions] == [not builds] * 2
    if not builds:
        assert all(loader() is None for loader in modelopt_extensions)
        assert len(said) == 1 and said[0].startswith(f"{MODELOPT_CUDA_EXT_ENV}=0")
    else:
        assert said == []
