"""ONNX Runtime sessions for every ONNX script: clear errors, and the truth about what ran where."""
import collections
import json
import os

import numpy as np
import onnx

import config

from . import contract, measure, viewer
from .cli import UserError, append_json_line, atomic_path, error_line

GPU_INSTALL = ("on a CUDA machine: pip uninstall -y onnxruntime && "
               "pip install -r requirements-gpu.txt (see README)")


TIMINGS = ("host", "resident", "both")


def add_model_args(parser, what="ONNX model", timing=True, auto=False):
    parser.add_argument("--model", help=f"{what} from export_onnx.py (default: the --routing graph)")
    if timing:
        add_timing_arg(parser)
    parser.add_argument("--routing", choices=config.ROUTINGS + (("auto",) if auto else ()), default=config.ROUTING,
                        help=f"which exported graph to run when --model is not given (default {config.ROUTING}): "
                             f"{', '.join(f'{r} = {config.onnx_path(r)}' for r in config.ROUTINGS)}; dense is "
                             "faster for single images and small batches, loop for large batches"
                             + (f"; auto: {config.onnx_path('dense')} below batch {config.AUTO_LOOP_FROM}, "
                                f"{config.onnx_path('loop')} from there, in two sessions (in bulk slower than "
                                "the loop graph alone on a 2-core machine)" if auto else ""))
    measure.add_common_args(parser)
    viewer.add_netron_args(parser)


def add_timing_arg(parser):
    parser.add_argument("--timing", choices=TIMINGS,
                        help="host: session.run from host numpy arrays, as most users call it; resident: "
                             "IOBinding with inputs and outputs already on the provider's device; both "
                             "(default: host on CPU, both on CUDA)")


def parse_args(parser, argv, on_gpu=False):
    args = parser.parse_args(argv)
    args.large_model = None
    if args.routing == "auto" and not args.model:
        args.model, args.large_model = config.onnx_path("dense"), config.onnx_path("loop")
    args.model = args.model or config.onnx_path(args.routing)
    if "timing" in vars(args):
        args.timing = args.timing or ("both" if on_gpu else "host")
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


def session_options(opt_level="all", threads=0, profile_prefix=None, spinning=True):
    import onnxruntime as ort
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[opt_level]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only; fallbacks are reported by provider_kernels()
    if not spinning:  # idle threads sleep at once instead of spinning, leaving the cores to another session
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
                        f"({error_line(error, 300)})")
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


def resident_runner(session, device="cpu", device_id=0):
    """IOBinding: each batch is copied to the device and bound, with its outputs, before the clock
    starts; the clock covers the run and the wait for its outputs, nothing else."""
    import onnxruntime as ort
    outputs = [o.name for o in session.get_outputs()]

    def prepare(batch):
        binding = session.io_binding()
        pixels = ort.OrtValue.ortvalue_from_numpy(batch, device, device_id)
        binding.bind_ortvalue_input(contract.PIXELS, pixels)
        for name in outputs:
            binding.bind_output(name, device, device_id)
        return binding, pixels  # the OrtValue must outlive the binding

    def run(prepared):
        session.run_with_iobinding(prepared[0])
        prepared[0].synchronize_outputs()
        return prepared[0]

    return measure.Runner(run, prepare=prepare,
                          fetch=lambda binding: binding.copy_outputs_to_cpu()[outputs.index(contract.LOGITS)],
                          timing=f"device-resident: IOBinding, inputs and outputs on {device}:{device_id} "
                                 "before the clock starts")


def by_batch_size(small, large, threshold=config.AUTO_LOOP_FROM):
    """A Runner that gives batches below `threshold` to `small` and the rest to `large`."""
    def pick(batch):
        return small if len(batch) < threshold else large

    def sync():
        small.sync()
        large.sync()
    return measure.Runner(lambda prepared: (prepared[0], prepared[0].run(prepared[1])),
                          prepare=lambda batch: (pick(batch), pick(batch).prepare(batch)), sync=sync,
                          fetch=lambda done: done[0].fetch(done[1]), timing=small.timing)


def runners(session, timing, device="cpu", device_id=0):
    chosen = {"host": ["host"], "resident": ["resident"], "both": ["host", "resident"]}[timing]
    made = {"host": lambda: measure.Runner(predictor(session)),
            "resident": lambda: resident_runner(session, device, device_id)}
    return [made[name]() for name in chosen]


def cuda_graph_latency(path, device_id, images, runs):
    """Batch-1 latency with the CUDA provider replaying a captured CUDA graph: enable_cuda_graph
    needs IOBinding with fixed buffers, so every run reuses one input and one output OrtValue.
    Returns (accuracy inputs' logits, latencies in seconds): each image is copied into the fixed
    input before its run, outside the clock."""
    import time

    import onnxruntime as ort
    session = create_session(path, [("CUDAExecutionProvider", {"device_id": device_id, "enable_cuda_graph": "1"})])
    pixels = ort.OrtValue.ortvalue_from_numpy(images[:1], "cuda", device_id)
    outputs = {o.name: ort.OrtValue.ortvalue_from_shape_and_type([1] + o.shape[1:], np.float32, "cuda", device_id)
               for o in session.get_outputs()}
    binding = session.io_binding()
    binding.bind_ortvalue_input(contract.PIXELS, pixels)
    for name, value in outputs.items():
        binding.bind_ortvalue_output(name, value)
    logits, latencies = [], []
    for i in range(max(runs, len(images))):
        pixels.update_inplace(images[i % len(images)][None])
        started = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if i >= 3:  # the first runs capture the graph
            latencies.append(time.perf_counter() - started)
        if i < len(images):
            logits.append(outputs[contract.LOGITS].numpy())
    return np.concatenate(logits), latencies[:runs]


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


def gpu_name(device_id=0):
    """The GPU's name, from torch when it sees one, else nvidia-smi; 'GPU <id>' if neither can say."""
    import shutil
    import subprocess
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(device_id)
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        found = subprocess.run(["nvidia-smi", "-i", str(device_id), "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    return f"GPU {device_id}"


def report_latency_only(args, backend, logits, labels, latencies, timing):
    """A block for a mode that runs one batch size only (batch 1, as a CUDA graph captures it)."""
    result = {"accuracy": 100.0 * float((logits.argmax(1) == labels[:len(logits)]).mean()), "images": len(logits),
              "latency_p50_us": 1e6 * float(np.percentile(latencies, 50)),
              "latency_p99_us": 1e6 * float(np.percentile(latencies, 99)), "latency_runs": len(latencies)}
    lines = [f"== {backend}", f"   model         {args.model}",
             f"   machine       {measure.cpu_name()}, {os.cpu_count()} cores",
             f"   timing        {timing}",
             f"   accuracy      {result['accuracy']:.2f}% on {result['images']} test images, one at a time",
             f"   latency b=1   p50 {result['latency_p50_us']:.1f} us, p99 {result['latency_p99_us']:.1f} us "
             f"over {result['latency_runs']} runs after warm-up (the graph's capture)"]
    print("\n".join(lines), flush=True)
    record = {"backend": backend, "model": args.model, "timing": timing, **result, "versions": versions()}
    if args.json:
        append_json_line(args.json, record)
    return record


def versions():
    import onnxruntime as ort
    return measure.library_versions(ort, onnx, np)


def run_backend(args, backend_label, providers, options_kwargs=None, details=None, device="cpu", device_id=0):
    """Everything an ONNX backend script does once it has chosen its providers and model file:
    one printed block (and JSON line) per timing mode in args.timing; returns their records."""
    options_kwargs = options_kwargs or {}
    require_providers(providers)
    contract.require_file(args.model)
    images, labels = measure.load_test_set(args)
    paths = [args.model] + ([args.large_model] if args.large_model else [])
    # auto: the large-batch session does not spin, or its idle threads would slow the small-batch one
    made, setup_s = measure.timed(lambda: [create_session(path, providers, session_options(
        **options_kwargs, spinning=path != args.large_model)) for path in paths])
    backend = f"{backend_label} [providers: {', '.join(made[0].get_providers())}]"
    details = dict(details or {})
    for path, graph in zip(paths, ("", " (loop)") if args.large_model else ("",)):
        kernels = provider_kernels(path, providers, options_kwargs, images[:1])
        details[f"kernels on{' (dense)' if args.large_model and not graph else graph}"] = ", ".join(
            f"{p} {n}" for p, n in kernels.items())
    if args.large_model:
        details["routing"] = (f"auto: {args.model} for batches below {config.AUTO_LOOP_FROM}, {args.large_model} "
                              f"from {config.AUTO_LOOP_FROM} (here: batch 1 on the first, batch {args.batch_size} "
                              f"on the {'second' if args.batch_size >= config.AUTO_LOOP_FROM else 'first'})")
    records = []
    for chosen in zip(*(runners(session, args.timing, device, device_id) for session in made)):
        runner = chosen[0] if len(chosen) == 1 else by_batch_size(*chosen)
        result = measure.measure(runner, images, labels, args.batch_size, args.latency_runs, not args.quiet)
        records.append(measure.report(args, backend, result, setup_s, versions(), details))
    if args.netron:
        viewer.serve(args.model, args)
    return records
