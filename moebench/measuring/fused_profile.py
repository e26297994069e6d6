"""Where the fused operator's time goes: its phases per thread on the whole test set and on one image
(clocked inside the operator), the call's cost outside them, and the memory floor of reading the
float32 test set once, beside the int8 roofline."""
import numpy as np
import torch

from .. import fused
from . import clock


def memory_floor_ms(images, repeats=5):
    """The best time to read the float32 images once on PyTorch's threads (a sum): no kernel that takes
    float32 pixels can be faster."""
    tensor = torch.from_numpy(images)
    return 1e3 * min(clock.seconds_of(tensor.sum, repeats))


def measure(model, structure, images, repeats=5, single_runs=2000):
    """{kernel, threads, test set: wall and phases per thread (ms), one image: p50 and phases (us),
    memory floor (ms), the path's product instructions alone on every thread (GOP/s)} for the fastest
    path this CPU has."""
    op = fused.FusedInt8(model, structure)
    whole = op.profile(images, repeats)
    single_phases = {phase: [] for phase in op.phases}
    for i in range(0, min(single_runs, len(images)), 10):  # profiled calls, a sample of the images
        for phase, seconds in op.profile(images[i:i + 1], 1).items():
            single_phases[phase].append(seconds[0])
    latencies = clock.time_single_images(fused.predictor(op), images, single_runs)
    return {"kernel": op.kernel, "label": fused.label(op.kernel), "threads": torch.get_num_threads(),
            "images": len(images), "wall_ms": 1e3 * float(np.median(clock.seconds_of(lambda: op.numpy(images), repeats))),
            "phases_ms": {phase: [1e3 * s for s in per_thread] for phase, per_thread in whole.items()},
            "single_p50_us": 1e6 * float(np.median(latencies)),
            "single_phases_us": {phase: 1e6 * float(np.median(s)) for phase, s in single_phases.items()},
            "memory_floor_ms": memory_floor_ms(images, repeats),
            "instruction_gops": {name: 2 * rate / 1e9 for name, rate in op.instruction_peaks(0.2).items()}}

