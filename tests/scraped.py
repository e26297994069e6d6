"""A server's Prometheus metrics as a test reads them: GET /metrics parsed into samples, and sums
over labels."""
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from moebench.serving import metrics


def scrape(url):
    """{(sample name, frozenset of labels): value} of GET /metrics."""
    with urllib.request.urlopen(url + "metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def settled_scrape(url):
    """scrape(url) once every worker and model process has written what it saw (its first GET /, too)."""
    time.sleep(3 * metrics.FLUSH_S)
    return scrape(url)


def total(samples, name, **labels):
    """The sum of a metric's samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


def grown(before, after, name, **labels):
    return total(after, name, **labels) - total(before, name, **labels)
