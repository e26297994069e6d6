"""The machine a figure was taken on: the CPU's name and SIMD features, the cores, the library
versions and the date."""
import os
import platform
import time

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags (avx512f, avx512_bf16, ...) from /proc/cpuinfo; empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def library_versions(*modules):
    return {module.__name__: module.__version__ for module in modules}



def machine(*modules):
    """The CPU, its cores and SIMD features, Python, the versions of `modules`, and the date."""
    flags = cpu_flags()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "simd": [f for f in SIMD_FLAGS if f in flags],
            "python": platform.python_version(), "versions": library_versions(*modules),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def machine_line(m):
    return (f"{m['cpu']}, {m['cores']} cores, SIMD {', '.join(m['simd']) or 'none detected'}"
            + (f"; GPU {m['gpu']}" if m.get("gpu") else "") + "; "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f", python {m['python']}")
