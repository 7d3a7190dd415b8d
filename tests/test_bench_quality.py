"""A broken engine stops the bench stage with a clear error; it never becomes a finished report.

On an H200 an int8 engine package gave NaN noise predictions, and the bench stage wrote a
bench.json with PSNR 5.9 dB and every step's SQNR "inf" (docs/PERF.md, sixth session)."""
import math

import pytest
import torch

from quantdiff.bench import quality, run
from quantdiff.errors import EngineOutputError
from quantdiff.metrics import mean_finite, sqnr_db

from conftest import ROOT


class NaNAfter:
    """A UNet stand-in: a finite noise prediction for its first `good` calls, then one NaN in it."""

    def __init__(self, good):
        self.good, self.calls = good, 0

    def __call__(self, sample, *args, **kwargs):
        self.calls += 1
        out = torch.zeros_like(sample)
        if self.calls > self.good:
            out.view(-1)[3] = math.nan
        return (out,)


def test_probe_stops_at_the_first_non_finite_prediction():
    probe = quality.SQNRProbe(NaNAfter(good=5), lambda sample, *a, **kw: (torch.ones_like(sample),))
    sample = torch.zeros(2, 4, 8, 8)
    probe.start_image()
    for _ in range(3):  # image 1: three steps, all finite
        probe(sample)
    probe.start_image()
    probe(sample), probe(sample)  # image 2, steps 1-2: calls 4 and 5
    with pytest.raises(EngineOutputError, match=r"noise prediction at denoising step 3 of image 2 has 1 non-finite "
                                                r"values of 512: the engine is broken, so no bench report is written"):
        probe(sample)
    assert [len(values) for values in probe.by_step] == [2, 2, 1]  # nothing recorded for the bad step


def test_nan_is_no_quality_number():
    """sqnr_db of a NaN prediction was NaN, and the per-step mean dropped it as non-finite: a step of
    nothing but NaNs came out "inf", the value of identical outputs."""
    with pytest.raises(ValueError, match="the test has 1 non-finite values"):
        sqnr_db(torch.ones(4), torch.tensor([1.0, math.nan, 1.0, 1.0]))
    with pytest.raises(ValueError, match="the reference has 2 non-finite values"):
        sqnr_db(torch.tensor([math.inf, 1.0, -math.inf]), torch.ones(3))
    with pytest.raises(ValueError, match="a NaN among the values"):
        mean_finite([math.nan, math.nan])
    assert mean_finite([math.inf, 20.0]) == 20.0


def test_bench_stops_before_timing_an_engine_that_predicts_nan(tiny_xl_dir, tmp_path, monkeypatch):
    """The first call, on the example inputs, is checked: no minutes of timing, no baseline compile,
    no images, no record."""
    broken = NaNAfter(good=0)
    monkeypatch.setattr(run, "load_engine_unet", lambda backend, path, plain: broken)
    monkeypatch.setattr(run, "time_calls", lambda *a, **kw: pytest.fail("timed a broken engine"))
    out = {name: tmp_path / name for name in ("bench.json", "images", "grid.png", "sqnr.png")}
    settings = {"model": "tiny-xl", "precision": "int8", "quant_level": 3, "guidance": 5.0, "batch_size": 1,
                "resolution": 64, "steps": 2, "warmup": 1, "iters": 2, "seed": 0, "n_prompts": 1,
                "prompts": str(ROOT / "config/prompts/evaluation.txt")}
    with pytest.raises(EngineOutputError, match="noise prediction on the example inputs has 1 non-finite values"):
        run.run_bench(tiny_xl_dir, tmp_path / "engine.pt2", "torch", tmp_path / "reference", settings, out,
                      log=lambda *_: None)
    assert broken.calls == 1
    assert not any(path.exists() for path in out.values())
