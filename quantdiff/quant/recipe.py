"""ModelOpt quantization configs for a quant level (list format, deny-all first)."""
import os

from .calibrators import StepRangePercentileCalibrator

# ModelOpt JIT-builds CUDA kernels for its fake quant on first GPU use (~1 min each, cached under
# ~/.cache/torch_extensions; a killed build leaves a lock that hangs the next). "0" here makes it
# use its torch formula instead, the one the torch engine emulates: for machines that start bare.
MODELOPT_CUDA_EXT_ENV = "QUANTDIFF_MODELOPT_CUDA_EXT"

FORMATS = {"int8": 8, "fp8": (4, 3)}  # (4, 3) is ModelOpt's spelling of float8 e4m3
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")


def quantizer_cfg(precision, role, kind, settings):
    """Attributes of one quantizer. role: 'weight' | 'input'."""
    bits = FORMATS[precision]
    if role == "weight":
        # INT8 weights per output channel; FP8 e4m3 per tensor (its dynamic range is enough).
        return {"num_bits": bits, "axis": 0 if precision == "int8" else None}
    cfg = {"num_bits": bits, "axis": None}
    if precision == "int8" and kind != "conv" and settings["alpha"] == "auto":
        cfg["axis"] = -1  # per-channel amax: what smoothing needs; smooth_per_layer makes it per tensor
    if precision == "int8" and kind == "conv":
        cfg["calibrator"] = (StepRangePercentileCalibrator, (), {
            "num_bits": bits, "axis": None, "n_steps": settings["n_steps"],
            "percentile": settings["percentile"], "collect_method": settings["collect_method"]})
    return cfg


def smoothed_linears(precision, layers):
    """Names of the linears SmoothQuant applies to (INT8 only)."""
    return [name for name, kind in layers.items() if kind != "conv"] if precision == "int8" else []


def algorithm(precision, layers, settings):
    """SmoothQuant migrates INT8 linear-input outliers into the weights; everything else is max.
    With `alpha: auto` calibration is max, and quant.smoothing picks and applies each layer's alpha."""
    if smoothed_linears(precision, layers) and settings["alpha"] != "auto":
        return {"method": "smoothquant", "alpha": settings["alpha"]}
    return {"method": "max"}


def quant_config(precision, layers, attention, settings):
    """The `mtq.quantize` config quantizing exactly `layers` ({name: kind}) and `attention` (names)."""
    entries = [{"quantizer_name": "*", "enable": False}]
    for name, kind in layers.items():
        for role in ("weight", "input"):
            entries.append({"quantizer_name": f"{name}.{role}_quantizer",
                            "cfg": quantizer_cfg(precision, role, kind, settings)})
    for name in attention:
        for quantizer in ATTENTION_QUANTIZERS:
            entries.append({"quantizer_name": f"{name}.{quantizer}", "cfg": {"num_bits": FORMATS["fp8"], "axis": None}})
    return {"quant_cfg": entries, "algorithm": algorithm(precision, layers, settings)}


def skip_modelopt_cuda_extensions():
    """Make ModelOpt's fake quant run its torch formula rather than build its CUDA extensions."""
    from modelopt.torch.quantization import extensions

    extensions.get_cuda_ext.extension = None
    extensions.get_cuda_ext_fp8.extension = None


def modelopt_cuda_extensions_from_env(log=print):
    """Honour MODELOPT_CUDA_EXT_ENV; True when ModelOpt may build and use its CUDA extensions."""
    if os.environ.get(MODELOPT_CUDA_EXT_ENV, "1") != "0":
        return True
    skip_modelopt_cuda_extensions()
    log(f"{MODELOPT_CUDA_EXT_ENV}=0: ModelOpt fake quant runs its torch formula (no CUDA extension build)")
    return False
