"""ONNX Runtime sessions for every ONNX script: clear errors, and the truth about what ran where."""
import collections
import json
import os

import numpy as np
import onnx

import config

from . import contract, measure, viewer
from .cli import UserError, atomic_path

GPU_INSTALL = ("on a CUDA machine: pip uninstall -y onnxruntime && "
               "pip install -r requirements-gpu.txt (see README)")


def add_model_args(parser, what="ONNX model"):
    parser.add_argument("--model", help=f"{what} from export_onnx.py (default: the --routing graph)")
    parser.add_argument("--routing", choices=config.ROUTINGS, default=config.ROUTING,
                        help=f"which exported graph to run when --model is not given: "
                             f"{', '.join(f'{r} = {config.onnx_path(r)}' for r in config.ROUTINGS)}")
    measure.add_common_args(parser)
    viewer.add_netron_args(parser)


def parse_args(parser, argv):
    args = parser.parse_args(argv)
    args.model = args.model or config.onnx_path(args.routing)
    return args


def derived_copy(path, suffix, transform, target=None):
    """Write transform(the ONNX model at path) to target, by default beside it as <stem><suffix>."""
    target = target or os.path.splitext(path)[0] + suffix
    converted = transform(contract.load_onnx(path))
    with atomic_path(target) as tmp:
        onnx.save(converted, tmp)
    return target


def stored_structure(path):
    """The structure export_onnx.py wrote into the model's metadata, under config.py's names."""
    metadata = {p.key: p.value for p in contract.load_onnx(path).metadata_props}
    if "structure_json" not in metadata:
        raise UserError(f"{path} carries no structure metadata; export it with export_onnx.py")
    return json.loads(metadata["structure_json"])


def session_options(opt_level="all", threads=0, profile_prefix=None):
    import onnxruntime as ort
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[opt_level]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only; fallbacks are reported by provider_kernels()
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def provider_names(providers):
    return [p if isinstance(p, str) else p[0] for p in providers]


def require_providers(providers):
    """providers: names or (name, options) pairs, best first."""
    import onnxruntime as ort
    missing = [name for name in provider_names(providers) if name not in ort.get_available_providers()]
    if missing:
        raise UserError(f"{missing[0]} is not available in this onnxruntime "
                        f"{ort.__version__} (it has {', '.join(ort.get_available_providers())}); "
                        + GPU_INSTALL)


def create_session(path, providers, options=None):
    """An InferenceSession whose first provider really is providers[0], never a silent CPU one."""
    import onnxruntime as ort
    require_providers(providers)
    contract.require_file(path)
    wanted = provider_names(providers)
    try:
        session = ort.InferenceSession(path, sess_options=options or session_options(),
                                       providers=providers)
    except Exception as error:
        contract.load_onnx(path)  # a file that is no ONNX model gets that said plainly; parsed only on failure
        raise UserError(f"{path}: onnxruntime could not load it with {wanted[0]} "
                        f"({str(error).strip().splitlines()[0][:300]})")
    if session.get_providers()[0] != wanted[0]:
        raise UserError(f"{wanted[0]} failed to start (onnxruntime fell back to "
                        f"{session.get_providers()[0]}); check the CUDA/cuDNN/TensorRT libraries; "
                        + GPU_INSTALL)
    contract.check(path, *session_io(session))
    return session


ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int64)": "int64"}


def session_io(session):
    """[(name, dtype, shape)] of a session's inputs and outputs, for contract.check()."""
    def entries(args):
        return [(a.name, ORT_TYPES.get(a.type, a.type), [d if isinstance(d, int) else None for d in a.shape])
                for a in args]
    return entries(session.get_inputs()), entries(session.get_outputs())


def predictor(session):
    input_name = session.get_inputs()[0].name

    def predict(batch):
        return session.run(["logits"], {input_name: batch})[0]
    return predict


def provider_kernels(path, providers, options_kwargs, sample):
    """Kernels per execution provider, from one profiled run: shows what fell back to CPU."""
    import onnxruntime as ort
    options = session_options(**options_kwargs, profile_prefix=os.path.join(
        os.path.dirname(os.path.abspath(path)), ".profile"))
    session = ort.InferenceSession(path, sess_options=options, providers=providers)
    session.run(None, {session.get_inputs()[0].name: sample})
    trace = session.end_profiling()
    try:
        with open(trace) as f:
            events = json.load(f)
    finally:
        os.remove(trace)
    nodes = {e["name"]: e["args"]["provider"] for e in events
             if e.get("cat") == "Node" and "provider" in e.get("args", {})}
    return dict(collections.Counter(nodes.values()).most_common())


def versions():
    import onnxruntime as ort
    return measure.library_versions(ort, onnx, np)


def run_backend(args, backend_label, providers, options_kwargs=None, details=None):
    """Everything an ONNX backend script does once it has chosen its providers and model file."""
    options_kwargs = options_kwargs or {}
    require_providers(providers)
    contract.require_file(args.model)
    images, labels = measure.load_test_set(args)
    session, setup_s = measure.timed(
        lambda: create_session(args.model, providers, session_options(**options_kwargs)))
    result = measure.measure(predictor(session), images, labels, args.batch_size,
                             args.latency_runs, not args.quiet)
    kernels = provider_kernels(args.model, providers, options_kwargs, images[:1])
    backend = f"{backend_label} [providers: {', '.join(session.get_providers())}]"
    details = {**(details or {}), "kernels on": ", ".join(f"{p} {n}" for p, n in kernels.items())}
    record = measure.report(args, backend, result, setup_s, versions(), details)
    if args.netron:
        viewer.serve(args.model, args)
    return record, result
