"""The Open Inference Protocol over gRPC on serve.py's default server (--grpc-port): KServe's
GRPCInferenceService (protocols/grpc_predict_v2.proto) with ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata and ModelInfer (raw tensor contents, or typed ones), as Triton's and
KServe's gRPC clients call it. Every worker serves it on its own event loop beside HTTP, all on one
port (SO_REUSEPORT: the kernel spreads the connections across the workers), into the same batcher
as HTTP, so a request gets the same answer over either protocol."""
import functools
import os
import sys
import time

import numpy as np

from . import kserve
from .batcher import Full
from .requests import RequestError

PROTOCOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protocols")
INFER_PATH = "inference.GRPCInferenceService/ModelInfer"  # the HTTP/2 path of a ModelInfer call


@functools.cache
def messages():
    """(messages, services) of the proto, compiled at first use (grpcio-tools)."""
    import grpc
    sys.path.insert(0, PROTOCOLS)
    try:
        return grpc.protos_and_services("grpc_predict_v2.proto")
    finally:
        sys.path.remove(PROTOCOLS)


async def start(application, host, port):
    """Serve the protocol for `application` (http_app.Application) on host:port; returns the server."""
    import grpc
    protos, services = messages()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    services.add_GRPCInferenceServiceServicer_to_server(Servicer(application, protos), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server


def code_of(status):
    import grpc
    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
            413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}.get(status,
                                                                                          grpc.StatusCode.INTERNAL)


def tensor_of(request):
    """The one input of a ModelInferRequest as kserve.read_input takes it: (tensor, its raw bytes)."""
    if len(request.inputs) != 1:
        raise RequestError(400, "an infer request needs one input tensor named \"pixels\"")
    given = request.inputs[0]
    tensor = {"name": given.name, "datatype": given.datatype, "shape": list(given.shape)}
    if request.raw_input_contents:
        raw = request.raw_input_contents[0]
        return {**tensor, "parameters": {"binary_data_size": len(raw)}}, raw
    return {**tensor, "data": list(given.contents.fp32_contents)}, b""  # any other datatype is refused


def infer_request(pixels):
    """A ModelInferRequest of float32 pixels (N, 1, 28, 28) as raw contents, as tritonclient sends it."""
    protos, _ = messages()
    request = protos.ModelInferRequest(model_name=kserve.MODEL)
    request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(np.ascontiguousarray(pixels, np.float32).tobytes())
    return request


def classes_over_grpc(address, pixels, batch=100):
    """The class of every image as the server at host:port answers it over gRPC, `batch` per request."""
    import grpc
    _, services = messages()
    found = []
    with grpc.insecure_channel(address) as channel:
        stub = services.GRPCInferenceServiceStub(channel)
        for start in range(0, len(pixels), batch):
            answer = stub.ModelInfer(infer_request(pixels[start:start + batch]), timeout=60)
            at = [output.name for output in answer.outputs].index("logits")
            logits = np.frombuffer(answer.raw_output_contents[at], np.float32)
            found.append(logits.reshape(-1, 10).argmax(1))
    return np.concatenate(found)


class Servicer:
    """The service's methods, each answering from the application's current model."""

    def __init__(self, application, protos):
        self.application, self.protos = application, protos

    async def ServerLive(self, request, context):  # noqa: N802  (the service's method names)
        return self.protos.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return self.protos.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):  # noqa: N802
        ready = request.name == kserve.MODEL and self.application.v2_documents["model-ready"][0] == 200
        return self.protos.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):  # noqa: N802
        document = self.application.v2_documents["server"][1]
        return self.protos.ServerMetadataResponse(name=document["name"], version=document["version"],
                                                  extensions=document["extensions"])

    async def ModelMetadata(self, request, context):  # noqa: N802
        if request.name != kserve.MODEL:
            await context.abort(code_of(404), f"no model {request.name!r}; this server serves {kserve.MODEL!r}")
        status, document = self.application.v2_documents["model"]
        if status != 200:
            await context.abort(code_of(status), document["error"])
        tensors = [[self.protos.ModelMetadataResponse.TensorMetadata(**t) for t in document[side]]
                   for side in ("inputs", "outputs")]
        return self.protos.ModelMetadataResponse(name=document["name"], versions=document["versions"],
                                                 platform=document["platform"], inputs=tensors[0], outputs=tensors[1])

    async def ModelInfer(self, request, context):  # noqa: N802
        """One inference; counted in the metrics as route 'grpc' with the HTTP status it stands for."""
        started, status = time.perf_counter(), 200
        try:
            return await self.infer(request)
        except RequestError as error:
            status = error.status
            await context.abort(code_of(error.status), str(error))
        except Full as error:
            status = 503
            await context.abort(code_of(503), str(error))
        finally:
            if self.application.recorder is not None:
                self.application.recorder.request("grpc", status, time.perf_counter() - started)

    async def infer(self, request):
        if request.model_name != kserve.MODEL:
            raise RequestError(404, f"no model {request.model_name!r}; this server serves {kserve.MODEL!r}")
        unknown = {o.name for o in request.outputs} - set(kserve.OUTPUTS)
        if unknown:
            raise RequestError(400, f"no output {sorted(unknown)[0]!r}; this model has outputs "
                                    f"{', '.join(kserve.OUTPUTS)}")
        pixels = kserve.read_input(*tensor_of(request), self.application.max_request_images)
        rows = await self.application.batcher.infer(pixels)
        return self.answer(request, np.stack([row[1] for row in rows]), np.stack([row[2] for row in rows]))

    def answer(self, request, logits, gates):
        outputs = {"logits": logits, "gates": gates}
        wanted = [o.name for o in request.outputs] or list(kserve.OUTPUTS)
        response = self.protos.ModelInferResponse(model_name=kserve.MODEL, model_version=kserve.VERSION,
                                                  id=request.id)
        for name in wanted:
            response.outputs.add(name=name, datatype="FP32", shape=list(outputs[name].shape))
            response.raw_output_contents.append(np.ascontiguousarray(outputs[name], np.float32).tobytes())
        return response
