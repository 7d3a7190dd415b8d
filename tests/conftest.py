import os
import sys
from pathlib import Path

import pytest
import torch

# The torch engine's Triton kernels (quantdiff/engines/triton_gemm.py) run in Triton's interpreter
# on a machine without a GPU; the variable must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def exact_fp8_casts_in_the_interpreter():
    """Triton's interpreter (3.8) rounds float32 to e4m3 without carrying into the exponent (0.4966
    becomes 0.25, not 0.5) and rounds ties up; the GPU's cvt.rn.satfinite rounds to nearest even and
    saturates, as torch's cast after a clamp does. The kernels' e4m3 casts (attention's softmax
    output and output) run through torch's here, so their tests compare like with like."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    convert = interpreter._convert_float

    def exact(values, from_dtype, to_dtype, rounding_mode):
        if to_dtype != tl.float8e4nv or from_dtype not in (tl.float32, tl.float16):
            return convert(values, from_dtype, to_dtype, rounding_mode)
        wide = np.frombuffer(values.tobytes(), dtype=np.float32 if from_dtype == tl.float32 else np.float16)
        narrow = torch.from_numpy(wide.astype(np.float32)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return narrow.view(torch.uint8).numpy().reshape(values.shape)

    interpreter._convert_float = exact


if os.environ.get("TRITON_INTERPRET") == "1":
    exact_fp8_casts_in_the_interpreter()

sys.path.insert(0, str(Path(__file__).parent))  # workflow_helpers

ROOT = Path(__file__).resolve().parents[1]
TINY_XL = {"pipeline": "sdxl", "source": "builtin:tiny-xl", "resolution": 64}


@pytest.fixture(scope="session")
def tiny_xl_dir(tmp_path_factory):
    """The embedded tiny-xl pipeline, materialized once per test session."""
    from quantdiff.models import materialize

    out = tmp_path_factory.mktemp("models") / "tiny-xl"
    materialize("tiny-xl", TINY_XL, out)
    return out


def quick_settings(precision, level, **overrides):
    """Calibration settings small enough for tests (2 prompts x 4 steps)."""
    settings = {"prompts": str(ROOT / "config/prompts/calibration.txt"), "calib_size": 2, "batch_size": 2,
                "n_steps": 4, "guidance": 5.0, "seed": 0, "percentile": 1.0, "collect_method": "min-mean",
                "alpha": 0.8, "exclude": "(time_embedding|add_embedding|conv_in|conv_out|conv_shortcut|time_emb_proj)",
                "precision": precision, "quant_level": level, "pipeline": "sdxl", "resolution": 64}
    return settings | overrides


def restored_twice(model_dir, ckpt):
    """Two fresh UNets restored from `ckpt`, one example input, and the outputs of both and of
    the plain UNet: what save/restore identity tests compare."""
    import torch

    from quantdiff.models import load_unet, unet_example_inputs
    from quantdiff.quant.calibrate import restore_calibrated_unet

    first, second = load_unet(model_dir), load_unet(model_dir)
    restore_calibrated_unet(first, ckpt)
    restore_calibrated_unet(second, ckpt)
    x = unet_example_inputs(first, 2, 64)
    with torch.no_grad():
        outputs = first(**x).sample, second(**x).sample, load_unet(model_dir)(**x).sample
    return second, x, outputs
