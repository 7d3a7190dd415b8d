"""ONNX export of the (calibrated) UNet with Q/DQ nodes, as TensorRT expects it."""
