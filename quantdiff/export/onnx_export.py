"""Export the UNet to ONNX with the legacy TorchScript exporter, then clean it with onnx-graphsurgeon.

The legacy exporter (`dynamo=False`) is deliberate: with ModelOpt fake-quant the dynamo exporter
fails on a data-dependent guard (`if min_amax < 0`), and the legacy one emits the Q/DQ nodes
TensorRT fuses (standard QuantizeLinear/DequantizeLinear for INT8, trt::TRT_FP8* for FP8).
"""
import tempfile
import time
from pathlib import Path

import onnx
import torch

from ..io import atomic_path

INPUT_NAMES = {
    "sdxl": ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
    "sd": ["sample", "timestep", "encoder_hidden_states"],
}
OUTPUT_NAME = "out_sample"
TWO_GB = 2 * 1024**3


class UNetWithNamedInputs(torch.nn.Module):
    """Positional inputs in INPUT_NAMES order, a plain tensor out: what an ONNX graph can name."""

    def __init__(self, unet, pipeline):
        super().__init__()
        self.unet, self.pipeline = unet, pipeline

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.pipeline == "sdxl" else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


def export_dtype(precision, quant_level):
    """FP8 attention (level 4) must be exported in fp16: TensorRT's FP8 MHA fusion pattern needs
    16-bit Q/DQ inputs and ModelOpt refuses otherwise. Everything else exports in fp32 so ONNX
    Runtime on CPU can check it; TensorRT's FP16 flag lowers it on the GPU."""
    return torch.float16 if (precision == "fp8" and quant_level == 4) else torch.float32


def positional_inputs(example, pipeline):
    """The example-input dict (models.unet_example_inputs) as a tuple in INPUT_NAMES order."""
    added = example.get("added_cond_kwargs") or {}
    values = {"sample": example["sample"], "timestep": example["timestep"],
              "encoder_hidden_states": example["encoder_hidden_states"], **added}
    return tuple(values[name] for name in INPUT_NAMES[pipeline])


def dynamic_axes(pipeline):
    batch = {0: "batch"}
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "encoder_hidden_states": batch,
            OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    if pipeline == "sdxl":
        axes |= {"text_embeds": batch, "time_ids": batch}
    return axes


def cleanup_graph(model):
    """graphsurgeon: fold constants (weight Q → int8 initializers), drop dead nodes, toposort."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    # FP8 ops live in the trt domain, which ONNX Runtime cannot fold: graphsurgeon skips them.
    graph.fold_constants(error_ok=True).cleanup().toposort()
    return gs.export_onnx(graph)


def weight_bytes(model):
    """Bytes of the initializers: ModelProto.ByteSize() cannot be trusted past protobuf's 2 GB."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def save_onnx(model, path):
    """Write atomically; weights go to `<name>.data` beside it only when the graph passes 2 GB."""
    path = Path(path)
    large = weight_bytes(model) > TWO_GB - (64 << 20)  # the graph itself needs some room too
    with atomic_path(path) as tmp:
        if large:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
            # The data file was written beside the temporary graph; move it next to the final one.
            (tmp.parent / f"{path.name}.data").replace(path.parent / f"{path.name}.data")
        else:
            onnx.save_model(model, str(tmp))
    return large


def export_unet(unet, pipeline, example, opset, out_path, log=print):
    """Trace `unet` (fake-quant or plain) into `out_path`; returns timings and sizes."""
    start = time.time()
    wrapper = UNetWithNamedInputs(unet, pipeline).eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # The raw trace (and its external data, for graphs over 2 GB) lives in a scratch folder.
    with tempfile.TemporaryDirectory(prefix=".export.", dir=out_path.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(wrapper, positional_inputs(example, pipeline), str(raw),
                              input_names=INPUT_NAMES[pipeline], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes(pipeline), opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        traced = time.time() - start
        cleaned = cleanup_graph(onnx.load(str(raw)))
    external = save_onnx(cleaned, out_path)
    log(f"exported {out_path} (trace {traced:.1f} s, total {time.time() - start:.1f} s)")
    return {"opset": opset, "trace_seconds": round(traced, 2), "seconds": round(time.time() - start, 2),
            "external_data": external, "inputs": INPUT_NAMES[pipeline], "output": OUTPUT_NAME}
