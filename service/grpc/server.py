"""The Open Inference Protocol over gRPC, in the process that serves HTTP and on the same data
plane: KServe's `inference.GRPCInferenceService` with Triton's repository RPCs, and
`grpc.health.v1.Health` (SERVING once every model served is ready), on VIT_GRPC_PORT.

Each RPC parses its message, makes one data-plane call and builds its answer; a ServiceError
becomes the gRPC status its class names (service/errors.py), counted as HTTP's are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from service.errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    ServiceError,
)
from service.grpc import oip_pb2 as pb
from service.grpc.tensors import encode_response, parse_request
from service.inference.data_plane import DataPlane
from service.metrics import Metrics
from service.observability.tracing import Tracing
from service.settings import Settings

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
"""The service's full name on the wire, as KServe's and Triton's clients call it."""
SERVER_NAME = "vit-inference"
HEALTH_POLL_S = 0.5
"""How often a health Watch looks at readiness (a Check reads it as it is)."""
CANCELLATION_ARRIVES_S = 0.05
"""How long a call whose message never came waits to learn whether its client cancelled it."""
PROPAGATED = ("traceparent", "tracestate")
"""The metadata a client's trace continues from (W3C trace context, as HTTP's headers)."""
SERVER_FAULTS = {
    "UNKNOWN",
    "DEADLINE_EXCEEDED",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
}
"""Status codes that are the server's failure, not the client's (OpenTelemetry's RPC
conventions): only these mark a server span as an error."""
PARSE_ON_LOOP_BYTES = 64 * 1024
"""Messages smaller than this are parsed on the event loop; larger ones in a thread (typed
FP32 contents are per-element work)."""


class Call:
    """What one RPC's metrics name beside its method: the model that served it, once known."""

    model = ""


Behaviour = Callable[[Any, grpc.aio.ServicerContext, Call], Awaitable[Any]]


class Malformed:
    """What a message that is not valid protobuf parses to: the RPC answers INVALID_ARGUMENT
    saying why (gRPC's own answer would be INTERNAL, blaming the server)."""

    def __init__(self, why: str) -> None:
        self.why = why


def parser(message: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as error:
            return Malformed(f"the request is not a valid {message.DESCRIPTOR.name}: {error}")

    return parse


def well_formed(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise InvalidRequest(request.why)
    return request


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The call's `authorization` metadata (`Bearer <token>`), if it has one."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


MAX_DETAILS = 2000
"""Characters of an error's message sent as the status details: messages quote what the client
sent (a model's name, a shape), and gRPC fails a call whose headers exceed 8-16 KB."""


def bounded(message: str) -> str:
    return message if len(message) <= MAX_DETAILS else message[: MAX_DETAILS - 3] + "..."


def trailers(error: ServiceError) -> tuple[tuple[str, str], ...]:
    """When to retry an overloaded server: seconds as HTTP's Retry-After, and milliseconds as
    gRPC's own pushback, which clients with a retry policy wait for."""
    if isinstance(error, Overloaded):
        seconds = error.retry_after
        return (("retry-after", str(seconds)), ("grpc-retry-pushback-ms", str(seconds * 1000)))
    return ()


class InferenceService:
    """The RPCs, each a thin shell around one data-plane call."""

    def __init__(
        self,
        data_plane: DataPlane,
        metrics: Metrics,
        settings: Settings,
        version: str,
        tracing: Tracing | None = None,
    ) -> None:
        self.data_plane = data_plane
        self.metrics = metrics
        self.tracing = tracing
        self.settings = settings
        self.version = version
        self.infer_calls = 0
        """ModelInfer calls from their start (before their message is read) until answered."""

    async def server_live(self, _: pb.ServerLiveRequest, *__: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, _: pb.ServerReadyRequest, *__: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.data_plane.ready)

    async def model_ready(self, request: pb.ModelReadyRequest, *_: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self.data_plane.model_ready(_named(request.name), request.version or None)
        )

    async def server_metadata(
        self, _: pb.ServerMetadataRequest, *__: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=["model_repository"]
        )

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, *_: Any
    ) -> pb.ModelMetadataResponse:
        signature = self.data_plane.signature(_named(request.name), request.version or None)
        TensorMetadata = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=signature.name,
            versions=signature.versions,
            platform=signature.platform,
            inputs=[TensorMetadata(**t.as_dict()) for t in signature.inputs],
            outputs=[TensorMetadata(**t.as_dict()) for t in signature.outputs],
        )

    async def model_infer(
        self, _: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext, call: Call
    ) -> pb.ModelInferResponse:
        """Served as a client-streaming method (the same on the wire as a unary call) so that
        reading the message has a bound: a stream that stalls is answered DEADLINE_EXCEEDED
        after VIT_BODY_TIMEOUT_S instead of holding its place."""
        limit = self.settings.grpc_max_infer_calls
        if self.infer_calls >= limit:
            # Before the message is read: gRPC holds no more of it than its flow-control window.
            raise Overloaded(f"{limit} inference calls are in flight", retry_after=1)
        self.infer_calls += 1
        try:
            return await self._infer(context, call)
        finally:
            self.infer_calls -= 1

    async def _infer(self, context: grpc.aio.ServicerContext, call: Call) -> pb.ModelInferResponse:
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                request = await context.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request message did not arrive within {self.settings.body_timeout_s} s"
            ) from None
        data_plane = self.data_plane
        given = authorization(context)
        data_plane.authorize(given)  # before anything of the message is looked at
        if request is grpc.aio.EOF:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the call's deadline passed before its request message")
            # A call the client cancelled reads as ended until its cancellation reaches this
            # task, moments later: then it is counted as cancelled, not as a malformed call.
            await asyncio.sleep(CANCELLATION_ARRIVES_S)
            raise InvalidRequest("the call ended before its request message")
        request = well_formed(request)
        allowed = context.time_remaining()  # one already past is refused below, as 504
        admitted = await data_plane.admit(
            _named(request.model_name),
            request.model_version or None,
            given,
            allowed if allowed is not None and allowed > 0 else None,
        )
        try:
            call.model = admitted.pipeline.session.metadata.name
            size = request.ByteSize()
            admitted.ticket.hold_bytes(size)
            spec = admitted.pipeline.input_spec
            parsed = (
                parse_request(request, spec)
                if size < PARSE_ON_LOOP_BYTES
                else await asyncio.to_thread(parse_request, request, spec)
            )
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the call's deadline passed before it was parsed")
            deadline = min(admitted.deadline, data_plane.deadline(remaining))
            outputs = await data_plane.infer(admitted, parsed, deadline)
        finally:
            admitted.ticket.release()
        metadata = admitted.pipeline.session.metadata
        return encode_response(
            outputs, model_name=metadata.name, model_version=metadata.version, request=parsed
        )

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext, _: Call
    ) -> pb.RepositoryIndexResponse:
        entries = await self.data_plane.index(authorization(context))
        ModelIndex = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                ModelIndex(
                    name=entry.name,
                    version="" if entry.version is None else str(entry.version),
                    state=entry.state,
                    reason=entry.reason or "",
                )
                for entry in entries
                if entry.state == "READY" or not request.ready
            ]
        )

    async def repository_model_load(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext, _: Call
    ) -> pb.RepositoryModelLoadResponse:
        self.data_plane.require_admin(authorization(context))
        _no_parameters(request.parameters)
        await self.data_plane.load(_named(request.model_name), authorization(context))
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext, _: Call
    ) -> pb.RepositoryModelUnloadResponse:
        self.data_plane.require_admin(authorization(context))
        _no_parameters(request.parameters)
        await self.data_plane.unload(_named(request.model_name), authorization(context))
        return pb.RepositoryModelUnloadResponse()

    def handler(self) -> grpc.GenericRpcHandler:
        unary: dict[str, tuple[Behaviour, Any, Any]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (
                self.server_metadata,
                pb.ServerMetadataRequest,
                pb.ServerMetadataResponse,
            ),
            "ModelMetadata": (
                self.model_metadata,
                pb.ModelMetadataRequest,
                pb.ModelMetadataResponse,
            ),
            "RepositoryIndex": (
                self.repository_index,
                pb.RepositoryIndexRequest,
                pb.RepositoryIndexResponse,
            ),
            "RepositoryModelLoad": (
                self.repository_model_load,
                pb.RepositoryModelLoadRequest,
                pb.RepositoryModelLoadResponse,
            ),
            "RepositoryModelUnload": (
                self.repository_model_unload,
                pb.RepositoryModelUnloadRequest,
                pb.RepositoryModelUnloadResponse,
            ),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._observed(name, behaviour),
                request_deserializer=parser(request),
                response_serializer=response.SerializeToString,
            )
            for name, (behaviour, request, response) in unary.items()
        }
        handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
            self._observed("ModelInfer", self.model_infer),
            request_deserializer=parser(pb.ModelInferRequest),
            response_serializer=pb.ModelInferResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _observed(
        self, method: str, behaviour: Behaviour
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        """`behaviour` answering errors with their gRPC status, timed and counted by method
        and status code (and refusals by their type, as HTTP counts them)."""
        metrics, tracing = self.metrics, self.tracing

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            call, code = Call(), "OK"
            span = token = None
            if tracing is not None:
                span, token = _server_span(tracing, method, context)
            try:
                return await behaviour(well_formed(request), context, call)
            except ServiceError as error:
                code = error.grpc_code
                metrics.rejections.labels(error.type).inc()
                await context.abort(
                    getattr(grpc.StatusCode, code), bounded(error.message), trailers(error)
                )
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                logger.exception("unhandled error in gRPC %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                metrics.grpc_requests.labels(method, code).inc()
                metrics.grpc_request_seconds.labels(method, code, call.model).observe(
                    time.perf_counter() - started, metrics.exemplar()
                )
                if span is not None and token is not None:
                    _end_span(span, token, code, call.model)

        return observed


def _server_span(
    tracing: Tracing, method: str, context: grpc.aio.ServicerContext
) -> tuple[trace.Span, object]:
    """The call's server span, continuing the client's trace from its metadata, made current."""
    carrier = {
        key: value
        for key, value in (context.invocation_metadata() or ())
        if key in PROPAGATED and isinstance(value, str)
    }
    parent = propagate.extract(carrier)
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": method,
        "network.peer.address": context.peer(),
    }
    span = tracing.server_span(f"{SERVICE}/{method}", parent, attributes)
    return span, otel_context.attach(trace.set_span_in_context(span, parent))


def _end_span(span: trace.Span, token: object, code: str, model: str) -> None:
    span.set_attribute("rpc.grpc.status_code", getattr(grpc.StatusCode, code).value[0])
    if model:
        span.set_attribute("vit.model.name", model)
    if code != "OK":
        span.set_attribute("error.type", code)
        if code in SERVER_FAULTS:
            span.set_status(Status(StatusCode.ERROR))
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


def _named(name: str) -> str:
    if not name:
        raise InvalidRequest("name the model: the request's name is empty")
    return name


HARMLESS_PARAMETERS = {"unload_dependents"}
"""Repository parameters with nothing to do here (no model has dependents); tritonclient
sends this one with every unload."""


def _no_parameters(parameters: Any) -> None:
    """Triton's load parameters replace a model's configuration or files; a model here loads
    from its folder as it is, so they are refused rather than ignored."""
    given = sorted(set(parameters) - HARMLESS_PARAMETERS)
    if given:
        raise InvalidRequest(
            f"repository parameters are not supported (got {', '.join(given)}): "
            "a model loads from its folder as it is"
        )


class GrpcFront:
    """The gRPC server and its health service, started and stopped with the app."""

    def __init__(self, server: grpc.aio.Server, health_service: ReadinessHealth) -> None:
        self._server = server
        self._health = health_service

    @classmethod
    async def start(
        cls,
        data_plane: DataPlane,
        metrics: Metrics,
        settings: Settings,
        version: str,
        tracing: Tracing | None = None,
    ) -> GrpcFront:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on the port fails, as HTTP's does
                ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
            ],
        )
        server.add_generic_rpc_handlers(
            (InferenceService(data_plane, metrics, settings, version, tracing).handler(),)
        )
        health_service = ReadinessHealth(data_plane)
        health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
        address = f"{settings.host}:{settings.grpc_port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as error:
            raise RuntimeError(f"cannot listen for gRPC on {address}: {error}") from None
        await server.start()
        logger.info("gRPC (Open Inference Protocol) on %s", address)
        return cls(server, health_service)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls and let those in flight finish for at most `grace_s`; health
        says NOT_SERVING, and its Watch streams end (a probe's stream holds up no drain)."""
        self._health.stopping = True
        await self._server.stop(grace_s)


class ReadinessHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 for the server ("") and the inference service: SERVING exactly while
    the data plane is ready, as it is at each Check; Watch streams each change."""

    def __init__(self, data_plane: DataPlane) -> None:
        self._data_plane = data_plane
        self.stopping = False

    def status(self, service: str) -> int | None:
        """The service's status now; None for a service this server does not serve."""
        if service not in ("", SERVICE):
            return None
        serving = self._data_plane.ready and not self.stopping
        return int(
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def Check(  # noqa: N802 (the RPC's name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, bounded(f"no service {request.service!r}")
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802 (the RPC's name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """The status now and at each change (SERVICE_UNKNOWN for a service not served),
        looked at every HEALTH_POLL_S; the stream ends once the server stops."""
        last = None
        while True:
            status = self.status(request.service)
            if status is None:
                status = int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self.stopping:
                return
            await asyncio.sleep(HEALTH_POLL_S)
