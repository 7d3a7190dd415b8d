"""GEMM-level benchmark on the GPU: SDXL's linear shapes, fp16 against the 8-bit GEMM paths.

    python -m quantdiff.bench.gemm --out gemm_bench.json

Every 8-bit path starts from the fp16 activation (its quantization is part of the cost, as in the
UNet) and is compiled twice: Inductor's default (cuBLASLt GEMM, quantize as its own kernel) and
max-autotune (Inductor's Triton GEMM templates compete, with the quantize and the dequantize
fusable into them); the "triton" paths are the torch engine's own kernel (engines/triton_gemm.py,
its fixed tile, dequantize in its epilogue). For the GEGLU feed-forward input (rows marked geglu) the
8-bit paths end in the FF-out GEMM's 8-bit input: cuBLASLt GEMM then one fused GEGLU+quantize
kernel, against the Triton kernel doing both in its epilogue. Timing is a CUDA graph of 20 calls,
so launch overhead does not count. Each output is checked against the plain-PyTorch fake-quant
GEMM (float32 on the dequantized values).
"""
import argparse
import functools
import itertools
import json
import time

import torch
import torch.nn.functional as F

from ..engines import triton_gemm
from ..engines.gemm8 import conv_geometry, fp8_matmul, image_patches, int8_dequantize, int8_matmul, int8_out_scale
from ..io import write_json
from ..quant.grids import INT8_MAX, fp8_scales, int8_scales, quantize_fp8, quantize_int8
from .timing import capture_cuda_graph, time_calls

# (tokens, in, out) of SDXL's linears at 1024 px, batch 2: FF in/out and attention at 32x32 and 64x64
SHAPES = ((2048, 1280, 10240), (2048, 1280, 1280), (2048, 5120, 1280), (8192, 640, 640), (8192, 640, 5120))
# the cross-attention k/v projections of the text (77 tokens, batch 2): few rows, Triton's small-M tile
SMALL_M_SHAPES = ((154, 2048, 1280), (154, 2048, 640))
GEGLU_SHAPES = ((2048, 1280, 10240), (8192, 640, 5120))  # the FF-in GEMMs: n = value + gate
# (channels, side) of SDXL's 3x3 convs that run as GEMMs at 1024 px, batch 2 (stride 1, padding 1)
CONV_INPUTS = ((640, 64), (1280, 32), (1920, 64), (1280, 64), (2560, 32), (640, 128))
# (in channels, side, out channels) of SDXL's 3x3 convs at 1024 px, batch 2: those that run as
# 8-bit GEMMs, and the 320-channel ones at 128 x 128 (fp16 convs under int8: GEMM_MIN_OUT_CHANNELS)
CONV_SHAPES = ((640, 64, 640), (1280, 32, 1280), (1920, 64, 640), (2560, 32, 1280), (640, 128, 640),
               (320, 128, 320), (960, 128, 320))
CALLS_PER_GRAPH = 20


def gemm_operands(m, k, n, device="cuda", seed=0):
    """fp16 activation and weight, and both 8-bit forms: static per-tensor activation scale,
    per-tensor fp8 / per-channel int8 weight scales, as the torch engine stores them."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device).half()
    w = (torch.randn(n, k, generator=g, device=device) / k ** 0.5).half()
    return {"x": x, "w16": w, **quantized_operands(x, w)}


def quantized_operands(x, w):
    """{"fp8": ..., "int8": ...}: the activation x's static per-tensor grid (any shape) and the (n, k)
    weight w on its 8-bit grid (fp8 per tensor, int8 per row), as the torch engine stores them."""
    x_to8, x_back8 = fp8_scales(x.abs().amax())
    w_to8, w_back8 = fp8_scales(w.abs().amax())
    x_toi, _ = int8_scales(x.abs().amax())
    w_toi, w_divi = int8_scales(w.abs().amax(dim=1))
    return {"fp8": {"to_grid": x_to8, "back": x_back8, "w": quantize_fp8(w, w_to8), "w_back": w_back8},
            "int8": {"to_grid": x_toi, "w": quantize_int8(w, w_toi[:, None]),
                     "out_scale": int8_out_scale(x_toi, w_divi, w.shape[0])}}


def column_scale(fmt, p):
    """What takes an 8-bit GEMM's sums back to float: int8 per column, fp8 one factor."""
    return p["back"] * p["w_back"] if fmt == "fp8" else p["out_scale"]


def fp8_path(x, p):
    return fp8_matmul(quantize_fp8(x, p["to_grid"]), p["w"], p["back"], p["w_back"], x.dtype, fast_accum=True)


def int8_path(x, p):
    return int8_dequantize(int8_matmul(quantize_int8(x, p["to_grid"]), p["w"]), p["out_scale"], None, x.dtype)


def triton_path(x, p, fmt, tma=False):
    quantize = quantize_fp8 if fmt == "fp8" else quantize_int8
    scale = p["back"] * p["w_back"] if fmt == "fp8" else p["out_scale"]
    return triton_gemm.gemm8(quantize(x, p["to_grid"]), p["w"], scale, tma=tma)


def geglu_8bit(y, next_grid, fmt):
    """value * gelu(gate) of a GEMM output (m, 2h), quantized onto the next GEMM's grid."""
    value, gate = y.chunk(2, dim=-1)
    h = value * F.gelu(gate)
    return quantize_fp8(h, next_grid) if fmt == "fp8" else quantize_int8(h, next_grid)


def geglu_triton_path(x, p, fmt, next_grid, tma=False):
    quantize = quantize_fp8 if fmt == "fp8" else quantize_int8
    scale = p["back"] * p["w_back"] if fmt == "fp8" else p["out_scale"]
    half = p["w"].shape[0] // 2
    out_fmt = triton_gemm.OUT_FP8 if fmt == "fp8" else triton_gemm.OUT_INT8
    return triton_gemm.gemm8(quantize(x, p["to_grid"]), p["w"], scale, out_grid=next_grid, n=half,
                             gate_offset=half, out_fmt=out_fmt, tma=tma)


def fake_quant_reference(x, p, fmt):
    """The 8-bit GEMM's value in float32: the same quantized operands, dequantized, multiplied."""
    if fmt == "fp8":
        a = quantize_fp8(x, p["to_grid"]).float() * p["back"]
        return a @ (p["w"].float() * p["w_back"]).t()
    a = quantize_int8(x, p["to_grid"]).float()
    return (a @ p["w"].float().t()) * p["out_scale"]


def time_graph(fn, iters=20):
    """Median microseconds per call of fn, replayed as CUDA graphs of CALLS_PER_GRAPH calls."""
    graph, _ = capture_cuda_graph(lambda: [fn() for _ in range(CALLS_PER_GRAPH)])
    return time_calls(graph.replay, 3, iters, "cuda")["median"] * 1000 / CALLS_PER_GRAPH


# the GEGLU rows quantize value * gelu(gate) (about N(0, 0.5) here) onto these grids
GEGLU_NEXT_GRID = {"fp8": 448 / 4.0, "int8": 127 / 4.0}


def fp16_geglu(y):
    value, gate = y.chunk(2, dim=-1)
    return value * F.gelu(gate)


def shape_paths(ops, modes, geglu):
    """(name, mode, fn, fmt) for one shape: fp16 once, each cuBLAS(Lt) 8-bit path per compile mode,
    and the Triton kernel (its own tiles; Inductor's mode does not change it), for int8 also with
    TMA loads as engine.int8_gemm: triton-tma runs it (the op, compiled; few rows keep cp.async),
    and for the GEGLU rows both formats with TMA loads, as engine.geglu: triton runs them."""
    grid = {fmt: torch.tensor(g, device=ops["x"].device) for fmt, g in GEGLU_NEXT_GRID.items()}
    if geglu:
        fp16 = lambda x: fp16_geglu(F.linear(x, ops["w16"]))  # noqa: E731
        cublas = {"fp8": lambda x: geglu_8bit(fp8_path(x, ops["fp8"]), grid["fp8"], "fp8"),
                  "int8": lambda x: geglu_8bit(int8_path(x, ops["int8"]), grid["int8"], "int8")}
        own = {fmt: (lambda x, fmt=fmt: geglu_triton_path(x, ops[fmt], fmt, grid[fmt])) for fmt in cublas}
    else:
        fp16 = lambda x: F.linear(x, ops["w16"])  # noqa: E731
        cublas = {"fp8": lambda x: fp8_path(x, ops["fp8"]), "int8": lambda x: int8_path(x, ops["int8"])}
        own = {fmt: (lambda x, fmt=fmt: triton_path(x, ops[fmt], fmt)) for fmt in cublas}
    paths = [("fp16", "default", fp16, None)] + [(fmt, mode, cublas[fmt], fmt) for mode in modes for fmt in cublas]
    if triton_gemm.available(ops["x"].device):
        paths += [(f"{fmt} triton", "default", own[fmt], fmt) for fmt in own]
        if geglu:  # as engine.geglu: triton runs it
            paths += [(f"{fmt} triton tma", "default", lambda x, fmt=fmt: geglu_triton_path(x, ops[fmt], fmt, grid[fmt],
                                                                                           tma=True), fmt)
                      for fmt in own]
        else:
            paths.append(("int8 triton tma", "default", lambda x: triton_path(x, ops["int8"], "int8", tma=True), "int8"))
    return paths


def path_reference(x, ops, fmt, geglu):
    """Float32 value of a path: the fp16 GEMM, or the fake-quant one; for GEGLU rows then
    value * gelu(gate) (the 8-bit paths: on the next GEMM's grid, as they return it)."""
    ref = F.linear(x.float(), ops["w16"].float()) if fmt is None else fake_quant_reference(x, ops[fmt], fmt)
    if not geglu:
        return ref
    h = fp16_geglu(ref)
    if fmt is None:
        return h
    h = h * GEGLU_NEXT_GRID[fmt]
    return quantize_fp8(h, 1.0).float() if fmt == "fp8" else torch.clamp(torch.round(h), -127, 127)


def measure_shape(m, k, n, modes, log, geglu=False):
    ops = gemm_operands(m, k, n)
    x = ops["x"]
    flop = 2 * m * k * n
    rows = []
    for name, mode, fn, fmt in shape_paths(ops, modes, geglu):
        torch._dynamo.reset()
        start = time.time()
        compiled = torch.compile(fn, mode=None if mode == "default" else mode)
        with torch.no_grad():
            out = compiled(x)
            compile_s = time.time() - start
            us = time_graph(lambda: compiled(x))
        ref = path_reference(x, ops, fmt, geglu)
        err = float((out.float() - ref).norm() / ref.norm())
        row = {"shape": [m, k, n], "path": name + (" geglu" if geglu else ""), "mode": mode, "us": round(us, 2),
               "tflops": round(flop / us / 1e6, 1), "rel_err_vs_reference": round(err, 6),
               "compile_s": round(compile_s, 1)}
        rows.append(row)
        log(json.dumps(row))
    return rows


def sweep_shape(m, k, n, log):
    """Microseconds of the Triton kernel alone (8-bit input) per tile config: fp16 output, and for
    the FF-in shapes also the GEGLU form (8-bit output for the FF-out GEMM)."""
    ops = gemm_operands(m, k, n)
    rows = []
    tiles = triton_gemm.SMALL_M_SWEEP_CONFIGS if triton_gemm.small_m(m) else triton_gemm.SWEEP_CONFIGS
    forms = [(False, tiles)] + ([(True, triton_gemm.GEGLU_SWEEP_CONFIGS)] if (m, k, n) in GEGLU_SHAPES else [])
    for fmt, (geglu, configs) in itertools.product(("int8", "fp8"), forms):
        p = ops[fmt]
        a = (quantize_fp8 if fmt == "fp8" else quantize_int8)(ops["x"], p["to_grid"])
        scale = column_scale(fmt, p).float().expand(n).contiguous()
        cols = n // 2 if geglu else n
        out_fmt = {(False, fmt): triton_gemm.OUT_FLOAT, (True, "fp8"): triton_gemm.OUT_FP8,
                   (True, "int8"): triton_gemm.OUT_INT8}[(geglu, fmt)]
        out = torch.empty(m, cols, device=a.device, dtype={triton_gemm.OUT_FLOAT: torch.float16,
                                                           triton_gemm.OUT_FP8: torch.float8_e4m3fn,
                                                           triton_gemm.OUT_INT8: torch.int8}[out_fmt])
        next_grid = torch.full((cols,), GEGLU_NEXT_GRID[fmt], device=a.device)
        for config in configs:
            kwargs = triton_gemm.tile_kwargs(config)
            try:
                def run():
                    triton_gemm.launch_kernel(a, p["w"], scale, None, next_grid, out, cols if geglu else 0,
                                              out_fmt, -127, kwargs)
                run()
                us = time_graph(run)
            except Exception as e:  # e.g. out of shared memory: a config this GPU cannot take
                log(f"{m}x{k}x{n} {fmt} {kwargs}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append({"shape": [m, k, n], "path": f"{fmt} triton" + (" geglu" if geglu else ""), "config": kwargs,
                         "us": round(us, 2), "tflops": round(2 * m * k * n / us / 1e6, 1)})
            log(json.dumps(rows[-1]))
        if not triton_gemm.small_m(m):
            rows += tma_rows(m, k, n, fmt, a, p["w"], scale, out, log, next_grid if geglu else None, out_fmt)
    return rows


def tma_rows(m, k, n, fmt, a, w, scale, out, log, next_grid=None, out_fmt=triton_gemm.OUT_FLOAT):
    """The same GEMM with TMA loads (triton_gemm.launch_tma_kernel), per tile of TMA_SWEEP_CONFIGS
    (with next_grid: the GEGLU form, TMA_GEGLU_SWEEP_CONFIGS); each output checked against the
    cp.async kernel's."""
    rows = []
    geglu = {"out_grid": next_grid, "gate_offset": out.shape[1] if next_grid is not None else 0, "out_fmt": out_fmt,
             "int8_min": -127}
    expected = triton_gemm.launch_kernel(a, w, scale, None, next_grid, torch.empty_like(out), geglu["gate_offset"],
                                         out_fmt, -127, triton_gemm.tile_kwargs(triton_gemm.TILES[fmt]))
    configs = triton_gemm.TMA_SWEEP_CONFIGS if next_grid is None else triton_gemm.TMA_GEGLU_SWEEP_CONFIGS
    for config in configs:
        kwargs = triton_gemm.tile_kwargs(config)
        try:
            def run():
                triton_gemm.launch_tma_kernel(a, w, scale, out, kwargs, **geglu)
            run()
            same = bool(torch.allclose(out.float(), expected.float(), rtol=1e-3, atol=1e-3))
            us = time_graph(run)
        except Exception as e:  # e.g. Triton without tensor descriptors, or out of shared memory
            log(f"{m}x{k}x{n} {fmt} tma {kwargs}: {type(e).__name__}: {str(e)[:120]}")
            continue
        rows.append({"shape": [m, k, n], "path": f"{fmt} triton tma" + (" geglu" if next_grid is not None else ""),
                     "config": kwargs, "us": round(us, 2),
                     "tflops": round(2 * m * k * n / us / 1e6, 1), "same_as_cp_async": same})
        log(json.dumps(rows[-1]))
    return rows


def geglu_middle_row(m, n, fmt, log, device="cuda", time_fn=None):
    """The middle of a GEGLU feed-forward, (m, 2n) fp16 in, (m, n) 8-bit out, us and GB/s: Inductor's
    kernel (engine.geglu: inductor), the project's Triton kernel (triton-pointwise) per tile; outputs
    compared (element share that differs, and by how much)."""
    from ..engines import triton_geglu

    time_fn = time_fn or time_graph
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(m, 2 * n, generator=g, device=device).half()
    grid = torch.tensor(GEGLU_NEXT_GRID[fmt], device=device)
    out_fmt = triton_gemm.OUT_FP8 if fmt == "fp8" else triton_gemm.OUT_INT8
    moved_mb = (h.numel() * 2 + m * n) / 1e6
    row = {"fmt": fmt, "input": [m, 2 * n], "moved_mb": round(moved_mb, 3)}
    torch._dynamo.reset()
    inductor = torch.compile(lambda h: geglu_8bit(h, grid, fmt))
    want = inductor(h)
    row["inductor us"] = round(time_fn(lambda: inductor(h)), 2)
    got = triton_geglu.geglu8(h, grid, out_fmt)
    row["triton us"] = round(time_fn(lambda: triton_geglu.geglu8(h, grid, out_fmt)), 2)
    row["triton differs"] = round(float((got.float() != want.float()).float().mean()), 6)
    row["triton max diff"] = float((got.float() - want.float()).abs().max())
    for name in ("inductor", "triton"):
        row[f"{name} GB/s"] = round(moved_mb / 1e3 / (row[f"{name} us"] * 1e-6), 1)
    if device == "cuda":  # the tile sweep, the kernel alone
        grid_columns = triton_gemm.per_column(grid, n)
        out = torch.empty_like(got)
        row["triton us by tile"] = {
            f"{t['BLOCK_M']}x{t['BLOCK_N']}/{t['num_warps']}": round(time_fn(lambda t=t: triton_geglu.launch_kernel(
                h, grid_columns, out, out_fmt, -INT8_MAX, tile=t)), 2) for t in triton_geglu.SWEEP_TILES}
    log(json.dumps(row))
    return row


def patches_row(channels, side, log):
    """The int8 patch matrix of a 3x3 conv's input, from fp16 (the quantize included), compiled:
    Inductor's kernel for the unfold view against the Triton copy kernel; same bytes required."""
    from ..engines import triton_patches

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, channels, side, side, generator=g, device="cuda").half()
    x = x.contiguous(memory_format=torch.channels_last)
    to_grid = torch.tensor(127 / 4.0, device="cuda")
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
    outs, row = {}, {"input": [2, channels, side, side], "patch_mb": round(2 * side * side * 9 * channels / 2**20, 1)}
    for name, patches_of in (("inductor", image_patches), ("triton", triton_patches.image_patches)):
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: patches_of(quantize_int8(x, to_grid), *geometry))
        with torch.no_grad():
            outs[name] = compiled(x).reshape(-1, 9 * channels)
            row[f"{name}_us"] = round(time_graph(lambda: compiled(x)), 2)
    row["same_bytes"] = bool(torch.equal(outs["inductor"], outs["triton"]))
    log(json.dumps(row))
    return row


def conv_row(channels, side, out_channels, log, device="cuda", time_fn=None):
    """One 3x3 conv from its fp16 input, compiled, us: cuDNN fp16, and per 8-bit format the conv as
    quantize + Triton patch copy + GEMM (Triton int8, cuBLASLt fp8) against quantize + the
    implicit-GEMM Triton conv (no patch matrix); each 8-bit output's error against the fp16 conv."""
    from ..engines import triton_conv, triton_patches

    time_fn = time_fn or time_graph
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, channels, side, side, generator=g, device=device).half()
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(out_channels, channels, 3, 3, generator=g, device=device) / (9 * channels) ** 0.5).half()
    weight = weight.contiguous(memory_format=torch.channels_last)
    w = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
    row = {"input": [2, channels, side, side], "out_channels": out_channels,
           "tflop": round(2 * 2 * side * side * 9 * channels * out_channels / 1e12, 4)}
    reference = F.conv2d(x.float(), weight.float(), None, 1, 1)
    paths = {"fp16 cudnn": lambda x: F.conv2d(x, weight, None, 1, 1)}
    operands = quantized_operands(x, w)
    for fmt in ("int8", "fp8"):
        p = operands[fmt]
        wq, scale = p["w"], column_scale(fmt, p)
        quantize = functools.partial(quantize_int8 if fmt == "int8" else quantize_fp8, to_grid=p["to_grid"])
        if fmt == "int8":
            gemm = functools.partial(triton_gemm.gemm8, w=wq, scale=scale)
        else:
            gemm = functools.partial(fp8_matmul, weight=wq, scale_a=p["back"], scale_b=p["w_back"],
                                     out_dtype=torch.float16)

        def patches_gemm(x, quantize=quantize, gemm=gemm):
            xq = quantize(x)
            patches = triton_patches.image_patches(xq.view(torch.int8), *geometry)
            return gemm(patches.reshape(-1, patches.shape[-1]).view(xq.dtype))

        paths[f"{fmt} patches+gemm"] = patches_gemm
        paths[f"{fmt} implicit"] = lambda x, quantize=quantize, wq=wq, scale=scale: triton_conv.conv8(
            quantize(x), wq, scale, None, *geometry)
        row[f"{fmt} implicit alone us by tile"] = conv_tiles(quantize(x), wq, scale, geometry, time_fn)
    for name, path in paths.items():
        torch._dynamo.reset()
        compiled = torch.compile(path)
        with torch.no_grad():
            out = compiled(x)
            out = out.reshape(2, side, side, out_channels).permute(0, 3, 1, 2) if out.dim() == 2 else out
            row[f"{name} us"] = round(time_fn(lambda: compiled(x)), 2)
        row[f"{name} rel_err"] = round(float((out.float() - reference).norm() / reference.norm()), 5)
    log(json.dumps(row))
    return row


# (batch, heads, queries, keys) of SDXL's attention at 1024 px, batch 2 (head_dim 64): self- and
# cross-attention (the text's 77 tokens) at 64x64 and 32x32 latents
ATTENTION_SHAPES = ((2, 10, 4096, 4096), (2, 20, 1024, 1024), (2, 10, 4096, 77), (2, 20, 1024, 77))


def attention_row(b, h, m, n, log, d=64, device="cuda", time_fn=None):
    """One attention from fp16 q, k, v, compiled, us: fp16 SDPA (cuDNN / flash), level 4 as the
    engine runs it now (fake-quantized q, k, v into fp16 SDPA), and the FP8 Triton kernel (its
    quantize included), with p v in fp16 and with p in e4m3 too; then the kernel alone on e4m3 input
    per tile, both ways. Errors against the reference (p unquantized, the fake-quant model's meaning)."""
    from ..engines import triton_attention

    time_fn = time_fn or time_graph
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=g, device=device).half() for length in (m, n, n))
    grids = [fp8_scales(t.abs().amax()) for t in (q, k, v)]  # (to_grid, back) per tensor
    backs = [back for _, back in grids]
    quantized = [quantize_fp8(t, to_grid) for t, (to_grid, _) in zip((q, k, v), grids)]
    reference = triton_attention.fp8_attention_reference(*quantized, *backs).float()
    row = {"shape": [b, h, m, n, d], "tflop": round(4 * b * h * m * n * d / 1e12, 4)}

    def fake_quant(t, to_grid, back):
        return (quantize_fp8(t, to_grid).float() * back).half()

    paths = {"fp16 sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
             "fp8 fake-quant sdpa": lambda q, k, v: F.scaled_dot_product_attention(
                 *(fake_quant(t, *grid) for t, grid in zip((q, k, v), grids))),
             "fp8 triton": lambda q, k, v: triton_attention.fp8_attention(
                 *(quantize_fp8(t, to_grid) for t, (to_grid, _) in zip((q, k, v), grids)), *backs),
             "fp8 triton p e4m3": lambda q, k, v: triton_attention.fp8_attention(
                 *(quantize_fp8(t, to_grid) for t, (to_grid, _) in zip((q, k, v), grids)), *backs,
                 quantize_probs=True)}
    for name, path in paths.items():
        torch._dynamo.reset()
        compiled = torch.compile(path)
        with torch.no_grad():
            out = compiled(q, k, v)
            row[f"{name} us"] = round(time_fn(lambda: compiled(q, k, v)), 2)
        row[f"{name} rel_err"] = round(float((out.float() - reference).norm() / reference.norm()), 5)
    scales = torch.stack([s.float().reshape(()) for s in backs])
    out = triton_attention.heads_last_output(q)  # as the op writes it
    tiles = triton_attention.SWEEP_TILES if device == "cuda" else [None]
    q8, k8, v8 = quantized
    for probs, v_layout in ((False, v8), (True, triton_attention.keys_contiguous(v8))):
        by_tile = row["fp8 triton p e4m3 alone us by tile" if probs else "fp8 triton alone us by tile"] = {}
        for tile in tiles:
            key = "default" if tile is None else f"{tile['BLOCK_M']}x{tile['BLOCK_N']}/{tile['num_warps']}/{tile['num_stages']}"
            try:
                by_tile[key] = round(time_fn(lambda: triton_attention.launch_kernel(
                    q8, k8, v_layout, scales, out, 1 / d ** 0.5, tile, quantize_probs=probs)), 2)
            except Exception as e:  # e.g. out of shared memory
                by_tile[key] = f"{type(e).__name__}: {str(e)[:100]}"
    log(json.dumps(row))
    return row


def conv_tiles(xq, wq, scale, geometry, time_fn):
    """Microseconds of the implicit conv kernel alone (8-bit input) per tile of triton_conv.SWEEP_CONFIGS,
    keyed "BLOCK_MxBLOCK_NxBLOCK_K/warps/stages"."""
    from ..engines import triton_conv

    xq = xq.contiguous(memory_format=torch.channels_last)
    b, _, h, w = xq.shape
    geo = conv_geometry(xq, *geometry)
    out = torch.empty(b * geo[-1][0] * geo[-1][1], wq.shape[0], device=xq.device, dtype=torch.float16)
    scale = triton_gemm.per_column(scale, wq.shape[0])
    configs = triton_conv.SWEEP_CONFIGS if xq.is_cuda else [triton_conv.INTERPRETER_TILE]
    times = {}
    for config in configs:
        kwargs = config if isinstance(config, dict) else triton_gemm.tile_kwargs(config)
        key = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        key += f"/{kwargs.get('num_warps', '-')}/{kwargs.get('num_stages', '-')}"
        try:
            times[key] = round(time_fn(lambda: triton_conv.launch_kernel(xq.permute(0, 2, 3, 1), wq, scale, None,
                                                                         out, geo, kwargs)), 2)
        except Exception as e:  # e.g. out of shared memory: a tile this GPU cannot take
            times[key] = f"{type(e).__name__}: {str(e)[:100]}"
    return times


def shape_list(text):
    """"2048x1280x1280,154x2048x640" -> ((2048, 1280, 1280), (154, 2048, 640))"""
    try:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: want MxKxN[,MxKxN...] with positive sizes")
    return shapes


def main(argv=None):
    from ..device import describe_device, require_cuda

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="default,max-autotune-no-cudagraphs")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no new shape after this")
    parser.add_argument("--sweep", action="store_true",
                        help="instead: time the Triton kernel alone for every tile in triton_gemm.SWEEP_CONFIGS")
    parser.add_argument("--patches", action="store_true",
                        help="instead: time the conv GEMMs' patch matrices, Inductor's kernel against the Triton one")
    parser.add_argument("--convs", action="store_true",
                        help="instead: time SDXL's 3x3 convs from fp16 input: cuDNN fp16, and 8-bit as patch "
                             "matrix + GEMM against the implicit-GEMM Triton conv")
    parser.add_argument("--geglu-middle", action="store_true",
                        help="instead: time the GEGLU feed-forwards' middle (value * gelu(gate), quantized) on "
                             "SDXL's shapes: Inductor's kernel against the project's Triton kernel and its tiles")
    parser.add_argument("--attention", action="store_true",
                        help="instead: time SDXL's attention shapes: fp16 SDPA, level 4's fake-quant SDPA and "
                             "the FP8 Triton attention kernel")
    parser.add_argument("--shapes", type=shape_list, default=SHAPES + SMALL_M_SHAPES, metavar="MxKxN[,MxKxN]",
                        help="the GEMM shapes to time (default: SDXL's, SHAPES and SMALL_M_SHAPES)")
    parser.add_argument("--out", default="gemm_bench.json")
    args = parser.parse_args(argv)
    require_cuda("GEMM benchmark")
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    began = time.time()
    result = {"device": describe_device("cuda"), "torch": torch.__version__, "rows": []}
    if args.patches:
        for channels, side in CONV_INPUTS:
            result["rows"].append(patches_row(channels, side, log))
            write_json(args.out, result)
        return result
    if args.geglu_middle:
        for fmt, (m, _, n) in itertools.product(("int8", "fp8"), GEGLU_SHAPES):
            result["rows"].append(geglu_middle_row(m, n // 2, fmt, log))
            write_json(args.out, result)
        return result
    if args.attention:
        for b, h, m, n in ATTENTION_SHAPES:
            result["rows"].append(attention_row(b, h, m, n, log))
            write_json(args.out, result)
        return result
    if args.convs:
        for channels, side, out_channels in CONV_SHAPES:
            result["rows"].append(conv_row(channels, side, out_channels, log))
            write_json(args.out, result)
        return result
    if args.sweep:
        for m, k, n in args.shapes:
            result["rows"] += sweep_shape(m, k, n, log)
            write_json(args.out, result)
        return result
    for m, k, n in args.shapes:
        if time.time() - began > args.budget_s:
            log(f"{m}x{k}x{n}: skipped by the budget")
            continue
        result["rows"] += measure_shape(m, k, n, args.modes.split(","), log)
        if (m, k, n) in GEGLU_SHAPES:
            result["rows"] += measure_shape(m, k, n, args.modes.split(","), log, geglu=True)
        write_json(args.out, result)
    base = {(*r["shape"], r["path"]): r["us"] for r in result["rows"] if r["path"].startswith("fp16")}
    log(f"{'m x k x n':>18} {'path':16} {'mode':28} {'us':>8} {'vs fp16':>7} {'TFLOP/s':>8} {'rel err':>9}")
    for r in result["rows"]:
        fp16_us = base[(*r["shape"], "fp16 geglu" if r["path"].endswith("geglu") else "fp16")]
        log(f"{'x'.join(map(str, r['shape'])):>18} {r['path']:16} {r['mode']:28} {r['us']:8.2f} "
            f"{fp16_us / r['us']:7.2f} {r['tflops']:8.1f} {r['rel_err_vs_reference']:9.2e}")
    return result


if __name__ == "__main__":
    main()
