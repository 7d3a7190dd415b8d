"""The export stage: model (+ calib.pt) → unet.onnx + export.json, checked in ONNX Runtime."""
import tempfile
from pathlib import Path

import onnx
import torch

from ..errors import CorruptArtifactError
from ..io import read_json, write_json
from .onnx_export import INPUT_NAMES, UNetWithNamedInputs, export_dtype, export_unet, positional_inputs, save_onnx
from .ort_check import compare_with_torch
from .qdq import check_counts, fp8_to_standard_qdq, qdq_summary

EXPORT_BATCH = 2  # one prompt with classifier-free guidance


def load_onnx(path):
    """onnx.load with a clear error for a truncated or foreign file."""
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf raises DecodeError, onnx raises its own: both mean "corrupt"
        raise CorruptArtifactError(path, f"ONNX could not parse it: {type(err).__name__}: {err}") from err


def prepared_unet(model_dir, ckpt, precision, quant_level):
    """The UNet to export: plain for fp16, calibrated fake-quant for int8/fp8, in export dtype, on CPU."""
    from ..models import load_unet
    from ..quant.calibrate import restore_calibrated_unet

    unet = load_unet(model_dir)
    if ckpt:
        restore_calibrated_unet(unet, ckpt)
    return in_export_dtype(unet, precision, quant_level)


def in_export_dtype(unet, precision, quant_level):
    from modelopt.torch.quantization.nn import TensorQuantizer

    dtype = export_dtype(precision, quant_level)
    if dtype == torch.float16:
        # Q/DQ nodes cast around 16-bit tensors: the pattern TensorRT fuses into FP8 MHA.
        for module in unet.modules():
            if isinstance(module, TensorQuantizer):
                module.trt_high_precision_dtype = "Half"
    return unet.to(dtype).eval()


def ort_error(path, wrapper, positional, pipeline, fp8):
    """Relative error of ONNX Runtime against PyTorch. FP8 is checked on the standard-op rewrite."""
    if not fp8:
        return compare_with_torch(path, wrapper, positional, INPUT_NAMES[pipeline])
    model, _ = fp8_to_standard_qdq(load_onnx(path))
    with tempfile.TemporaryDirectory() as scratch:
        converted = Path(scratch) / "fp8_standard.onnx"
        save_onnx(model, converted)  # external data past 2 GB, as the export itself
        return compare_with_torch(converted, wrapper, positional, INPUT_NAMES[pipeline])


def should_check_in_ort(setting, external_data):
    """export.ort_check: true/false, or auto = only graphs that fit in one protobuf (under 2 GB)."""
    return (not external_data) if setting == "auto" else bool(setting)


def remove_onnx(path):
    """A failed export leaves neither the graph nor its external data (which Snakemake does not know of)."""
    for f in (Path(path), Path(f"{path}.data")):
        f.unlink(missing_ok=True)


def run_export(model_dir, ckpt, calib_record, settings, onnx_path, record_path, log=print):
    try:
        return _export_and_check(model_dir, ckpt, calib_record, settings, onnx_path, record_path, log)
    except BaseException:
        remove_onnx(onnx_path)
        raise


def export_example_inputs(unet, resolution):
    """The example inputs an export traces with, in the UNet's own dtype, on the CPU."""
    from ..models import unet_example_inputs

    dtype = next(unet.parameters()).dtype
    example = unet_example_inputs(unet, EXPORT_BATCH, resolution, dtype, "cpu")
    # One timestep for the whole batch, shape [1]: what TensorRT's profile expects (a static input).
    example["timestep"] = example["timestep"][:1]
    return example


def _export_and_check(model_dir, ckpt, calib_record, settings, onnx_path, record_path, log):
    precision, pipeline = settings["precision"], settings["pipeline"]
    level = read_json(calib_record)["settings"]["quant_level"] if calib_record else None
    unet = prepared_unet(model_dir, ckpt, precision, level)
    example = export_example_inputs(unet, settings["resolution"])
    info = export_unet(unet, pipeline, example, settings["opset"], onnx_path, log)

    graph = load_onnx(onnx_path)
    summary = qdq_summary(graph)
    if calib_record:
        check_counts(summary, read_json(calib_record)["counts"])
    info |= summary
    log(f"Q/DQ layers by kind {summary['layers_by_kind']}, nodes {summary['qdq_nodes']}")
    if should_check_in_ort(settings.get("ort_check", "auto"), info["external_data"]):
        wrapper, positional = UNetWithNamedInputs(unet, pipeline).eval(), positional_inputs(example, pipeline)
        info["ort_relative_error"] = ort_error(onnx_path, wrapper, positional, pipeline, fp8=precision == "fp8")
        log(f"ONNX Runtime vs PyTorch: relative error {info['ort_relative_error']:.3g}")
    else:
        info["ort_relative_error"] = None
        log("ONNX Runtime check skipped (export.ort_check: auto skips graphs past 2 GB)")
    if precision == "fp8" and settings["fp8_standard_qdq"]:
        graph, n = fp8_to_standard_qdq(graph)
        save_onnx(graph, onnx_path)
        info["fp8_standard_qdq_rewritten"] = n
    info |= {"precision": precision, "quant_level": level, "dtype": str(example["sample"].dtype).replace("torch.", ""),
             "pipeline": pipeline, "example_batch": EXPORT_BATCH, "resolution": settings["resolution"]}
    write_json(record_path, info)
    return info
