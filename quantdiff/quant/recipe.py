"""ModelOpt quantization configs for a quant level (list format, deny-all first)."""
from .calibrators import StepRangePercentileCalibrator

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
