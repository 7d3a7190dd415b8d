"""The step-range percentile calibrator ("Percentile Quant").

Early denoising steps decide an image's layout; activation outliers of late steps barely
matter. So instead of the global max, each quantizer records its amax per denoising step,
combines each step across calibration batches, and keeps the *minimum* (by default) over the
first ceil(percentile * n_steps) steps. The denoising step comes from STEP_CLOCK, which the
calibration loop advances on every UNet call.
"""
import math

import torch
from modelopt.torch.quantization.calib import MaxCalibrator

REDUCERS = {
    "min": lambda t: t.min(dim=0).values,
    "max": lambda t: t.max(dim=0).values,
    "mean": lambda t: t.mean(dim=0),
}
COLLECT_METHODS = ("min-mean", "min-max", "mean-max", "max-max")


class StepClock:
    """Which denoising step the UNet is on. One UNet call per step (Euler-family samplers)."""

    def __init__(self):
        self.step = 0
        self._calls = 0

    def start_image(self):
        self.step, self._calls = 0, 0

    def tick(self, *_):
        """UNet forward pre-hook: the coming call is step `self.step`."""
        self.step = self._calls
        self._calls += 1


# Module-level so that calibrators made by ModelOpt from plain-number kwargs (which survive
# `mto.save`) can find it.
STEP_CLOCK = StepClock()


def parse_collect_method(method):
    """'<over steps>-<over batches>' → two reducer names."""
    if method not in COLLECT_METHODS:
        raise ValueError(f"collect_method {method!r} is not one of {COLLECT_METHODS}")
    over_steps, over_batches = method.split("-")
    return over_steps, over_batches


def step_range_amax(per_step, n_steps, percentile, collect_method):
    """Combine {step: [amax of each batch]} into one amax.

    Each step's amaxes are reduced across batches, then the first ceil(percentile * n_steps)
    steps are reduced across steps. Pure function: the calibrator and the tests share it.
    """
    over_steps, over_batches = parse_collect_method(collect_method)
    keep = max(1, math.ceil(percentile * n_steps - 1e-9))
    steps = sorted(per_step)[:keep]
    if not steps:
        return None
    combined = torch.stack([REDUCERS[over_batches](torch.stack(per_step[s])) for s in steps])
    return REDUCERS[over_steps](combined)


class StepRangePercentileCalibrator(MaxCalibrator):
    """ModelOpt max calibrator that keeps amax per denoising step (see the module doc)."""

    def __init__(self, num_bits=8, axis=None, unsigned=False, n_steps=20, percentile=1.0,
                 collect_method="min-mean", clock=None):
        super().__init__(num_bits=num_bits, axis=axis, unsigned=unsigned)
        parse_collect_method(collect_method)
        self.n_steps, self.percentile, self.collect_method = n_steps, percentile, collect_method
        self.clock = clock or STEP_CLOCK
        self.per_step = {}

    @torch.no_grad()
    def collect(self, x):
        super().collect(x)  # the global max stays available as a fallback and for the record
        if x.device.type == "meta":
            return
        self.per_step.setdefault(self.clock.step, []).append(self._calib_amax_of(x))

    def _calib_amax_of(self, x):
        from modelopt.torch.quantization import utils as quant_utils

        reduce_axis = quant_utils.convert_quantization_axis_to_reduce_axis(x, self._axis)
        return quant_utils.reduce_amax(x, axis=reduce_axis).detach().float()

    def reset(self):
        super().reset()
        self.per_step = {}

    def compute_amax(self, *args, **kwargs):
        amax = step_range_amax(self.per_step, self.n_steps, self.percentile, self.collect_method)
        if amax is None:
            return super().compute_amax()
        return amax.to(self._calib_amax.dtype) if self._calib_amax is not None else amax

    def __repr__(self):
        return (f"StepRangePercentileCalibrator(n_steps={self.n_steps}, percentile={self.percentile}, "
                f"collect_method={self.collect_method!r}, steps_seen={len(self.per_step)})")
