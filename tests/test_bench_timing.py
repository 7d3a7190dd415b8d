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


def test_gpu_bytes_in_use_counts_what_a_load_allocates_past_the_allocator(monkeypatch):
    """An AOTInductor package's weights are cudaMalloc'ed beside PyTorch's caching allocator: a load of
    2 GiB of those plus 8 MiB through the allocator (which reserves 20 MiB for it) is 2 GiB + 8 MiB."""
    from quantdiff.bench import timing

    total, gib, mib = 140 * 2**30, 2**30, 2**20
    state = {"free": total - 600 * mib, "reserved": 100 * mib, "allocated": 90 * mib}  # 500 MiB context
    for name in ("memory_reserved", "memory_allocated"):
        monkeypatch.setattr(timing.torch.cuda, name, lambda name=name: state[name.removeprefix("memory_")])
    monkeypatch.setattr(timing.torch.cuda, "mem_get_info", lambda: (state["free"], total))
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: None)

    before, beside = timing.cuda_bytes_in_use(), timing.cuda_bytes_beside_allocator()
    assert beside == 500 * mib and before == 590 * mib
    state.update(free=state["free"] - 2 * gib - 20 * mib, reserved=120 * mib, allocated=98 * mib)  # the load
    assert timing.cuda_bytes_in_use() - before == 2 * gib + 8 * mib
    assert timing.cuda_bytes_beside_allocator() - beside == 2 * gib


def test_capture_runs_the_step_without_autograd(monkeypatch):
    """A torch.compile'd step timed under no_grad and then captured with grad enabled recompiles inside
    the capture, which fails (seen on the H200: BackendCompilerFailed); warm-up and capture run no_grad."""
    import contextlib

    from quantdiff.bench import timing

    class FakeStream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(timing.torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(timing.torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(timing.torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(timing.torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(timing.torch.cuda, "graph", lambda g: contextlib.nullcontext())
    grad_modes = []
    graph, out = timing.capture_cuda_graph(lambda: grad_modes.append(timing.torch.is_grad_enabled()) or "out")
    assert out == "out" and grad_modes == [False] * 4  # 3 warm-up calls and the captured one


def test_baseline_compiles_with_the_engines_inductor_settings(tiny_xl_dir, tmp_path, monkeypatch):
    """engine.inductor reaches the bench's torch.compile baseline (like for like), and the config
    slice the bench rule tracks holds it, so changing it reruns the bench."""
    import copy

    import yaml

    from quantdiff.config import bench_settings, validate_config

    from conftest import ROOT

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["engine"]["inductor"] = {"triton.multi_kernel": 1}
    config["models"]["xl-turbo"]["engine"] = {"inductor": {}}
    validated = validate_config(copy.deepcopy(config), root=ROOT)
    assert bench_settings(validated, "tiny-xl", "fp8")["baseline_inductor"] == {"triton.multi_kernel": 1}
    assert bench_settings(validated, "xl-turbo", "fp8")["baseline_inductor"] == {}

    class Compiled(Exception):
        pass

    def compile_(module, options=None):
        raise Compiled(options)

    monkeypatch.setattr(bench_run, "load_engine_unet", lambda backend, path, plain: plain)  # a working "engine"
    monkeypatch.setattr(bench_run.torch, "compile", compile_)
    settings = {"model": "tiny-xl", "precision": "fp8", "quant_level": 4, "guidance": 5.0, "batch_size": 1,
                "resolution": 64, "steps": 2, "warmup": 1, "iters": 2, "seed": 0, "n_prompts": 1,
                "prompts": str(ROOT / "config/prompts/evaluation.txt"), "baseline_inductor": {"max_autotune": True}}
    out = {name: tmp_path / name for name in ("bench.json", "images", "grid.png", "sqnr.png")}
    with pytest.raises(Compiled) as compiled:
        bench_run.run_bench(tiny_xl_dir, tmp_path / "engine.pt2", "torch", tmp_path / "reference", settings, out,
                            log=lambda *_: None)
    assert compiled.value.args == ({"max_autotune": True},)


def test_gpu_share_times_one_process_at_a_time(tmp_path):
    """GpuShare: while one process compiles (a shared lock), another may compile too but not time;
    while one times (exclusive), no other may do either; after, both may compile again. flock locks
    belong to an open file, so a second open of the lock file stands for the other process."""
    import fcntl
    import threading

    from quantdiff.bench.timing import GpuShare

    lock = tmp_path / "gpu.lock"
    share = GpuShare(str(lock))
    other = open(lock)  # noqa: SIM115

    def other_gets(kind):
        try:
            fcntl.flock(other, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(other, fcntl.LOCK_UN)
        return True

    try:
        assert other_gets(fcntl.LOCK_SH) and not other_gets(fcntl.LOCK_EX)
        with share.timing():
            assert not other_gets(fcntl.LOCK_SH) and not other_gets(fcntl.LOCK_EX)
        assert other_gets(fcntl.LOCK_SH) and not other_gets(fcntl.LOCK_EX)
        fcntl.flock(other, fcntl.LOCK_SH)  # the other compiling: this one waits to time, and counts it
        threading.Timer(0.3, lambda: fcntl.flock(other, fcntl.LOCK_UN)).start()
        with share.timing():
            pass
        assert share.waited_s >= 0.25
    finally:
        other.close()
    alone = GpuShare(None)  # no lock file: timing() is a no-op
    with alone.timing():
        pass
    assert alone.waited_s == 0.0 and alone.file is None
