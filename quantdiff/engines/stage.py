"""The engine stage for both backends: what the thin rule scripts call."""
import json
from pathlib import Path

import torch

from ..device import describe_device, require_cuda, require_fp8
from ..io import write_json
from .profile import opt_shape, optimization_profile, sample_ranges


def engine_device(precision):
    """GPU when present (fp16 activations); CPU otherwise, where 8-bit is emulated exactly in fp32."""
    if torch.cuda.is_available():
        if precision == "fp8":
            require_fp8("cuda")
        return "cuda", torch.float16
    return "cpu", torch.float32


def run_torch_engine(model_dir, ckpt, settings, out_path, record_path, log=print):
    from ..models import load_unet, unet_example_inputs
    from ..models.inputs import VAE_SCALE_FACTOR
    from ..quant.calibrate import restore_calibrated_unet
    from .torch import build_torch_engine

    precision = settings["precision"]
    device, dtype = engine_device(precision)
    profile = engine_profile(model_dir, settings)
    unet = load_unet(model_dir)
    if ckpt:
        restore_calibrated_unet(unet, ckpt)
    unet = unet.to(device=device, dtype=dtype).eval()
    batch, side = opt_shape(profile)  # built and tuned at the profile's opt point, like TensorRT
    example = unet_example_inputs(unet, batch, side * VAE_SCALE_FACTOR, dtype, device)
    # (the kernel settings are in `settings` only for the precisions they concern)
    kernels = {k: settings[k] for k in ("int8_gemm", "conv_patches", "fp8_attention", "geglu") if k in settings}
    info = build_torch_engine(unet, precision, example, out_path, log=log, ranges=sample_ranges(profile),
                              inductor=settings.get("inductor"), torch_format=settings.get("torch_format", "aoti"),
                              **kernels)
    record = {"backend": "torch", "precision": precision, "device": describe_device(device),
              "build": info, "profile": {k: list(v) for k, v in profile.items()}, "settings": settings}
    write_json(record_path, record)
    return record


def unet_config(model_dir):
    return json.loads((Path(model_dir) / "unet" / "config.json").read_text())


def engine_profile(model_dir, settings):
    """The (min, opt, max) UNet input shapes both backends build for (engine.batch, engine.resolution)."""
    return optimization_profile(settings["pipeline"], unet_config(model_dir), settings["resolution"],
                                settings["batch"], settings["resolution_range"], guidance=settings["guidance"])


def run_tensorrt_engine(model_dir, onnx_path, settings, out_path, record_path, log=print):
    from .tensorrt import build_plan, require_tensorrt

    require_tensorrt()
    require_cuda("engine (tensorrt)")
    profile = engine_profile(model_dir, settings)
    info = build_plan(onnx_path, out_path, settings["precision"], profile, settings["optimization_level"],
                      settings["timing_cache"], log=log)
    record = {"backend": "tensorrt", "precision": settings["precision"], "device": describe_device("cuda"),
              "build": info, "profile": {k: list(v) for k, v in profile.items()}, "settings": settings}
    write_json(record_path, record)
    return record
