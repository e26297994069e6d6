"""Export the trained checkpoint to ONNX and prove the exported graph still agrees with torch."""
import shutil
import subprocess

import config
from data import add_data_args, load_split
from moebench import checkpoint, netron
from moebench.cli import ArgumentParser, UserError, atomic_path, positive_int, run
from moebench.export import op_counts, to_dot, write_checked

def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=checkpoint.DEFAULT_PATH)
    parser.add_argument("--routing", choices=config.ROUTINGS,
                        help=f"export only this graph (default: both, {config.onnx_path('dense')} and "
                             f"{config.onnx_path('loop')}, what the other scripts' defaults read); any "
                             "checkpoint exports either way")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="torchscript: torch.jit.script then the TorchScript exporter (default); "
                             "dynamo: torch.export of the eager module")
    parser.add_argument("--output", help="default: model.onnx for the default routing and exporter, "
                                         "else e.g. model.loop.onnx, model.dynamo.onnx; one graph only "
                                         f"(--routing, default {config.ROUTING})")
    parser.add_argument("--test-limit", type=positive_int, help="check parity on the first N test images only")
    parser.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz source")
    parser.add_argument("--svg", metavar="FILE", help="also render the graph to SVG (needs graphviz's dot)")
    netron.add_netron_args(parser)
    add_data_args(parser)
    args = parser.parse_args(argv)
    if args.routing or args.output:  # one graph
        routings = [args.routing or config.ROUTING]
    else:  # both, the default routing's first (model.onnx)
        routings = [config.ROUTING] + [r for r in config.ROUTINGS if r != config.ROUTING]
    args.outputs = {routing: args.output or config.onnx_path(routing, args.exporter) for routing in routings}
    return args


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


def main(argv=None):
    args = parse_args(argv)
    images, labels = load_split("test", args.data_dir, args.test_limit)
    written = []
    for routing, output in args.outputs.items():
        model, structure, _ = checkpoint.load_model(args.checkpoint, {"ROUTING": routing})
        onnx_model = write_checked(model, structure, output, args.exporter, images, labels)
        counts = op_counts(onnx_model)
        opset = next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
        print(f"wrote {output} (ROUTING={routing}, {args.exporter} exporter, opset {opset}): "
              f"{len(onnx_model.graph.node)} nodes: " + ", ".join(f"{op} {n}" for op, n in counts.most_common()))
        written.append((output, onnx_model))
    first, first_model = written[0]  # pictures and Netron: the default routing's graph
    write_pictures(first_model, args.dot, args.svg)
    netron.serve_if_asked(first, netron.asked(args))
    return [path for path, _ in written]


if __name__ == "__main__":
    run(main)
