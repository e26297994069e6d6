"""The input/output contract every model file must keep, checked before any engine runs it:
input 'pixels' float32 (N, 1, 28, 28) with a dynamic batch N; output 'logits' float32 (N, 10);
optional output 'gates' float32 (N, EXPERTS). A file that breaks it gets one line saying what was
expected and what was found."""
import os

import onnx

from .cli import UserError

PIXELS, LOGITS, GATES = "pixels", "logits", "gates"
EXPECTED = (f"input '{PIXELS}' float32 (N, 1, 28, 28) with a dynamic batch N, "
            f"output '{LOGITS}' float32 (N, 10)")
ONNX_FLOAT = onnx.TensorProto.FLOAT


def require_file(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run train.py, then export_onnx.py first (or pass --model PATH)")


def load_onnx(path):
    """The ONNX ModelProto at path, or a one-line error if the file is not one."""
    require_file(path)
    try:
        model = onnx.load(path)
    except Exception as error:
        raise UserError(f"{path} is not an ONNX model ({type(error).__name__}); "
                        "run export_onnx.py to write it again")
    if not model.graph.node:
        raise UserError(f"{path} is not an ONNX model (no graph); run export_onnx.py to write it again")
    return model


def describe(name, dtype, shape):
    dims = ", ".join("N" if d is None or isinstance(d, str) or d < 0 else str(d) for d in shape)
    return f"'{name}' {dtype} ({dims})"


def problems(inputs, outputs):
    """What breaks the contract, given [(name, dtype, shape)] of the inputs and of the outputs;
    dtype as 'float32', a shape dim None or a string when it is dynamic."""
    found = []
    if [name for name, _, _ in inputs] != [PIXELS]:
        found.append(("input " if len(inputs) == 1 else "inputs ") + ", ".join(describe(*i) for i in inputs))
    else:
        _, dtype, shape = inputs[0]
        batch_fixed = len(shape) == 4 and isinstance(shape[0], int) and shape[0] >= 0
        if dtype != "float32" or len(shape) != 4 or list(shape[1:]) != [1, 28, 28] or batch_fixed:
            found.append("input " + describe(*inputs[0]))
    by_name = {name: (dtype, shape) for name, dtype, shape in outputs}
    if LOGITS not in by_name:
        found.append(("output " if len(outputs) == 1 else "outputs ") + ", ".join(describe(*o) for o in outputs))
    else:
        dtype, shape = by_name[LOGITS]
        if dtype != "float32" or len(shape) != 2 or shape[1] != 10:
            found.append("output " + describe(LOGITS, dtype, shape))
    if GATES in by_name and (by_name[GATES][0] != "float32" or len(by_name[GATES][1]) != 2):
        found.append("output " + describe(GATES, *by_name[GATES]))
    return found


def check(path, inputs, outputs):
    found = problems(inputs, outputs)
    if found:
        raise UserError(f"{path} breaks the model contract: expected {EXPECTED}, found "
                        + "; ".join(found) + "; export a model with export_onnx.py")


def onnx_io(model):
    """[(name, dtype, shape)] of an ONNX graph's real inputs (not initializers) and outputs."""
    weights = {init.name for init in model.graph.initializer}

    def entry(value):
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown"
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        return value.name, dtype, shape
    return ([entry(v) for v in model.graph.input if v.name not in weights],
            [entry(v) for v in model.graph.output])


def is_loop_graph(model):
    """Whether a loaded ONNX model is the loop graph: its NonZero picks each expert's rows at run time."""
    return "NonZero" in {node.op_type for node in model.graph.node}


def check_onnx(path):
    """load_onnx(path), refusing a model that breaks the contract."""
    model = load_onnx(path)
    check(path, *onnx_io(model))
    return model
