"""Run an exported graph in ONNX Runtime (CPU) and compare it with the PyTorch model."""
import numpy as np
import torch

# ORT's QDQ propagation moves float8 Q/DQ pairs across ops and gives wrong FP8 results (seen
# with onnxruntime 1.32); our graphs already have Q/DQ where TensorRT wants them.
DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"]


def ort_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=DISABLED_OPTIMIZERS)


def run_ort(path, feeds):
    session = ort_session(path)
    names = {i.name for i in session.get_inputs()}
    arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items() if k in names}
    return session.run(None, arrays)[0]


def relative_error(reference, test):
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    return float(np.linalg.norm(test - reference) / max(np.linalg.norm(reference), 1e-30))


def compare_with_torch(path, wrapper, positional, names):
    """Relative L2 error of ORT's output against `wrapper(*positional)`."""
    with torch.no_grad():
        expected = wrapper(*positional).float().cpu().numpy()
    got = run_ort(path, dict(zip(names, positional)))
    return relative_error(expected, got)
