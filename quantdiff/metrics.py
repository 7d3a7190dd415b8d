"""Image and tensor quality metrics, latency summaries, and JSON-safe numbers for bench.json.

PSNR and SSIM compare the 8-bit pipeline's images with the FP16 images of the same prompt and
seed; SQNR compares the UNet's noise predictions step by step.

SSIM follows Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from error
visibility to structural similarity", as in their reference MATLAB code:
  - an 11x11 Gaussian window, sigma 1.5, normalised to sum 1;
  - K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2 with L the data range (255 for uint8);
  - local means, variances and covariance are window-weighted (population, not sample, moments);
  - the SSIM map is computed only where the window fits inside the image ("valid" filtering,
    no padding), and its mean is the image's SSIM;
  - colour images: SSIM per channel (R, G, B separately), then the mean of the channels.
No downsampling is applied (the paper's optional step for large viewing distances).

JSON has no Infinity, so `json_number` writes +inf as the string "inf". Identical images have
infinite PSNR; means over lists containing "inf" are taken over the finite values only (so one
identical image does not hide the error of the others) and are "inf" only when every value is;
`quality_summary` also reports how many images were identical.
"""
import math

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_array(image):
    """A PIL image or array as float64 HxW or HxWxC."""
    return np.asarray(image, dtype=np.float64)


def _as_pair(reference, test):
    ref, tst = _as_array(reference), _as_array(test)
    if ref.shape != tst.shape:
        raise ValueError(f"images differ in shape: reference {ref.shape}, test {tst.shape}")
    if ref.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {ref.shape}")
    return ref, tst


def psnr(reference, test, data_range=255.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(L^2 / MSE) over all pixels and channels.

    Returns inf when the images are identical.
    """
    ref, tst = _as_pair(reference, test)
    mse = float(np.mean((ref - tst) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """1-D Gaussian weights summing to 1; the 2-D window is their outer product (separable)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-(x**2) / (2.0 * sigma**2))
    return w / w.sum()


def _filter_valid(image, weights):
    """Separable 'valid' filtering of a 2-D array: weighted window sums where the window fits."""
    k = len(weights)
    rows = sum(w * image[i : image.shape[0] - k + 1 + i, :] for i, w in enumerate(weights))
    return sum(w * rows[:, i : rows.shape[1] - k + 1 + i] for i, w in enumerate(weights))


def _ssim_channel(x, y, c1, c2, weights):
    mu_x, mu_y = _filter_valid(x, weights), _filter_valid(y, weights)
    var_x = _filter_valid(x * x, weights) - mu_x * mu_x
    var_y = _filter_valid(y * y, weights) - mu_y * mu_y
    cov_xy = _filter_valid(x * y, weights) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


def ssim(reference, test, data_range=255.0) -> float:
    """Mean structural similarity (Wang et al. 2004; see the module docstring for the exact recipe).

    Both images must be at least 11x11. Returns exactly 1.0 for identical images.
    """
    ref, tst = _as_pair(reference, test)
    if ref.shape[0] < SSIM_WINDOW or ref.shape[1] < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {ref.shape[:2]}")
    if np.array_equal(ref, tst):
        return 1.0  # exact by definition; skips float rounding in the map
    if ref.ndim == 2:
        ref, tst = ref[..., None], tst[..., None]
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    weights = _gaussian_window()
    per_channel = [_ssim_channel(ref[..., c], tst[..., c], c1, c2, weights) for c in range(ref.shape[2])]
    return float(np.mean(per_channel))


def _as_float64(values):
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64)


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2).

    Takes torch tensors or numpy arrays of the same shape. Returns inf when they are equal.
    Raises ValueError when the reference is all zeros but the test is not (no signal to compare).
    """
    ref, tst = _as_float64(reference), _as_float64(test)
    if ref.shape != tst.shape:
        raise ValueError(f"tensors differ in shape: reference {ref.shape}, test {tst.shape}")
    for name, values in (("reference", ref), ("test", tst)):
        if not np.all(np.isfinite(values)):  # NaN would pass every comparison below as a number
            raise ValueError(f"SQNR is undefined: the {name} has {int(np.sum(~np.isfinite(values)))} non-finite values")
    noise = float(np.sum((ref - tst) ** 2))
    if noise == 0.0:
        return math.inf
    signal = float(np.sum(ref**2))
    if signal == 0.0:
        raise ValueError("SQNR is undefined: the reference is all zeros and the test is not")
    return 10.0 * math.log10(signal / noise)


def summarize_latency(samples_ms) -> dict:
    """{median, p10, p90, n} of latency samples in milliseconds (numpy percentiles, linear)."""
    samples = np.asarray(list(samples_ms), dtype=np.float64)
    if samples.size == 0:
        raise ValueError("no latency samples: latency is only reported where it was measured")
    if not np.all(np.isfinite(samples)) or np.any(samples < 0):
        raise ValueError(f"latency samples must be finite and >= 0, got {samples.tolist()}")
    p10, median, p90 = np.percentile(samples, [10, 50, 90], method="linear")
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "n": int(samples.size)}


def json_number(x):
    """A float for JSON: +inf becomes the string "inf" (JSON has no Infinity). "inf" passes through.

    NaN and -inf have no place in bench.json and raise ValueError.
    """
    if isinstance(x, str):
        if x == "inf":
            return x
        raise ValueError(f"expected a number or 'inf', got {x!r}")
    x = float(x)
    if math.isnan(x) or x == -math.inf:
        raise ValueError(f"{x} cannot be written to bench.json")
    return "inf" if x == math.inf else x


def from_json_number(x) -> float:
    """Inverse of json_number: "inf" back to float inf."""
    return math.inf if x == "inf" else float(x)


def mean_finite(values) -> float:
    """Mean of the finite values; inf when every value is inf. See the module docstring for why.
    A NaN is an error, never dropped: it is no measurement, and dropping it could turn a list of
    NaNs into "inf", the value of identical images."""
    values = [from_json_number(v) for v in values]
    if not values:
        raise ValueError("mean of an empty list")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"a NaN among the values to average: {values}")
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.inf
    return float(np.mean(finite))


def quality_summary(ref_images, test_images, sqnr_by_step) -> dict:
    """Quality block for bench.json, JSON-ready (inf written as "inf").

    ref_images / test_images: same-length sequences of uint8 HxWxC arrays or PIL images, pairwise
    the same prompt and seed. sqnr_by_step: SQNR (dB) of the noise prediction per denoising step.
    Returns psnr_db, psnr_db_mean, ssim, ssim_mean, sqnr_db_by_step, sqnr_db_mean and
    identical_images (how many pairs had infinite PSNR). The caller adds `meaningful` and `note`.
    """
    ref_images, test_images, sqnr_by_step = list(ref_images), list(test_images), list(sqnr_by_step)
    if len(ref_images) != len(test_images):
        raise ValueError(f"{len(ref_images)} reference images but {len(test_images)} test images")
    if not ref_images:
        raise ValueError("quality needs at least one image pair")
    if not sqnr_by_step:
        raise ValueError("quality needs the SQNR of at least one denoising step")
    psnrs = [psnr(r, t) for r, t in zip(ref_images, test_images)]
    ssims = [ssim(r, t) for r, t in zip(ref_images, test_images)]
    sqnrs = [from_json_number(v) for v in sqnr_by_step]
    return {
        "psnr_db": [json_number(v) for v in psnrs],
        "psnr_db_mean": json_number(mean_finite(psnrs)),
        "ssim": ssims,
        "ssim_mean": float(np.mean(ssims)),
        "sqnr_db_by_step": [json_number(v) for v in sqnrs],
        "sqnr_db_mean": json_number(mean_finite(sqnrs)),
        "identical_images": sum(1 for v in psnrs if v == math.inf),
    }
