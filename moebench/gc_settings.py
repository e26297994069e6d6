"""Python's collector kept out of the way of latency, in a server and in the load generator: a full
collection over a heap with the model and its libraries loaded stalls every request in flight, and
under load requests in flight get promoted and set one off often (docs/serving.md has the pauses
measured)."""
import contextlib
import gc

YOUNG_THRESHOLDS = (50_000, 20, 20)  # each request makes a few dozen short-lived objects


def settle():
    """Once everything long-lived is loaded: freeze it out of the collector, never to be scanned
    again, and make young passes rarer, so fewer requests in flight are promoted."""
    gc.freeze()
    gc.set_threshold(*YOUNG_THRESHOLDS)


@contextlib.contextmanager
def settled():
    """settle() for a while (a LoadGen test), then the collector as it was. A collection first, so
    that only what is alive is frozen."""
    threshold = gc.get_threshold()
    gc.collect()
    settle()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
