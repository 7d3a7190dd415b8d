"""Bad configs stop with one message naming the key, before any job runs."""
import copy

import pytest
import yaml

from quantdiff.config import (calibration_settings, engine_settings, validate_config)
from quantdiff.errors import ConfigError

from workflow_helpers import ROOT, copy_project, snakemake


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_shipped_config_is_valid_and_defaults_filled(config):
    validated = validate_config(config, root=ROOT)
    assert validated["calibration"]["alpha"] == 0.8
    assert validated["calibration"]["n_steps"] == 20
    assert validated["calibration"]["batch_size"] == 2
    assert validated["precisions"] == {"int8": {"quant_level": 3}, "fp8": {"quant_level": 4}}
    assert set(validated["models"]) == {"tiny-xl", "tiny-xl-shapes", "xl-1.0", "xl-turbo", "1.5", "2.1", "xl-1.0-arch"}


def test_defaults_fill_a_minimal_config():
    minimal = {"models": {"tiny-xl": {"pipeline": "sdxl", "source": "builtin:tiny-xl", "resolution": 64}}}
    validated = validate_config(minimal, root=ROOT)
    assert validated["export"] == {"opset": 19, "fp8_standard_qdq": False, "ort_check": "auto"}
    assert validated["engine"]["optimization_level"] == {"fp16": 3, "int8": 4, "fp8": 4}
    assert validated["calibration"]["percentile"] == 1.0


def test_alpha_auto_is_valid(config):
    auto = copy.deepcopy(config)
    auto["calibration"]["alpha"] = "auto"
    assert calibration_settings(validate_config(auto, root=ROOT), "tiny-xl", "int8")["alpha"] == "auto"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(calibraton={}), "'calibraton' was unexpected"),
    (lambda c: c["calibration"].update(alpah=0.5), "config key 'calibration': Additional properties are not allowed ('alpah'"),
    (lambda c: c["precisions"].update(int4={"quant_level": 3}), "'int4' was unexpected"),
    (lambda c: c["precisions"]["int8"].update(quant_level=5), "config key 'precisions.int8.quant_level': 5 is not one of [1, 2, 2.5, 3, 4]"),
    (lambda c: c["precisions"]["int8"].update(quant_level=4), "level 4 adds FP8 attention and exists for fp8 only"),
    (lambda c: c["calibration"].update(percentile=0), "config key 'calibration.percentile': 0 is less than or equal to the minimum of 0"),
    (lambda c: c["calibration"].update(percentile=1.5), "config key 'calibration.percentile': 1.5 is greater than the maximum of 1"),
    (lambda c: c["calibration"].update(prompts="config/prompts/nope.txt"), "config key 'calibration.prompts': prompt file 'config/prompts/nope.txt' does not exist"),
    (lambda c: c["build"].update(models=["xl-2.0"]), "config key 'build.models': unknown model 'xl-2.0'"),
    (lambda c: c["models"]["tiny-xl"].update(pipeline="sd3"), "config key 'models.tiny-xl.pipeline': 'sd3' is not one of ['sdxl', 'sd']"),
    (lambda c: c["engine"].update(backend="onnxruntime"), "config key 'engine.backend'"),
    (lambda c: c["engine"].update(batch={"min": 4, "opt": 2, "max": 8}), "config key 'engine.batch': needs min <= opt <= max"),
    (lambda c: c["calibration"].update(alpha="magic"), "config key 'calibration.alpha': 'magic' is not valid"),
    (lambda c: c["calibration"].update(alpha=1.5), "config key 'calibration.alpha'"),
    (lambda c: c["export"].update(ort_check="sometimes"), "config key 'export.ort_check': 'sometimes' is not one of"),
    (lambda c: c["engine"].update(int8_gemm="cutlass"), "config key 'engine.int8_gemm': 'cutlass' is not one of ['auto', 'triton', 'triton-tma', 'int_mm', 'cudnn']"),
    (lambda c: c["engine"].update(conv_patches="cudnn"), "config key 'engine.conv_patches': 'cudnn' is not one of ['auto', 'triton', 'inductor', 'implicit']"),
    (lambda c: c["engine"].update(torch_format="onnx"), "config key 'engine.torch_format': 'onnx' is not one of ['aoti', 'export']"),
    (lambda c: c["engine"].update(fp8_attention="flash"), "config key 'engine.fp8_attention': 'flash' is not one of ['auto', 'sdpa', 'triton', 'triton-fp8-probs']"),
    (lambda c: c["engine"].update(inductor={"max_autotun": True}),
     "config key 'engine.inductor.max_autotun': not a torch._inductor.config setting (torch "),
    (lambda c: c["engine"].update(inductor={"max_autotun": True}), "did you mean 'max_autotune'?"),
    (lambda c: c["engine"].update(inductor={"max_autotune": "yes"}),
     "config key 'engine.inductor.max_autotune': takes a bool (default False), not 'yes'"),
    (lambda c: c["engine"].update(inductor={"aot_inductor.metadata": "x"}),
     "config key 'engine.inductor.aot_inductor.metadata': set by the engine stage itself"),
    (lambda c: c["engine"].update(inductor={"max_autotune": [1]}), "config key 'engine.inductor.max_autotune': [1] is not of type"),
    (lambda c: c["models"]["tiny-xl"].setdefault("engine", {}).update(inductor={"coordinate_descent_tuning": 1}),
     "config key 'models.tiny-xl.engine.inductor.coordinate_descent_tuning': takes a bool"),
    # kernels an AOTInductor package does not take (docs/PERF.md: NaN images from one on an H200)
    (lambda c: c["engine"].update(int8_gemm="triton-tma"),
     "engine.int8_gemm is triton-tma, which the torch engine (an AOTInductor package) does not take: its kernel "
     "makes TMA descriptors on the GPU, and a package with it gave NaN images on an H200 (torch 2.11; "
     "docs/PERF.md). Use triton or auto;"),
    (lambda c: c["models"]["tiny-xl"].setdefault("engine", {}).update(geglu="triton"),
     "models.tiny-xl.engine.geglu is triton, which the torch engine (an AOTInductor package) does not take"),
    # cuDNN's int8 kernels are Python ops: the export format only
    (lambda c: c["engine"].update(int8_gemm="cudnn"),
     "engine.int8_gemm is cudnn, whose kernels are called from Python, which an AOTInductor package "
     "(engine.torch_format: aoti) cannot hold. Set engine.torch_format: export"),
])
def test_bad_config_names_the_key(config, edit, message):
    bad = copy.deepcopy(config)
    edit(bad)
    with pytest.raises(ConfigError) as err:
        validate_config(bad, root=ROOT)
    assert message in str(err.value)
    assert "\n" not in str(err.value)  # one line, not a schema dump


def test_per_model_overrides_apply_to_that_model_only(config):
    validated = validate_config(config, root=ROOT)
    assert calibration_settings(validated, "xl-turbo", "int8")["n_steps"] == 4
    assert calibration_settings(validated, "xl-1.0", "int8")["n_steps"] == 20
    engine = engine_settings(validated, "xl-turbo", "fp8", "tensorrt")
    assert engine["guidance"] is False and engine["optimization_level"] == 4


def test_inductor_settings_reach_the_engine_stage(config):
    tuned = copy.deepcopy(config)
    tuned["engine"]["inductor"] = {"max_autotune": True, "aot_inductor.compile_wrapper_opt_level": "O0"}
    tuned["models"]["xl-turbo"]["engine"] = {"inductor": {"coordinate_descent_tuning": True}}
    validated = validate_config(tuned, root=ROOT)
    assert engine_settings(validated, "tiny-xl", "fp8")["inductor"] == tuned["engine"]["inductor"]
    assert engine_settings(validated, "xl-turbo", "int8")["inductor"] == {"coordinate_descent_tuning": True}
    assert engine_settings(validate_config(config, root=ROOT), "tiny-xl", "fp8")["inductor"] == {}
    # each engine rule's params hold what its backend reads: an Inductor setting rebuilds no TensorRT plan
    plan = engine_settings(validated, "tiny-xl", "fp8", "tensorrt")
    assert "inductor" not in plan and {"optimization_level", "timing_cache"} <= set(plan)
    assert not {"optimization_level", "timing_cache"} & set(engine_settings(validated, "tiny-xl", "fp8"))


def test_kernels_refused_in_a_package_pass_where_the_engine_is_tensorrt(config):
    """engine.backend: tensorrt builds no AOTInductor package, so the torch kernels' settings are moot."""
    plan = copy.deepcopy(config)
    plan["engine"].update(backend="tensorrt", int8_gemm="triton-tma", geglu="triton")
    assert validate_config(plan, root=ROOT)["engine"]["geglu"] == "triton"


def test_cudnn_int8_passes_in_the_export_format(config):
    chosen = copy.deepcopy(config)
    chosen["engine"].update(int8_gemm="cudnn", torch_format="export")
    assert engine_settings(validate_config(chosen, root=ROOT), "tiny-xl", "int8")["int8_gemm"] == "cudnn"


def test_int8_gemm_setting_reaches_only_int8_torch_engines(config):
    chosen = copy.deepcopy(config)
    chosen["models"]["xl-turbo"]["engine"] = {"int8_gemm": "int_mm"}
    validated = validate_config(chosen, root=ROOT)
    assert engine_settings(validated, "tiny-xl", "int8")["int8_gemm"] == "auto"  # the default
    assert engine_settings(validated, "xl-turbo", "int8")["int8_gemm"] == "int_mm"
    # an fp8 engine or a TensorRT plan does not rebuild when it changes
    assert "int8_gemm" not in engine_settings(validated, "xl-turbo", "fp8")
    assert "int8_gemm" not in engine_settings(validated, "xl-turbo", "int8", "tensorrt")
    # the conv patches' kernel matters to 8-bit torch engines only
    assert engine_settings(validated, "tiny-xl", "fp8")["conv_patches"] == "auto"
    assert "conv_patches" not in engine_settings(validated, "tiny-xl", "fp16")
    # and the fp8 attention's to fp8 ones only
    assert engine_settings(validated, "tiny-xl", "fp8")["fp8_attention"] == "auto"
    assert "fp8_attention" not in engine_settings(validated, "tiny-xl", "int8")


def test_torch_format_reaches_every_torch_engine_and_no_plan(config):
    chosen = copy.deepcopy(config)
    chosen["models"]["xl-turbo"]["engine"] = {"torch_format": "export"}
    validated = validate_config(chosen, root=ROOT)
    assert [engine_settings(validated, m, p)["torch_format"] for m, p in
            [("tiny-xl", "int8"), ("xl-turbo", "int8"), ("xl-turbo", "fp16")]] == ["aoti", "export", "export"]
    assert "torch_format" not in engine_settings(validated, "xl-turbo", "fp8", "tensorrt")


def test_snakemake_stops_before_any_job(tmp_path):
    """Through the real CLI: the message, a non-zero exit, and nothing built."""
    work = copy_project(tmp_path)
    (work / "bad.yaml").write_text("precisions: {int8: {quant_level: 4}}\n")
    proc = snakemake(work, "--configfile", "config/config.yaml", "bad.yaml", "--", "results/tiny-xl/int8/calib.pt",
                     check=False)
    assert proc.returncode != 0
    assert "level 4 adds FP8 attention and exists for fp8 only" in proc.stdout
    assert not (work / "resources").exists() and not (work / "results").exists()


def test_unknown_model_or_precision_target_is_refused(tmp_path):
    work = copy_project(tmp_path)
    for target in ("results/xl-9/int8/calib.pt", "results/tiny-xl/int4/calib.pt"):
        proc = snakemake(work, "--dry-run", target, check=False)
        assert proc.returncode != 0
        assert "MissingRuleException" in proc.stdout or "No rule to produce" in proc.stdout


@pytest.mark.parametrize("overlay", sorted(p.name for p in (ROOT / "config" / "overlays").glob("*.yaml")))
def test_shipped_overlays_validate_on_the_config(config, overlay):
    """Each overlay, merged onto config.yaml as `--configfile config/config.yaml OVERLAY` merges it."""
    from snakemake.utils import update_config

    update_config(config, yaml.safe_load((ROOT / "config" / "overlays" / overlay).read_text()))
    validated = validate_config(config, root=ROOT)
    if overlay == "multi-kernel.yaml":
        assert engine_settings(validated, "xl-1.0-arch", "fp8")["inductor"] == {"triton.multi_kernel": 1}
