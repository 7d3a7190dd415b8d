"""UNet-step benchmark on the GPU: the torch engine's 8-bit UNet against torch.compile fp16,
side by side in one process, with FLOP rate, peak memory and output error.

    python -m quantdiff.bench.unet --arch sdxl-base-1.0 --precisions int8,fp8 --out unet_bench.json

Random weights (architecture only): speed does not depend on the values; the error columns
compare the real 8-bit modules with the ModelOpt fake-quant model they were converted from.
"""
import argparse
import copy
import json
import time

import torch

from ..io import write_json
from .timing import module_bytes, time_calls

QUIET = lambda *a: None  # noqa: E731


def relative_error(reference, test):
    return float((test.float() - reference.float()).norm() / reference.float().norm())


def count_flops(unet, inputs):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(**inputs)
    return counter.get_total_flops()


def measure(name, module, inputs, flops, warmup, iters, log):
    """Compile, time and take the peak memory of one variant."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # Variants share diffusers' code objects (ResnetBlock2D.forward ...): without a reset their
    # dynamo cache entries pile up, hit config.recompile_limit (8) and those frames run eager.
    torch._dynamo.reset()
    start = time.time()
    compiled = torch.compile(module)
    with torch.no_grad():
        out = compiled(**inputs, return_dict=False)[0]
    torch.cuda.synchronize()
    compile_s = time.time() - start
    latency = time_calls(lambda: compiled(**inputs, return_dict=False), warmup, iters, "cuda")
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
    row = {"variant": name, "ms": round(latency["median"], 3), "p10": round(latency["p10"], 3),
           "p90": round(latency["p90"], 3), "tflops": round(flops / latency["median"] / 1e9, 1),
           "peak_mb": round(peak_mb), "weights_mb": round(module_bytes(module) / 2**20), "compile_s": round(compile_s, 1)}
    log(json.dumps(row))
    return row, out


def quantized_copy(unet, precision, level, inputs):
    """ModelOpt fake-quant copy calibrated on the benchmark input (speed does not need more)."""
    import modelopt.torch.quantization as mtq

    from ..quant.levels import EXCLUDE_DEFAULT, fp8_attention_layers, quantized_layers
    from ..quant.recipe import quant_config

    settings = {"n_steps": 1, "percentile": 1.0, "collect_method": "min-mean", "alpha": 0.8}
    model = copy.deepcopy(unet)
    layers = quantized_layers(model, level, EXCLUDE_DEFAULT)
    attention = fp8_attention_layers(model, level) if precision == "fp8" else []

    def loop(m):
        with torch.no_grad():
            m(**inputs)

    mtq.quantize(model, quant_config(precision, layers, attention, settings), forward_loop=loop)
    return model


def main(argv=None):
    from ..device import describe_device, require_cuda, require_fp8
    from ..engines.qmodules import convert_to_real_quant
    from ..models import arch_unet, unet_example_inputs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sdxl-base-1.0")
    parser.add_argument("--precisions", default="int8,fp8")
    parser.add_argument("--level", type=float, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", default="unet_bench.json")
    args = parser.parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    require_cuda("UNet benchmark")
    level = int(args.level) if args.level == int(args.level) else args.level

    torch.manual_seed(0)
    unet = arch_unet(args.arch, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    inputs = unet_example_inputs(unet, args.batch, args.resolution, torch.float16, "cuda")
    flops = count_flops(unet, inputs)
    log(f"{args.arch}: {flops / 1e12:.2f} TFLOP per step at batch {args.batch}, {args.resolution}px")
    with torch.no_grad():
        reference = unet(**inputs).sample
    rows = []
    base, _ = measure("torch.compile fp16", unet, inputs, flops, args.warmup, args.iters, log)
    rows.append(base | {"speedup": 1.0, "rel_err_vs_fp16": 0.0})
    for precision in args.precisions.split(","):
        if precision == "fp8":
            require_fp8("cuda")
        fake = quantized_copy(unet, precision, level, inputs)
        with torch.no_grad():
            fake_out = fake(**inputs).sample
        real, counts = convert_to_real_quant(fake)
        log(f"{precision}: converted {counts}")
        row, out = measure(f"torch engine {precision} L{level}", real, inputs, flops, args.warmup, args.iters, log)
        rows.append(row | {"speedup": round(base["ms"] / row["ms"], 3),
                           "rel_err_vs_fakequant": round(relative_error(fake_out, out), 4),
                           "rel_err_vs_fp16": round(relative_error(reference, out), 4),
                           "fakequant_rel_err_vs_fp16": round(relative_error(reference, fake_out), 4)})
        del fake, real
    # The baseline again, last, to show the clock did not drift between variants.
    again, _ = measure("torch.compile fp16 (again)", unet, inputs, flops, args.warmup, args.iters, log)
    rows.append(again | {"speedup": round(base["ms"] / again["ms"], 3)})
    result = {"arch": args.arch, "batch": args.batch, "resolution": args.resolution, "level": level,
              "flops_per_step": flops, "device": describe_device("cuda"), "rows": rows}
    write_json(args.out, result)
    header = f"{'variant':34} {'ms':>8} {'speedup':>8} {'TFLOP/s':>8} {'peak MB':>8} {'err':>8}"
    log(header)
    for r in rows:
        err = r.get("rel_err_vs_fakequant", r.get("rel_err_vs_fp16", ""))
        log(f"{r['variant']:34} {r['ms']:8.2f} {r['speedup']:8.3f} {r['tflops']:8.1f} {r['peak_mb']:8d} {err!s:>8}")
    return result


if __name__ == "__main__":
    main()
