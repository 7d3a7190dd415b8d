"""Per-layer SmoothQuant (`alpha: auto`): the alpha search on known layers, then on tiny-xl."""
import pytest
import torch

from quantdiff.quant.smoothing import (ALPHA_GRID, ActivationSampler, choose_alpha, fake_quant_int8, output_error,
                                       smoothing_scale)

from conftest import quick_settings, restored_twice


def test_fake_quant_int8_hand_values():
    x = torch.tensor([0.0, 0.5, 1.0, -1.0, 2.0, 0.004])
    # amax 1: step 1/127; 0.5 -> 63.5 -> 64 (half to even), 2.0 clamps to 127, 0.004 -> 0.508 -> 1
    assert torch.allclose(fake_quant_int8(x, torch.tensor(1.0)), torch.tensor([0, 64, 127, -127, 127, 1]) / 127)


def test_smoothing_scale_hand_values():
    act_amax, weight = torch.tensor([4.0, 1.0]), torch.tensor([[1.0, 0.25], [-0.5, 0.0]])  # |W| col max: 1, 0.25
    # s_j = w_j^(1-a) / x_j^a
    assert torch.allclose(smoothing_scale(act_amax, weight, 0.5), torch.tensor([1 / 2, 0.5 / 1]))
    assert torch.allclose(smoothing_scale(act_amax, weight, 0.0), torch.tensor([1.0, 0.25]))
    assert torch.allclose(smoothing_scale(act_amax, weight, 1.0), torch.tensor([0.25, 1.0]))
    # a dead channel (amax 0) keeps scale 1
    assert smoothing_scale(torch.tensor([0.0, 1.0]), weight, 0.5)[0] == 1


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(512, 64, generator=g), torch.randn(32, 64, generator=g) * 0.05
    x[:, 3] *= 60  # one channel with LLM-style outliers
    return x, w, x.abs().amax(dim=0)


def test_activation_outliers_want_a_large_alpha():
    x, w, act_amax = _layer()
    alpha, errors = choose_alpha(x, w, act_amax)
    assert set(errors) == set(ALPHA_GRID)
    assert alpha >= 0.5
    assert errors[alpha] < 0.2 * errors[0.0]  # smoothing really helps this layer
    assert errors[alpha] == min(errors.values())


def test_errors_do_not_depend_on_where_a_channel_factor_sits():
    # Smoothing divides out per-channel magnitude: an outlier channel in x or the same factor in
    # W's column is the same layer (same x·Wᵀ) and must get the same errors and alpha.
    x, w, act_amax = _layer()
    x2, w2 = x.clone(), w.clone()
    x2[:, 3] /= 60
    w2[:, 3] *= 60
    alpha, errors = choose_alpha(x, w, act_amax)
    alpha2, errors2 = choose_alpha(x2, w2, x2.abs().amax(dim=0))
    assert alpha == alpha2
    assert errors2 == pytest.approx(errors, rel=1e-3)


def test_output_error_is_zero_when_everything_sits_on_the_grid():
    # act and weight amax are 1 in every channel, so the scale is 1 for any alpha and values on
    # the k/127 grid quantize exactly.
    x = torch.tensor([[127.0, -64.0], [3.0, 127.0]]) / 127
    w = torch.tensor([[1.0, -1.0], [64 / 127, 1.0]])
    for alpha in (0.0, 0.5, 1.0):
        assert output_error(x, w, torch.ones(2), alpha) == pytest.approx(0.0, abs=1e-12)


def test_sampler_keeps_rows_from_every_call_and_detaches():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
    sampler = ActivationSampler(["0"], rows=6, calls=3, seed=0)
    with sampler.attached(lin):
        for i in range(3):
            lin(torch.full((2, 10, 8), float(i)))
    lin(torch.zeros(1, 8))  # after the block: not recorded
    assert [s.shape for s in sampler.samples["0"]] == [(2, 8)] * 3  # 6 rows over 3 calls
    rows = sampler.rows_of("0")
    assert rows.shape == (6, 8) and set(rows[:, 0].tolist()) == {0.0, 1.0, 2.0}  # every call is represented
    assert not lin[0]._forward_pre_hooks


@pytest.fixture(scope="module")
def auto_calibrated(tiny_xl_dir, tmp_path_factory):
    from quantdiff.quant.calibrate import calibrate

    out = tmp_path_factory.mktemp("auto")
    settings = quick_settings("int8", 3, alpha="auto")
    record = calibrate(tiny_xl_dir, settings, out / "calib.pt", out / "calib.json", log=lambda *a: None)
    return out, record


def test_auto_alpha_record_and_smoothing(auto_calibrated):
    _, record = auto_calibrated
    linears = {n: e for n, e in record["layers"].items() if e["kind"] != "conv"}
    assert len(linears) == 132  # ff 24 + qkv 72 + linear 36
    for entry in linears.values():
        errors = {float(a): e for a, e in entry["smoothquant_error_by_alpha"].items()}
        assert entry["smoothquant"] is True and entry["smoothquant_alpha"] in ALPHA_GRID
        assert errors[entry["smoothquant_alpha"]] == min(errors.values())
    assert len({e["smoothquant_alpha"] for e in linears.values()}) > 1  # really per layer
    assert not any("smoothquant_alpha" in e for e in record["layers"].values() if e["kind"] == "conv")


def test_auto_alpha_restores_identically_and_converts(auto_calibrated, tiny_xl_dir):
    from quantdiff.engines.qmodules import convert_to_real_quant

    out, _ = auto_calibrated
    restored, x, (a, b, plain) = restored_twice(tiny_xl_dir, out / "calib.pt")
    assert torch.equal(a, b)
    assert 0 < (a - plain).norm() / plain.norm() < 0.2
    real, counts = convert_to_real_quant(restored)
    with torch.no_grad():
        c = real(**x).sample
    assert counts["linear_int8"] == 132
    # Rounding flips compound through the net (as in test_torch_engine): the same bound as alpha 0.8.
    assert (c - a).norm() / a.norm() < 0.08
