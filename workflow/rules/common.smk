# Helpers shared by the rules: config validation, per-stage params, module inputs, wildcards.
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # the package, when it is not pip-installed

from quantdiff import config as settings
from quantdiff.errors import QuantdiffError


try:
    settings.validate_config(config, root=workflow.basedir)
except QuantdiffError as err:
    raise WorkflowError(str(err)) from None


wildcard_constraints:
    model="|".join(re.escape(m) for m in config["models"]),
    precision="|".join(settings.PRECISIONS),
    quant="int8|fp8",
    variant="|".join(re.escape(v) for v in config["study"]["variants"]) or "(?!)",


def package_modules(*names):
    """Source files of package modules: listed as inputs, editing them reruns the rule."""
    root = Path(workflow.basedir) / "quantdiff"
    files = []
    for name in names:
        path = root / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [root / f"{name}.py"]
    return [os.path.relpath(f) for f in files]


def model_dir(wildcards):
    return f"resources/models/{wildcards.model}"


def model_params(wildcards):
    return settings.model_settings(config, wildcards.model)


def calibration_params(wildcards):
    return settings.calibration_settings(config, wildcards.model, wildcards.quant)


def calibration_prompts(wildcards):
    return settings.merged(config, wildcards.model, "calibration")["prompts"]


def export_params(wildcards):
    return settings.export_settings(config, wildcards.model, wildcards.precision)


def engine_params(backend):
    return lambda wildcards: settings.engine_settings(config, wildcards.model, wildcards.precision, backend)


def bench_params(wildcards):
    return settings.bench_settings(config, wildcards.model, wildcards.precision)


def reference_params(wildcards):
    return settings.reference_settings(config, wildcards.model)


def evaluation_prompts(wildcards):
    return settings.merged(config, wildcards.model, "bench")["prompts"]


def calibrated_or_model(wildcards):
    """fp16 exports and engines start from the model itself; 8-bit ones from the calibrated UNet."""
    if wildcards.precision == "fp16":
        return []
    return [f"results/{wildcards.model}/{wildcards.precision}/calib.pt"]


def engine_backend(wildcards):
    from quantdiff.engines import resolve_backend

    return resolve_backend(settings.merged(config, wildcards.model, "engine")["backend"])


def engine_file(wildcards):
    from quantdiff.engines import engine_filename

    return f"results/{wildcards.model}/{wildcards.precision}/{engine_filename(engine_backend(wildcards))}"


def study_calibration_params(wildcards):
    return settings.study_calibration_settings(config, wildcards.model, wildcards.variant)


def study_bench_params(wildcards):
    return settings.study_bench_settings(config, wildcards.model, wildcards.variant)


def study_records(wildcards):
    return [f"results/study/{wildcards.model}/{v}/quality.json" for v in config["study"]["variants"]]


def bench_targets(wildcards=None):
    build = settings.build_matrix(config)
    return [f"results/{m}/{p}/bench.json" for m in build["models"] for p in build["precisions"]]


def all_targets(wildcards):
    return ["results/summary.md"]


def data_files(*names):
    """Package data folders (architecture configs, tokenizer, trained weights) a rule reads."""
    root = Path(workflow.basedir) / "quantdiff" / "data"
    return [os.path.relpath(f) for name in names for f in sorted((root / name).rglob("*")) if f.is_file()]


def model_inputs(wildcards):
    """The package code and data a model's folder is made from: retraining tiny-xl-shapes reruns
    its model stage, not tiny-xl's."""
    kind, _, name = config["models"][wildcards.model]["source"].partition(":")
    data = {"builtin": ("tokenizer", f"weights/{name}"), "arch": ("tokenizer", f"arch/{name}")}.get(kind, ())
    return package_modules("models") + data_files(*data)
