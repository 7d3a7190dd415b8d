"""Per-layer SmoothQuant: `alpha: auto` picks each linear's migration strength from a grid.

SmoothQuant divides each input channel of a linear by s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)
(folded into the weight), so activation outliers move into the weights. One global alpha suits
some layers and hurts others; here every INT8 linear gets the alpha on ALPHA_GRID that minimizes
its own output error, ||fq(x/s) fq(W s)ᵀ - x Wᵀ||², on activations sampled during calibration
(fq: the INT8 fake quant ModelOpt applies: activations per tensor, weights per output channel).
The chosen smoothing is applied through ModelOpt, exactly as its own `smoothquant` does it, so the
checkpoint, the export and the torch engine see an ordinary SmoothQuant-calibrated layer.
"""
import contextlib
import math

import torch

from .grids import fake_quant_int8

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0
ROWS_PER_LAYER = 256  # activation rows kept per linear (tokens), enough to rank alphas
_EPS = 1.0 / (1 << 31)


def smoothing_scale(act_amax, weight, alpha):
    """ModelOpt's pre-quant scale for `alpha`: the factor each input channel is multiplied by."""
    weight_amax = weight.abs().amax(dim=0)
    scale = weight_amax.pow(1 - alpha) / act_amax.clamp(min=_EPS).pow(alpha)
    scale = torch.where(act_amax <= _EPS, torch.ones_like(scale), scale)
    return scale.clamp(1e-4, 1e4)


def output_error(x, weight, act_amax, alpha):
    """Mean squared output error of the INT8 layer smoothed with `alpha` on sample rows `x`."""
    scale = smoothing_scale(act_amax, weight, alpha)
    x_s, w_s = x * scale, weight / scale
    x_q = fake_quant_int8(x_s, (act_amax * scale).amax())
    w_q = fake_quant_int8(w_s, w_s.abs().amax(dim=1, keepdim=True))
    return float((x_q @ w_q.T - x @ weight.T).pow(2).mean())


def choose_alpha(x, weight, act_amax, grid=ALPHA_GRID):
    """(best alpha, {alpha: error}) for one linear; ties go to the smaller alpha."""
    x, weight, act_amax = x.float(), weight.detach().float(), act_amax.float().reshape(-1)
    errors = {alpha: output_error(x, weight, act_amax, alpha) for alpha in grid}
    return min(errors, key=lambda a: (errors[a], a)), errors


class ActivationSampler:
    """Keeps about `rows` input rows of each named linear, spread evenly over the `calls` forward
    passes calibration makes (every step of every prompt batch), seeded, on the CPU. Memory stays
    at rows x width per layer (SDXL: about 1 GB in all), however long calibration runs."""

    def __init__(self, names, rows=ROWS_PER_LAYER, calls=1, seed=0):
        self.names, self.rows = list(names), rows
        self.rows_per_call = max(1, math.ceil(rows / max(1, calls)))
        self.samples = {name: [] for name in self.names}
        self._generator = torch.Generator().manual_seed(seed)

    def _hook(self, name):
        def keep(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            take = torch.randperm(x.shape[0], generator=self._generator)[: self.rows_per_call].to(x.device)
            self.samples[name].append(x[take].float().cpu())  # pick on the device, copy only the rows
        return keep

    @contextlib.contextmanager
    def attached(self, model):
        """Forward pre-hooks on the named linears of `model` for the duration of the block."""
        modules = dict(model.named_modules())
        handles = [modules[name].register_forward_pre_hook(self._hook(name)) for name in self.names]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def rows_of(self, name):
        """A seeded subsample of `rows` rows drawn from every call (every step, every prompt)."""
        x = torch.cat(self.samples[name])
        return x[torch.randperm(x.shape[0], generator=self._generator)[: self.rows]]


@torch.no_grad()
def smooth_per_layer(unet, sampler, grid=ALPHA_GRID):
    """Apply the best-alpha SmoothQuant to each sampled linear; {name: {alpha, error, errors}}.

    Expects input quantizers calibrated per channel (axis -1), as ModelOpt's smoothquant leaves
    them before smoothing; leaves them per tensor with pre_quant_scale set, as it does.
    """
    from modelopt.torch.quantization.model_calib import apply_pre_quant_scale_and_smooth

    modules = dict(unet.named_modules())
    chosen = {}
    for name in sampler.names:
        module = modules[name]
        quantizer = module.input_quantizer
        act_amax = quantizer.amax.float().reshape(-1)
        alpha, errors = choose_alpha(sampler.rows_of(name), module.weight, act_amax.cpu(), grid)
        scale = smoothing_scale(act_amax, module.weight.detach().float(), alpha)
        quantizer._amax_for_smoothing = act_amax.cpu()
        quantizer.reset_amax()
        quantizer.axis = None
        quantizer.amax = act_amax.amax().to(module.weight)
        apply_pre_quant_scale_and_smooth(module, scale)
        chosen[name] = {"alpha": alpha, "error": errors[alpha], "error_at": {str(a): e for a, e in errors.items()}}
    return chosen
