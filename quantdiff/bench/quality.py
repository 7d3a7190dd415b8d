"""Image quality of an 8-bit UNet against the fp16 reference images of the same prompts and seeds:
PSNR and SSIM per image, and the noise-prediction SQNR per denoising step on the very same latents."""
from pathlib import Path

from PIL import Image

from ..io import atomic_path
from ..metrics import quality_summary, sqnr_db
from .reference import generate, read_reference


class SQNRProbe:
    """Stands in for the pipeline's UNet: returns the engine's noise prediction and records its
    SQNR against the fp16 UNet evaluated on the very same latents, step by step."""

    def __init__(self, engine, reference_unet):
        self.engine, self.reference = engine, reference_unet
        self.by_step, self.step = [], 0

    def start_image(self):
        self.step = 0

    def __getattr__(self, name):  # config, dtype, device, add_embedding: as the engine has them
        return getattr(self.engine, name)

    def __call__(self, *args, **kwargs):
        out = self.engine(*args, **kwargs)
        ref = self.reference(*args, **kwargs)
        test_t, ref_t = out[0] if isinstance(out, tuple) else out.sample, ref[0] if isinstance(ref, tuple) else ref.sample
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
