"""Reports: the files benchmark.py, sweep.py and loadgen.py write (JSON, Markdown, PNG)."""
