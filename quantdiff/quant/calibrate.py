"""Calibration: run the real diffusers pipeline over calibration prompts, let ModelOpt observe the
UNet at every denoising step, and save the calibrated (fake-quant) UNet with its record."""
import contextlib
import time
import warnings

import torch
from tqdm.auto import tqdm

from ..errors import CorruptArtifactError
from ..io import atomic_path, write_json
from .calibrators import STEP_CLOCK, StepRangePercentileCalibrator
from .fusion import share_fused_scales
from .levels import check_level, count_by_kind, fp8_attention_layers, quantized_layers
from .recipe import modelopt_cuda_extensions_from_env, quant_config, smoothed_linears
from .smoothing import ActivationSampler, smooth_per_layer


def read_prompts(path, limit=None):
    prompts = [line.strip() for line in open(path, encoding="utf-8") if line.strip() and not line.startswith("#")]
    return prompts[:limit] if limit else prompts


def compute_device():
    """Calibrate on the GPU in fp16 when there is one; on CPU in fp32 (CPU fp16 is slow and lossy)."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def calibration_loop(pipe, prompts, settings, progress, sampler=None):
    """The forward loop ModelOpt runs: the whole pipeline, so the UNet sees real trajectories.
    `sampler` (alpha: auto) records linear inputs of the UNet ModelOpt passes in (already converted)."""

    def loop(unet):
        batch_size = settings["batch_size"]
        with sampler.attached(unet) if sampler else contextlib.nullcontext():
            for i in range(0, len(prompts), batch_size):
                batch = prompts[i:i + batch_size]
                STEP_CLOCK.start_image()
                generator = torch.Generator("cpu").manual_seed(settings["seed"] + i)
                pipe(prompt=batch, num_inference_steps=settings["n_steps"], guidance_scale=settings["guidance"],
                     height=settings["resolution"], width=settings["resolution"], generator=generator,
                     output_type="latent")
                progress.update(len(batch) * settings["n_steps"])

    return loop


def quantize_unet(pipe, settings, log=print):
    """Quantize `pipe.unet` in place for settings['precision'] / settings['quant_level'].

    Returns (layers {name: kind}, FP8 attention module names, per-layer alphas or {}, the groups
    of projections given one scale {attention: [members]}: quant/fusion.py)."""
    import modelopt.torch.quantization as mtq

    precision, level = settings["precision"], settings["quant_level"]
    check_level(level, precision)
    unet = pipe.unet
    layers = quantized_layers(unet, level, settings["exclude"])
    attention = fp8_attention_layers(unet, level)
    prompts = read_prompts(settings["prompts"], settings["calib_size"])
    auto_alpha = settings["alpha"] == "auto" and smoothed_linears(precision, layers)
    calls = settings["n_steps"] * -(-len(prompts) // settings["batch_size"])  # UNet calls of the loop
    sampler = ActivationSampler(smoothed_linears(precision, layers), calls=calls, seed=settings["seed"]) if auto_alpha else None
    log(f"calibrating {precision} level {level}: {count_by_kind(layers)} layers, "
        f"{len(attention)} FP8 attention blocks, {len(prompts)} prompts x {settings['n_steps']} steps"
        + (", SmoothQuant alpha per layer" if auto_alpha else ""))
    modelopt_cuda_extensions_from_env(log)
    hook = unet.register_forward_pre_hook(STEP_CLOCK.tick)
    progress = tqdm(total=len(prompts) * settings["n_steps"], desc="calibrate (prompt x step)", unit="step")
    try:
        with warnings.catch_warnings():
            # Excluded linears are disabled on purpose; ModelOpt warns about each one.
            warnings.filterwarnings("ignore", message=".*is not calibrated, skip smoothing")
            mtq.quantize(unet, quant_config(precision, layers, attention, settings),
                         forward_loop=calibration_loop(pipe, prompts, settings, progress, sampler))
    finally:
        hook.remove()
        progress.close()
    alphas = smooth_per_layer(unet, sampler) if auto_alpha else {}
    fused = share_fused_scales(unet, settings["alpha"]) if settings.get("fused_scales", True) else {}
    if fused:
        log(f"one scale per fused projection group: {len(fused)} attentions")
    if alphas:
        picked = [v["alpha"] for v in alphas.values()]
        log(f"SmoothQuant alpha per layer: {len(picked)} linears, mean {sum(picked) / len(picked):.2f}, "
            f"range {min(picked)}-{max(picked)}")
    return layers, attention, alphas, fused


def _amax(quantizer):
    amax = getattr(quantizer, "amax", None)
    return None if amax is None else amax.detach().float().cpu()


def calibration_record(unet, layers, attention, settings, seconds, alphas=None, fused=None):
    """calib.json: every quantized layer with its amax (and, with alpha: auto, its chosen alpha
    and the output error at each alpha of the grid), the projection groups given one scale
    (`fused_scales`), and the settings used."""
    modules = dict(unet.named_modules())
    record_layers = {}
    for name, kind in layers.items():
        module = modules[name]
        a_amax, w_amax = _amax(module.input_quantizer), _amax(module.weight_quantizer)
        entry = {"kind": kind, "type": type(module).__name__,
                 "input_amax": float(a_amax.max()) if a_amax is not None else None,
                 "weight_amax_max": float(w_amax.max()) if w_amax is not None else None,
                 "weight_amax_channels": int(w_amax.numel()) if w_amax is not None else 0,
                 "smoothquant": getattr(module.input_quantizer, "pre_quant_scale", None) is not None}
        calibrator = getattr(module.input_quantizer, "_calibrator", None)
        if isinstance(calibrator, StepRangePercentileCalibrator) and calibrator.per_step:
            entry["input_amax_global_max"] = float(max(max(v) for v in calibrator.per_step.values()))
            entry["input_amax_by_step"] = [float(torch.stack(calibrator.per_step[s]).max())
                                           for s in sorted(calibrator.per_step)]
        if name in (alphas or {}):
            entry["smoothquant_alpha"] = alphas[name]["alpha"]
            entry["smoothquant_error_by_alpha"] = alphas[name]["error_at"]
        record_layers[name] = entry
    record_attention = {name: {q: float(_amax(getattr(modules[name], q)).max())
                               for q in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")
                               if _amax(getattr(modules[name], q)) is not None}
                        for name in attention}
    return {"settings": settings, "counts": count_by_kind(layers) | {"fp8_attention": len(attention)},
            "layers": record_layers, "attention": record_attention, "fused_scales": fused or {},
            "seconds": round(seconds, 2)}


def calibrate(model_dir, settings, ckpt_path, record_path, log=print):
    """The calibrate stage: model folder → calib.pt (ModelOpt state + weights) + calib.json."""
    import modelopt.torch.opt as mto

    from ..models import load_pipeline

    start = time.time()
    device, dtype = compute_device()
    torch.manual_seed(settings["seed"])
    pipe = load_pipeline(model_dir, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    layers, attention, alphas, fused = quantize_unet(pipe, settings, log)
    record = calibration_record(pipe.unet, layers, attention, settings, time.time() - start, alphas, fused)
    record["device"] = device
    with atomic_path(ckpt_path) as tmp:
        mto.save(pipe.unet, tmp)
    write_json(record_path, record)
    log(f"wrote {ckpt_path} in {record['seconds']} s")
    return record


def restore_calibrated_unet(unet, ckpt_path):
    """Load calib.pt into a freshly built UNet of the same model. Corrupt file → clear error."""
    import pickle
    import zipfile

    import modelopt.torch.opt as mto

    try:
        return mto.restore(unet, str(ckpt_path))
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError) as err:
        raise CorruptArtifactError(ckpt_path, f"{type(err).__name__}: {err}") from err
