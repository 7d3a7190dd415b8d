import os
import sys
from pathlib import Path

import pytest
import torch

# The torch engine's Triton kernels (quantdiff/engines/triton_gemm.py) run in Triton's interpreter
# on a machine without a GPU; the variable must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
