"""Metrics against closed forms and a slow, direct SSIM reference."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from quantdiff.metrics import (
    json_number,
    mean_finite,
    psnr,
    quality_summary,
    sqnr_db,
    ssim,
    summarize_latency,
)


def _image(seed=0, size=32, low=20, high=200):
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, (size, size, 3), dtype=np.uint8)


def _smooth_image(size=64):
    """A gradient with gentle texture: low local variance, so heavy noise wrecks its structure."""
    y, x = np.mgrid[0:size, 0:size]
    base = 60 + 100 * x / size + 20 * np.sin(y / 5.0)
    return np.stack([base, base * 0.8 + 20, 200 - base * 0.5], axis=-1).astype(np.uint8)


def _slow_ssim_channel(x, y, data_range=255.0):
    """Wang et al. 2004 written out window by window: 11x11 Gaussian (sigma 1.5), valid positions."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_identical_images():
    a = _image()
    assert psnr(a, a.copy()) == math.inf
    assert ssim(a, a.copy()) == 1.0
    assert ssim(Image.fromarray(a), Image.fromarray(a)) == 1.0


@pytest.mark.parametrize("d", [1, 3, 17, 50])
def test_psnr_constant_shift_is_exact(d):
    a = _image(high=200)
    assert psnr(a, a + np.uint8(d)) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    assert psnr(Image.fromarray(a), Image.fromarray(a + np.uint8(d))) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)


def test_psnr_gaussian_noise_matches_realized_mse():
    a = _image(size=48, low=40, high=216)
    rng = np.random.default_rng(1)
    noisy = np.clip(a + rng.normal(0, 5, a.shape).round(), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - noisy) ** 2)
    assert psnr(a, noisy) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    assert psnr(a, noisy) == pytest.approx(20 * math.log10(255 / 5), abs=0.5)  # sigma 5 -> about 34 dB


def test_ssim_heavy_noise_is_low_and_symmetric():
    a = _smooth_image()
    rng = np.random.default_rng(2)
    noisy = np.clip(a + rng.normal(0, 60, a.shape), 0, 255).astype(np.uint8)
    forward, backward = ssim(a, noisy), ssim(noisy, a)
    assert forward < 0.5
    assert forward == pytest.approx(backward, abs=1e-12)


def test_ssim_constant_shift_of_flat_image_hand_value():
    # Flat c vs flat c+d: every variance and covariance is 0, so SSIM is the luminance term alone.
    c, d = 100.0, 20.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * c * (c + d) + c1) / (c**2 + (c + d) ** 2 + c1)
    a = np.full((11, 11, 3), c, dtype=np.uint8)
    assert ssim(a, a + np.uint8(d)) == pytest.approx(expected, abs=1e-12)


def test_ssim_matches_direct_reference():
    a = _image(seed=3, size=20)
    rng = np.random.default_rng(4)
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    expected = np.mean([_slow_ssim_channel(a[..., k].astype(float), b[..., k].astype(float)) for k in range(3)])
    assert ssim(a, b) == pytest.approx(expected, abs=1e-10)
    shifted = a + np.uint8(30)
    expected = np.mean([_slow_ssim_channel(a[..., k].astype(float), shifted[..., k].astype(float)) for k in range(3)])
    assert ssim(a, shifted) == pytest.approx(expected, abs=1e-10)


def test_ssim_rejects_small_or_mismatched():
    with pytest.raises(ValueError, match="11x11"):
        ssim(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 17, 3), np.uint8))


def test_sqnr_hand_values():
    ref = torch.tensor([3.0, 4.0])  # signal energy 25
    assert sqnr_db(ref, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))  # noise 1
    assert sqnr_db(ref.numpy(), np.array([2.0, 4.0])) == pytest.approx(10 * math.log10(25.0))
    assert sqnr_db(np.ones(4), np.full(4, 1.1)) == pytest.approx(20.0)  # 4 / (4 * 0.01) = 100
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf
    with pytest.raises(ValueError, match="all zeros"):
        sqnr_db(np.zeros(3), np.ones(3))


def test_summarize_latency_one_to_ten():
    assert summarize_latency([float(v) for v in range(1, 11)]) == pytest.approx(
        {"median": 5.5, "p10": 1.9, "p90": 9.1, "n": 10}
    )
    with pytest.raises(ValueError):
        summarize_latency([])


def test_json_number_and_means():
    assert json_number(math.inf) == "inf"
    assert json_number(np.float32(2.5)) == 2.5
    assert json_number("inf") == "inf"
    for bad in (math.nan, -math.inf):
        with pytest.raises(ValueError):
            json_number(bad)
    assert mean_finite([10.0, math.inf, 20.0]) == 15.0
    assert mean_finite(["inf", "inf"]) == math.inf


def test_quality_summary_is_json_ready():
    a, b = _image(seed=5), _image(seed=6)
    shifted = a + np.uint8(10)
    q = quality_summary([a, a], [a.copy(), shifted], [30.0, math.inf, "inf", 40.0])
    assert q["psnr_db"][0] == "inf"
    assert q["psnr_db"][1] == pytest.approx(20 * math.log10(25.5))
    assert q["psnr_db_mean"] == pytest.approx(q["psnr_db"][1])  # mean over finite values
    assert q["identical_images"] == 1
    assert q["ssim"][0] == 1.0 and q["ssim_mean"] == pytest.approx((1.0 + q["ssim"][1]) / 2)
    assert q["sqnr_db_by_step"] == [30.0, "inf", "inf", 40.0]
    assert q["sqnr_db_mean"] == 35.0
    json.dumps(q, allow_nan=False)
    with pytest.raises(ValueError):
        quality_summary([a], [a, b], [1.0])
