"""Latency and memory measurement: CUDA events on the GPU, perf_counter on the CPU."""
import contextlib
import fcntl
import time

import torch

from ..metrics import summarize_latency


def timing_method(device):
    return "cuda-events" if device == "cuda" else "perf_counter"


@torch.no_grad()
def time_calls(fn, warmup, iters, device):
    """Milliseconds of each of `iters` calls of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000)
    return summarize_latency(samples)


@torch.no_grad()  # as time_calls: a grad-mode call of a torch.compile'd module recompiles, inside the capture
def capture_cuda_graph(fn):
    """(graph, its output) for a capturable fn, warmed up on a side stream as CUDA graphs need."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_cuda_graph(fn, warmup, iters):
    """fn captured as one CUDA graph and replayed: the GPU time of a step without the CPU's launch
    overhead. Returns (latency, None, graph), or (None, why, None) where fn cannot be captured
    (a host sync, a CPU tensor). The graph holds its memory pool until the caller drops it."""
    try:
        graph, _ = capture_cuda_graph(fn)
    except Exception as err:  # noqa: BLE001 - the caller records why and keeps the launched figure
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return None, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}", None
    return time_calls(graph.replay, warmup, iters, "cuda"), None, graph


class GpuShare:
    """Lets benchmark processes share one GPU: each holds a shared lock on `path` while it compiles,
    calibrates or autotunes (work that would disturb another's clock) and an exclusive one while it
    times, so they compile side by side and time one at a time, each on a quiet GPU. flock drops the
    shared lock before it waits for the exclusive one, so two processes waiting to time never
    deadlock. path None: one process alone, no locks."""

    def __init__(self, path):
        self.file = None if path is None else open(path, "a")  # noqa: SIM115 - held for the process's life
        self.waited_s = 0.0
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_SH)

    @contextlib.contextmanager
    def timing(self):
        """The GPU to this process alone for the block; time spent waiting for it adds to waited_s."""
        if self.file is None:
            yield
            return
        start = time.time()
        fcntl.flock(self.file, fcntl.LOCK_EX)
        self.waited_s += time.time() - start
        try:
            yield
        finally:
            fcntl.flock(self.file, fcntl.LOCK_SH)


def cuda_bytes_beside_allocator():
    """Bytes in use on the current GPU that PyTorch's caching allocator does not hold: the CUDA
    context, and what was allocated past the allocator (an AOTInductor package's weights, a TensorRT
    engine's), which memory_allocated() never sees. Device-wide: a difference of two readings is
    this process's own only while nothing else runs on the GPU, as in the bench stages."""
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def cuda_bytes_in_use():
    """What the allocator handed out plus what was allocated beside it."""
    return torch.cuda.memory_allocated() + cuda_bytes_beside_allocator()


class PeakMemory:
    """Peak GPU memory of one phase: what it allocated at its peak, plus the weights it brought.

    Other models may be resident at the same time (the bench keeps the fp16 UNet for quality),
    so the phase's own footprint is (peak - allocated before) + its weight bytes.
    """

    def __init__(self, device, weight_bytes):
        self.device, self.weight_bytes, self.mb = device, weight_bytes, None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda" and exc[0] is None:
            torch.cuda.synchronize()
            self.mb = round((torch.cuda.max_memory_allocated() - self.before + self.weight_bytes) / 2**20, 1)


def module_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
