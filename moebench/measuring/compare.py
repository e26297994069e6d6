"""One way to compare a model's outputs with a reference's, used by export, the benchmark and the
tests: the largest logit difference, how often both pick the same class, and accuracy."""
import numpy as np


def as_numpy(values):
    return values.detach().float().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)


def accuracy(logits, labels):
    """Percent of images whose highest logit is the label; `logits` may be the classes already (one
    per image, as a server answers), and `labels` another model's classes (then: how often both agree)."""
    logits = as_numpy(logits)
    classes = logits.argmax(1) if logits.ndim == 2 else logits
    return 100.0 * float((classes == as_numpy(labels)).mean())


def compare(logits, reference, labels=None):
    """{'max_logit_diff', 'agreement' (% of images with the same argmax), and with labels 'accuracy'
    and 'reference_accuracy' (%)} of `logits` against `reference`, image by image."""
    logits, reference = as_numpy(logits), as_numpy(reference)
    if logits.shape != reference.shape:
        raise ValueError(f"logits of shape {logits.shape} cannot be compared with {reference.shape}")
    result = {"max_logit_diff": float(np.abs(logits.astype(np.float64) - reference).max()),
              "agreement": 100.0 * float((logits.argmax(1) == reference.argmax(1)).mean())}
    if labels is not None:
        result.update(accuracy=accuracy(logits, labels), reference_accuracy=accuracy(reference, labels))
    return result
