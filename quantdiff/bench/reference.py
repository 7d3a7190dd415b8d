"""FP16 reference images: the plain pipeline on the held-out evaluation prompts and seeds.

They are their own cached artifact, so every precision's bench compares against the same images
and they rerun only when prompts, seeds or sampler settings change."""
import torch

from ..io import atomic_path, read_json, write_json
from ..quant.calibrate import read_prompts


def bench_device():
    """fp16 on the GPU; fp32 on the CPU, where fp16 kernels are slow and not what anyone serves."""
    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def generate(pipe, prompt, seed, settings, **extra):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt=prompt, num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                height=settings["resolution"], width=settings["resolution"], generator=generator, **extra).images[0]


def evaluation_cases(settings):
    prompts = read_prompts(settings["prompts"], settings["n_prompts"])
    return [{"prompt": p, "seed": settings["seed"] + i, "file": f"{i:03d}.png"} for i, p in enumerate(prompts)]


def write_reference(model_dir, settings, out_dir, log=print):
    from ..models import load_pipeline

    device, dtype = bench_device()
    pipe = load_pipeline(model_dir, dtype=dtype, device=device)
    cases = evaluation_cases(settings)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for case in cases:
            generate(pipe, case["prompt"], case["seed"], settings).save(tmp / case["file"])
            log(f"reference {case['file']}: {case['prompt']}")
        write_json(tmp / "manifest.json", {"cases": cases, "settings": settings, "device": device,
                                           "dtype": str(dtype).replace("torch.", "")})


def read_reference(ref_dir):
    return read_json(f"{ref_dir}/manifest.json")
