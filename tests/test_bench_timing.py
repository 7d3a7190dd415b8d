"""The bench's CUDA-graph timing: what it records when a capture works and when it fails."""
import pytest

from quantdiff.bench import run as bench_run
from quantdiff.bench.timing import time_cuda_graph


def _latency(median):
    return {"median": median, "p10": median, "p90": median, "n": 3}


def test_time_cuda_graph_reports_why_it_could_not_capture():
    latency, why, graph = time_cuda_graph(lambda: None, 1, 3)
    if latency is not None:
        pytest.skip("this machine has a GPU: the capture worked")
    assert graph is None and why and ":" in why  # "ErrorType: first line"


def test_graph_speedup_from_both_captures(monkeypatch):
    replayed = {"engine": _latency(20.0), "baseline": _latency(30.0)}
    monkeypatch.setattr(bench_run, "time_cuda_graph", lambda step, warmup, iters: (replayed[step()], None, object()))
    monkeypatch.setattr(bench_run.torch.cuda, "empty_cache", lambda: None)
    result = bench_run.cuda_graph_timing(lambda: "engine", lambda: "baseline", 1, 3, log=lambda *a: None)
    assert result == {"unet_step_ms": replayed["engine"], "baseline_unet_step_ms": replayed["baseline"],
                      "speedup": 1.5, "note": "both captured"}


def test_a_failed_capture_is_named_and_gives_no_speedup(monkeypatch):
    def fake(step, warmup, iters):
        return (None, "RuntimeError: operation not permitted when stream is capturing", None) \
            if step() == "baseline" else (_latency(20.0), None, object())

    monkeypatch.setattr(bench_run, "time_cuda_graph", fake)
    monkeypatch.setattr(bench_run.torch.cuda, "empty_cache", lambda: None)
    result = bench_run.cuda_graph_timing(lambda: "engine", lambda: "baseline", 1, 3, log=lambda *a: None)
    assert result["speedup"] is None and result["unet_step_ms"] == _latency(20.0)
    assert result["baseline_unet_step_ms"] is None
    assert result["note"] == "baseline unet step: RuntimeError: operation not permitted when stream is capturing"
