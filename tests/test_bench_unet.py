"""The GPU UNet-step benchmark entry: what can be checked without a GPU (its refusal, its table)."""
import pytest
import torch

from quantdiff.bench import unet as bench_unet
from quantdiff.errors import ConfigError, MissingBackendError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu_before_building_anything(tmp_path):
    with pytest.raises(MissingBackendError, match="UNet benchmark stage needs a CUDA GPU"):
        bench_unet.main(["--out", str(tmp_path / "bench")])
    assert not (tmp_path / "bench").exists()


def test_inductor_settings_are_read_as_yaml_scalars():
    assert bench_unet.inductor_setting("max_autotune=true") == ("max_autotune", True)
    assert bench_unet.inductor_setting("aot_inductor.compile_wrapper_opt_level=O0") == (
        "aot_inductor.compile_wrapper_opt_level", "O0")
    assert bench_unet.inductor_setting("compile_threads=4") == ("compile_threads", 4)


@pytest.mark.parametrize("argv, error", [
    (["--inductor", "max_autotune"], SystemExit),
    (["--inductor", "max_autotun=true"], ConfigError),
    (["--inductor", "max_autotune=1"], ConfigError),
    (["--baseline-inductor", "max_autotun=true"], ConfigError),
])
def test_bad_inductor_settings_stop_before_anything(tmp_path, argv, error, capsys):
    with pytest.raises(error) as raised:
        bench_unet.main([*argv, "--out", str(tmp_path / "bench")])
    said = str(raised.value) + capsys.readouterr().err
    flag = argv[0]
    assert ("expected KEY=VALUE" in said) if error is SystemExit else said.startswith(f"config key '{flag}.max_autotun")
    assert not (tmp_path / "bench").exists()


def test_table_shows_the_time_not_in_any_kind():
    rows = [{"variant": "torch engine fp8 L3", "ms": 28.5, "cuda_graph_ms": 28.5, "launched_ms": 59.1,
             "speedup": 1.12, "tflops": 474.4, "footprint_mb": 3206, "memory_vs_fp16": 0.612,
             "rel_err_vs_fakequant": 0.0669,
             "device_ms_by_kind": {"gemm": 10.744, "conv": 2.253, "attention": 4.608, "triton": 10.242}},
            {"variant": "torch engine int8 L3 (conv_patches implicit)", "error": "CompilationError: out of resources"}]
    lines = []
    bench_unet.print_table(rows, lines.append)
    assert lines[2].endswith("failed: CompilationError: out of resources")  # a failed variant is a row too
    assert "gemm/conv/attn/triton/rest" in lines[0]
    assert lines[1].split()[-2:] == ["0.0669", "10.744/2.253/4.608/10.242/0.653"]
    assert "1.120" in lines[1] and "0.61" in lines[1]


def test_error_bound_is_the_measured_one_and_flags_what_passes_it():
    """The bound on the error against fake quant exists where it was measured (SDXL at 1024 px,
    batch 2); a row past it is marked in the table and named for the exit status."""
    assert bench_unet.error_bound("sdxl-base-1.0", "fp8", 2, 1024) == 0.075
    assert bench_unet.error_bound("sdxl-base-1.0", "int8", 2, 1024) == 0.05
    # (every measured error, docs/PERF.md, is inside it: fp8 up to 0.0677, int8 up to 0.0448)
    assert bench_unet.error_bound("sdxl-base-1.0", "fp8", 1, 1024) is None  # no measured bound there
    assert bench_unet.error_bound("sdxl-base-1.0", "fp8", 2, 512) is None
    assert bench_unet.error_bound("sd-1.5", "int8", 2, 1024) is None
    row = {"ms": 30.0, "cuda_graph_ms": 30.0, "launched_ms": 40.0, "speedup": 1.0, "tflops": 400.0,
           "footprint_mb": 2800, "device_ms_by_kind": {"gemm": 10.0, "conv": 1.0, "attention": 4.0, "triton": 8.0}}
    rows = [row | {"variant": "inside", "rel_err_vs_fakequant": 0.0671, "within_error_bound": True},
            row | {"variant": "past", "rel_err_vs_fakequant": 0.2, "within_error_bound": False},
            row | {"variant": "unbounded", "rel_err_vs_fakequant": 0.3, "within_error_bound": None}]
    lines = []
    bench_unet.print_table(rows, lines.append)
    assert [line.split()[-2] for line in lines[1:]] == ["0.0671", "0.2!", "0.3"]
    assert bench_unet.past_error_bound(rows) == ["past"]


def test_every_recorded_gpu_run_is_inside_the_error_bound():
    """The bound is the measurements': every 8-bit row of docs/perf's UNet benches (18 runs on an H200)."""
    import json
    import re

    from conftest import ROOT

    checked = 0
    for path in sorted((ROOT / "docs" / "perf").glob("unet-bench-*.json")):
        run = json.loads(path.read_text())
        for row in run["rows"]:
            if "rel_err_vs_fakequant" not in row:
                continue
            precision = re.match(r"torch engine (int8|fp8) ", row["variant"]).group(1)
            bound = bench_unet.error_bound(run["arch"], precision, run["batch"], run["resolution"])
            assert row["rel_err_vs_fakequant"] <= bound, (path.name, row["variant"])
            checked += 1
    assert checked >= 24


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert bench_unet.relative_error(ref, ref) == 0.0
    assert bench_unet.relative_error(ref, torch.tensor([3.0, 4.5])) == pytest.approx(0.1)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("backend", ["compile", "aoti"])
def test_compiled_step_returns_the_noise_prediction(backend):
    """Both backends of the UNet bench time a step that predicts what the module does; "aoti"
    goes through the engine stage's packaging and loading, and runs after its package is gone."""
    from tiny_unets import tiny_sdxl_unet, unet_inputs

    unet = tiny_sdxl_unet().eval()
    inputs = unet_inputs(2, 3)
    said = []
    step = bench_unet.compiled_step(unet, inputs, backend, log=said.append)
    expected = unet(**inputs).sample
    out = step()
    assert out.shape == expected.shape and bench_unet.relative_error(expected, out) < 1e-4
    assert any("engine: compiled in" in line for line in said) == (backend == "aoti")


def test_kinds_count_the_engines_own_gemm_kernel_once():
    # rows as the H200 profile of the int8 engine had them: the Triton GEMM's GPU kernel, the
    # CPU-side range Inductor wraps it in (same name, suffixed, nesting the same device time),
    # an aten GEMM, a generated Triton kernel and the CPU range of a cuDNN attention call
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, device_type, total, own):
        return SimpleNamespace(key=key, device_type=device_type, device_time_total=total, self_device_time_total=own)

    events = [event("_gemm8_kernel", cuda, 9000, 9000), event("_gemm8_kernel_13", cpu, 6000, 0),
              event("_gemm8_kernel_11", cpu, 3000, 0), event("aten::mm", cpu, 3000, 0),
              event("triton_poi_fused_mul_0", cuda, 1500, 1500), event("triton_poi_fused_mul_0", cpu, 1500, 0),
              event("aten::_scaled_dot_product_cudnn_attention", cpu, 600, 0), event("Memcpy DtoD", cuda, 300, 300),
              event("_patches_kernel_2", cuda, 1500, 1500), event("_patches_kernel_2", cpu, 1500, 0),
              event("_conv8_kernel", cuda, 600, 600), event("_conv8_kernel_4", cpu, 600, 0),
              event("_fp8_attention_kernel_2", cuda, 900, 900), event("_fp8_attention_kernel_2", cpu, 900, 0),
              event("_gemm8_tma_kernel_1", cuda, 1500, 1500), event("_gemm8_tma_kernel_1", cpu, 1500, 0)]
    assert bench_unet.device_ms_by_kind(events, calls=3) == {"gemm": 4.5, "conv": 0.2, "attention": 0.5,
                                                             "triton": 1.0}


@pytest.mark.parametrize("argv, message", [
    (["--int8-gemm", "triton,cutlass"], "int8 GEMM 'cutlass' is not one of auto, triton, triton-tma, int_mm"),
    (["--conv-patches", "inductor,cudnn"], "conv patches 'cudnn' is not one of auto, triton, inductor, implicit"),
    (["--fp8-attention", "sdpa,flash"], "fp8 attention 'flash' is not one of auto, sdpa, triton, triton-fp8-probs"),
    # torch.compile times them; an AOTInductor package, as the engine stage builds, does not take them
    (["--backend", "aoti", "--int8-gemm", "triton,triton-tma"], "engine.int8_gemm is triton-tma, which the torch engine"),
    (["--backend", "aoti", "--geglu", "inductor,triton"], "engine.geglu is triton, which the torch engine"),
])
def test_bad_kernel_names_stop_before_anything(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        bench_unet.main([*argv, "--out", str(tmp_path / "bench")])
    assert not (tmp_path / "bench").exists()


def test_bad_conv_mode_stops_before_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_unet.main(["--conv", "auto,winograd", "--out", str(tmp_path / "bench")])
    assert "--conv 'auto,winograd': each mode is one of auto, gemm, float" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_bad_projection_mode_stops_before_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_unet.main(["--projections", "fused,merged", "--out", str(tmp_path / "bench")])
    assert "--projections 'fused,merged': each mode is one of fused, separate" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


@torch.no_grad()
def test_each_projection_mode_is_a_conversion_of_its_own(tmp_path, monkeypatch):
    """The variant loop on a CPU stand-in (the tiny UNet, each variant run eagerly instead of
    compiled and timed): fused and separate projections are two conversions of one fake-quant
    model, with their own counts, and the same output."""
    pytest.importorskip("modelopt.torch.quantization")
    import quantdiff.device
    import quantdiff.engines.gemm8 as gemm8
    import quantdiff.engines.torch as engine_torch
    import quantdiff.models
    from tiny_unets import tiny_sdxl_unet, unet_inputs

    outputs = {}

    def measure(name, module, inputs, flops, args, log, backend="compile", inductor=None):
        outputs[name] = module(**inputs).sample
        row = {"variant": name, "ms": 2.0 if "fp16" in name else 1.0, "cuda_graph_ms": None, "launched_ms": 1.0,
               "tflops": 1.0, "footprint_mb": 10, "device_ms_by_kind": dict.fromkeys(("gemm", "conv", "attention",
                                                                                        "triton"), 0.0)}
        return row, outputs[name], None

    resolve = gemm8.resolve_kernels
    monkeypatch.setattr(quantdiff.device, "require_cuda", lambda what: None)
    monkeypatch.setattr(quantdiff.device, "require_fp8", lambda device: None)
    monkeypatch.setattr(quantdiff.device, "describe_device", lambda device: {"name": "CPU stand-in"})
    monkeypatch.setattr(quantdiff.models, "arch_unet", lambda arch, device, dtype: tiny_sdxl_unet())
    monkeypatch.setattr(quantdiff.models, "unet_example_inputs", lambda unet, batch, res, dtype, device: unet_inputs(2, 0))
    monkeypatch.setattr(engine_torch, "device_layout", lambda unet, device: unet)
    monkeypatch.setattr(gemm8, "resolve_kernels",
                        lambda precision, device, *a, **kw: resolve(precision, "cpu", *a, **kw))
    monkeypatch.setattr(bench_unet, "measure", measure)
    result = bench_unet.main(["--precisions", "fp8", "--projections", "fused,separate", "--out", str(tmp_path)])
    fused, separate = result["rows"][1:]
    assert fused["variant"] == "torch engine fp8 L3 (fused projections)" and fused["projections"] == "fused"
    assert separate["variant"] == "torch engine fp8 L3 (separate projections)"
    assert fused["counts"]["attention_to_qkv"] == fused["counts"]["attention_to_kv"] == 4
    assert "attention_to_qkv" not in separate["counts"] and separate["counts"]["attention_shared_input_quantizers"] == 8
    assert torch.equal(outputs[fused["variant"]], outputs[separate["variant"]])
    assert fused["speedup"] == 2.0 and fused["rel_err_vs_fakequant"] == separate["rel_err_vs_fakequant"] < 1e-3
