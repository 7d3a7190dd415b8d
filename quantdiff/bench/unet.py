"""UNet-step benchmark on the GPU: the torch engine's 8-bit UNets against torch.compile fp16,
side by side in one process, with FLOP rate, memory, output error and where the time goes.

    python -m quantdiff.bench.unet --arch sdxl-base-1.0 --precisions fp8,int8 --out DIR

Random weights (architecture only): speed does not depend on the values. Each variant is
compiled once (torch.compile, default mode; with --backend aoti the 8-bit ones are instead
AOTInductor packages, as the engine stage ships them) and timed twice: launched from Python, and replayed
as one CUDA graph (no launch overhead, which a ~1500-kernel UNet step otherwise pays on the
CPU). The error columns compare the real 8-bit modules with the ModelOpt fake-quant model they
were converted from (and with fp16). DIR gets unet_bench.json and one profile table per variant.
"""
import argparse
import copy
import itertools
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from ..engines.check import relative_error
from ..io import write_json
from .timing import GpuShare, cuda_bytes_beside_allocator, module_bytes, time_calls, time_cuda_graph

# aten ops whose device time is a GEMM, a convolution or attention (no op here nests in another)
OP_KINDS = {"aten::mm": "gemm", "aten::addmm": "gemm", "aten::bmm": "gemm", "aten::_scaled_mm": "gemm",
            "aten::_int_mm": "gemm", "aten::convolution": "conv",
            "quantdiff::cudnn_int8_matmul": "gemm", "quantdiff::cudnn_int8_conv": "conv"}
# --conv: QuantConv2d.use_gemm (None: where it pays, QuantConv2d.runs_as_gemm)
CONV_MODES = {"auto": None, "gemm": True, "float": False}
# --projections: convert_to_real_quant's fuse_projections (q/k/v, k/v as one GEMM where they can)
PROJECTION_MODES = {"fused": True, "separate": False}
# GPU kernels by name: the engine's Triton GEMMs (engines/triton_gemm.py, cp.async and TMA loads;
# Inductor may suffix them), conv (engines/triton_conv.py, counted with the convolutions) and fp8
# attention (engines/triton_attention.py), the patch-matrix copy (engines/triton_patches.py, counted
# with the other Triton kernels) and Inductor's generated ones. A CPU-side range of the same name
# nests them, so only GPU events count.
OWN_KERNELS = (("_gemm8_kernel", "gemm"), ("_gemm8_tma_kernel", "gemm"), ("_conv8_kernel", "conv"),
               ("_fp8_attention_kernel", "attention"),
               ("_patches_kernel", "triton"), ("triton_", "triton"))
# The error bound of the real 8-bit UNet against the ModelOpt fake-quant model it was converted from
# (relative_error of one step) for the SDXL architecture at 1024 px, batch 2, random weights (seed 0).
# Measured on an H200 in every run since 2026-11-29 (docs/PERF.md): fp8 0.0668-0.0677 (levels 3
# and 4, every kernel), int8 0.0446-0.0448. That gap is as large as fake quant's own from fp16
# (fp8 0.0782, int8 0.0403), and the real engine is no farther from fp16 than fake quant is (0.0788,
# 0.0402): fp8 MMA sums (cuBLASLt's fast accumulation) and fp16 roundings in another order, which
# random weights amplify through 70 transformer blocks. The bound sits ~10% above the largest
# measured; a variant past it is flagged and the run exits 1. Other architectures and shapes have
# no measured bound.
ERROR_BOUNDS = {"sdxl-base-1.0": {"fp8": 0.075, "int8": 0.05}}
ERROR_BOUND_SHAPE = {"batch": 2, "resolution": 1024}


def error_bound(arch, precision, batch, resolution):
    """The measured bound on rel_err_vs_fakequant for this run (ERROR_BOUNDS), or None."""
    if {"batch": batch, "resolution": resolution} != ERROR_BOUND_SHAPE:
        return None
    return ERROR_BOUNDS.get(arch, {}).get(precision)


def past_error_bound(rows):
    """The variants whose error against fake quant is past their measured bound."""
    return [r["variant"] for r in rows if r.get("within_error_bound") is False]


def count_flops(unet, inputs):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(**inputs)
    return counter.get_total_flops()


def device_ms_by_kind(events, calls):
    """Device milliseconds per call by kind, from torch.profiler's key_averages(): aten GEMMs (and
    the engine's own Triton GEMM kernel, quantdiff::gemm8), convolutions, attention, and Inductor's
    generated Triton kernels. Kernels count by their own (self) time on the GPU."""
    kinds = {"gemm": 0.0, "conv": 0.0, "attention": 0.0, "triton": 0.0}
    for event in events:
        kind = OP_KINDS.get(event.key) or ("attention" if event.key.startswith("aten::_scaled_dot_product_") else None)
        if kind:
            kinds[kind] += event.device_time_total
        elif event.device_type == torch.autograd.DeviceType.CUDA:
            for prefix, kind in OWN_KERNELS:
                if event.key.startswith(prefix):
                    kinds[kind] += event.self_device_time_total
                    break
    return {k: round(v / calls / 1000, 3) for k, v in kinds.items()}


def profile_step(fn, out_file, calls=3):
    """Device milliseconds per call spent in GEMMs, convolutions, attention and Inductor's Triton
    kernels (the fused norms, activations and quantization); the per-shape table goes to out_file."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="device_time_total", row_limit=400,
                                                               max_name_column_width=60, max_shapes_column_width=70)
    Path(out_file).write_text(table)
    return device_ms_by_kind(prof.key_averages(), calls)


def compiled_step(module, inputs, backend, log=print, inductor=None):
    """One UNet step of `module` as a no-argument callable returning the noise prediction.

    backend "compile": torch.compile (default mode). "aoti": what the engine stage ships, an
    AOTInductor package built for exactly these input shapes and loaded back (the package file,
    ~2.5 GB for SDXL, is deleted once loaded: the loader keeps what it extracted).
    `inductor`: torch._inductor.config settings for either.
    """
    if backend == "compile":
        compiled = torch.compile(module, options=inductor or None)
        return lambda: compiled(**inputs, return_dict=False)[0]
    from ..engines.torch import engine_inputs, load_engine, package_engine

    with tempfile.TemporaryDirectory(prefix="quantdiff-unet-bench-") as workdir:
        path = Path(workdir) / "engine.pt2"
        package_engine(module, inputs, path, dynamic=False, log=log, inductor=inductor)
        runner = load_engine(path)
    positional = engine_inputs(module, inputs)

    def step():
        out = runner(*positional)
        return out[0] if isinstance(out, (list, tuple)) else out
    return step


def measure(name, module, inputs, flops, args, log, backend="compile", inductor=None):
    """Compile, time (launched and as a CUDA graph), profile and take the memory of one variant."""
    tag = re.sub(r"[^A-Za-z0-9]+", "_", name.replace(".", "")).strip("_")  # a plain file name
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # Variants share diffusers' code objects (ResnetBlock2D.forward ...): without a reset their
    # dynamo cache entries pile up, hit config.recompile_limit (8) and those frames run eager.
    torch._dynamo.reset()
    resident, beside = torch.cuda.memory_allocated(), cuda_bytes_beside_allocator()
    start = time.time()
    step = compiled_step(module, inputs, backend, log, inductor)
    loaded_beside = cuda_bytes_beside_allocator() - beside

    with torch.no_grad():
        out = step().clone()
        torch.cuda.synchronize()
        compile_s = time.time() - start
        torch.cuda.reset_peak_memory_stats()
        with args.gpu_share.timing():
            launched = time_calls(step, args.warmup, args.iters, "cuda")
            activations_mb = (torch.cuda.max_memory_allocated() - resident) / 2**20
            kinds = profile_step(step, Path(args.out) / f"profile-{tag}.txt")
            replayed, failure, graph = time_cuda_graph(step, args.warmup, args.iters)
        if failure:
            log(f"{name}: CUDA graph capture failed: {failure}")
    # An AOTInductor package loads its own copy of the weights (and its kernels) past the caching allocator
    weights_mb = (module_bytes(module) if backend == "compile" else loaded_beside) / 2**20
    best = replayed or launched
    row = {"variant": name, "ms": round(best["median"], 3), "p10": round(best["p10"], 3), "p90": round(best["p90"], 3),
           "launched_ms": round(launched["median"], 3), "cuda_graph_ms": replayed and round(replayed["median"], 3),
           "tflops": round(flops / best["median"] / 1e9, 1), "weights_mb": round(weights_mb),
           "footprint_mb": round(weights_mb + activations_mb), "compile_s": round(compile_s, 1),
           "device_ms_by_kind": kinds}
    log(json.dumps(row))
    return row, out, graph


def quantized_copy(unet, precision, level, inputs):
    """ModelOpt fake-quant copy calibrated on the benchmark input (speed does not need more), its
    projections of one input sharing their scales (calibration.fused_scales, the default)."""
    import modelopt.torch.quantization as mtq

    from ..quant.fusion import share_fused_scales
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
    share_fused_scales(model, settings["alpha"])
    return model


def print_table(rows, log):
    log(f"{'variant':30} {'ms':>7} {'graph':>7} {'launch':>7} {'speedup':>7} {'TFLOP/s':>7} "
        f"{'foot MB':>7} {'mem':>5} {'err':>7}  device ms: gemm/conv/attn/triton/rest")
    for r in rows:
        if "error" in r:
            log(f"{r['variant']:30} failed: {r['error']}")
            continue
        k = r["device_ms_by_kind"]
        err = r.get("rel_err_vs_fakequant", r.get("rel_err_vs_fp16", ""))
        if r.get("within_error_bound") is False:
            err = f"{err}!"  # past the measured bound (ERROR_BOUNDS)
        log(f"{r['variant']:30} {r['ms']:7.2f} {r['cuda_graph_ms'] or 0:7.2f} {r['launched_ms']:7.2f} "
            f"{r['speedup']:7.3f} {r['tflops']:7.1f} {r['footprint_mb']:7d} {r.get('memory_vs_fp16', 1.0):5.2f} "
            f"{err!s:>7}  {k['gemm']}/{k['conv']}/{k['attention']}/{k['triton']}/{r['ms'] - sum(k.values()):.3f}")


def inductor_setting(text):
    """--inductor KEY=VALUE: (key, the value read as YAML: true, 1, 0.5, O1)."""
    import yaml

    key, sep, value = text.partition("=")
    if not (sep and key and value):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a torch._inductor.config setting), got {text!r}")
    return key, yaml.safe_load(value)


def main(argv=None):
    from ..device import describe_device, require_cuda, require_fp8
    from ..engines import check_packageable
    from ..engines.gemm8 import (resolve_conv_patches, resolve_fp8_attention, resolve_geglu, resolve_int8_gemm,
                                 resolve_kernels)
    from ..engines.qmodules import QuantConv2d, apply_kernels, convert_to_real_quant, set_e4m3_projections
    from ..engines.torch import check_inductor_settings, device_layout
    from ..models import arch_unet, unet_example_inputs
    from ..quant.recipe import skip_modelopt_cuda_extensions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sdxl-base-1.0")
    parser.add_argument("--precisions", default="fp8,int8")
    parser.add_argument("--level", type=float, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--conv", default="auto", metavar="MODE[,MODE]",
                        help="8-bit convs as 8-bit GEMMs (gemm: all that cuBLASLt takes; auto: those where it "
                             "pays) or as fp16 convs on dequantized weights (float); several: each its own variant")
    parser.add_argument("--backend", choices=("compile", "aoti"), default="compile",
                        help="8-bit variants through torch.compile, or packaged with AOTInductor as the engine stage "
                             "ships them (static shapes; an SDXL package builds for over 4.5 minutes)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no further 8-bit variant after this many seconds (each compiles for minutes)")
    parser.add_argument("--inductor", type=inductor_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a torch._inductor.config setting for the 8-bit variants (repeatable), as the "
                             "engine stage's engine.inductor; the fp16 baseline keeps the defaults")
    parser.add_argument("--baseline-inductor", type=inductor_setting, action="append", default=[],
                        metavar="KEY=VALUE", help="the same for the torch.compile fp16 baseline, to compare "
                                                  "like with like")
    parser.add_argument("--int8-gemm", default="auto", metavar="KERNEL[,KERNEL]",
                        help="int8 GEMM kernels to time, each as its own int8 variant: auto, triton, triton-tma, "
                             "int_mm (torch._int_mm, cuBLASLt), cudnn (cuDNN's int8 matmul and conv), as "
                             "engine.int8_gemm")
    parser.add_argument("--conv-patches", default="auto", metavar="KERNEL[,KERNEL]",
                        help="who writes the conv GEMMs' patch matrices, each as its own 8-bit variant: "
                             "auto, triton, inductor, as engine.conv_patches")
    parser.add_argument("--fp8-attention", default="auto", metavar="KERNEL[,KERNEL]",
                        help="who runs fp8 level 4's attention, each as its own fp8 variant: auto, sdpa, triton, "
                             "triton-fp8-probs, as engine.fp8_attention")
    parser.add_argument("--geglu", default="auto", metavar="KERNEL[,KERNEL]",
                        help="who runs the 8-bit GEGLU feed-forwards' middle, each as its own 8-bit variant: auto, "
                             "inductor, triton, triton-pointwise, as engine.geglu")
    parser.add_argument("--projections", default="fused", metavar="MODE[,MODE]",
                        help="the projections of an attention that read one input as one GEMM (fused: q/k/v of a "
                             "self-attention, k/v of a cross-attention, where their scales allow, as the engine "
                             "stage builds them) or one each (separate); several: each its own 8-bit variant")
    parser.add_argument("--projection-output", default="e4m3", metavar="DTYPE[,DTYPE]",
                        help="what fp8 level 4's q/k/v projections write for the fp8 attention kernel: e4m3 (from "
                             "the GEMM, on their quantizers' grids, as the engine stage builds them) or fp16 "
                             "(quantize kernels after); several: each its own fp8 variant")
    parser.add_argument("--gpu-lock", metavar="FILE",
                        help="a lock file shared with other bench processes on this GPU: they compile side by side "
                             "and time one at a time (timing.GpuShare)")
    parser.add_argument("--out", default="unet_bench")
    args = parser.parse_args(argv)
    int8_gemms, conv_patches, conv_modes = args.int8_gemm.split(","), args.conv_patches.split(","), args.conv.split(",")
    attentions, geglus = args.fp8_attention.split(","), args.geglu.split(",")
    if not set(conv_modes) <= set(CONV_MODES):
        parser.error(f"--conv {args.conv!r}: each mode is one of {', '.join(CONV_MODES)}")
    projection_outputs = args.projection_output.split(",")
    if not set(projection_outputs) <= {"e4m3", "fp16"}:
        parser.error(f"--projection-output {args.projection_output!r}: each is e4m3 or fp16")
    projection_modes = args.projections.split(",")
    if not set(projection_modes) <= set(PROJECTION_MODES):
        parser.error(f"--projections {args.projections!r}: each mode is one of {', '.join(PROJECTION_MODES)}")
    for kernel in int8_gemms:  # a bad name stops here, before any GPU work
        resolve_int8_gemm(kernel, "cpu")
    for kernel in conv_patches:
        resolve_conv_patches(kernel, "cpu")
    for kernel in attentions:
        resolve_fp8_attention(kernel, "cpu")
    for kernel in geglus:
        resolve_geglu(kernel, "cpu")
    if args.backend == "aoti":  # what the engine stage would refuse to package
        for int8_gemm, geglu in itertools.product(int8_gemms, geglus):
            check_packageable({"int8_gemm": int8_gemm, "geglu": geglu})
    inductor = check_inductor_settings(dict(args.inductor), "--inductor")
    baseline_inductor = check_inductor_settings(dict(args.baseline_inductor), "--baseline-inductor")
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    require_cuda("UNet benchmark")
    args.gpu_share = GpuShare(args.gpu_lock)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    level = int(args.level) if args.level == int(args.level) else args.level
    began = time.time()

    torch.manual_seed(0)
    unet = device_layout(arch_unet(args.arch, device="cuda", dtype=torch.float16), "cuda")
    inputs = unet_example_inputs(unet, args.batch, args.resolution, torch.float16, "cuda")
    flops = count_flops(unet, inputs)
    log(f"{args.arch}: {flops / 1e12:.2f} TFLOP per step at batch {args.batch}, {args.resolution}px")
    with torch.no_grad():
        reference = unet(**inputs).sample
    result = {"arch": args.arch, "batch": args.batch, "resolution": args.resolution, "level": level,
              "conv": args.conv, "backend": args.backend, "inductor": inductor,
              "baseline_inductor": baseline_inductor, "flops_per_step": flops,
              "device": describe_device("cuda"),
              "torch": torch.__version__, "rows": []}
    rows = result["rows"]
    base, _, base_graph = measure("torch.compile fp16", unet, inputs, flops, args, log, inductor=baseline_inductor)
    rows.append(base | {"speedup": 1.0, "rel_err_vs_fp16": 0.0})
    write_json(Path(args.out) / "unet_bench.json", result)
    skip_modelopt_cuda_extensions()  # the fake-quant reference then is the formula the engine emulates
    for precision in args.precisions.split(","):
        if time.time() - began > args.budget_s:
            log(f"{precision}: skipped, {time.time() - began:.0f} s spent of a {args.budget_s:.0f} s budget")
            result.setdefault("skipped", []).append(precision)
            continue
        if precision == "fp8":
            require_fp8("cuda")
        fake = quantized_copy(unet, precision, level, inputs)
        with torch.no_grad():
            fake_out = fake(**inputs).sample
        packaged = " (AOTInductor package)" if args.backend == "aoti" else ""
        variants = itertools.product(projection_modes, conv_modes, int8_gemms if precision == "int8" else [None],
                                     conv_patches, attentions if precision == "fp8" else [None], geglus,
                                     projection_outputs if precision == "fp8" else ["fp16"])
        several = len(int8_gemms) > 1 or len(conv_patches) > 1 or len(attentions) > 1 or len(geglus) > 1
        real = projections = None
        for projection_mode, mode, kernel, patches, attention, geglu, projection_output in variants:
            if projection_mode != projections:  # each projection mode is a conversion of its own
                del real  # the previous one goes before the next copy is made (SDXL: GBs of GPU memory)
                real, converted = convert_to_real_quant(copy.deepcopy(fake) if len(projection_modes) > 1 else fake,
                                                        PROJECTION_MODES[projection_mode])
                convs, projections = [m for m in real.modules() if isinstance(m, QuantConv2d)], projection_mode
                log(f"{precision}: converted ({projection_mode} projections) {converted}")
            for conv in convs:
                conv.use_gemm = CONV_MODES[mode]
            counts = converted | {"conv_as_gemm": sum(c.runs_as_gemm(on_gpu=True) for c in convs)}
            name = f"torch engine {precision} L{level}{packaged}"
            kernels = resolve_kernels(precision, "cuda", kernel or "auto", patches, attention or "auto", geglu,
                                      python_ops=args.backend == "compile")
            apply_kernels(real, kernels)
            set_e4m3_projections(real, projection_output == "e4m3")
            labels = ([f"{projection_mode} projections"] if len(projection_modes) > 1 else []) + \
                ([f"q/k/v out {projection_output}"] if precision == "fp8" and len(projection_outputs) > 1 else []) + \
                ([f"conv {mode}"] if len(conv_modes) > 1 else []) + [f"{k} {v}" for k, v in kernels.items() if several]
            if labels:
                name += " (" + ", ".join(labels) + ")"
            try:
                row, out, _ = measure(name, real, inputs, flops, args, log, args.backend, inductor)
            except Exception as e:  # a variant that fails is a result too; the others still run
                log(f"{name}: failed: {type(e).__name__}: {e}")
                rows.append({"variant": name, "conv": mode, "projections": projection_mode,
                             "projection_output": projection_output, "error": f"{type(e).__name__}: {str(e)[:500]}"} | kernels)
                write_json(Path(args.out) / "unet_bench.json", result)
                torch._dynamo.reset()
                continue
            bound = error_bound(args.arch, precision, args.batch, args.resolution)
            err = round(relative_error(fake_out, out), 4)
            rows.append(row | {"conv": mode, "projections": projection_mode, "projection_output": projection_output,
                               "counts": counts,
                               "speedup": round(base["ms"] / row["ms"], 3),
                               "memory_vs_fp16": round(row["footprint_mb"] / base["footprint_mb"], 3),
                               "rel_err_vs_fakequant": err, "error_bound": bound,
                               "within_error_bound": None if bound is None else err <= bound,
                               "rel_err_vs_fp16": round(relative_error(reference, out), 4),
                               "fakequant_rel_err_vs_fp16": round(relative_error(reference, fake_out), 4)}
                        | kernels)
            write_json(Path(args.out) / "unet_bench.json", result)
        del fake, real, fake_out
    if base_graph is not None:  # the baseline again, last: the clock did not drift between variants
        with args.gpu_share.timing():
            again = time_calls(base_graph.replay, args.warmup, args.iters, "cuda")
        result["fp16_cuda_graph_ms_again"] = round(again["median"], 3)
        log(f"torch.compile fp16 again (CUDA graph): {again['median']:.2f} ms")
    if args.gpu_lock:
        result["gpu_lock_waited_s"] = round(args.gpu_share.waited_s, 1)
    write_json(Path(args.out) / "unet_bench.json", result)
    print_table(rows, log)
    over = past_error_bound(rows)
    if over:
        log(f"past the measured error bound against fake quant (ERROR_BOUNDS): {', '.join(over)}")
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
