"""A static check, not a run: does every node of an ONNX graph use an operator, data type and
attributes that the ONNX-TensorRT parser supports, by its published support matrix (pinned in
tensorrt_operators.json with its version and source)? What it says is what TensorRT would be asked
to take; ONNX Runtime's TensorRT provider hands any node it cannot take to CUDA or the CPU."""
import json
import os

import onnx
from onnx import numpy_helper

from . import contract
from .cli import UserError
from .convert import derived_copy

SUPPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensorrt_operators.json")
TYPE_NAMES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
              onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT8: "INT8",
              onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.DOUBLE: "DOUBLE"}


def support_matrix():
    with open(SUPPORT) as f:
        return json.load(f)


def tensor_types(model):
    """{tensor name: type name} for every tensor shape inference can type."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: TYPE_NAMES.get(v.type.tensor_type.elem_type, "?") for v in values}
    types.update({init.name: TYPE_NAMES.get(init.data_type, "?") for init in model.graph.initializer})
    return types


def constants(model):
    """{name: numpy value} of initializers and Constant node outputs."""
    found = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def node_problems(node, rule, types, known):
    """Why the parser would refuse this node, by the rule for its operator ([] if it would not)."""
    if rule is None:
        return [f"{node.op_type} is not in the pinned support matrix"]
    if rule.get("supported", True) is False:
        return [f"{node.op_type} is not supported"]
    problems = []
    data = node.output[0] if node.op_type in ("Constant", "ConstantOfShape") else node.input[0]
    dtype = types.get(data, "?")
    if dtype not in rule["types"]:
        problems.append(f"{node.op_type} on {dtype} (supported: {', '.join(rule['types'])})")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    for name, wanted in rule.get("attributes", {}).items():
        value = attributes.get(name, wanted)
        value = value.decode() if isinstance(value, bytes) else value
        if value != wanted:
            problems.append(f"{node.op_type} with {name}={value} (must be {wanted})")
    for index, name in rule.get("constant_inputs", {}).items():
        index = int(index)
        if index < len(node.input) and node.input[index] and node.input[index] not in known:
            problems.append(f"{node.op_type}'s {name} is computed, not a constant")
    for index, bound in rule.get("max_constant", {}).items():
        value = known.get(node.input[int(index)]) if int(index) < len(node.input) else None
        if value is not None and value.max() > bound:
            problems.append(f"{node.op_type} with constant {int(value.max())} > {bound}")
    zero_point = rule.get("zero_point_input")
    if zero_point is not None and zero_point < len(node.input) and node.input[zero_point]:
        value = known.get(node.input[zero_point])
        if value is None or value.any():
            problems.append(f"{node.op_type} with a non-zero or computed zero point")
    return problems


def unsupported_nodes(model):
    """[(node name, op type, why)] for every node the ONNX-TensorRT parser would refuse."""
    matrix = support_matrix()
    rules, (low, high) = matrix["operators"], matrix["opsets"]
    types, known = tensor_types(model), constants(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    in_range = opset is not None and low <= opset <= high
    found = [] if in_range else [("graph", "-", f"opset {opset} outside {low}-{high}")]
    for node in model.graph.node:
        for problem in node_problems(node, rules.get(node.op_type), types, known):
            found.append((node.name or node.output[0], node.op_type, problem))
    return found


def summary(model):
    """One line: what the static check found for this graph."""
    parser = support_matrix()["parser"]
    bad = unsupported_nodes(model)
    if not bad:
        return f"all {len(model.graph.node)} nodes supported by {parser}'s support matrix (static check, not a run)"
    reasons = sorted({why for _, _, why in bad})
    return (f"{len(bad)} of {len(model.graph.node)} nodes not supported by {parser}'s support matrix "
            f"(static check, not a run): " + "; ".join(reasons))


TENSORRT_INSTALL = ("pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13==10.16.1.11 and put "
                    "its libraries on LD_LIBRARY_PATH (see README: onnxruntime-gpu 1.31.1's TensorRT provider "
                    "links libnvinfer.so.10)")


def shape_inferred_copy(path):
    """TensorRT needs every shape known: write <model>.trt.onnx with symbolic shape inference."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def infer(model):
        try:
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception as error:
            raise UserError(f"{path}: symbolic shape inference failed ({error}); install sympy")
    return derived_copy(path, ".trt.onnx", infer)


def profile(batch):
    return f"{contract.PIXELS}:{batch}x1x28x28"


def tensorrt_options(device_id, fp16, batch_size, max_batch, engine_cache):
    """The TensorRT provider's options, by ONNX Runtime's documentation of them."""
    return {"device_id": device_id, "trt_fp16_enable": fp16,
            "trt_profile_min_shapes": profile(1), "trt_profile_opt_shapes": profile(batch_size),
            "trt_profile_max_shapes": profile(max(max_batch, batch_size)),
            "trt_engine_cache_enable": True, "trt_engine_cache_path": engine_cache,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": engine_cache}
