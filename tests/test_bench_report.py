"""bench.json schema, image grid, SQNR plot and summary tables."""
import json

import numpy as np
import pytest
from PIL import Image

from quantdiff.bench import report
from quantdiff.bench.report import plot_sqnr, save_grid, summary_html, summary_markdown, summary_table
from quantdiff.bench.schema import BENCH_SCHEMA_PATH, BenchSchemaError, load_bench, validate_bench
from quantdiff.errors import ConfigError, CorruptArtifactError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _latency(median):
    return {"median": median, "p10": median * 0.9, "p90": median * 1.1, "n": 20}


def example_record(**overrides):
    record = {
        "schema_version": 1,
        "created": "2025-01-31T12:00:00Z",
        "model": "sdxl-tiny",
        "precision": "int8",
        "quant_level": 3,
        "backend": "torch",
        "architecture_only": True,
        "device": {
            "kind": "cpu",
            "name": "x86_64",
            "compute_capability": None,
            "driver": None,
            "versions": {"torch": "2.13.0", "tensorrt": None},
        },
        "shapes": {"batch": 1, "resolution": 64, "steps": 4, "guidance": 5.0},
        "timing_method": "perf_counter",
        "unet_step_ms": _latency(10.0),
        "pipeline_ms": _latency(60.0),
        "baseline": {
            "name": "torch.compile fp32 (CPU)",
            "dtype": "float32",
            "unet_step_ms": _latency(12.0),
            "pipeline_ms": _latency(70.0),
        },
        "speedup_vs_baseline": {"unet": 1.2, "pipeline": 70.0 / 60.0},
        "peak_memory_mb": {"engine": None, "baseline": None},
        "engine_size_mb": 4.5,
        "quality": {
            "meaningful": False,
            "note": "random weights",
            "psnr_db": [30.5, "inf"],
            "psnr_db_mean": 30.5,
            "ssim": [0.9, 1.0],
            "ssim_mean": 0.95,
            "sqnr_db_by_step": [25.0, 22.0, 20.0, "inf"],
            "sqnr_db_mean": 22.333,
            "identical_images": 1,
        },
        "inputs": {"checkpoint": {"path": "checkpoints/sdxl-tiny/int8-3", "sha256": "ab" * 32}},
        "images": [
            {"prompt": "a cat", "seed": 0, "reference": "images/fp16/0.png", "test": "images/int8/0.png"},
            {"prompt": "a dog", "seed": 1, "reference": "images/fp16/1.png", "test": "images/int8/1.png"},
        ],
    }
    record.update(overrides)
    return record


def _error(record):
    with pytest.raises(BenchSchemaError) as info:
        validate_bench(record)
    return str(info.value)


def test_schema_file_is_valid_draft_2020_12():
    schema = json.loads(BENCH_SCHEMA_PATH.read_text())
    assert schema["$schema"].endswith("2020-12/schema")
    assert schema["properties"]["schema_version"] == {"const": 1}


def test_example_record_validates():
    validate_bench(example_record())
    gpu = example_record(
        precision="fp16", quant_level=None, backend="tensorrt", architecture_only=False,
        timing_method="cuda-events",
        device={"kind": "cuda", "name": "NVIDIA H100", "compute_capability": "9.0", "driver": "580.1",
                "versions": {"tensorrt": "10.9"}},
        peak_memory_mb={"engine": 5000.0, "baseline": 7000.0},
    )
    gpu["quality"]["meaningful"] = True
    validate_bench(gpu)


def test_error_is_config_and_value_error():
    assert issubclass(BenchSchemaError, ConfigError) and issubclass(BenchSchemaError, ValueError)


@pytest.mark.parametrize("key", list(example_record()))
def test_missing_top_level_key_is_named(key):
    record = example_record()
    del record[key]
    assert f"'{key}' is a required property" in _error(record)


@pytest.mark.parametrize(
    "section, key",
    [("device", "compute_capability"), ("shapes", "steps"), ("unet_step_ms", "p90"), ("baseline", "dtype"),
     ("quality", "sqnr_db_mean"), ("peak_memory_mb", "engine"), ("speedup_vs_baseline", "unet")],
)
def test_missing_nested_key_is_named_with_path(section, key):
    record = example_record()
    del record[section][key]
    message = _error(record)
    assert f"$.{section}: '{key}' is a required property" in message


@pytest.mark.parametrize(
    "path, value",
    [(("precision",), "int4"), (("backend",), "onnxruntime"), (("timing_method",), "wallclock"),
     (("device", "kind"), "tpu")],
)
def test_wrong_enum_is_named(path, value):
    record = example_record()
    target = record
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    message = _error(record)
    assert "$." + ".".join(path) in message and repr(value) in message


def test_other_violations():
    assert "$.schema_version" in _error(example_record(schema_version=2))
    assert "'unexpected' was unexpected" in _error(example_record(unexpected=1))
    assert "$.quant_level" in _error(example_record(quant_level=None))  # int8 needs a level
    assert "$.quant_level" in _error(example_record(precision="fp16"))  # fp16 has none
    assert "$.timing_method" in _error(example_record(timing_method="cuda-events"))  # CPU has no CUDA events
    record = example_record()
    record["quality"]["meaningful"] = True  # random weights cannot give meaningful quality
    assert "$.quality.meaningful" in _error(record)
    record = example_record()
    record["quality"]["psnr_db"][1] = "Infinity"
    assert "$.quality.psnr_db[1]" in _error(record)
    record = example_record()
    record["inputs"]["checkpoint"]["sha256"] = "xyz"
    assert "$.inputs.checkpoint.sha256" in _error(record)
    record = example_record()
    record["images"][0]["reference"] = "/abs/0.png"
    assert "$.images[0].reference" in _error(record)
    record["images"][0]["reference"] = "../0.png"
    assert "$.images[0].reference" in _error(record)
    record = example_record()
    record["unet_step_ms"]["n"] = 0
    assert "$.unet_step_ms.n" in _error(record)


def test_load_bench(tmp_path):
    good = tmp_path / "bench.json"
    good.write_text(json.dumps(example_record()))
    assert load_bench(good)["model"] == "sdxl-tiny"
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1,')
    with pytest.raises(CorruptArtifactError):
        load_bench(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(example_record(model=None)))
    with pytest.raises(BenchSchemaError, match="bad.json"):
        load_bench(bad)


def test_grid_size_for_two_64px_prompts(tmp_path):
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    tests = [Image.fromarray(r) for r in refs]
    path = tmp_path / "grid.png"
    captions = [report.format_caption("a cat", 31.2, 0.95), report.format_caption("a dog " * 40, "inf", 1.0)]
    save_grid(refs, tests, captions, path)
    with Image.open(path) as grid:
        assert grid.format == "PNG"
        # 64 px upscaled x2 to 128; width 8 + 2 * (128 + 8), height 8 + 24 + 2 * (128 + 20 + 8).
        assert grid.size == (280, 344)
        assert (report.PAD, report.HEADER_H, report.CAPTION_H, report.MIN_CELL) == (8, 24, 20, 128)
        # Nearest upscale: the first reference pixel fills a 2x2 block at the first cell's corner.
        top_left = (report.PAD, report.PAD + report.HEADER_H)
        block = [grid.getpixel((top_left[0] + dx, top_left[1] + dy)) for dx in (0, 1) for dy in (0, 1)]
        assert set(block) == {tuple(refs[0][0, 0])}
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp leftovers
    with pytest.raises(ValueError):
        save_grid(refs, tests[:1], captions, tmp_path / "bad.png")


def test_plot_sqnr_writes_png(tmp_path):
    path = tmp_path / "sqnr.png"
    plot_sqnr([30.0, 25.5, "inf", float("inf"), 20.0], path, title="sdxl-tiny int8 level 3")
    assert path.read_bytes()[:8] == PNG_MAGIC
    all_inf = tmp_path / "all_inf.png"
    plot_sqnr(["inf", "inf"], all_inf, title="identical")
    assert all_inf.read_bytes()[:8] == PNG_MAGIC


def _records():
    fp16 = example_record(precision="fp16", quant_level=None)
    fp8 = example_record(precision="fp8", quant_level=4)
    other = example_record(model="a-model")
    return [fp8, example_record(), other, fp16]


def test_summary_table_order_and_values():
    rows = summary_table(_records())
    assert [(r["model"], r["precision"]) for r in rows] == [
        ("a-model", "int8"), ("sdxl-tiny", "fp16"), ("sdxl-tiny", "int8"), ("sdxl-tiny", "fp8")]
    row = rows[0]
    assert row["unet_ms"] == 10.0 and row["baseline_ms"] == 12.0 and row["speedup"] == 1.2
    assert row["pipeline_ms"] == 60.0 and row["psnr_mean"] == 30.5 and row["ssim_mean"] == 0.95
    assert row["note"] == f"{report.ARCHITECTURE_ONLY_NOTE}; {report.CPU_TIMING_NOTE}"
    assert summary_table([example_record(architecture_only=False)])[0]["note"] == f"random weights; {report.CPU_TIMING_NOTE}"


def test_summary_markdown_has_header_and_one_row_per_record():
    records = _records()
    lines = summary_markdown(records).strip().splitlines()
    assert lines[0].startswith("| model | precision | quant level |")
    assert set(lines[1]) <= set("|-")
    assert len(lines) == 2 + len(records)
    assert "| sdxl-tiny | fp16 | - |" in lines[3]
    assert "1.20x" in lines[2] and "10.00" in lines[2]


def test_summary_html_has_table_id():
    page = summary_html(_records() + [example_record(model="<script>")])
    assert page.startswith("<!DOCTYPE html>")
    assert '<table id="bench-results">' in page
    assert "<th>model</th>" in page
    assert page.count("<tr>") == 1 + 5
    assert "&lt;script&gt;" in page and "<script>" not in page



def test_documented_example_validates():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "BENCH_SCHEMA.md").read_text()
    validate_bench(json.loads(re.search(r"```json\n(.*?)```", doc, re.S).group(1)))


def _cuda_graph(engine_ms=25.0, baseline_ms=32.0):
    return {"unet_step_ms": engine_ms and _latency(engine_ms), "baseline_unet_step_ms": baseline_ms and _latency(baseline_ms),
            "speedup": round(baseline_ms / engine_ms, 4) if engine_ms and baseline_ms else None,
            "note": "both captured" if engine_ms and baseline_ms else "unet step: RuntimeError: capture"}


def test_cuda_graph_section_is_optional_and_checked():
    validate_bench(example_record(cuda_graph=_cuda_graph()))
    validate_bench(example_record(cuda_graph=_cuda_graph(engine_ms=None)))
    assert "$.cuda_graph: 'note' is a required property" in _error(
        example_record(cuda_graph={k: v for k, v in _cuda_graph().items() if k != "note"}))
    assert "$.cuda_graph.speedup" in _error(example_record(cuda_graph=_cuda_graph() | {"speedup": 0}))
    assert "$.cuda_graph.unet_step_ms" in _error(example_record(cuda_graph=_cuda_graph() | {"unet_step_ms": {"n": 0}}))


def test_summary_shows_the_cuda_graph_speedup_where_measured():
    rows = summary_table([example_record(), example_record(model="gpu", cuda_graph=_cuda_graph())])
    assert [r["speedup_graph"] for r in rows] == [1.28, None]
    lines = summary_markdown([example_record(model="gpu", cuda_graph=_cuda_graph())]).splitlines()
    assert "speedup (UNet, CUDA graphs)" in lines[0] and "| 1.20x | 1.28x |" in lines[2]
