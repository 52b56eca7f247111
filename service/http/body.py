"""Request body -> the uploaded image files: byte limits while streaming, multipart or raw image."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from model_contract.decode import ALLOWED_FORMATS, image_format
from service.errors import (
    ClientClosedRequest,
    EmptyBody,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    TooManyImages,
    UnsupportedMediaType,
)
from service.inference.budget import Ticket

FILE_FIELD = "file"
MULTIPART, OCTET_STREAM = "multipart/form-data", "application/octet-stream"
ACCEPTED_BODIES = (
    f"{MULTIPART} with field {FILE_FIELD!r}, an image/* body, or an image file's bytes as "
    f"{OCTET_STREAM}"
)
MAX_FORM_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024

T = TypeVar("T")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int, timeout: float, ticket: Ticket) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` (declared or streamed),
    with 503 as soon as it would take the bodies in flight over their budget (declared or
    streamed: each chunk is counted on the request's `ticket` before the next is read), and
    with 408 unless it has all arrived within `timeout` seconds (a trickling client), and
    with 499 when the client goes (or its framing breaks) before it has all arrived."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
        if not ticket.can_hold_bytes(int(declared)):
            ticket.hold_bytes(int(declared))  # raises the 503 without reading a byte
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
                ticket.hold_bytes(len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ClientClosedRequest("the client disconnected before its body arrived") from None
    return b"".join(chunks)


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its name where the client gave one (multipart), and its bytes."""

    name: str | None
    data: bytes


async def uploaded_images(
    request: Request, *, limit: int, timeout: float, max_files: int, ticket: Ticket
) -> list[Upload]:
    """Image files from a multipart form (field `file`, repeatable) or a raw body: `image/*`,
    or bytes of no declared image type (`application/octet-stream`, what many clients send for
    bytes, or no Content-Type, which RFC 9110 lets a server read by content) that begin as an
    accepted image format does."""
    kind = media_type(request)
    if kind not in (MULTIPART, OCTET_STREAM, "") and not kind.startswith("image/"):
        raise UnsupportedMediaType(f"send {ACCEPTED_BODIES}, not {kind!r}")
    body = await read_body(request, limit, timeout, ticket)
    if not body:
        raise EmptyBody(f"the request body is empty: send {ACCEPTED_BODIES}")
    if kind == MULTIPART:
        ticket.hold_bytes(len(body))  # the files parsed from it are a second copy at most
        return await _form_files(request, body, max_files)
    if not kind.startswith("image/") and image_format(body) is None:
        declared = f"is {kind}" if kind else "has no Content-Type"
        raise UnsupportedMediaType(
            f"the body {declared} and is not an image file in an accepted format "
            f"({', '.join(ALLOWED_FORMATS)}): send {ACCEPTED_BODIES}"
        )
    return [Upload(name=None, data=body)]


async def _form_files(request: Request, body: bytes, max_files: int) -> list[Upload]:
    """The files of a multipart body, never spooled to disk: they are in memory already, and
    counted (a pod's /tmp is small, and a disk is no bound on what is in flight)."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        request.headers,
        stream(),
        max_files=max_files,
        max_fields=MAX_FORM_FIELDS,
        max_part_size=MAX_FIELD_BYTES,
    )
    parser.spool_max_size = len(body) + 1
    try:
        form = await parser.parse()
    except MultiPartException as error:
        if error.message.startswith("Too many files"):
            raise TooManyImages(
                f"at most {max_files} images in one request (VIT_MAX_IMAGES_PER_REQUEST); "
                "send the rest in another"
            ) from error
        raise InvalidRequest(f"malformed multipart body: {error.message}") from error
    try:
        uploads = [item for item in form.getlist(FILE_FIELD) if isinstance(item, UploadFile)]
        if not uploads:
            raise InvalidRequest(f"the form has no file in the field {FILE_FIELD!r}")
        files = [
            Upload(name=upload.filename or None, data=await upload.read()) for upload in uploads
        ]
    finally:
        await form.close()
    for number, file in enumerate(files, 1):
        if not file.data:
            raise EmptyBody(f"uploaded file {number} ({file.name or 'no name'}) is empty")
    return files


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or `work` cancelled as soon as the client disconnects: its answer
    would go nowhere, and its images would take decoders and places from others. `work` runs
    in the caller's task, not a task of its own (one scheduling round less per request); a
    watcher cancels that task when the client goes, and never once `work` has ended."""
    task = asyncio.current_task()
    assert task is not None
    ended = gone = False

    def client_gone(watcher: asyncio.Task[None]) -> None:
        nonlocal gone
        if not ended and not watcher.cancelled():
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(client_gone)
    try:
        return await work
    except asyncio.CancelledError:
        # Cancelled by the watcher alone, the request ends as the client's doing; any other
        # cancellation (the server stopping) goes on.
        if gone and task.uncancel() == 0:
            raise ClientClosedRequest(
                "the client disconnected before the answer was ready"
            ) from None
        raise
    finally:
        ended = True
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
