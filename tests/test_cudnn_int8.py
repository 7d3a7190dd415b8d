"""cuDNN's int8 matmul and conv (engine.int8_gemm: cudnn): their meaning, checked on the CPU, where the
custom ops compute the same numbers in plain PyTorch; the layouts their cuDNN graphs are built with; and
the refusals where they cannot run. (The cuDNN graphs themselves need a GPU: docs/PERF.md has their
check against these paths on an H100, equal within one fp16 rounding of the bias add.)"""
import pytest
import torch

from quantdiff.engines import cudnn_int8, gemm8
from quantdiff.errors import ConfigError, MissingBackendError


def _int8(*shape, seed=0):
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_matmul_op_is_the_int8_linear_of_the_engine():
    a, w = _int8(37, 48), _int8(40, 48, seed=1)
    scale, bias = torch.rand(40) * 1e-3, torch.randn(40, dtype=torch.float16)
    expected = gemm8.int8_dequantize(gemm8.int8_matmul(a, w), scale, bias, torch.float16)
    assert torch.equal(cudnn_int8.int8_matmul(a, w, scale, bias), expected)
    no_bias = cudnn_int8.int8_matmul(a, w, scale, None, torch.float32)
    assert no_bias.dtype == torch.float32 and torch.equal(no_bias, (a.int() @ w.int().t()).float() * scale)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv_op_is_the_conv_as_gemm_of_the_engine(kernel, stride, padding):
    """The same int32 sums as patches @ weight (gemm8.image_patches, int8_linear), the same float32 epilogue."""
    x = _int8(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    w = _int8(24, 16, kernel, kernel, seed=1).contiguous(memory_format=torch.channels_last)
    scale, bias = torch.rand(24) * 1e-3, torch.randn(24, dtype=torch.float16)
    geometry = ((kernel, kernel), (stride, stride), (padding, padding), (1, 1))
    patches = gemm8.image_patches(x, *geometry)
    b, ho, wo, _ = patches.shape
    expected = gemm8.int8_linear(patches.reshape(b * ho * wo, -1), w.permute(0, 2, 3, 1).reshape(24, -1), scale, bias,
                                 torch.float16).reshape(b, ho, wo, 24).permute(0, 3, 1, 2)
    got = cudnn_int8.int8_conv2d(x, w, scale, bias, *geometry[1:])
    assert got.shape == (2, 24, ho, wo) == (2, 24, 9 // stride + (stride == 2), 9 // stride + (stride == 2))
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, expected)


def test_ops_trace_and_export():
    """Their fake implementations agree with the real ones (opcheck), and torch.export carries them
    (the engine's export format)."""
    a, w, scale = _int8(33, 32), _int8(16, 32, seed=1), torch.rand(16)
    torch.library.opcheck(torch.ops.quantdiff.cudnn_int8_matmul, (a, w, scale, None, torch.float16))
    x, wc = _int8(2, 8, 6, 6), _int8(16, 8, 3, 3, seed=2)
    torch.library.opcheck(torch.ops.quantdiff.cudnn_int8_conv,
                          (x, wc, scale, torch.randn(16), [2, 2], [1, 1], [1, 1], torch.float16))

    class Conv(torch.nn.Module):
        def forward(self, x):
            return cudnn_int8.int8_conv2d(x, wc, scale, None, (1, 1), (1, 1), (1, 1))

    program = torch.export.export(Conv(), (x,))
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.quantdiff.cudnn_int8_conv.default in calls
    assert torch.equal(program.module()(x), Conv()(x))


def test_conv_images_reach_the_op_channels_last():
    """An NCHW producer (as a group norm's output traces on the GPU) still hands the op an NHWC image:
    the wrapper's copy is in the traced graph, where Inductor fuses it into the quantize."""
    wc, scale = _int8(16, 8, 3, 3, seed=2).contiguous(memory_format=torch.channels_last), torch.rand(16)

    class QuantizeThenConv(torch.nn.Module):
        def forward(self, x):
            xq = torch.clamp(torch.round(x * 20), -128, 127).to(torch.int8)  # NCHW, as x
            return cudnn_int8.int8_conv2d(xq, wc, scale, None, (1, 1), (1, 1), (1, 1))

    x = torch.randn(2, 8, 6, 6)
    program = torch.export.export(QuantizeThenConv(), (x,))
    (conv,) = [n for n in program.graph.nodes if n.target == torch.ops.quantdiff.cudnn_int8_conv.default]
    image = conv.args[0].meta["val"]
    assert image.dtype == torch.int8 and image.stride() == (8 * 36, 1, 8 * 6, 8)
    assert torch.equal(program.module()(x), QuantizeThenConv()(x))


def test_graph_layouts():
    """What the cuDNN graphs are told: the weight (n, k) read as (k, n) in place; NHWC images and output."""
    layout = cudnn_int8.matmul_layout(2048, 1280, 320)
    assert layout["a"] == ([1, 2048, 1280], [2048 * 1280, 1280, 1]) and layout["w"] == ([1, 1280, 320], [320 * 1280, 1, 1280])
    assert layout["out"] == ([1, 2048, 320], [2048 * 320, 320, 1]) and layout["per_column"] == ([1, 1, 320], [320, 320, 1])
    conv = cudnn_int8.conv_layout((2, 640, 64, 64), (1280, 640, 3, 3), (2, 2), (1, 1), (1, 1))
    assert conv["x"] == ([2, 640, 64, 64], [640 * 64 * 64, 1, 640 * 64, 640])
    assert conv["w"] == ([1280, 640, 3, 3], [640 * 9, 1, 640 * 3, 640])
    assert conv["out"] == ([2, 1280, 32, 32], [1280 * 32 * 32, 1, 1280 * 32, 1280])


def test_refusals(monkeypatch):
    with pytest.raises(ValueError, match="take int8 operands"):
        cudnn_int8.int8_matmul(_int8(4, 8).float(), _int8(4, 8), torch.ones(4))
    assert gemm8.resolve_int8_gemm("cudnn", "cpu") == "int_mm"  # the CPU always
    assert not cudnn_int8.available("cpu")
    monkeypatch.setattr(cudnn_int8, "_import_frontend", lambda: (None, ImportError("No module named 'cudnn'")))
    with pytest.raises(MissingBackendError, match=r"engine.int8_gemm is cudnn, which runs cuDNN's int8 kernels through "
                                                  r"the nvidia-cudnn-frontend package, and that does not import here "
                                                  r"\(ImportError: No module named 'cudnn'\); install it .* or set "
                                                  r"engine.int8_gemm: triton"):
        gemm8.resolve_int8_gemm("cudnn", "cuda")


def test_an_aoti_package_refuses_the_python_ops():
    from quantdiff.engines import check_packageable

    with pytest.raises(ConfigError, match="engine.int8_gemm is cudnn, whose kernels are called from Python, which an "
                                          "AOTInductor package .engine.torch_format: aoti. cannot hold"):
        check_packageable({"int8_gemm": "cudnn"})
    check_packageable({"int8_gemm": "cudnn"}, torch_format="export")  # the export format takes them


def test_an_export_engine_with_the_ops_loads_in_a_fresh_process(tmp_path):
    """The bench stage loads engine.pt2 in a process of its own: load_engine must register the ops first."""
    import subprocess
    import sys

    from quantdiff.engines import torch as engine_torch

    class Ops(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wc, self.wl, self.scale = _int8(16, 8, 3, 3, seed=2), _int8(16, 16, seed=3), torch.rand(16) * 1e-2

        def forward(self, x):
            y = cudnn_int8.int8_conv2d(x, self.wc, self.scale, None, (1, 1), (1, 1), (1, 1), torch.float32)
            rows = torch.clamp(torch.round(y.permute(0, 2, 3, 1).reshape(-1, 16)), -128, 127).to(torch.int8)
            return cudnn_int8.int8_matmul(rows, self.wl, self.scale, None, torch.float32)

    ops, x, path = Ops(), _int8(2, 8, 6, 6), tmp_path / "engine.pt2"
    torch.export.save(torch.export.export(ops, (x,)), str(path), extra_files={"quantdiff": ""})
    torch.save({"x": x, "expected": ops(x)}, tmp_path / "io.pt")
    script = (f"import torch; from quantdiff.engines.torch import load_engine; io = torch.load({str(tmp_path / 'io.pt')!r}); "
              f"out = load_engine({str(path)!r})(io['x']); assert torch.equal(out, io['expected']); print('same')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]
    assert engine_torch.engine_format(path) == "export"
