"""The Open Inference Protocol (KServe v2), which Triton, KServe, Seldon and OpenVINO Model Server
speak, for serve.py: health, server and model metadata, and inference with JSON tensors or with the
binary tensor extension (a JSON header of `Inference-Header-Content-Length` bytes, then the raw
tensors). The model is 'moe': input 'pixels' FP32 (N, 1, 28, 28) in [0, 1], the model's own
contract and exactly what Triton takes for it (Triton refuses any other datatype or shape, so a
client that works with one server works with all of them), outputs 'logits' FP32 (N, 10) and
'gates' FP32 (N, EXPERTS). Everything here is plain functions of bytes; the server routes to them."""
import orjson

import numpy as np

from .requests import PIXELS_PER_IMAGE, RequestError

MODEL = "moe"
VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = ("logits", "gates")
IMAGE_SHAPE = (1, 28, 28)
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
    """(images: float32 pixels (N, 1, 28, 28); request id; {output: binary?}) of an infer request; a
    RequestError (4xx) names what is wrong."""
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
    if datatype != "FP32":
        raise RequestError(400, f"input datatype {datatype!r}; this model takes FP32 pixels 0-1 (pixel / 255), "
                                "as its metadata says (raw uint8 images go to POST /)")
    if (not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape)
            or tuple(shape[1:]) != IMAGE_SHAPE):
        raise RequestError(400, f"input shape {shape}; this model takes [N, 1, 28, 28], as its metadata says")
    if shape[0] > max_request_images:
        raise RequestError(413, f"{shape[0]} images in one request; at most {max_request_images}")
    count = shape[0] * PIXELS_PER_IMAGE
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * 4 or size != len(binary):
            raise RequestError(400, f"binary_data_size {size} with {len(binary)} bytes after the header; shape "
                                    f"{shape} of FP32 takes {count * 4}")
        values = np.frombuffer(binary, dtype=np.float32)
    else:
        values = json_values(tensor.get("data"), count)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise RequestError(400, "FP32 pixels must be numbers from 0 to 1 (pixel / 255)")
    return values.reshape(-1, *IMAGE_SHAPE)


def json_values(data, count):
    try:
        values = np.asarray(data, dtype=np.float32).ravel()
    except (ValueError, TypeError, RecursionError):
        raise RequestError(400, "the input's \"data\" must be a list of numbers (flat or nested)")
    if values.size != count:
        raise RequestError(400, f"the input's \"data\" has {values.size} values; its shape needs {count}")
    return values


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
