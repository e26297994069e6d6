"""The library behind the entry scripts, grouped by what it holds: runners/ (a runner per backend, and
the registry, the catalogue every script selects from by key), measuring/ (clocks, the floor and the
roofline, comparisons, the printed block, LoadGen's systems), reports/ (the JSON, Markdown and PNG
reports), serving/ (the HTTP application, batching, Ray Serve); beside them export and precision
conversion, the fused operator, distributed training, and the command-line edges. It imports the
model's own files (config.py, moe.py, data.py), never an entry script."""
