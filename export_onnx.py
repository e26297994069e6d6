"""Export the trained checkpoint to ONNX with the TorchScript exporter and prove it still agrees."""
import collections
import json
import shutil
import subprocess
import warnings

import numpy as np
import onnx
import torch

import checkpoint
import config
import sessions
from cli import ArgumentParser, UserError, atomic_path, run
from data import add_data_args, load_split

DEFAULT_PATH = "model.onnx"
OPSET = 17
MAX_LOGIT_DIFF = 1e-3  # parity: ONNX Runtime vs torch on the whole test set; float32 sums differ ~1e-5
MIN_ARGMAX_AGREEMENT = 1.0
INPUT_CONTRACT = ("Input 'pixels': float32 (N, 1, 28, 28), pixel values in [0, 1] (uint8 / 255, "
                  "what torchvision's ToTensor gives). Normalisation happens inside the graph: feed "
                  "nothing else. Outputs: 'logits' (N, 10) class scores; 'gates' (N, EXPERTS) the "
                  "renormalised top-k gate weights, zeros for experts not chosen.")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=checkpoint.DEFAULT_PATH)
    parser.add_argument("--output", default=DEFAULT_PATH)
    parser.add_argument("--test-limit", type=int, help="check parity on the first N test images only")
    parser.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz source")
    parser.add_argument("--svg", metavar="FILE", help="also render the graph to SVG (needs graphviz's dot)")
    parser.add_argument("--netron", action="store_true", help="open the exported model in Netron")
    add_data_args(parser)
    return parser.parse_args(argv)


def export(model, path):
    """TorchScript export of the scripted model, batch axis dynamic."""
    scripted = torch.jit.script(model)
    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():
        # index_add -> ScatterElements warns about duplicate indices; each expert's rows are unique.
        warnings.simplefilter("ignore")
        torch.onnx.export(scripted, (example,), path, dynamo=False, opset_version=OPSET,
                          input_names=["pixels"], output_names=["logits", "gates"],
                          dynamic_axes={name: {0: "batch"} for name in ("pixels", "logits", "gates")})


def annotate(path, structure, torch_accuracy):
    """Doc string, metadata (the structure under config.py's names), checker, shape inference."""
    model = onnx.load(path)
    model.doc_string = INPUT_CONTRACT
    model.producer_name = "moe-mnist export_onnx.py"
    metadata = {**{name: str(structure[name]) for name in config.STRUCTURE},
                "structure_json": json.dumps(structure), "input_contract": INPUT_CONTRACT,
                "test_accuracy_torch": f"{torch_accuracy:.2f}"}
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, path)
    return model


def parity(model, path, images):
    """(max |logit difference|, share of images whose argmax agrees, ORT logits)."""
    session = sessions.create_session(path, ["CPUExecutionProvider"])
    with torch.no_grad():
        expected = torch.cat([model(images[i:i + 1000])[0] for i in range(0, len(images), 1000)]).numpy()
    got = np.concatenate([session.run(["logits"], {"pixels": images[i:i + 1000].numpy()})[0]
                          for i in range(0, len(images), 1000)])
    return float(np.abs(got - expected).max()), float((got.argmax(1) == expected.argmax(1)).mean()), got


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


def write_pictures(model, dot_path, svg_path):
    source = to_dot(model)
    if dot_path:
        with atomic_path(dot_path) as tmp, open(tmp, "w") as f:
            f.write(source)
        print(f"wrote {dot_path}")
    if svg_path:
        if shutil.which("dot") is None:
            raise UserError("--svg needs Graphviz's dot program: apt-get install graphviz "
                            "(or use --dot FILE and render it elsewhere)")
        with atomic_path(svg_path) as tmp:
            subprocess.run(["dot", "-Tsvg", "-o", tmp], input=source, text=True, check=True)
        print(f"wrote {svg_path}")


def open_in_netron(path):
    import netron
    netron.start(path, browse=True)
    print("Netron is serving the model; press Ctrl-C to stop")
    netron.wait()


def main(argv=None):
    args = parse_args(argv)
    model, structure, state = checkpoint.load_model(args.checkpoint)
    images, labels = load_split("test", args.data_dir, args.test_limit)
    with atomic_path(args.output) as tmp:  # model.onnx appears only once parity holds
        export(model, tmp)
        with torch.no_grad():
            torch_accuracy = 100.0 * float((model(images)[0].argmax(1) == labels).float().mean())
        onnx_model = annotate(tmp, structure, torch_accuracy)
        max_diff, agreement, ort_logits = parity(model, tmp, images)
        ort_accuracy = 100.0 * float((ort_logits.argmax(1) == labels.numpy()).mean())
        print(f"parity on {len(images)} test images: max |logit difference| {max_diff:.2e}, "
              f"argmax agrees on {100 * agreement:.2f}%; accuracy torch {torch_accuracy:.2f}%, "
              f"onnxruntime {ort_accuracy:.2f}%")
        if max_diff > MAX_LOGIT_DIFF or agreement < MIN_ARGMAX_AGREEMENT:
            raise UserError(f"parity broken (max difference {max_diff:.2e} > {MAX_LOGIT_DIFF:.0e} or "
                            f"argmax agreement {100 * agreement:.2f}% < 100%); {args.output} not written")
        onnx.helper.set_model_props(onnx_model, {**{p.key: p.value for p in onnx_model.metadata_props},
                                                 "test_accuracy_onnxruntime": f"{ort_accuracy:.2f}"})
        onnx.save(onnx_model, tmp)
    counts = op_counts(onnx_model)
    print(f"wrote {args.output}: opset {OPSET}, {len(onnx_model.graph.node)} nodes: "
          + ", ".join(f"{op} {n}" for op, n in counts.most_common()))
    write_pictures(onnx_model, args.dot, args.svg)
    if args.netron:
        open_in_netron(args.output)


if __name__ == "__main__":
    run(main)
