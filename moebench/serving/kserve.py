"""The Open Inference Protocol (KServe v2), which Triton, KServe, Seldon and OpenVINO Model Server
speak, for serve.py: health, server and model metadata, and inference with JSON tensors or with the
binary tensor extension (a JSON header of `Inference-Header-Content-Length` bytes, then the raw
tensors). The model is 'moe': input 'pixels' FP32 (N, 1, 28, 28) in [0, 1] (the model's own
contract; UINT8 0-255 and shapes (N, 28, 28) or (N, 784) are taken too), outputs 'logits' FP32
(N, 10) and 'gates' FP32 (N, EXPERTS). Everything here is plain functions of bytes; the server
routes to them."""
import orjson

import numpy as np

from .requests import PIXELS_PER_IMAGE, RequestError

MODEL = "moe"
VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"
DTYPES = {"FP32": np.float32, "UINT8": np.uint8}
OUTPUTS = ("logits", "gates")
SHAPES = ((1, 28, 28), (28, 28), (PIXELS_PER_IMAGE,))
DOCUMENTS = ("live", "ready", "server", "model", "model-ready")  # what route() names besides 'infer'
REPOSITORY = ("load", "unload", "index")  # ... and the model repository extension's calls


def route(path):
    """What a /v2 path asks for: 'live', 'ready', 'server', 'model', 'model-ready', 'infer', or None
    (not served); a model path may name version 1."""
    parts = path.rstrip("/").split("/")[2:]  # after "", "v2"
    if parts in ([], ["health", "live"], ["health", "ready"]):
        return parts[-1] if parts else "server"
    if parts in (["repository", "index"], ["repository", "models", MODEL, "load"],
                 ["repository", "models", MODEL, "unload"]):
        return parts[-1]
    if len(parts) < 2 or parts[0] != "models" or parts[1] != MODEL:
        return None
    rest = parts[2:]
    if rest[:2] == ["versions", VERSION]:
        rest = rest[2:]
    return {(): "model", ("ready",): "model-ready", ("infer",): "infer"}.get(tuple(rest))


def server_metadata(version):
    return {"name": "serve.py", "version": version, "extensions": ["binary_tensor_data"]}


def model_metadata(platform, experts):
    return {"name": MODEL, "versions": [VERSION], "platform": platform,
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                        {"name": "gates", "datatype": "FP32", "shape": [-1, experts]}]}


def split_body(body, header_length):
    """(JSON header, the binary part after it) of an infer request."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                                f"body of {len(body)} bytes")
    return body[:int(header_length)], body[int(header_length):]


def parse_infer(body, header_length, max_request_images):
    """(images: float32 pixels (N, 1, 28, 28), or uint8 (N, 784) for a UINT8 tensor; request id;
    {output: binary?}) of an infer request; a RequestError (4xx) names what is wrong."""
    header, binary = split_body(body, header_length)
    try:
        request = orjson.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(400, f"the infer request's JSON does not parse ({error}); see the Open Inference "
                                "Protocol's inference request")
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise RequestError(400, "an infer request needs \"inputs\": one tensor named \"pixels\"")
    pixels = read_input(request["inputs"][0], binary, max_request_images)
    parameters = request.get("parameters") or {}
    wanted = {}
    for output in request.get("outputs") or [{"name": name} for name in OUTPUTS]:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in OUTPUTS:
            raise RequestError(400, f"no output {name!r}; this model has outputs {', '.join(OUTPUTS)}")
        wanted[name] = bool((output.get("parameters") or {}).get("binary_data",
                                                               parameters.get("binary_data_output", False)))
    return pixels, request.get("id"), wanted


def read_input(tensor, binary, max_request_images):
    if not isinstance(tensor, dict) or tensor.get("name") != "pixels":
        raise RequestError(400, "the input must be named \"pixels\"")
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if datatype not in DTYPES:
        raise RequestError(400, f"input datatype {datatype!r}; send FP32 (0-1) or UINT8 (0-255) pixels")
    if (not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape)
            or tuple(shape[1:]) not in SHAPES):
        raise RequestError(400, f"input shape {shape}; send [N, 1, 28, 28], [N, 28, 28] or [N, 784]")
    if shape[0] > max_request_images:
        raise RequestError(413, f"{shape[0]} images in one request; at most {max_request_images}")
    dtype, count = DTYPES[datatype], shape[0] * PIXELS_PER_IMAGE
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * np.dtype(dtype).itemsize or size != len(binary):
            raise RequestError(400, f"binary_data_size {size} with {len(binary)} bytes after the header; shape "
                                    f"{shape} of {datatype} takes {count * np.dtype(dtype).itemsize}")
        values = np.frombuffer(binary, dtype=dtype)
    else:
        values = json_values(tensor.get("data"), dtype, count)
    if dtype == np.uint8:
        return values.reshape(-1, PIXELS_PER_IMAGE)  # the server's batcher makes them float32 pixels
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise RequestError(400, "FP32 pixels must be numbers from 0 to 1 (pixel / 255)")
    return values.reshape(-1, 1, 28, 28)


def json_values(data, dtype, count):
    try:
        values = np.asarray(data, dtype=np.float64).ravel()
    except (ValueError, TypeError, RecursionError):
        raise RequestError(400, "the input's \"data\" must be a list of numbers (flat or nested)")
    if values.size != count:
        raise RequestError(400, f"the input's \"data\" has {values.size} values; its shape needs {count}")
    if dtype == np.uint8:
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
            raise RequestError(400, "UINT8 pixels must be numbers from 0 to 255")
        return np.round(values).astype(np.uint8)
    return values.astype(np.float32)


def encode_infer(logits, gates, request_id, wanted):
    """(body, Inference-Header-Content-Length or None) of the answer: each wanted output as JSON data
    or, where asked, as binary after the JSON header."""
    arrays = {"logits": np.ascontiguousarray(logits, np.float32), "gates": np.ascontiguousarray(gates, np.float32)}
    outputs, binary = [], []
    for name, as_binary in wanted.items():
        tensor = {"name": name, "datatype": "FP32", "shape": list(arrays[name].shape)}
        if as_binary:
            tensor["parameters"] = {"binary_data_size": arrays[name].nbytes}
            binary.append(arrays[name].tobytes())
        else:
            tensor["data"] = arrays[name].ravel().tolist()
        outputs.append(tensor)
    answer = {"model_name": MODEL, "model_version": VERSION, "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    header = orjson.dumps(answer)
    return (header + b"".join(binary), len(header)) if binary else (header, None)


def request_body(pixels, binary=True):
    """(body, headers) of an infer request for float32 pixels (N, 1, 28, 28), as a Triton client
    sends it: the binary tensor extension, or JSON data; both outputs asked for in binary."""
    tensor = {"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape)}
    if binary:
        raw = np.ascontiguousarray(pixels, np.float32).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        raw, tensor["data"] = b"", pixels.ravel().tolist()
    header = orjson.dumps({"inputs": [tensor], "outputs": [{"name": name, "parameters": {"binary_data": True}}
                                                           for name in OUTPUTS]})
    headers = {"Content-Type": "application/octet-stream"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(header))
    return (header + raw if binary else header), headers


def read_answer(body, header_length):
    """{output name: array} of an infer answer, its outputs as JSON data or binary."""
    header, binary = split_body(body, header_length)
    arrays, at = {}, 0
    for output in orjson.loads(header)["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            values = np.asarray(output["data"], np.float32)
        else:
            values, at = np.frombuffer(binary[at:at + size], np.float32), at + size
        arrays[output["name"]] = values.reshape(output["shape"])
    return arrays
