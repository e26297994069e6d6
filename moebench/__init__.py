"""The library behind the entry scripts: a runner per backend (runners/, with the registry the
scripts compose), export and precision conversion, measuring against the floor and the roofline,
one comparison and one report writer, serving, distributed training, and the command-line edges.
It imports the model's own files (config.py, moe.py, data.py), never an entry script."""
