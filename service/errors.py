"""The closed set of errors clients see, each with its HTTP status, its gRPC status and a
machine-readable type: the one table every front maps errors by."""

from __future__ import annotations

import model_contract.errors as image_errors


class ServiceError(Exception):
    """Base of every error the service reports to clients; the table below is the only mapping."""

    status_code: int = 500
    grpc_code: str = "INTERNAL"
    """The gRPC status (a `grpc.StatusCode` member's name) the gRPC front answers with."""
    type: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EmptyBody(ServiceError):
    status_code, grpc_code, type = 400, "INVALID_ARGUMENT", "empty_body"


class InvalidRequest(ServiceError):
    status_code, grpc_code, type = 400, "INVALID_ARGUMENT", "invalid_request"


class Unauthorized(ServiceError):
    """A bearer token is required and the request's is missing or wrong."""

    status_code, grpc_code, type = 401, "UNAUTHENTICATED", "unauthorized"


class Forbidden(ServiceError):
    """The route is turned off in this server's configuration."""

    status_code, grpc_code, type = 403, "PERMISSION_DENIED", "forbidden"


class ModelLoadFailed(ServiceError):
    """A model version asked for could not be loaded (checks, warm-up or memory budget)."""

    status_code, grpc_code, type = 400, "FAILED_PRECONDITION", "load_failed"


class NoAttention(ServiceError):
    """Explain was asked of a model whose file carries no attention rollout."""

    status_code, grpc_code, type = 400, "INVALID_ARGUMENT", "no_attention_output"


class NoEmbedding(ServiceError):
    """Embeddings were asked of a model whose file carries none."""

    status_code, grpc_code, type = 400, "INVALID_ARGUMENT", "no_embedding_output"


class NoClasses(ServiceError):
    """Classes (classify, explain) were asked of a model that serves embeddings only."""

    status_code, grpc_code, type = 400, "INVALID_ARGUMENT", "no_classes"


class ModelNotFound(ServiceError):
    status_code, grpc_code, type = 404, "NOT_FOUND", "model_not_found"


class NotAcceptable(ServiceError):
    """The request's `Accept` header takes none of the media types the route answers with."""

    status_code, grpc_code, type = 406, "INVALID_ARGUMENT", "not_acceptable"


class RequestTimeout(ServiceError):
    status_code, grpc_code, type = 408, "DEADLINE_EXCEEDED", "request_timeout"


class ClientClosedRequest(ServiceError):
    """The client disconnected first; nobody reads this answer, but the metrics count it."""

    status_code, grpc_code, type = 499, "CANCELLED", "client_closed_request"


class PayloadTooLarge(ServiceError):
    status_code, grpc_code, type = 413, "RESOURCE_EXHAUSTED", "payload_too_large"


class TooManyImages(ServiceError):
    """More files in one request than VIT_MAX_IMAGES_PER_REQUEST allows."""

    status_code, grpc_code, type = 413, "RESOURCE_EXHAUSTED", "too_many_images"


class UnsupportedMediaType(ServiceError):
    status_code, grpc_code, type = 415, "INVALID_ARGUMENT", "unsupported_media_type"


class UnsupportedImageFormat(ServiceError):
    status_code, grpc_code, type = 415, "INVALID_ARGUMENT", "unsupported_image_format"


class UndecodableImage(ServiceError):
    status_code, grpc_code, type = 422, "INVALID_ARGUMENT", "undecodable_image"


class TooManyPixels(ServiceError):
    status_code, grpc_code, type = 422, "INVALID_ARGUMENT", "too_many_pixels"


class TooExpensiveToDecode(ServiceError):
    """The image overran its decoder's memory or time limit (a bomb, or just too big)."""

    status_code, grpc_code, type = 422, "INVALID_ARGUMENT", "too_expensive_to_decode"


class InferenceFailed(ServiceError):
    status_code, grpc_code, type = 500, "INTERNAL", "inference_failed"


class NotReady(ServiceError):
    status_code, grpc_code, type = 503, "UNAVAILABLE", "not_ready"


class Overloaded(ServiceError):
    """The queue is full; `retry_after` says when the work already accepted should be done."""

    status_code, grpc_code, type = 503, "UNAVAILABLE", "overloaded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(ServiceError):
    status_code, grpc_code, type = 504, "DEADLINE_EXCEEDED", "deadline_exceeded"


ERROR_TYPES: tuple[type[ServiceError], ...] = (
    EmptyBody,
    InvalidRequest,
    Unauthorized,
    Forbidden,
    ModelLoadFailed,
    NoAttention,
    NoEmbedding,
    NoClasses,
    ModelNotFound,
    NotAcceptable,
    RequestTimeout,
    ClientClosedRequest,
    PayloadTooLarge,
    TooManyImages,
    UnsupportedMediaType,
    UnsupportedImageFormat,
    UndecodableImage,
    TooManyPixels,
    TooExpensiveToDecode,
    InferenceFailed,
    NotReady,
    Overloaded,
    DeadlineExceeded,
)


IMAGE_ERRORS: dict[type[image_errors.ImageError], type[ServiceError]] = {
    image_errors.UnsupportedImageFormat: UnsupportedImageFormat,
    image_errors.UndecodableImage: UndecodableImage,
    image_errors.TooManyPixels: TooManyPixels,
    image_errors.TooExpensiveToDecode: TooExpensiveToDecode,
}


def from_image_error(error: image_errors.ImageError) -> ServiceError:
    """The client-facing error for an upload the contract could not turn into a tensor."""
    return IMAGE_ERRORS.get(type(error), UndecodableImage)(str(error))
