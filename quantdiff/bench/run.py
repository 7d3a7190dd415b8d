"""The bench stage: latency of the engine against a torch.compile baseline measured in the same
job, and image quality against the FP16 reference images of the same prompts and seeds."""
import datetime
from pathlib import Path

import torch
from PIL import Image

from ..device import describe_device
from ..io import atomic_path, read_json, sha256, write_json
from ..metrics import json_number, quality_summary, sqnr_db
from .reference import bench_device, evaluation_cases, generate, read_reference
from .report import format_caption, plot_sqnr, save_grid
from .schema import validate_bench
from .timing import PeakMemory, module_bytes, time_calls, timing_method

PIPELINE_ITERS = 3  # whole-pipeline runs are long; the UNet step gets settings["iters"]


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


def mean_by_step(by_step):
    from ..metrics import mean_finite

    return [mean_finite(values) for values in by_step]


def run_bench(model_dir, engine_path, backend, reference_dir, settings, out, log=print):
    """out: {'record', 'images', 'grid', 'sqnr'} output paths."""
    from ..models import load_pipeline, read_model_info, unet_example_inputs

    device, dtype = bench_device()
    pipe = load_pipeline(model_dir, dtype=dtype, device=device)
    plain = pipe.unet
    cfg = settings["guidance"] > 1
    unet_batch = settings["batch_size"] * (2 if cfg else 1)
    inputs = unet_example_inputs(plain, unet_batch, settings["resolution"], dtype, device)
    cases = evaluation_cases(settings)
    warmup, iters = settings["warmup"], settings["iters"]

    log(f"bench {settings['precision']} ({backend}) on {device}: UNet batch {unet_batch}, {iters} timed steps")
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    engine = load_engine_unet(backend, engine_path, plain)
    engine_weights = (torch.cuda.memory_allocated() - before) if device == "cuda" else 0
    with PeakMemory(device, engine_weights) as engine_mem:
        engine_step = time_calls(unet_step(engine, inputs), warmup, iters, device)
    engine_pipeline = time_calls(pipeline_run(pipe, engine, cases[0], settings), 1, PIPELINE_ITERS, device)
    log(f"engine: UNet step median {engine_step['median']:.2f} ms, pipeline {engine_pipeline['median']:.1f} ms")

    log("baseline: torch.compile of the plain UNet (compiling...)")
    compiled = torch.compile(plain)
    with PeakMemory(device, module_bytes(plain)) as base_mem:
        base_step = time_calls(unet_step(compiled, inputs), max(warmup, 1), iters, device)
    base_pipeline = time_calls(pipeline_run(pipe, compiled, cases[0], settings), 1, PIPELINE_ITERS, device)
    log(f"baseline: UNet step median {base_step['median']:.2f} ms, pipeline {base_pipeline['median']:.1f} ms")

    probe = SQNRProbe(engine, plain)
    reference = read_reference(reference_dir)
    ref_images, test_images, captions, image_records = [], [], [], []
    images_dir = Path(out["images"])
    with atomic_path(images_dir) as tmp:
        tmp.mkdir()
        for case, ref_case in zip(cases, reference["cases"]):
            probe.start_image()
            pipe.unet = probe
            image = generate(pipe, case["prompt"], case["seed"], settings)
            image.save(tmp / case["file"])
            test_images.append(image)
            ref_images.append(Image.open(Path(reference_dir) / ref_case["file"]).convert("RGB"))
            image_records.append({"prompt": case["prompt"], "seed": case["seed"],
                                  "reference": str(Path(reference_dir) / ref_case["file"]),
                                  "test": str(images_dir / case["file"])})
    pipe.unet = plain
    sqnr_by_step = mean_by_step(probe.by_step)
    quality = quality_summary(ref_images, test_images, sqnr_by_step)
    info = read_model_info(model_dir)
    architecture_only = bool(info.get("architecture_only"))
    quality["meaningful"] = not architecture_only
    quality["note"] = ("random weights (architecture only): quality numbers are not meaningful" if architecture_only
                       else f"against fp16 reference images of {len(cases)} held-out prompts, same seeds")
    for i, (prompt, p, s) in enumerate(zip([c["prompt"] for c in cases], quality["psnr_db"], quality["ssim"])):
        captions.append(format_caption(prompt, p, s))
    save_grid(ref_images, test_images, captions, out["grid"], labels=("fp16", settings["precision"]))
    plot_sqnr(quality["sqnr_db_by_step"], out["sqnr"],
              title=f"{settings.get('model', '')} {settings['precision']}: noise-prediction SQNR vs fp16")

    device_info = describe_device(device)
    record = {
        "schema_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": settings["model"], "precision": settings["precision"], "quant_level": settings["quant_level"],
        "backend": backend, "architecture_only": architecture_only,
        "device": {"kind": device_info["kind"], "name": device_info["name"],
                   "compute_capability": device_info["compute_capability"], "driver": device_info["driver"],
                   "versions": device_info["versions"]},
        "shapes": {"batch": settings["batch_size"], "resolution": settings["resolution"],
                   "steps": settings["steps"], "guidance": settings["guidance"]},
        "timing_method": timing_method(device),
        "unet_step_ms": engine_step, "pipeline_ms": engine_pipeline,
        "baseline": {"name": f"torch.compile {'fp16' if device == 'cuda' else 'fp32 (CPU)'}",
                     "dtype": str(dtype).replace("torch.", ""), "unet_step_ms": base_step, "pipeline_ms": base_pipeline},
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
    validate_bench(record)
    write_json(out["record"], record)
    log(f"speedup vs baseline: UNet {record['speedup_vs_baseline']['unet']}x; "
        f"PSNR mean {quality['psnr_db_mean']}, SSIM mean {quality['ssim_mean']}")
    return record
