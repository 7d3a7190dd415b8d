"""Post-training quantization with NVIDIA ModelOpt: quant levels, calibrators, calibration."""
