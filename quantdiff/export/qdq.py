"""Q/DQ bookkeeping on exported graphs: counts by layer kind, and the FP8 op rewrite."""
import collections

from onnx import TensorProto, helper

from ..quant.levels import linear_kind

QUANTIZE_OPS = {"QuantizeLinear", "TRT_FP8QuantizeLinear"}
DEQUANTIZE_OPS = {"DequantizeLinear", "TRT_FP8DequantizeLinear"}
COMPUTE_OPS = {"Conv": "conv", "MatMul": None, "Gemm": None}
ATTENTION_LEAVES = {"attn1", "attn2"}


def module_path(node_name):
    """'/unet/down_blocks.1/attentions.0/.../to_q/MatMul' → 'down_blocks.1.attentions.0....to_q'."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[1:-1])  # drop the wrapper's attribute ('unet') and the op name


# FP8 attention places Cast/Transpose/Mul (the softmax scale) between its DQ and the MatMul.
TRANSPARENT_OPS = {"Cast", "Transpose", "Mul", "Reshape"}


def _fed_by_dequantize(tensor, producer, depth=4):
    node = producer.get(tensor)
    while node is not None and depth > 0:
        if node.op_type in DEQUANTIZE_OPS:
            return True
        if node.op_type not in TRANSPARENT_OPS:
            return False
        node, depth = producer.get(node.input[0]), depth - 1
    return False


def quantized_compute_nodes(model):
    """{node name: (module path, kind)} for every Conv/MatMul/Gemm fed by a dequantize node."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        if not any(_fed_by_dequantize(i, producer) for i in node.input):
            continue
        path = module_path(node.name)
        leaf = path.rsplit(".", 1)[-1]
        if node.op_type == "Conv":
            kind = "conv"
        elif leaf in ATTENTION_LEAVES:
            kind = "attention"  # q·kᵀ and softmax·v inside an attention block (FP8 level 4)
        else:
            kind = linear_kind(path)
        found[node.name] = (path, kind)
    return found


def qdq_summary(model):
    """What export.json records: Q/DQ node counts, quantized layers by kind, and by name."""
    ops = collections.Counter(n.op_type for n in model.graph.node if n.op_type in QUANTIZE_OPS | DEQUANTIZE_OPS)
    nodes = quantized_compute_nodes(model)
    layers = {}
    for path, kind in nodes.values():
        if kind != "attention":
            layers[path] = kind
    by_kind = collections.Counter(layers.values())
    attention_blocks = {path for path, kind in nodes.values() if kind == "attention"}
    return {"qdq_nodes": dict(sorted(ops.items())),
            "layers_by_kind": dict(sorted(by_kind.items())) | ({"fp8_attention": len(attention_blocks)} if attention_blocks else {}),
            "quantized_layers": sorted(layers)}


def fp8_to_standard_qdq(model):
    """Rewrite TensorRT's trt::TRT_FP8{Q,DQ} ops into opset-19 float8 QuantizeLinear/DequantizeLinear.

    Adds an e4m3 zero point (which sets the output type) and saturate=1, drops the exporter's
    stale uint8 value_info for the rewritten tensors, and moves the graph to opset 19.
    """
    zero_name = "fp8_e4m3_zero_point"
    rewritten = set()
    for node in model.graph.node:
        if node.domain != "trt" or node.op_type not in {"TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"}:
            continue
        quantize = node.op_type == "TRT_FP8QuantizeLinear"
        node.op_type, node.domain = ("QuantizeLinear" if quantize else "DequantizeLinear"), ""
        del node.attribute[:]
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = zero_name
        if quantize:
            node.attribute.append(helper.make_attribute("saturate", 1))
        rewritten.update(node.output)
    if not rewritten:
        return model, 0
    count = len(rewritten)
    rewritten |= _hoist_layout_ops_above_quantize(model, rewritten)
    model.graph.initializer.append(helper.make_tensor(zero_name, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    keep = [vi for vi in model.graph.value_info if vi.name not in rewritten]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    default = max([op.version for op in model.opset_import if op.domain == ""] + [19])
    imports = [op for op in model.opset_import if op.domain not in ("", "trt")]
    del model.opset_import[:]
    model.opset_import.extend(imports + [helper.make_opsetid("", default)])
    return model, count


# Ops that only move elements: with a per-tensor scale, Q(op(x)) == op(Q(x)) exactly.
LAYOUT_OPS = {"Transpose", "Reshape"}


def _hoist_layout_ops_above_quantize(model, quantized):
    """Q -> Transpose/Reshape -> DQ becomes Transpose/Reshape -> Q -> DQ.

    FP8 attention exports kᵀ as a Transpose between Q and DQ (seen on the SDXL UNet, not on
    tiny-xl). TensorRT's uint8-typed trt:: ops allow that, but at opset 19 Transpose and Reshape do
    not take float8 tensors, and ONNX Runtime rejects the graph. Returns the tensor names that are
    now float8 (their stale value_info must go)."""
    nodes = list(model.graph.node)
    consumers = collections.Counter(name for node in nodes for name in node.input)
    producer = {out: node for node in nodes for out in node.output}
    moved = set()
    for layout in nodes:
        quantize = producer.get(layout.input[0]) if layout.input else None
        if (layout.op_type not in LAYOUT_OPS or quantize is None or quantize.op_type != "QuantizeLinear"
                or quantize.output[0] not in quantized or consumers[quantize.output[0]] != 1):
            continue
        x, q_out, layout_out = quantize.input[0], quantize.output[0], layout.output[0]
        layout.input[0], layout.output[0] = x, q_out + "_layout"
        quantize.input[0], quantize.output[0] = layout.output[0], layout_out
        # Q now reads the layout op's output: place it right after it (its scale is a constant).
        model.graph.node.remove(quantize)
        model.graph.node.insert(list(model.graph.node).index(layout) + 1, quantize)
        producer[layout_out] = quantize
        moved.add(layout_out)
    return moved


def check_counts(summary, expected_counts):
    """The exported graph must quantize exactly the layer kinds calibration chose."""
    got = {k: v for k, v in summary["layers_by_kind"].items()}
    want = {k: v for k, v in expected_counts.items() if v}
    if got != want:
        raise AssertionError(f"Q/DQ layers by kind {got} do not match the quant level's layer set {want}")
