"""The quality study: many 8-bit variants of one model, each against the same fp16 reference images.

A variant is a precision, a quant level and calibration overrides (config `study.variants`). Its
quality is measured on the calibrated fake-quant UNet itself: the torch engine and the TensorRT plan
are built from that UNet and emulate it (tests bound the difference), and skipping their build keeps
a dozen variants within minutes on a CPU. The report compares quant levels, plain max against
step-range percentile calibration, and global SmoothQuant alphas against `alpha: auto`
(quantdiff.bench.study_report, kept apart so that editing the report reruns no measurement).
"""
from pathlib import Path

from ..io import read_json, write_json
from .quality import architecture_only, compare_with_reference
from .reference import bench_device, evaluation_cases


def run_study_quality(model_dir, ckpt, reference_dir, settings, record_path, images_dir, log=print):
    """quality.json (+ images/) of one variant."""
    from ..models import load_pipeline, load_unet
    from ..quant.calibrate import restore_calibrated_unet

    device, dtype = bench_device()
    pipe = load_pipeline(model_dir, dtype=dtype, device=device)
    unet = load_unet(model_dir)
    restore_calibrated_unet(unet, ckpt)
    unet = unet.to(device=device, dtype=dtype).eval()
    cases = evaluation_cases(settings)
    log(f"study {settings['variant']}: {len(cases)} prompts x {settings['steps']} steps against the fp16 reference")
    quality, *_ = compare_with_reference(pipe, unet, cases, reference_dir, settings, images_dir,
                                         architecture_only(model_dir))
    calib = read_json(Path(ckpt).with_name("calib.json"))
    record = {"variant": settings["variant"], "model": settings["model"], "precision": settings["precision"],
              "quant_level": settings["quant_level"], "calibration": calib["settings"], "counts": calib["counts"],
              "alphas": alpha_summary(calib), "quality": quality, "device": device}
    write_json(record_path, record)
    log(f"study {settings['variant']}: PSNR {quality['psnr_db_mean']} dB, SSIM {quality['ssim_mean']:.4f}, "
        f"SQNR {quality['sqnr_db_mean']} dB")
    return record


def alpha_summary(calib):
    """Per-layer SmoothQuant alphas of an `alpha: auto` calibration: {alpha: number of layers}."""
    picked = [e["smoothquant_alpha"] for e in calib["layers"].values() if "smoothquant_alpha" in e]
    return {str(a): picked.count(a) for a in sorted(set(picked))}
