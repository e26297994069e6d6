"""One report writer for benchmark.py, sweep.py and loadgen.py: the same report as JSON (for
programs), Markdown (for people) and PNG pictures, each written atomically, and the machine it ran on."""
import json
import os
import platform
import time

from . import measure
from .cli import atomic_path

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def machine(*modules):
    """The CPU, its cores and SIMD features, Python, the versions of `modules`, and the date."""
    flags = measure.cpu_flags()
    return {"cpu": measure.cpu_name(), "cores": os.cpu_count(), "simd": [f for f in SIMD_FLAGS if f in flags],
            "python": platform.python_version(), "versions": measure.library_versions(*modules),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def machine_line(m):
    return (f"{m['cpu']}, {m['cores']} cores, SIMD {', '.join(m['simd']) or 'none detected'}"
            + (f"; GPU {m['gpu']}" if m.get("gpu") else "") + "; "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f", python {m['python']}")


def write(report, out_dir, stem, markdown, pictures=None):
    """<stem>.json, <stem>.md (markdown(report)) and one PNG per {name: draw(report, path)} in
    out_dir; returns the Markdown text."""
    with atomic_path(os.path.join(out_dir, f"{stem}.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with atomic_path(os.path.join(out_dir, f"{stem}.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    for name, draw in (pictures or {}).items():
        draw(report, os.path.join(out_dir, name))
    return text
