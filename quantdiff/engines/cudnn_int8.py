"""INT8 GEMMs and convolutions through cuDNN's graph API (nvidia-cudnn-frontend), for the torch engine on the GPU.

Why: on Hopper, torch._int_mm runs Ampere kernels and our Triton int8 GEMM reaches 0.55-0.75 of
cuBLASLt's fp8 speed; cuDNN's int8 matmul with the dequantize (scale per output channel, bias,
cast) fused into it took 0.68-0.82 of the Triton GEMM's time on SDXL's linear shapes, and its
int8 convolution reads the NHWC image itself (no patch matrix): 0.66-0.79 of patches + GEMM on
the large 3x3 convs of SDXL (H100, docs/PERF.md). Its FP8 convolutions were 2-4x slower than
that, so fp8 keeps cuBLASLt.

Both are custom ops (`quantdiff::cudnn_int8_matmul`, `quantdiff::cudnn_int8_conv`): torch.compile
and torch.export carry them as opaque calls, and CUDA graphs capture them (cuDNN runs on torch's
current stream). An AOTInductor package cannot hold them (their implementation is Python), so the
engine stage takes them only in the `export` format. On the CPU the ops compute the same numbers
in plain PyTorch (exact int32 sums, then the float32 epilogue of gemm8.int8_dequantize), which is
what the tests check; the graphs' tensor layouts are described by `matmul_layout` and
`conv_layout`, testable without a GPU.
"""
import functools
import threading
import warnings

import torch
import torch.nn.functional as F

from quantdiff.engines.gemm8 import conv_output_size, int8_dequantize, int8_matmul as int_mm_sums
from quantdiff.errors import MissingBackendError

# cuDNN handles and built graphs, per thread (a handle is not to be shared between threads)
_state = threading.local()


@functools.cache
def _import_frontend():
    """(the cudnn frontend module, None) or (None, why it does not import)."""
    try:
        import cudnn  # nvidia-cudnn-frontend
        return cudnn, None
    except Exception as e:  # noqa: BLE001 (ImportError, or OSError where libcudnn is not found)
        return None, e


def _frontend():
    return _import_frontend()[0]


def available(device):
    """True where the cuDNN int8 kernels can run for tensors on `device`."""
    return torch.device(device).type == "cuda" and _frontend() is not None


def require(setting, choice, instead):
    """Raise MissingBackendError for `engine.<setting>: <choice>` where the cuDNN frontend is missing."""
    module, error = _import_frontend()
    if module is None:
        raise MissingBackendError(
            f"engine.{setting} is {choice}, which runs cuDNN's int8 kernels through the nvidia-cudnn-frontend "
            f"package, and that does not import here ({type(error).__name__}: {error}); install "
            f"it (`pip install .[gpu]`) or set engine.{setting}: {instead}")


def matmul_layout(m, k, n):
    """The graph's tensors for (m, k) @ (n, k)^T: (dims, strides) of a, w (read as (k, n)) and the (m, n) output."""
    return {"a": ([1, m, k], [m * k, k, 1]), "w": ([1, k, n], [n * k, 1, k]), "out": ([1, m, n], [m * n, n, 1]),
            "per_column": ([1, 1, n], [n, n, 1])}


def conv_layout(x_shape, w_shape, stride, padding, dilation):
    """The graph's NHWC tensors for a conv of x (b, c, h, w) by w (o, c, kh, kw): (dims, strides) of x, w, out."""
    b, c, h, w = x_shape
    o, _, kh, kw = w_shape
    ho = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, kw, stride[1], padding[1], dilation[1])

    def nhwc(n, ch, hh, ww):
        return [n, ch, hh, ww], [ch * hh * ww, 1, ch * ww, ch]
    return {"x": nhwc(b, c, h, w), "w": nhwc(o, c, kh, kw), "out": nhwc(b, o, ho, wo),
            "per_column": ([1, o, 1, 1], [o, 1, 1, 1])}


class _Graph:
    """One built cuDNN graph: int8 product (matmul or conv) * scale (+ bias) -> float output."""

    def __init__(self, kind, layout, geometry, out_dtype, bias_dtype):
        cudnn = _frontend()
        dt = cudnn.data_type
        # (the data types that ran on an H100 with cuDNN 9.19: int8 in, int32 sums, a float32 epilogue)
        graph = cudnn.pygraph(io_data_type=dt.INT8 if kind == "matmul" else dt.HALF, intermediate_data_type=dt.FLOAT,
                              compute_data_type=dt.INT32)
        first, second = ("a", "w") if kind == "matmul" else ("x", "w")
        self.inputs = {name: graph.tensor(name=name, dim=layout[name][0], stride=layout[name][1], data_type=dt.INT8)
                       for name in (first, second)}
        if kind == "matmul":
            sums = graph.matmul(A=self.inputs["a"], B=self.inputs["w"], compute_data_type=dt.INT32)
        else:
            stride, padding, dilation = geometry
            sums = graph.conv_fprop(image=self.inputs["x"], weight=self.inputs["w"], padding=list(padding),
                                    stride=list(stride), dilation=list(dilation), compute_data_type=dt.INT32)
        dims, strides = layout["per_column"]
        self.inputs["scale"] = graph.tensor(name="scale", dim=dims, stride=strides, data_type=dt.FLOAT)
        out = graph.mul(a=sums, b=self.inputs["scale"], compute_data_type=dt.FLOAT)
        if bias_dtype is not None:
            self.inputs["bias"] = graph.tensor(name="bias", dim=dims, stride=strides, data_type=bias_dtype)
            out = graph.add(a=out, b=self.inputs["bias"], compute_data_type=dt.FLOAT)
        out.set_output(True).set_dim(layout["out"][0]).set_stride(layout["out"][1]).set_data_type(out_dtype)
        self.out = out
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.workspace_size = graph, graph.get_workspace_size()

    def __call__(self, tensors, out):
        cudnn = _frontend()
        cudnn.set_stream(handle=_handle(out.device), stream=torch.cuda.current_stream(out.device).cuda_stream)
        workspace = torch.empty(max(self.workspace_size, 1), device=out.device, dtype=torch.uint8)
        pack = {self.inputs[name]: t for name, t in tensors.items()}
        pack[self.out] = out
        self.graph.execute(pack, workspace, handle=_handle(out.device))
        return out


def _handle(device):
    handles = getattr(_state, "handles", None)
    if handles is None:
        handles = _state.handles = {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in handles:
        with torch.cuda.device(index):
            handles[index] = _frontend().create_handle()
    return handles[index]


def _graph(kind, layout, geometry, out_dtype, bias, device):
    """The cached graph for these shapes (built on first use: under CUDA graphs, in the warm-up run)."""
    graphs = getattr(_state, "graphs", None)
    if graphs is None:
        graphs = _state.graphs = {}
    key = (kind, repr(layout), geometry, out_dtype, None if bias is None else bias.dtype, str(device))
    if key not in graphs:
        cudnn = _frontend()
        types = {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16,
                 torch.float32: cudnn.data_type.FLOAT}
        with torch.cuda.device(device):
            graphs[key] = _Graph(kind, layout, geometry, types[out_dtype], None if bias is None else types[bias.dtype])
    return graphs[key]


def _check_int8(*tensors):
    if any(t.dtype != torch.int8 for t in tensors):
        raise ValueError("the cuDNN int8 kernels take int8 operands")


@torch.library.custom_op("quantdiff::cudnn_int8_matmul", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def _matmul_op(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    (m, k), n = a.shape, w.shape[0]
    if not a.is_cuda:  # the engine's own CPU path: exact int32 sums, the float32 epilogue
        return int8_dequantize(int_mm_sums(a, w), scale.float(), bias, out_dtype)
    a, w, scale = a.contiguous(), w.contiguous(), scale.float().contiguous()
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    tensors = {"a": a, "w": w, "scale": scale}
    if bias is not None:
        tensors["bias"] = bias.contiguous()
    return _graph("matmul", matmul_layout(m, k, n), None, out_dtype, bias, a.device)(tensors, out)


@_matmul_op.register_fake
def _(a, w, scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# The tag asks Inductor for the strides tracing saw; int8_conv2d makes those channels_last (see there)
@torch.library.custom_op("quantdiff::cudnn_int8_conv", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def _conv_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
             stride: list[int], padding: list[int], dilation: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    if not x.is_cuda:  # exact int32 sums (float64 holds them), then the engine's float32 epilogue, per channel
        sums = F.conv2d(x.double(), w.double(), None, stride, padding, dilation).permute(0, 2, 3, 1).contiguous()
        return int8_dequantize(sums, scale.float(), bias, out_dtype).permute(0, 3, 1, 2)  # channels_last
    layout = conv_layout(x.shape, w.shape, stride, padding, dilation)
    if not x.is_contiguous(memory_format=torch.channels_last):
        _warn_copy(x)
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    out = torch.empty(layout["out"][0], device=x.device, dtype=out_dtype, memory_format=torch.channels_last)
    tensors = {"x": x, "w": w, "scale": scale.float().contiguous()}
    if bias is not None:
        tensors["bias"] = bias.contiguous()
    geometry = (tuple(stride), tuple(padding), tuple(dilation))
    return _graph("conv", layout, geometry, out_dtype, bias, x.device)(tensors, out)


def _warn_copy(x):
    """Say (once per shape) that an image reached the cuDNN conv in another layout: its copy costs a pass."""
    warnings.warn(f"cudnn_int8_conv: a {tuple(x.shape)} image with strides {x.stride()} is copied to NHWC "
                  f"on each call; pass it channels_last", stacklevel=2)


@_conv_op.register_fake
def _(x, w, scale, bias, stride, padding, dilation, out_dtype):
    dims = conv_layout(x.shape, w.shape, stride, padding, dilation)["out"][0]
    return torch.empty(dims, dtype=out_dtype, device=x.device, memory_format=torch.channels_last)


def int8_matmul(a, w, scale, bias=None, out_dtype=torch.float16):
    """(m, k) int8 @ (n, k)^T int8 * scale[n] (+ bias[n]) -> (m, n) out_dtype: gemm8.int8_linear's value."""
    _check_int8(a, w)
    return torch.ops.quantdiff.cudnn_int8_matmul(a, w, scale, bias, out_dtype)


def int8_conv2d(x, w, scale, bias, stride, padding, dilation, out_dtype=torch.float16):
    """conv2d of the int8 image x (b, c, h, w) by the int8 weight w (o, c, kh, kw), times scale[o] (+ bias[o]),
    -> (b, o, ho, wo) out_dtype, channels_last; groups 1, zero padding."""
    _check_int8(x, w)
    # Here, not in the op: under torch.compile this copy fuses into the quantize that writes x. On the GPU
    # tracing sees a group norm's output NCHW (torch's decomposition keeps channels_last on the CPU only),
    # and the op's own copy of the 38 NCHW images cost 2.2 ms of the SDXL step (H100, docs/PERF.md)
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.quantdiff.cudnn_int8_conv(x, w, scale, bias, list(stride), list(padding), list(dilation),
                                               out_dtype)
