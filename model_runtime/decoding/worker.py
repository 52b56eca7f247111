"""A decoding worker's life, in its own process: decode each image put in the shared file with
the preprocessing of the model it is for, write its tensor there and answer with what decoding
found, or with its error."""

from __future__ import annotations

import math
import os
import resource
import select
import socket
import time

import numpy as np
from PIL import Image

from model_contract.decode import DecodedImage, decode
from model_contract.errors import ImageError
from model_contract.preprocess import PreprocessSpec, preprocess_upload, seen_box
from model_runtime.decoding import messages
from model_runtime.decoding.shared_file import PICTURE_SIDE, SharedFile
from model_runtime.heap import give_back_free_memory, serve_from_heap
from model_runtime.scheduling import run_as_batch_work

HEAP_ALLOCATION_BYTES = 32 * 1024 * 1024
"""The largest allocation a worker serves from its heap (glibc's own ceiling for its adaptive
threshold): an 8-megapixel image's RGBA buffer. Between 1080p photos a worker holds ~47 MB,
after a 12-megapixel one ~87 MB, until its next image or until it has been idle
IDLE_BEFORE_TRIM_S (~38 MB)."""

IDLE_BEFORE_TRIM_S = 1.0
"""A worker with no image for this long gives the memory it kept back (`malloc_trim`): under
load it keeps it, and after a burst of large photos the pod shrinks back within a second."""

MEMORY_ERROR_CODE = "decoder error -9"
"""How Pillow reports a C decoder's failed allocation (IMAGING_CODEC_MEMORY)."""

# Every decoder loaded with this module, in the process the workers are forked from, not by a
# worker's first image of a format: what a plugin and its library map would otherwise come out
# of that image's memory allowance, and of every later image's in that worker.
Image.init()


def caused_by_memory(error: BaseException) -> bool:
    """Whether the memory limit is behind `error`: a MemoryError, which Pillow may wrap, or a
    C decoder's out-of-memory code."""
    seen: BaseException | None = error
    for _ in range(8):  # chains are short; a bound rules out a cycle
        if seen is None:
            return False
        if isinstance(seen, MemoryError) or MEMORY_ERROR_CODE in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _keep_freed_memory_for_the_next_image() -> None:
    """Keep an image's freed memory for the next one. By default glibc maps each allocation
    over 128 KiB on its own and unmaps it when freed, and gives the top of its heap back: the
    next image then faults every page in again, and a 1080p JPEG took 10 ms to decode in a
    worker against 5.5 ms in-process. Allocations up to HEAP_ALLOCATION_BYTES come from the
    heap instead, and up to twice that of freed heap is kept; larger images are still mapped
    and given back on their own, and all of it stays under the worker's memory limit. The
    worker gives the rest back once idle (IDLE_BEFORE_TRIM_S)."""
    serve_from_heap(HEAP_ALLOCATION_BYTES)


def serve(
    conn: socket.socket, shared: SharedFile, max_pixels: int, memory_bytes: int | None
) -> None:
    """Decode images until the server goes, each with the `PreprocessSpec` the server sent last
    on `conn`: a worker decodes for every model, and the server sends a model's spec before an
    image of it that follows another model's. `memory_bytes` None: no memory limit (the kernel
    would not enforce it). The answers name the image error (`model_contract.errors`) and
    carry its message; the server decides what each means to a client."""
    run_as_batch_work()
    # libtiff and libjpeg warn on stderr; the answer carries every error that matters.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    _keep_freed_memory_for_the_next_image()
    if memory_bytes is not None:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
        # What the worker has mapped now (interpreter, libraries) plus what one image may take.
        limit = mapped + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    spec: PreprocessSpec | None = None
    kept_memory = False
    while True:
        waits = [shared.bell, conn.fileno()]
        readable, _, _ = select.select(waits, [], [], IDLE_BEFORE_TRIM_S if kept_memory else None)
        if not readable:
            give_back_free_memory()
            kept_memory = False
            continue
        if conn.fileno() in readable:  # sent before the bell rang: read first
            try:
                spec = PreprocessSpec.model_validate(messages.receive(conn))
            except messages.ChannelClosed:  # the server has gone
                return
            continue
        assert spec is not None, "the server sends a spec before the first image"
        kept_before, kept_memory = kept_memory, True
        request = shared.heard() - 1
        began = time.time_ns()
        size, wants_picture = request >> 1, bool(request & 1)
        try:
            data = shared.take_upload(size)
            try:
                tensor, decoded = preprocess_upload(data, spec, max_pixels=max_pixels)
                retry = False
            except Exception as error:
                if not (kept_before and caused_by_memory(error)):
                    raise
                retry = True  # below, once this error and the memory it holds are gone
            if retry:
                # What earlier images left in the heap counts against the limit too: an image
                # gets the chance it would have in a fresh worker, whatever came before it.
                give_back_free_memory()
                tensor, decoded = preprocess_upload(data, spec, max_pixels=max_pixels)
            box = seen_box(decoded, spec)
            picture = _picture(data, decoded, spec, max_pixels) if wants_picture else None
        except Exception as error:  # every error goes back to the server, which raises it
            if caused_by_memory(error):
                messages.send(conn, ["memory", str(error)])
                return  # the server replaces this worker: its heap may stay large
            kind = type(error).__name__ if isinstance(error, ImageError) else ""
            messages.send(conn, ["error", kind, str(error)])
            continue
        finally:
            data = b""  # the upload's memory goes before the next one arrives
        shared.put_tensor(tensor)
        if picture is not None:
            shared.put_picture(picture)
        found = [decoded.format, decoded.original_mode, decoded.exif_rotated, decoded.upright_size]
        shape = None if picture is None else picture.shape
        messages.send(conn, ["ok", *found, box, shape, began, time.time_ns()])
        del tensor, decoded, picture  # the decoded image is not kept alive while the worker waits


def _picture(
    data: bytes, decoded: DecodedImage, spec: PreprocessSpec, max_pixels: int
) -> np.ndarray:
    """The upright RGB image at its own size, at most PICTURE_SIDE on its longest side.

    A JPEG that draft decoding read smaller than that for the model's input is decoded again,
    drafted for the picture instead of upscaled: draft decoding reduces by 1/2, 1/4 or 1/8, to
    the smallest scale that still covers the size asked, so the second decode holds under four
    times the picture's pixels (or 1/64 of the photo's, where even 1/8 is larger), never the
    whole photo (a 40-megapixel JPEG decoded whole takes 120 MB of the worker's allowance);
    and the picture keeps the photo's detail, which a drafted 125x88 upscaled to 512x358 has
    lost. The image is shrunk in place: it is not needed any more."""
    image = decoded.image
    if max(image.size) < max(_picture_size(decoded.upright_size)):
        image = decode(
            data,
            max_pixels=max_pixels,
            alpha_background=spec.alpha_background,
            key_background=spec.transparency_key_background,
            size_hint=_picture_size,
        ).image
    image.thumbnail((PICTURE_SIDE, PICTURE_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _picture_size(size: tuple[int, int]) -> tuple[int, int]:
    """`size` brought to at most PICTURE_SIDE on its longest side (rounded up: at least the
    size `thumbnail` gives), keeping its aspect."""
    scale = min(1.0, PICTURE_SIDE / max(size))
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)
