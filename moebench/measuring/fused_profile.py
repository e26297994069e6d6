"""Where the fused operator's time goes, on each SIMD path this CPU has: its phases per thread on the
whole test set and on one image (clocked inside the operator), the call's cost outside them, and each
path against its own limit: its product instruction alone (register-only loops on every thread) doing
the test set's multiply-adds, plus the memory floor of reading the float32 test set once."""
import numpy as np
import torch

from .. import fused
from . import clock, roofline


WALL_CALLS = 11  # whole test sets timed per path (a few ms each): the median of more calls than blocks


def memory_floor_ms(images, repeats=5):
    """The best time to read the float32 images once on PyTorch's threads (a sum): no kernel that takes
    float32 pixels can be faster."""
    tensor = torch.from_numpy(images)
    return 1e3 * min(clock.seconds_of(tensor.sum, repeats))


def simd_paths():
    """The paths this CPU has that multiply with a product instruction (all but the portable one)."""
    return [kernel for kernel in fused.available_kernels() if kernel != "portable"]


def measure_path(model, structure, kernel, images, repeats, single_runs):
    """{kernel, label, threads, test set: wall and phases per thread (ms), one image: p50 and phases
    (us), the path's product instructions alone on every thread (GOP/s) and the test set's folded
    multiply-adds at that rate (ms)}."""
    op = fused.FusedInt8(model, structure, kernel)
    whole = op.profile(images, repeats)
    single_phases = {phase: [] for phase in op.phases}
    for i in range(0, min(single_runs, len(images)), 10):  # profiled calls, a sample of the images
        for phase, seconds in op.profile(images[i:i + 1], 1).items():
            single_phases[phase].append(seconds[0])
    latencies = clock.time_single_images(fused.predictor(op), images, single_runs)
    gops = {name: 2 * rate / 1e9 for name, rate in op.instruction_peaks(0.2).items()}
    return {"kernel": kernel, "label": fused.label(kernel), "threads": torch.get_num_threads(),
            "images": len(images), "wall_ms": 1e3 * float(np.median(clock.seconds_of(lambda: op.logits(images),
                                                                                  max(repeats, WALL_CALLS)))),
            "phases_ms": {phase: [1e3 * s for s in per_thread] for phase, per_thread in whole.items()},
            "single_p50_us": 1e6 * float(np.median(latencies)),
            "single_phases_us": {phase: 1e6 * float(np.median(s)) for phase, s in single_phases.items()},
            "instruction_gops": gops,
            "instruction_ms": {name: roofline.best_possible_ms(roofline.folded_macs(structure), len(images), rate)
                               for name, rate in gops.items()}}


def measure(model, structure, images, repeats=5, single_runs=2000):
    """{memory floor (ms), paths: [measure_path() of each SIMD path, each with its own product
    instruction, its limit (that instruction's time + the memory floor) and its wall time against it]}."""
    floor_ms = memory_floor_ms(images, repeats)
    paths = []
    for kernel in simd_paths():
        path = measure_path(model, structure, kernel, images, repeats, single_runs)
        path["instruction"] = fused.PRODUCT_INSTRUCTION[kernel]
        path["limit_ms"] = path["instruction_ms"][path["instruction"]] + floor_ms
        path["vs_limit"] = path["wall_ms"] / path["limit_ms"]
        paths.append(path)
    return {"memory_floor_ms": floor_ms, "images": len(images), "paths": paths}
