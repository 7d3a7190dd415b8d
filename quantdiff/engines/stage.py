"""The engine stage for both backends: what the thin rule scripts call."""
import json
from pathlib import Path

import torch

from ..device import describe_device, require_cuda, require_fp8
from ..io import write_json

ENGINE_EXAMPLE_BATCH = 2  # one image with classifier-free guidance


def engine_device(precision):
    """GPU when present (fp16 activations); CPU otherwise, where 8-bit is emulated exactly in fp32."""
    if torch.cuda.is_available():
        if precision == "fp8":
            require_fp8("cuda")
        return "cuda", torch.float16
    return "cpu", torch.float32


def run_torch_engine(model_dir, ckpt, settings, out_path, record_path, log=print):
    from ..models import load_unet, unet_example_inputs
    from ..quant.calibrate import restore_calibrated_unet
    from .torch import build_torch_engine

    precision = settings["precision"]
    device, dtype = engine_device(precision)
    unet = load_unet(model_dir)
    if ckpt:
        restore_calibrated_unet(unet, ckpt)
    unet = unet.to(device=device, dtype=dtype).eval()
    example = unet_example_inputs(unet, ENGINE_EXAMPLE_BATCH, settings["resolution"], dtype, device)
    info = build_torch_engine(unet, precision, example, out_path, log=log)
    record = {"backend": "torch", "precision": precision, "device": describe_device(device),
              "build": info, "settings": settings}
    write_json(record_path, record)
    return record


def unet_config(model_dir):
    return json.loads((Path(model_dir) / "unet" / "config.json").read_text())


def run_tensorrt_engine(model_dir, onnx_path, settings, out_path, record_path, log=print):
    from .tensorrt import build_plan, optimization_profile, require_tensorrt

    require_tensorrt()
    require_cuda("engine (tensorrt)")
    profile = optimization_profile(settings["pipeline"], unet_config(model_dir), settings["resolution"],
                                   settings["batch"], settings["resolution_range"], guidance=settings["guidance"])
    info = build_plan(onnx_path, out_path, settings["precision"], profile, settings["optimization_level"],
                      settings["timing_cache"], log=log)
    record = {"backend": "tensorrt", "precision": settings["precision"], "device": describe_device("cuda"),
              "build": info, "profile": {k: list(v) for k, v in profile.items()}, "settings": settings}
    write_json(record_path, record)
    return record
