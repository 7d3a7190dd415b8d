"""Image quality of an 8-bit UNet against the fp16 reference images of the same prompts and seeds:
PSNR and SSIM per image, and the noise-prediction SQNR per denoising step on the very same latents."""
from pathlib import Path

import torch
from PIL import Image

from ..errors import EngineOutputError
from ..io import atomic_path
from ..metrics import quality_summary, sqnr_db
from .reference import generate, read_reference


def noise_prediction(out):
    """The tensor of a UNet call's output (a tuple, or diffusers' output class)."""
    return out[0] if isinstance(out, tuple) else out.sample


def require_finite(prediction, where):
    """Raise EngineOutputError unless every value of the engine's noise prediction is finite: a NaN
    image saved and scored would make a report that looks finished and means nothing."""
    bad = int((~torch.isfinite(prediction)).sum())
    if bad:
        raise EngineOutputError(
            f"the engine's noise prediction {where} has {bad} non-finite values of {prediction.numel()}: the engine "
            f"is broken, so no bench report is written. Rebuild it with the default engine.* kernel settings, and "
            f"report the settings it was built with (engine_torch.json).")


class SQNRProbe:
    """Stands in for the pipeline's UNet: returns the engine's noise prediction and records its
    SQNR against the fp16 UNet evaluated on the very same latents, step by step. A non-finite
    prediction stops the bench (require_finite)."""

    def __init__(self, engine, reference_unet):
        self.engine, self.reference = engine, reference_unet
        self.by_step, self.step, self.image = [], 0, -1

    def start_image(self):
        self.step = 0
        self.image += 1

    def __getattr__(self, name):  # config, dtype, device, add_embedding: as the engine has them
        return getattr(self.engine, name)

    def __call__(self, *args, **kwargs):
        out = self.engine(*args, **kwargs)
        test_t = noise_prediction(out)
        require_finite(test_t, f"at denoising step {self.step + 1} of image {self.image + 1}")
        ref_t = noise_prediction(self.reference(*args, **kwargs))
        if self.step == len(self.by_step):
            self.by_step.append([])
        self.by_step[self.step].append(sqnr_db(ref_t.float(), test_t.float()))
        self.step += 1
        return out


def mean_by_step(by_step):
    from ..metrics import mean_finite

    return [mean_finite(values) for values in by_step]


def architecture_only(model_dir):
    from ..models import read_model_info

    return bool(read_model_info(model_dir).get("architecture_only"))


def compare_with_reference(pipe, unet, cases, reference_dir, settings, images_dir, arch_only=False):
    """Generate every case with `unet` in `pipe` (whose own UNet is the fp16 reference model), save
    the images atomically into `images_dir`, and measure them against the reference images.

    Returns (quality dict, reference images, test images, per-image records)."""
    plain = pipe.unet
    probe = SQNRProbe(unet, plain)
    reference = read_reference(reference_dir)
    ref_images, test_images, records = [], [], []
    images_dir = Path(images_dir)
    try:
        with atomic_path(images_dir) as tmp:
            tmp.mkdir()
            for case, ref_case in zip(cases, reference["cases"]):
                probe.start_image()
                pipe.unet = probe
                image = generate(pipe, case["prompt"], case["seed"], settings)
                image.save(tmp / case["file"])
                test_images.append(image)
                ref_images.append(Image.open(Path(reference_dir) / ref_case["file"]).convert("RGB"))
                records.append({"prompt": case["prompt"], "seed": case["seed"],
                                "reference": str(Path(reference_dir) / ref_case["file"]),
                                "test": str(images_dir / case["file"])})
    finally:
        pipe.unet = plain
    quality = quality_summary(ref_images, test_images, mean_by_step(probe.by_step))
    quality["meaningful"] = not arch_only
    quality["note"] = ("random weights (architecture only): quality numbers are not meaningful" if arch_only
                       else f"against fp16 reference images of {len(cases)} held-out prompts, same seeds")
    return quality, ref_images, test_images, records
