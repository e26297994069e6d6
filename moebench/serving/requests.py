"""What a server does with one HTTP body, independent of Ray: parse one or many 28x28 images (raw
uint8 bytes, or JSON), and answer with each image's class, logits and chosen experts.
Bad requests become a RequestError with an HTTP status and a one-line message."""
import json

import numpy as np
import orjson

PIXELS_PER_IMAGE = 28 * 28


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status, the message one line."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def images_from_bytes(body, max_request_images):
    """Raw uint8 pixels, 784 bytes per image, row-major, any number of images up to max_request_images."""
    if not body:
        raise RequestError(400, "empty body: send 784 uint8 bytes per 28x28 image, or JSON {\"images\": [...]}")
    if len(body) % PIXELS_PER_IMAGE:
        raise RequestError(400, f"body of {len(body)} bytes is not a whole number of 28x28 uint8 images "
                                f"({PIXELS_PER_IMAGE} bytes each)")
    count = len(body) // PIXELS_PER_IMAGE
    if count > max_request_images:
        raise RequestError(413, f"{count} images in one request; at most {max_request_images}")
    return np.frombuffer(body, dtype=np.uint8).reshape(count, PIXELS_PER_IMAGE)


def images_from_json(body, max_request_images):
    """{"images": [image, ...]}, each image 784 numbers or 28 rows of 28, pixel values 0-255."""
    try:
        document = json.loads(body)
    except RecursionError:
        raise RequestError(400, "JSON nested too deeply; send {\"images\": [[784 pixel values 0-255], ...]}")
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"bad JSON ({error}); send {{\"images\": [[784 pixel values 0-255], ...]}}")
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images:
        raise RequestError(400, "JSON needs a non-empty list under \"images\"")
    if len(images) > max_request_images:
        raise RequestError(413, f"{len(images)} images in one request; at most {max_request_images}")
    try:
        array = np.asarray(images, dtype=np.float64)
    except (ValueError, TypeError, RecursionError):
        raise RequestError(400, "every image must be 784 numbers or 28 rows of 28 numbers")
    if array.shape[1:] not in ((PIXELS_PER_IMAGE,), (28, 28)):
        raise RequestError(400, f"images of shape {array.shape[1:]}; each must be 784 numbers or 28x28")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise RequestError(400, "pixel values must be numbers from 0 to 255")
    return np.round(array).astype(np.uint8).reshape(len(images), PIXELS_PER_IMAGE)


def parse(body, content_type, max_request_images):
    """uint8 (N, 784) from a request body: JSON when the content type says so, else raw bytes."""
    if "json" in (content_type or ""):
        return images_from_json(body, max_request_images)
    return images_from_bytes(body, max_request_images)


def to_pixels(images_uint8):
    """The model's input contract: float32 (N, 1, 28, 28) in [0, 1]."""
    return (images_uint8.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)


def joined_pixels(pieces):
    """The model's float32 pixels for a batch of the requests' images: uint8 (N, 784) from the own API
    and UINT8 tensors (converted once per batch rather than once per request), float32 from FP32
    tensors."""
    if all(piece.dtype == np.uint8 for piece in pieces):
        return to_pixels(np.concatenate(pieces))
    return np.concatenate([to_pixels(p) if p.dtype == np.uint8 else p.reshape(-1, 1, 28, 28) for p in pieces])


def answers(logits, gates):
    """One JSON-ready answer per image: class, logits, and the chosen experts with their weights
    (largest first). This runs for every request, so it stays plain Python over short lists."""
    results = []
    rounded = np.round(logits.astype(np.float64), 5).tolist()
    for label, values, row in zip(logits.argmax(1).tolist(), rounded, gates.tolist()):
        chosen = sorted((e for e, w in enumerate(row) if w), key=lambda e: -row[e])
        results.append({"class": label, "logits": values,
                        "experts": [{"expert": e, "weight": round(row[e], 5)} for e in chosen]})
    return results


def answers_json(logits, gates):
    """answers() as the JSON bytes of each image's answer: a server joins them into its reply."""
    return [orjson.dumps(answer) for answer in answers(logits, gates)]
