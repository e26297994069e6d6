"""OpenVINO on CPU: read an exported ONNX model, compile it at a chosen precision and performance
hint, say which precision really ran, and quantize it to INT8 with NNCF, the gate kept in float."""
import logging

import numpy as np

from .. import contract
from ..measuring.clock import Clock
from ..cli import UserError, error_line, for_the_user
from .base import Runner

PRECISIONS = ("auto", "f32", "bf16")  # auto: OpenVINO's own choice (bf16 where the CPU has it)
HINTS = ("latency", "throughput")


def core():
    try:
        import openvino
    except ImportError:
        raise UserError("openvino is not installed: pip install -r requirements.txt")
    return openvino.Core()


def port_io(model):
    """[(name, dtype, shape)] of an OpenVINO model's inputs and outputs, for contract.check()."""
    def entries(ports):
        return [(port.get_any_name(), port.get_element_type().to_dtype().name,
                 [None if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]) for port in ports]
    return entries(model.inputs), entries(model.outputs)


def read(path):
    """The ONNX file as an OpenVINO model, refusing files that break the model contract."""
    contract.require_file(path)
    try:
        model = core().read_model(path)
    except Exception as error:
        if for_the_user(error):
            raise
        contract.load_onnx(path)  # a file that is no ONNX model gets that said plainly
        raise UserError(f"{path}: OpenVINO could not read it ({error_line(error, 300)})")
    contract.check(path, *port_io(model))
    return model


def compile_model(model, precision="auto", hint="latency", threads=0):
    """threads: 0 leaves the count to OpenVINO (the hint's choice)."""
    settings = {"PERFORMANCE_HINT": hint.upper()}
    if precision != "auto":
        settings["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        settings["INFERENCE_NUM_THREADS"] = threads
    return core().compile_model(model, "CPU", settings)


def precision_used(compiled):
    """'bf16' or 'f32': the floating-point precision the compiled model really computes in."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def settings_used(compiled):
    return {"precision": precision_used(compiled), "hint": str(compiled.get_property("PERFORMANCE_HINT")).lower(),
            "streams": compiled.get_property("NUM_STREAMS"),
            "threads": compiled.get_property("INFERENCE_NUM_THREADS")}


def clock(compiled):
    """A Clock: one synchronous request per call; under the throughput hint a whole
    pass goes through an AsyncInferQueue, one request per stream, as OpenVINO intends."""
    import openvino
    request = compiled.create_infer_request()
    logits = compiled.output(contract.LOGITS)

    def run(batch):
        return request.infer({0: batch}, share_inputs=True)[logits]

    def run_all(batches):
        queue = openvino.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        outputs = [None] * len(batches)
        queue.set_callback(lambda done, i: outputs.__setitem__(i, done.get_tensor(logits).data.copy()))
        for i, batch in enumerate(batches):
            queue.start_async({0: batch}, userdata=i, share_inputs=True)
        queue.wait_all()
        return outputs
    throughput = str(compiled.get_property("PERFORMANCE_HINT")).lower() == "throughput"
    return Clock(run, run_all=run_all if throughput else None,
                 timing="end to end from host numpy arrays"
                        + (" (whole passes through an AsyncInferQueue)" if throughput else ""))


def gate_path(model):
    """Names of the ops that compute the gates (from the gate's MatMul to the 'gates' output) and
    of the MatMuls that consume them: what INT8 must leave in float, or routing changes."""
    def ancestors(node):
        seen, stack = set(), [node]
        while stack:
            for port in stack.pop().inputs():
                parent = port.get_source_output().get_node()
                if parent.get_friendly_name() not in seen:
                    seen.add(parent.get_friendly_name())
                    stack.append(parent)
        return seen
    ops = model.get_ordered_ops()
    top_k = next((op for op in ops if op.get_type_name() == "TopK"), None)
    gates = next((r for r in model.get_results()
                  if contract.GATES in r.input(0).get_source_output().get_names()), None)
    if top_k is None or gates is None:
        raise UserError("INT8 needs the model's gate (a TopK and a 'gates' output); export it with export_onnx.py")
    features = top_k.input(0).get_source_output().get_node().input(0).get_source_output().get_node()
    path = ancestors(gates) - ancestors(features) - {features.get_friendly_name()}
    consumers = {op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul" and any(
        port.get_source_output().get_node().get_friendly_name() in path for port in op.inputs())}
    return path | consumers


def quantize_int8(model, calibration, batch_size=100):
    """NNCF post-training quantization on `calibration` (training images, never test images):
    only the embedding's and the experts' matrix products become INT8; the gate, top-k, softmax
    and everything that routes stay in float, so every image is routed as in fp32."""
    import nncf
    nncf.set_log_level(logging.ERROR)
    keep_float = gate_path(model)
    quantized = [op.get_friendly_name() for op in model.get_ordered_ops()
                 if op.get_type_name() == "MatMul" and op.get_friendly_name() not in keep_float]
    ignored = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_friendly_name() not in quantized]
    dataset = nncf.Dataset([calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)])
    return nncf.quantize(model, dataset, subset_size=len(calibration),
                         ignored_scope=nncf.IgnoredScope(names=ignored, validate=False)), quantized


def version():
    import openvino
    return openvino.__version__.split("-")[0]


def versions(int8=False):
    import nncf
    return {"openvino": version(), **({"nncf": nncf.__version__} if int8 else {}), "numpy": np.__version__}


def runner(path, name=None, precision="auto", hint="latency", calibration=None, threads=0):
    """The recipe: the ONNX file read and compiled for the CPU at `precision`, INT8 (NNCF) first when
    calibration images are given; one infer request answers. describe() reads back the precision
    and threads the compiled model uses; the name says them unless given."""
    import time
    model = read(path)
    described = {}
    if calibration is not None:
        started = time.perf_counter()
        model, quantized = quantize_int8(model, calibration)
        described["quantized"] = (f"NNCF INT8: {len(quantized)} matrix products (embedding, experts), gate in "
                                  f"float; {len(calibration)} training images, {time.perf_counter() - started:.1f} s")
    compiled = compile_model(model, precision, hint, threads)
    request = compiled.create_infer_request()
    outputs = [compiled.output(contract.LOGITS)] + [o for o in compiled.outputs if contract.GATES in o.get_names()]

    def predict(pixels):
        found = request.infer({0: pixels}, share_inputs=True)
        return found[outputs[0]], found[outputs[1]] if len(outputs) > 1 else None
    used = settings_used(compiled)
    described = {"engine": f"OpenVINO {version()}", "provider": "CPU",
                 "precision": ("int8 products, the rest " if calibration is not None else "") + used["precision"],
                 "threads": used["threads"], "hint": used["hint"], "streams": used["streams"], **described}
    name = name or (f"OpenVINO CPU{' INT8' if calibration is not None else ''} "
                    f"({used['precision']}, {used['hint']} hint)")
    return Runner(name, predict, described, engine=compiled, clocks={"host": clock(compiled)},
                  versions=versions(calibration is not None))


def served(path, checkpoint_path=None, threads=0, precision="auto"):
    """serve.py --backend openvino: the CPU plugin at `precision` (auto: bf16 where the CPU has it)."""
    return runner(path, f"OpenVINO CPU, {precision}", precision=precision, threads=threads)
