"""The bench stage: latency of the engine against a torch.compile baseline measured in the same
job, and image quality against the FP16 reference images of the same prompts and seeds."""
import datetime
from pathlib import Path

import torch

from ..device import describe_device
from ..engines.torch import device_layout
from ..io import sha256, write_json
from .quality import architecture_only, compare_with_reference, noise_prediction, require_finite
from .reference import bench_device, evaluation_cases, generate
from .report import format_caption, plot_sqnr, save_grid
from .schema import validate_bench
from .timing import PeakMemory, cuda_bytes_in_use, module_bytes, time_calls, time_cuda_graph, timing_method

PIPELINE_ITERS = 3  # whole-pipeline runs are long; the UNet step gets settings["iters"]


def load_engine_unet(backend, path, plain_unet):
    if backend == "tensorrt":
        from ..engines.tensorrt import TensorRTUNet

        return TensorRTUNet(path, dict(plain_unet.config))
    from ..engines.torch import EngineUNet, load_engine

    return EngineUNet.wrap(load_engine(path), plain_unet)


def unet_step(unet, inputs):
    return lambda: unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                        added_cond_kwargs=inputs.get("added_cond_kwargs"), return_dict=False)


def pipeline_run(pipe, unet, case, settings):
    def run():
        pipe.unet = unet
        generate(pipe, case["prompt"], case["seed"], settings, output_type="latent")
    return run


def cuda_graph_timing(engine_step, baseline_step, warmup, iters, log=print):
    """The UNet step of engine and baseline replayed as CUDA graphs: launched from Python, a
    ~1500-kernel step can be bound by the CPU's launch rate, which hides what the kernels gain."""
    result, failures = {}, []
    for key, step in (("unet_step_ms", engine_step), ("baseline_unet_step_ms", baseline_step)):
        result[key], why, graph = time_cuda_graph(step, warmup, iters)
        del graph  # its memory pool
        torch.cuda.empty_cache()
        if why:
            failures.append(f"{key.removesuffix('_ms').replace('_', ' ')}: {why}")
    both = result["unet_step_ms"] and result["baseline_unet_step_ms"]
    result["speedup"] = round(result["baseline_unet_step_ms"]["median"] / result["unet_step_ms"]["median"], 4) \
        if both else None
    result["note"] = "; ".join(failures) or "both captured"
    log(f"CUDA graphs: {result['note']}; speedup {result['speedup']}")
    return result


def run_bench(model_dir, engine_path, backend, reference_dir, settings, out, log=print):
    """out: {'record', 'images', 'grid', 'sqnr'} output paths."""
    from ..models import load_pipeline, unet_example_inputs

    device, dtype = bench_device()
    pipe = load_pipeline(model_dir, dtype=dtype, device=device)
    plain = pipe.unet
    cfg = settings["guidance"] > 1
    unet_batch = settings["batch_size"] * (2 if cfg else 1)
    inputs = unet_example_inputs(plain, unet_batch, settings["resolution"], dtype, device)
    cases = evaluation_cases(settings)
    warmup, iters = settings["warmup"], settings["iters"]

    log(f"bench {settings['precision']} ({backend}) on {device}: UNet batch {unet_batch}, {iters} timed steps")
    before = cuda_bytes_in_use() if device == "cuda" else 0
    engine = load_engine_unet(backend, engine_path, plain)
    engine_weights = (cuda_bytes_in_use() - before) if device == "cuda" else 0
    # before minutes of timing and the baseline's compile: a broken engine stops here
    with torch.no_grad():
        require_finite(noise_prediction(unet_step(engine, inputs)()), "on the example inputs")
    with PeakMemory(device, engine_weights) as engine_mem:
        engine_step = time_calls(unet_step(engine, inputs), warmup, iters, device)
    engine_pipeline = time_calls(pipeline_run(pipe, engine, cases[0], settings), 1, PIPELINE_ITERS, device)
    log(f"engine: UNet step median {engine_step['median']:.2f} ms, pipeline {engine_pipeline['median']:.1f} ms")

    baseline_inductor = settings.get("baseline_inductor") or {}
    log(f"baseline: torch.compile of the plain UNet, Inductor settings {baseline_inductor} (compiling...)")
    # the layout the engine was built in, and its Inductor settings
    compiled = torch.compile(device_layout(plain, device), options=baseline_inductor or None)
    with PeakMemory(device, module_bytes(plain)) as base_mem:
        base_step = time_calls(unet_step(compiled, inputs), max(warmup, 1), iters, device)
    base_pipeline = time_calls(pipeline_run(pipe, compiled, cases[0], settings), 1, PIPELINE_ITERS, device)
    log(f"baseline: UNet step median {base_step['median']:.2f} ms, pipeline {base_pipeline['median']:.1f} ms")
    graphs = cuda_graph_timing(unet_step(engine, inputs), unet_step(compiled, inputs), warmup, iters, log) \
        if device == "cuda" else None

    quality, ref_images, test_images, image_records = compare_with_reference(
        pipe, engine, cases, reference_dir, settings, out["images"], architecture_only(model_dir))
    captions = [format_caption(c["prompt"], p, s) for c, p, s in zip(cases, quality["psnr_db"], quality["ssim"])]
    save_grid(ref_images, test_images, captions, out["grid"], labels=("fp16", settings["precision"]))
    plot_sqnr(quality["sqnr_db_by_step"], out["sqnr"],
              title=f"{settings.get('model', '')} {settings['precision']}: noise-prediction SQNR vs fp16")

    device_info = describe_device(device)
    record = {
        "schema_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": settings["model"], "precision": settings["precision"], "quant_level": settings["quant_level"],
        "backend": backend, "architecture_only": not quality["meaningful"],
        "device": {"kind": device_info["kind"], "name": device_info["name"],
                   "compute_capability": device_info["compute_capability"], "driver": device_info["driver"],
                   "versions": device_info["versions"]},
        "shapes": {"batch": settings["batch_size"], "resolution": settings["resolution"],
                   "steps": settings["steps"], "guidance": settings["guidance"]},
        "timing_method": timing_method(device),
        "unet_step_ms": engine_step, "pipeline_ms": engine_pipeline,
        "baseline": {"name": f"torch.compile {'fp16' if device == 'cuda' else 'fp32 (CPU)'}",
                     "dtype": str(dtype).replace("torch.", ""), "unet_step_ms": base_step, "pipeline_ms": base_pipeline,
                     "inductor": baseline_inductor},
        "speedup_vs_baseline": {"unet": round(base_step["median"] / engine_step["median"], 4),
                                "pipeline": round(base_pipeline["median"] / engine_pipeline["median"], 4)},
        "peak_memory_mb": {"engine": engine_mem.mb, "baseline": base_mem.mb},
        "engine_size_mb": round(Path(engine_path).stat().st_size / 2**20, 3),
        "quality": quality,
        "inputs": {name: {"path": str(path), "sha256": sha256(path)}
                   for name, path in (("engine", engine_path), ("reference_manifest", Path(reference_dir) / "manifest.json"),
                                      ("prompts", settings["prompts"]))},
        "images": image_records,
    }
    if graphs:
        record["cuda_graph"] = graphs
    validate_bench(record)
    write_json(out["record"], record)
    log(f"speedup vs baseline: UNet {record['speedup_vs_baseline']['unet']}x; "
        f"PSNR mean {quality['psnr_db_mean']}, SSIM mean {quality['ssim_mean']}")
    return record
