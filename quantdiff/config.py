"""Config validation and the per-stage slices that rules pass as `params:`.

Snakemake tracks `params:` only when they are plain builtins, so every slice here is a plain
dict of exactly what one stage reads: change it and that stage (and what follows) reruns.
"""
import copy
import math
from pathlib import Path

from .errors import ConfigError

PRECISIONS = ("fp16", "int8", "fp8")
QUANT_LEVELS = (1, 2, 2.5, 3, 4)
SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema" / "config.schema.yaml"


def _where(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_config(config, root=".", schema=SCHEMA):
    """Validate `config` in place (defaults filled in) and return it.

    Raises ConfigError with one message naming the offending key. Runs in the Snakefile, so a
    bad config stops the workflow before any job starts.
    """
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(schema), set_default=True)
    except WorkflowError as err:
        candidates = [*err.args, err.__cause__, err.__context__]
        cause = next((a for a in candidates if isinstance(a, jsonschema.ValidationError)), None)
        if cause is None:
            raise ConfigError(f"config is invalid: {err}") from None
        # The deepest error says most: "'int9' is not one of ..." beats "not valid under any".
        best = jsonschema.exceptions.best_match([cause])
        raise ConfigError(f"config key '{_where(best)}': {best.message}") from None
    _check_semantics(config, Path(root))
    return config


def _check_semantics(config, root):
    for precision, spec in config["precisions"].items():
        if spec["quant_level"] == 4 and precision != "fp8":
            raise ConfigError(
                f"config key 'precisions.{precision}.quant_level': level 4 adds FP8 attention and exists for fp8 only; "
                f"use 1, 2, 2.5 or 3 for {precision}"
            )
    for variant, spec in config.get("study", {}).get("variants", {}).items():
        if spec["quant_level"] == 4 and spec["precision"] != "fp8":
            raise ConfigError(f"config key 'study.variants.{variant}.quant_level': level 4 exists for fp8 only")
    for name in config.get("build", {}).get("models", []):
        if name not in config["models"]:
            raise ConfigError(f"config key 'build.models': unknown model '{name}'; known: {', '.join(config['models'])}")
    for name in config["models"]:
        for section in ("calibration", "bench"):
            prompts = merged(config, name, section)["prompts"]
            if not (root / prompts).is_file():
                where = f"models.{name}.{section}.prompts" if "prompts" in config["models"][name].get(section, {}) else f"{section}.prompts"
                raise ConfigError(f"config key '{where}': prompt file '{prompts}' does not exist")
        engine = merged(config, name, "engine")
        for key in ("batch", "resolution"):
            rng = engine[key]
            if not rng["min"] <= rng["opt"] <= rng["max"]:
                raise ConfigError(f"config key 'engine.{key}': needs min <= opt <= max, got {rng}")
        if engine["backend"] != "tensorrt":  # kernels the torch engine's package does not take
            from .engines import PYTHON_OP_KERNELS, UNPACKAGED_KERNELS, check_packageable

            for key in {**UNPACKAGED_KERNELS, **PYTHON_OP_KERNELS}:
                own = key in config["models"][name].get("engine", {})
                check_packageable({key: engine[key]}, f"models.{name}.engine" if own else "engine",
                                  engine["torch_format"])
        if engine["inductor"]:  # imports torch, so only when there is something to check
            from .engines.torch import check_inductor_settings

            own = "inductor" in config["models"][name].get("engine", {})
            check_inductor_settings(engine["inductor"], f"models.{name}.engine.inductor" if own else "engine.inductor")


def build_matrix(config):
    build = config.get("build", {})
    return {"models": build.get("models") or list(config["models"]),
            "precisions": build.get("precisions") or list(PRECISIONS)}


def merged(config, model, section):
    """A global section with the model's own overrides on top (a fresh plain dict)."""
    out = copy.deepcopy(config.get(section, {}))
    out.update(copy.deepcopy(config["models"][model].get(section, {})))
    return out


def quant_level(config, precision):
    return None if precision == "fp16" else config["precisions"][precision]["quant_level"]


def model_settings(config, model):
    """What the model stage reads: the model entry without the per-stage overrides."""
    entry = config["models"][model]
    return {k: entry[k] for k in ("pipeline", "source", "resolution")}


def calibration_settings(config, model, precision):
    """What calibration reads: its section, the precision and the quant level."""
    return dict(merged(config, model, "calibration"), precision=precision, quant_level=quant_level(config, precision),
                pipeline=config["models"][model]["pipeline"], resolution=config["models"][model]["resolution"])


def export_settings(config, model, precision):
    return dict(config["export"], precision=precision, pipeline=config["models"][model]["pipeline"],
                resolution=config["models"][model]["resolution"])


def engine_settings(config, model, precision, backend="torch"):
    """What the `backend` engine stage reads: a TensorRT plan does not rebuild for an Inductor setting,
    nor an fp8 engine for the int8 GEMM kernel, nor an fp16 one for the conv patches' kernel, nor an int8
    one for the fp8 attention's."""
    engine = merged(config, model, "engine")
    own = {"tensorrt": {"optimization_level": engine["optimization_level"].get(precision, 3),
                        "timing_cache": engine["timing_cache"]},
           "torch": {"inductor": engine["inductor"], "torch_format": engine["torch_format"]}}[backend]
    if backend == "torch" and precision == "int8":
        own["int8_gemm"] = engine["int8_gemm"]
    if backend == "torch" and precision != "fp16":
        own["conv_patches"] = engine["conv_patches"]
        own["geglu"] = engine["geglu"]
    if backend == "torch" and precision == "fp8":
        own["fp8_attention"] = engine["fp8_attention"]
    return {"backend": engine["backend"], "batch": engine["batch"], "resolution_range": engine["resolution"], **own,
            "precision": precision, "pipeline": config["models"][model]["pipeline"],
            "resolution": config["models"][model]["resolution"],
            # diffusers runs classifier-free guidance (UNet batch doubled) only when guidance > 1
            "guidance": merged(config, model, "bench")["guidance"] > 1}


def bench_settings(config, model, precision):
    """What the bench reads: its section, and the engine's Inductor settings, which its torch.compile
    baseline is compiled with too (like for like: docs/PERF.md measured multi-kernel reductions
    speed fp16 up as well)."""
    return dict(merged(config, model, "bench"), model=model, precision=precision, quant_level=quant_level(config, precision),
                pipeline=config["models"][model]["pipeline"], resolution=config["models"][model]["resolution"],
                baseline_inductor=merged(config, model, "engine")["inductor"])


def reference_settings(config, model):
    """What the fp16 reference images depend on: the prompts, seeds and sampler settings, not timing."""
    bench = merged(config, model, "bench")
    return {k: bench[k] for k in ("prompts", "n_prompts", "steps", "guidance", "seed")} | {
        "resolution": config["models"][model]["resolution"]}


def study_calibration_settings(config, model, variant):
    """Calibration of one study variant: the model's settings, then the study's, then the variant's."""
    spec = config["study"]["variants"][variant]
    settings = calibration_settings(config, model, spec["precision"])
    settings.update(copy.deepcopy(config["study"].get("calibration", {})))
    settings.update(copy.deepcopy(spec.get("calibration", {})), precision=spec["precision"],
                    quant_level=spec["quant_level"])
    return settings


def study_bench_settings(config, model, variant):
    """What a variant's quality measurement reads: the fp16 reference's settings and the variant."""
    spec = config["study"]["variants"][variant]
    return dict(reference_settings(config, model), model=model, variant=variant, precision=spec["precision"],
                quant_level=spec["quant_level"])


def calibration_steps_used(n_steps, percentile):
    """How many leading denoising steps the step-range percentile calibrator keeps."""
    return max(1, math.ceil(percentile * n_steps - 1e-9))
