"""ONNX Runtime, CUDA execution provider (needs requirements-gpu.txt on a CUDA machine)."""

from common import sessions
from common.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    sessions.add_model_args(parser, "ONNX model from export_onnx.py")
    parser.add_argument("--device-id", type=int, default=0)
    args = sessions.parse_args(parser, argv)
    return sessions.run_backend(args, "ONNX Runtime CUDA",
                                [("CUDAExecutionProvider", {"device_id": args.device_id}),
                                 "CPUExecutionProvider"])


if __name__ == "__main__":
    run(main)
