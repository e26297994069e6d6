"""ONNX Runtime as a runner: sessions that fail in one clear line and never fall back to another
provider silently, host and device-resident timing, and what ran where."""
import collections
import json
import os
from dataclasses import dataclass, replace

import numpy as np

from .. import contract
from ..measuring.clock import Clock, by_batch_size
from ..cli import UserError, error_line
from .base import Runner

GPU_INSTALL = ("on a CUDA machine: pip uninstall -y onnxruntime && "
               "pip install -r requirements-gpu.txt (see README)")


def stored_structure(path):
    """The structure export_onnx.py wrote into the model's metadata, under config.py's names."""
    metadata = {p.key: p.value for p in contract.load_onnx(path).metadata_props}
    if "structure_json" not in metadata:
        raise UserError(f"{path} carries no structure metadata; export it with export_onnx.py")
    return json.loads(metadata["structure_json"])


@dataclass(frozen=True)
class SessionSettings:
    """How a session is built: the graph optimisation level, the intra-op threads (0: one per
    physical core), whether idle threads spin, and a profile file prefix (None: no profile)."""
    opt_level: str = "all"
    threads: int = 0
    spinning: bool = True
    profile_prefix: str = None

    def options(self):
        import onnxruntime as ort
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[self.opt_level]
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3  # errors only; fallbacks are shown by provider_kernels()
        if not self.spinning:  # idle threads sleep at once instead of spinning, leaving the cores to another session
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = self.profile_prefix
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


def providers_for(device, device_id=0):
    """The providers, best first, for device 'cpu', 'cuda' or 'auto' (CUDA where this onnxruntime has it)."""
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cuda_available():
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def create_session(path, providers, settings=None):
    """runner()'s InferenceSession alone, for code that calls session.run itself."""
    return runner(path, providers=providers, settings=settings).engine


def load_failure(path, providers, error):
    """The one line for a session that could not be made from `path`."""
    contract.load_onnx(path)  # a file that is no ONNX model gets that said plainly; parsed only on failure
    wanted = provider_names(providers)[0]
    gpu_hint = "" if wanted == "CPUExecutionProvider" else ("; check that a GPU is visible and the "
                                                            "CUDA/cuDNN/TensorRT libraries; " + GPU_INSTALL)
    return UserError(f"{path}: onnxruntime could not load it with {wanted} ({error_line(error, 300)}){gpu_hint}")


def check_started(session, path, providers):
    """The session runs on the provider asked for first, and its model keeps the input contract."""
    wanted = provider_names(providers)[0]
    if session.get_providers()[0] != wanted:
        raise UserError(f"{wanted} failed to start (onnxruntime fell back to {session.get_providers()[0]}); "
                        "check the CUDA/cuDNN/TensorRT libraries; " + GPU_INSTALL)
    contract.check(path, *session_io(session))


ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int64)": "int64"}


def session_io(session):
    """[(name, dtype, shape)] of a session's inputs and outputs, for contract.check()."""
    def entries(ports):
        return [(p.name, ORT_TYPES.get(p.type, p.type), [d if isinstance(d, int) else None for d in p.shape])
                for p in ports]
    return entries(session.get_inputs()), entries(session.get_outputs())


def resident_clock(session, device="cpu", device_id=0):
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

    return Clock(run, prepare=prepare,
                 fetch=lambda binding: binding.copy_outputs_to_cpu()[outputs.index(contract.LOGITS)],
                 timing=f"device-resident: IOBinding, inputs and outputs on {device}:{device_id} "
                        "before the clock starts")


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


def provider_kernels(path, providers, settings=None):
    """{provider: nodes} from one run of a second session, profiled: shows what fell back to the CPU."""
    import onnxruntime as ort
    profiled = replace(settings or SessionSettings(),
                       profile_prefix=os.path.join(os.path.dirname(os.path.abspath(path)), ".profile"))
    session = ort.InferenceSession(path, sess_options=profiled.options(), providers=providers)
    session.run(None, {contract.PIXELS: np.zeros((1, 1, 28, 28), np.float32)})
    trace = session.end_profiling()
    try:
        with open(trace) as f:
            events = json.load(f)
    finally:
        os.remove(trace)
    nodes = {e["name"]: e["args"]["provider"] for e in events
             if e.get("cat") == "Node" and "provider" in e.get("args", {})}
    return dict(collections.Counter(nodes.values()).most_common())


def with_kernels(details, paths, providers, settings=None):
    """A printed block's details, then provider_kernels() of each graph: a function of the runner, so
    that the profile runs once the runner's own session has checked the providers."""
    graphs = (" (dense)", " (loop)") if len(paths) > 1 else ("",)

    def shown(runner):
        kernels = {f"kernels on{graph}": ", ".join(f"{p} {n}" for p, n in provider_kernels(path, providers,
                                                                                          settings).items())
                   + " (nodes, from a second, profiled session)" for path, graph in zip(paths, graphs)}
        return {**(details or {}), **kernels}
    return shown


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


def describe(session, precision="fp32"):
    """What ran: the engine, the provider that takes the graph (and those after it, for what it does
    not take), the precision, the threads."""
    import onnxruntime as ort
    threads = session.get_session_options().intra_op_num_threads
    first, *rest = session.get_providers()
    return {"engine": f"ONNX Runtime {ort.__version__}", "provider": first,
            **({"then": ", ".join(rest) + " (for the nodes the first does not take)"} if rest else {}),
            "precision": precision, "threads": threads or "auto (one per physical core)"}


def versions():
    import onnx
    import onnxruntime as ort
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__}


def runner(path, name="ONNX Runtime CPU", device="cpu", settings=None, precision="fp32", device_id=0,
           providers=None):
    """The recipe: the ONNX file at `path` in one InferenceSession on `device` ('cpu', 'cuda', or
    'auto': CUDA where it is here), or on `providers` given best first; session.run() answers the
    logits, and the gates where the graph has them. Timed from host arrays, or device-resident
    through IOBinding."""
    import onnxruntime as ort
    providers = list(providers or providers_for(device, device_id))
    device = "cuda" if provider_names(providers)[0] != "CPUExecutionProvider" else "cpu"
    require_providers(providers)
    contract.require_file(path)
    try:
        session = ort.InferenceSession(path, sess_options=(settings or SessionSettings()).options(),
                                       providers=providers)
    except Exception as error:
        raise load_failure(path, providers, error)
    check_started(session, path, providers)
    wanted = [contract.LOGITS] + [o.name for o in session.get_outputs() if o.name == contract.GATES]

    def predict(pixels):
        found = session.run(wanted, {contract.PIXELS: pixels})
        return found[0], found[1] if len(found) > 1 else None

    def logits(pixels):
        return session.run([contract.LOGITS], {contract.PIXELS: pixels})[0]
    return Runner(name, predict, describe(session, precision), engine=session, logits=logits,
                  clocks={"resident": resident_clock(session, device, device_id)}, versions=versions())


def auto_runner(dense, loop, threshold, name="ONNX Runtime CPU, auto", settings=None):
    """Two sessions, the dense graph for batches below `threshold` and the loop graph from it on;
    the loop session's idle threads do not spin, or they would slow the dense one."""
    settings = settings or SessionSettings()
    small = runner(dense, name, settings=replace(settings, spinning=True))
    large = runner(loop, name, settings=replace(settings, spinning=False))

    def pick(pixels):
        return small if len(pixels) < threshold else large
    clocks = {timing: by_batch_size(small.clock(timing), large.clock(timing), threshold)
              for timing in ("host", "resident")}
    return Runner(name, lambda pixels: pick(pixels).predict(pixels),
                  {**small.describe(), "routing": f"auto: {dense} for batches below {threshold}, {loop} from it"},
                  engine=(small.engine, large.engine), logits=lambda pixels: pick(pixels).logits(pixels),
                  clocks=clocks, versions=small.versions, release=lambda: (small.close(), large.close()))


def served(path, checkpoint_path=None, threads=0, precision="auto"):
    """serve.py --backend onnxruntime: the CPU provider, `threads` intra-op threads."""
    return runner(path, "ONNX Runtime CPU", settings=SessionSettings(threads=threads))


def served_on_cuda(path, checkpoint_path=None, threads=0, precision="auto"):
    """serve.py --backend onnxruntime-cuda: the CUDA provider, never a silent CPU fallback."""
    return runner(path, "ONNX Runtime CUDA", "cuda", SessionSettings(threads=threads))
