"""Export a trained model to ONNX (dynamic batch, input 'pixels', outputs 'logits' and 'gates'),
fold its constants, write the structure into its metadata, and prove it agrees with torch before
the file appears."""
import collections
import contextlib
import io
import json
import logging
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import config

from .cli import UserError, atomic_path, error_line
from .measuring.compare import accuracy, compare
from .runners import onnx_runtime

OPSET = 17  # TorchScript exporter; the dynamo exporter picks its own
MAX_LOGIT_DIFF = 1e-3  # parity: ONNX Runtime vs torch on the whole test set; float32 sums differ ~1e-5
MIN_ARGMAX_AGREEMENT = 100.0  # percent
INPUT_CONTRACT = ("Input 'pixels': float32 (N, 1, 28, 28), pixel values in [0, 1] (uint8 / 255, "
                  "what torchvision's ToTensor gives). Normalisation happens inside the graph: feed "
                  "nothing else. Outputs: 'logits' (N, 10) class scores; 'gates' (N, EXPERTS) the "
                  "renormalised top-k gate weights, zeros for experts not chosen.")


def export(model, path, exporter):
    """Export with a dynamic batch axis, input 'pixels', outputs 'logits' and 'gates'."""
    example = (torch.zeros(2, 1, 28, 28),)
    names = {"input_names": ["pixels"], "output_names": ["logits", "gates"]}
    chatter = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed": not needed
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")  # deprecation notices of the TorchScript path
            if exporter == "dynamo":
                torch.onnx.export(model, example, path, dynamo=True, verbose=False,
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, **names)
            else:
                torch.onnx.export(torch.jit.script(model), example, path, dynamo=False, opset_version=OPSET,
                                  dynamic_axes={n: {0: "batch"} for n in ("pixels", "logits", "gates")}, **names)
    except Exception as error:
        raise UserError(f"the {exporter} exporter failed on ROUTING={model.moe.routing} "
                        f"({error_line(error)})")


def fold_constants(model):
    """Evaluate every node whose inputs are all known (Constant nodes, initializers, products of
    weights such as the folded head) once, and store the results as initializers."""
    graph = model.graph
    known = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    opsets = {o.domain: o.version for o in model.opset_import}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(name in known for name in node.input if name)):
            inputs = {name: known[name] for name in node.input if name}
            for name, value in zip(node.output, ReferenceEvaluator(node, opsets=opsets).run(None, inputs)):
                known[name] = value
        else:
            kept.append(node)
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    graph.ClearField("node")
    graph.node.extend(kept)
    graph.ClearField("initializer")
    graph.initializer.extend(numpy_helper.from_array(known[name], name) for name in sorted(used & set(known)))
    return model


def annotate(path, structure, torch_accuracy, images):
    """Constant folding, doc string, metadata (the structure under config.py's names, the test
    accuracy), checker, shape inference."""
    model = fold_constants(onnx.load(path))
    model.doc_string = INPUT_CONTRACT
    model.producer_name = "moe-mnist export_onnx.py"
    metadata = {**{name: str(structure[name]) for name in config.STRUCTURE},
                "structure_json": json.dumps(structure), "input_contract": INPUT_CONTRACT,
                "test_accuracy_torch": f"{torch_accuracy:.2f}", "test_images": str(images)}
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, path)
    return model


def torch_logits(model, images):
    with torch.no_grad():
        return torch.cat([model(images[i:i + 1000])[0] for i in range(0, len(images), 1000)])


def parity(expected, path, images, labels):
    """compare() of ONNX Runtime's logits for the file at path against torch's, `expected`."""
    with onnx_runtime.runner(path) as runner:
        got = np.concatenate([runner.logits(images[i:i + 1000].numpy()) for i in range(0, len(images), 1000)])
    return compare(got, expected, labels)


def op_counts(model):
    return collections.Counter(node.op_type for node in model.graph.node)


def to_dot(model):
    """Graphviz source: one box per node, edges along the tensors they share."""
    producers = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    lines = ["digraph model {", "  rankdir=TB; node [shape=box, style=rounded, fontname=Helvetica];"]
    for i, node in enumerate(model.graph.node):
        lines.append(f'  n{i} [label="{node.op_type}"];')
        for tensor in node.input:
            if tensor in producers:
                lines.append(f"  n{producers[tensor]} -> n{i};")
    for graph_input in model.graph.input:
        lines.append(f'  "{graph_input.name}" [shape=ellipse];')
        for i, node in enumerate(model.graph.node):
            if graph_input.name in node.input:
                lines.append(f'  "{graph_input.name}" -> n{i};')
    for graph_output in model.graph.output:
        lines.append(f'  "{graph_output.name}" [shape=ellipse];')
        lines.append(f'  n{producers[graph_output.name]} -> "{graph_output.name}";')
    return "\n".join(lines + ["}"]) + "\n"


def write_checked(model, structure, path, exporter, images, labels):
    """Export, annotate and check parity; the file at `path` appears only if parity holds.
    Returns the ONNX model."""
    with atomic_path(path) as tmp:
        export(model, tmp, exporter)
        expected = torch_logits(model, images)  # once: the metadata's accuracy and the parity reference
        torch_accuracy = accuracy(expected, labels)
        onnx_model = annotate(tmp, structure, torch_accuracy, len(images))
        found = parity(expected, tmp, images, labels)
        max_diff, agreement, ort_accuracy = found["max_logit_diff"], found["agreement"], found["accuracy"]
        print(f"parity on {len(images)} test images: max |logit difference| {max_diff:.2e}, "
              f"argmax agrees on {agreement:.2f}%; accuracy torch {torch_accuracy:.2f}%, "
              f"onnxruntime {ort_accuracy:.2f}%")
        if max_diff > MAX_LOGIT_DIFF or agreement < MIN_ARGMAX_AGREEMENT:
            raise UserError(f"parity broken (max difference {max_diff:.2e} > {MAX_LOGIT_DIFF:.0e} or "
                            f"argmax agreement {agreement:.2f}% < 100%); {path} not written")
        onnx.helper.set_model_props(onnx_model, {**{p.key: p.value for p in onnx_model.metadata_props},
                                                 "test_accuracy_onnxruntime": f"{ort_accuracy:.2f}"})
        onnx.save(onnx_model, tmp)
    return onnx_model


