"""README.md and docs/ against the committed results/: every figure in the README's Results section
is in a committed report of the run it names, and the pages read as documentation, not as a log."""
import glob
import json
import os
import re

from conftest import ROOT

# a figure: digits (with thousands commas and decimals), not part of a word, a path or a commit
FIGURE = re.compile(r"(?<![\w.\-/=])(\d[\d,]*(?:\.\d+)?)(?=x\b|[^\w]|$)")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def section(text, heading):
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def figures(text):
    """The figures of a text, without links' targets (their file names hold numbers of their own)."""
    return [f.rstrip(".,").replace(",", "") for f in FIGURE.findall(re.sub(r"\]\([^)]*\)", "]", text))]


def committed_figures():
    """Every figure the committed reports show, as Markdown and in their JSON."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "results", "*.md")):
        found |= set(figures(read(path)))
    return found


def test_every_figure_in_the_readme_s_results_is_in_a_committed_report():
    results = section(read("README.md"), "Results")
    missing = sorted(set(figures(results)) - committed_figures(), key=float)
    assert not missing, f"README's Results section has figures no results/*.md shows: {missing}"


def test_the_readme_names_the_run_and_machine_its_reports_come_from():
    results = section(read("README.md"), "Results")
    for stem in ("benchmark", "sweep", "loadgen"):
        with open(os.path.join(ROOT, "results", f"{stem}.json")) as f:
            report = json.load(f)
        machine = report["machine"] if isinstance(report["machine"], str) else report["machine"]["cpu"]
        assert machine.split(",")[0] in results, (stem, machine)
    with open(os.path.join(ROOT, "results", "training.json")) as f:
        assert json.load(f)["machine"].split(",")[0] in results


def test_the_figure_check_can_fail():
    assert figures("carried 23,528 (0.45x), p99 2.3 ms on a001784 [results/sweep_2.md](results/sweep_2.md)") == \
        ["23528", "0.45", "2.3"]  # not the 99 of p99, the 001784 of a commit or the 2 of a file name
    assert set(figures("a figure typed in by hand: 1234567.891 ms")) - committed_figures() == {"1234567.891"}


def test_pages_are_short_and_carry_at_most_one_date():
    assert sum(1 for _ in open(os.path.join(ROOT, "README.md"))) <= 250
    assert sum(1 for _ in open(os.path.join(ROOT, "docs", "serving.md"))) < 250
    for path in glob.glob(os.path.join(ROOT, "docs", "*.md")):
        dates = set(DATE.findall(read(path)))
        assert len(dates) <= 1, (os.path.basename(path), sorted(dates))
