"""One report writer for benchmark.py, sweep.py and loadgen.py: the same report as JSON (for
programs), Markdown (for people) and PNG pictures, each written atomically."""
import json
import os

from ..cli import atomic_path


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
