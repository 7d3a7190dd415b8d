"""The quality study: settings per variant, the report's table and findings, and its DAG."""
import copy

import pytest
import yaml

from quantdiff.bench.study_report import findings, write_study_report
from quantdiff.config import study_bench_settings, study_calibration_settings, validate_config
from quantdiff.errors import ConfigError

from conftest import ROOT
from workflow_helpers import copy_project, planned_jobs


@pytest.fixture
def config():
    return validate_config(yaml.safe_load((ROOT / "config/config.yaml").read_text()), root=ROOT)


def test_variant_settings_layer_model_study_and_variant(config):
    s = study_calibration_settings(config, "tiny-xl-shapes", "int8-L3-p0.5")
    assert s["percentile"] == 0.5 and s["precision"] == "int8" and s["quant_level"] == 3
    assert s["calib_size"] == 16  # study-wide
    assert s["prompts"] == "config/prompts/shapes-calibration.txt"  # the model's own prompts
    assert study_calibration_settings(config, "tiny-xl-shapes", "int8-L3-auto")["alpha"] == "auto"
    b = study_bench_settings(config, "tiny-xl-shapes", "fp8-L4")
    assert b["prompts"] == "config/prompts/shapes-evaluation.txt" and b["precision"] == "fp8" and b["quant_level"] == 4


def test_int8_level4_variant_is_refused(config):
    bad = copy.deepcopy(config)
    bad["study"]["variants"]["int8-L4"] = {"precision": "int8", "quant_level": 4}
    with pytest.raises(ConfigError, match="study.variants.int8-L4.quant_level"):
        validate_config(bad, root=ROOT)


def _record(variant, psnr, precision="int8", level=3, alpha=0.8, percentile=1.0, method="min-mean", alphas=None,
            fused_scales=True):
    return {"variant": variant, "precision": precision, "quant_level": level,
            "calibration": {"alpha": alpha, "percentile": percentile, "collect_method": method,
                            "fused_scales": fused_scales},
            "alphas": alphas or {},
            "quality": {"psnr_db": [psnr, psnr], "psnr_db_mean": psnr, "ssim_mean": 0.9,
                        "sqnr_db_by_step": [20.0, 25.0, "inf"], "sqnr_db_mean": 22.5,
                        "meaningful": True, "note": "test"}}


RECORDS = [
    _record("int8-L3", 27.0),
    _record("int8-L3-max", 25.0, method="max-max"),
    _record("int8-L3-p0.5", 28.0, percentile=0.5),
    _record("int8-L3-a0.5", 27.5, alpha=0.5),
    _record("int8-L3-auto", 27.2, alpha="auto", alphas={"0.5": 3, "1.0": 7}),
    _record("fp8-L4", 30.0, precision="fp8", level=4),
]


def test_findings_compare_like_with_like():
    lines = findings({r["variant"]: r for r in RECORDS})
    assert lines[0] == "INT8 level 3 (int8-L3): mean PSNR 27.00 dB vs fp16, which meets the 26 dB goal."
    # the best global alpha is 0.5 (27.5 dB), above auto (27.2 dB)
    assert "auto is **not** better here" in lines[1] and "int8-L3-a0.5, alpha 0.5) 27.50 dB" in lines[1]
    # percentile 0.5 (28.0 dB) beats plain max (25.0 dB)
    assert "int8-L3-p0.5, percentile 0.5) 28.00 dB" in lines[2] and "is better" in lines[2]


def test_findings_say_when_a_goal_is_missed():
    lines = findings({"int8-L3": _record("int8-L3", 21.5)})
    assert lines == ["INT8 level 3 (int8-L3): mean PSNR 21.50 dB vs fp16, which misses the 26 dB goal."]


def test_report_table_and_plot(tmp_path):
    text = write_study_report(RECORDS, tmp_path / "QUALITY.md", tmp_path / "sqnr.png", "Study")
    assert (tmp_path / "QUALITY.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| int8") or line.startswith("| fp8")]
    assert len(rows) == len(RECORDS)
    assert rows[1] == "| int8-L3-max | int8 | 3 | collect_method max-max | 25.00 | 0.9000 | 22.50 | 20.00 / inf |"
    assert "- `int8-L3-auto` chose, per layer: alpha 0.5: 3, alpha 1.0: 7" in text
    assert (tmp_path / "sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_dag_and_staleness(tmp_path):
    work = copy_project(tmp_path)
    target = "results/study/tiny-xl/QUALITY.md"
    jobs = planned_jobs(work, target)
    n = len(yaml.safe_load((ROOT / "config/config.yaml").read_text())["study"]["variants"])
    assert jobs == {"model": 1, "reference": 1, "study_calibrate": n, "study_quality": n, "study": 1}


def test_alpha_comparison_is_made_within_each_conv_calibration():
    records = RECORDS + [_record("int8-L3-max-auto", 26.0, method="max-max", alpha="auto")]
    lines = findings({r["variant"]: r for r in records})
    maxed = [line for line in lines if line.startswith("SmoothQuant (max-max")]
    # in the plain-max group, auto (26.0 dB) is compared with int8-L3-max (alpha 0.8, 25.0 dB) only
    assert maxed == ["SmoothQuant (max-max, percentile 1.0): `alpha: auto` (int8-L3-max-auto) 26.00 dB against the "
                     "best global alpha (int8-L3-max, alpha 0.8) 25.00 dB: auto is better."]


def test_fused_scales_are_compared_with_each_layers_own():
    """A variant calibrated with fused_scales false is compared with its like of the default, and
    is left out of the other comparisons (it would otherwise stand in for a global alpha)."""
    records = RECORDS + [_record("int8-L3-own-scales", 29.0, fused_scales=False),
                         _record("fp8-L4-own-scales", 29.5, precision="fp8", level=4, fused_scales=False)]
    lines = findings({r["variant"]: r for r in records})
    assert lines[1:3] == ["One scale per fused projection group (int8-L3) 27.00 dB against each layer's own "
                          "(int8-L3-own-scales) 29.00 dB: -2.00 dB.",
                          "One scale per fused projection group (fp8-L4) 30.00 dB against each layer's own "
                          "(fp8-L4-own-scales) 29.50 dB: +0.50 dB."]
    assert lines[3:] == findings({r["variant"]: r for r in RECORDS})[1:]  # the rest as without them
