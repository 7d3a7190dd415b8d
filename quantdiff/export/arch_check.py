"""Export check of a full-size architecture-only UNet (random weights) without the workflow:

    python -m quantdiff.export.arch_check --precision int8 --level 3 --out int8.json

Builds the UNet on CPU, calibrates it on one random input (enough to give every quantizer an
amax), exports it as the export stage does, and records the Q/DQ counts against the level's layer
set. For machines with the memory an SDXL-size graph needs (about 40 GB for int8 in fp32).
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from ..io import write_json
from .onnx_export import export_unet
from .qdq import check_counts, qdq_summary
from .stage import EXPORT_BATCH, export_example_inputs, in_export_dtype, load_onnx


def main(argv=None):
    from ..bench.unet import quantized_copy
    from ..models import arch_unet, unet_example_inputs
    from ..quant.levels import EXCLUDE_DEFAULT, count_by_kind, fp8_attention_layers, quantized_layers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sdxl-base-1.0")
    parser.add_argument("--precision", choices=["int8", "fp8"], required=True)
    parser.add_argument("--level", type=float, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--opset", type=int, default=19)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    level = int(args.level) if args.level == int(args.level) else args.level
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    start = time.time()
    torch.manual_seed(0)
    unet = arch_unet(args.arch, device="cpu")
    inputs = unet_example_inputs(unet, EXPORT_BATCH, args.resolution)
    expected = count_by_kind(quantized_layers(unet, level, EXCLUDE_DEFAULT))
    expected["fp8_attention"] = len(fp8_attention_layers(unet, level)) if args.precision == "fp8" else 0
    unet = in_export_dtype(quantized_copy(unet, args.precision, level, inputs), args.precision, level)
    log(f"built and calibrated in {time.time() - start:.0f} s; expected {expected}")
    example = export_example_inputs(unet, args.resolution)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "unet.onnx"
        info = export_unet(unet, "sdxl", example, args.opset, path, log)
        info |= qdq_summary(load_onnx(path))
        info["onnx_bytes"] = sum(f.stat().st_size for f in Path(scratch).glob("unet.onnx*"))
    check_counts(info, expected)  # raises when the graph's Q/DQ layers differ from the level's set
    info.pop("quantized_layers")
    info |= {"arch": args.arch, "precision": args.precision, "quant_level": level, "expected": expected,
             "dtype": str(example["sample"].dtype).removeprefix("torch."), "total_seconds": round(time.time() - start, 1)}
    write_json(args.out, info)
    log(f"{args.precision} L{level}: layers {info['layers_by_kind']}, Q/DQ nodes {info['qdq_nodes']}, "
        f"{info['onnx_bytes'] / 1e9:.2f} GB, {info['total_seconds']} s")
    return info


if __name__ == "__main__":
    main()
