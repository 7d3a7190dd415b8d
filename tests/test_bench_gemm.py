"""Reference semantics of the GEMM benchmark's 8-bit paths, on the CPU (the GPU entry prints the
same comparison for the compiled kernels)."""
import pytest
import torch

from quantdiff.bench import gemm
from quantdiff.errors import MissingBackendError


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_8bit_path_is_the_fake_quant_gemm(fmt):
    ops = gemm.gemm_operands(40, 64, 48, device="cpu", seed=1)
    path = gemm.fp8_path if fmt == "fp8" else gemm.int8_path
    out = path(ops["x"], ops[fmt]).float()
    ref = gemm.fake_quant_reference(ops["x"], ops[fmt], fmt)
    plain = ops["x"].float() @ ops["w16"].float().t()
    assert out.shape == (40, 48)
    # same quantized operands: only the fp16 output rounding differs (measured ~2e-4)
    assert (out - ref).norm() / ref.norm() < 1e-3
    # and quantization is really there: the 8-bit result is not the fp16 GEMM
    assert (ref - plain).norm() / plain.norm() > 1e-3


def test_int8_weight_is_per_output_channel():
    ops = gemm.gemm_operands(8, 32, 16, device="cpu")
    w = ops["int8"]["w"]
    assert w.dtype == torch.int8 and w.shape == (16, 32)
    assert (w.abs().amax(dim=1) == 127).all()  # every row uses its full range


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu(tmp_path):
    with pytest.raises(MissingBackendError, match="GEMM benchmark stage needs a CUDA GPU"):
        gemm.main(["--out", str(tmp_path / "g.json")])
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("geglu", [False, True])
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_every_path_is_close_to_its_reference(fmt, geglu):
    # the Triton kernel in Triton's interpreter; what the GPU bench's error column compares
    # (300 rows: more than the few-row tile's, so the TMA form takes the int8 GEMM and the GEGLU ones)
    ops = gemm.gemm_operands(300, 64, 96, device="cpu", seed=2)
    paths = {name: (fn, f) for name, mode, fn, f in gemm.shape_paths(ops, ["default"], geglu)}
    tma = {"fp8 triton tma", "int8 triton tma"} if geglu else {"int8 triton tma"}
    assert set(paths) == {"fp16", fmt, "fp8", "int8", "fp8 triton", "int8 triton"} | tma
    for name in ("fp16", fmt, f"{fmt} triton") + ((f"{fmt} triton tma",) if fmt == "int8" or geglu else ()):
        fn, f = paths[name]
        out = fn(ops["x"]).float()
        ref = gemm.path_reference(ops["x"], ops, f, geglu)
        assert out.shape == ((300, 48) if geglu else (300, 96)), name
        # fp16 output rounding; for GEGLU also a grid step where rounding lands differently (erf, fp8 cast)
        assert (out - ref).norm() / ref.norm() < (3e-2 if geglu and f else 1e-3), name


def test_sweep_configs_are_distinct_and_include_the_chosen_tiles():
    from quantdiff.engines import triton_gemm as tg

    tiles = [tuple(sorted(tg.tile_kwargs(c).items())) for c in tg.SWEEP_CONFIGS]
    assert len(set(tiles)) == len(tiles) == 18
    geglu = [tuple(sorted(tg.tile_kwargs(c).items())) for c in tg.GEGLU_SWEEP_CONFIGS]
    assert len(set(geglu)) == len(geglu) == 9
    assert tg.tile_kwargs(tg.TILES["int8"]) == {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                                                  "num_warps": 4, "num_stages": 5}
    assert all(tile in tg.SWEEP_CONFIGS for tile in tg.TILES.values())
    small = [tuple(sorted(tg.tile_kwargs(c).items())) for c in tg.SMALL_M_SWEEP_CONFIGS]
    assert len(set(small)) == len(small) == 8
    assert all(tile in tg.SMALL_M_SWEEP_CONFIGS for tile in tg.SMALL_M_TILES.values())


def test_shapes_option():
    assert gemm.shape_list("2048x1280x1280,154x2048x640") == ((2048, 1280, 1280), (154, 2048, 640))
    for bad in ("2048x1280", "2048x0x5", "big", ""):
        with pytest.raises(Exception, match="want MxKxN"):
            gemm.shape_list(bad)
    with pytest.raises(SystemExit):  # argparse reports it and exits before any GPU work
        gemm.main(["--shapes", "12x12"])


def test_sweep_runs_every_tile_and_form(monkeypatch):
    # on the CPU in Triton's interpreter, with the clock stubbed: the GPU sweep's calls are well formed
    from quantdiff.engines import triton_gemm as tg

    operands = gemm.gemm_operands
    monkeypatch.setattr(gemm, "gemm_operands", lambda m, k, n: operands(m, k, n, device="cpu"))
    monkeypatch.setattr(gemm, "time_graph", lambda fn: fn() or 1.0)
    monkeypatch.setattr(gemm, "GEGLU_SHAPES", ((24, 64, 64),))
    monkeypatch.setattr(tg, "SWEEP_CONFIGS", tg.SWEEP_CONFIGS[:2])
    monkeypatch.setattr(tg, "GEGLU_SWEEP_CONFIGS", tg.GEGLU_SWEEP_CONFIGS[:1])
    monkeypatch.setattr(tg, "SMALL_M_SWEEP_CONFIGS", tg.SMALL_M_SWEEP_CONFIGS[:1])
    monkeypatch.setattr(tg, "SMALL_M_ROWS", 16)
    monkeypatch.setattr(tg, "TMA_SWEEP_CONFIGS", [tg._config(32, 32, 32, 4, 2)])
    monkeypatch.setattr(tg, "TMA_GEGLU_SWEEP_CONFIGS", [tg._config(32, 32, 64, 4, 2)])
    logged = []
    rows = gemm.sweep_shape(24, 64, 64, logged.append) + gemm.sweep_shape(8, 64, 32, logged.append)
    assert all(line.startswith("{") for line in logged), logged  # no config failed
    assert [(r["shape"][0], r["path"], r["config"]["BLOCK_K"]) for r in rows] == [
        (24, "int8 triton", 64), (24, "int8 triton", 64), (24, "int8 triton tma", 32), (24, "int8 triton geglu", 128),
        (24, "int8 triton tma geglu", 64),
        (24, "fp8 triton", 64), (24, "fp8 triton", 64), (24, "fp8 triton tma", 32), (24, "fp8 triton geglu", 128),
        (24, "fp8 triton tma geglu", 64),
        (8, "int8 triton", 128), (8, "fp8 triton", 128)]  # the few-row shape: its own tiles, no TMA form
    assert all(r["same_as_cp_async"] for r in rows if "tma" in r["path"])


def test_conv_rows_compare_the_8bit_conv_paths(monkeypatch):
    # on the CPU in Triton's interpreter, eager, clock stubbed: every path of the GPU's --convs
    # mode runs and is the conv (the int8 ones exactly the same values)
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    logged = []
    row = gemm.conv_row(64, 8, 40, logged.append, device="cpu", time_fn=lambda fn: fn() is None or 1.0)
    assert row["input"] == [2, 64, 8, 8] and len(logged) == 1
    paths = ["fp16 cudnn", "int8 patches+gemm", "int8 implicit", "fp8 patches+gemm", "fp8 implicit"]
    assert [k[:-3] for k in row if k.endswith(" us")] == paths
    assert list(row["int8 implicit alone us by tile"].values()) == [1.0]  # the interpreter's tile, ran
    assert row["fp16 cudnn rel_err"] < 2e-3  # fp16 rounding only
    for path in paths[1:]:  # 8-bit grids: a few percent, not more
        assert 2e-3 < row[f"{path} rel_err"] < 0.05, (path, row)
    assert row["int8 patches+gemm rel_err"] == row["int8 implicit rel_err"]



def test_attention_rows_compare_the_level_4_paths(monkeypatch):
    # on the CPU in Triton's interpreter, eager, clock stubbed: every path of the GPU's --attention
    # mode runs and is the same attention up to fp8 quantization
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    logged = []
    row = gemm.attention_row(1, 2, 24, 40, logged.append, d=16, device="cpu", time_fn=lambda fn: fn() is None or 1.0)
    assert row["shape"] == [1, 2, 24, 40, 16] and len(logged) == 1
    assert [k[:-3] for k in row if k.endswith(" us")] == ["fp16 sdpa", "fp8 fake-quant sdpa", "fp8 triton",
                                                           "fp8 triton p e4m3"]
    assert row["fp8 triton rel_err"] < 2e-3 and row["fp8 fake-quant sdpa rel_err"] < 2e-3  # the fp8 model's own
    assert 5e-3 < row["fp16 sdpa rel_err"] < 0.1  # what fp8 q, k, v change
    assert 2e-3 < row["fp8 triton p e4m3 rel_err"] < 0.06  # what e4m3 p adds
    assert row["fp8 triton alone us by tile"] == row["fp8 triton p e4m3 alone us by tile"] == {"default": 1.0}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_geglu_middle_rows_compare_inductor_with_the_triton_kernel(fmt, monkeypatch):
    # on the CPU (Inductor's C++ kernel, the Triton kernel in the interpreter), clock stubbed
    logged = []
    row = gemm.geglu_middle_row(37, 96, fmt, logged.append, device="cpu", time_fn=lambda fn: fn() is None or 2.0)
    moved_mb = (37 * 192 * 2 + 37 * 96) / 1e6
    assert row["input"] == [37, 192] and row["moved_mb"] == round(moved_mb, 3) and logged
    assert row["inductor us"] == row["triton us"] == 2.0 and row["triton GB/s"] == round(moved_mb / 2e-3, 1) > 0
    # float32 in the kernel, fp16 first in the modules' chain: a few values one grid step apart
    assert row["triton differs"] < 0.02
    assert row["triton max diff"] <= (1.0 if fmt == "int8" else 16.0)  # int8: one step; e4m3: one step near 128
    assert "triton us by tile" not in row  # the sweep is the GPU's
