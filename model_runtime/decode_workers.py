"""Decoding in worker processes, each image under a memory limit and a time limit.

Pillow's decoders run in C and in pure Python; neither can be interrupted, and a crafted file can
make them allocate gigabytes or run for minutes. In a process of its own a decoder can be bounded
(`RLIMIT_AS`, where the kernel enforces it: Linux) and stopped (killed), and its memory comes back
when the process goes. Workers are forked from multiprocessing's fork server, which has this
module and Pillow imported already, so replacing a killed worker costs a fork, not an interpreter
start.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import mmap
import multiprocessing
import os
import resource
import select
import sys
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import forkserver, popen_forkserver, spawn, util
from multiprocessing.connection import Connection
from multiprocessing.context import (  # type: ignore[attr-defined]
    ForkServerProcess,
    reduction,
    set_spawning_popen,
)
from typing import Any

import numpy as np
from PIL import Image

from model_contract.decode import DecodedImage, decode
from model_contract.errors import (
    ImageError,
    TooExpensiveToDecode,
    TooManyPixels,
    UndecodableImage,
    UnsupportedImageFormat,
)
from model_contract.preprocess import PreprocessSpec, preprocess_upload, seen_box
from model_runtime.heap import give_back_free_memory, serve_from_heap
from model_runtime.platform import enforces_memory_limits, missing_protection
from model_runtime.scheduling import run_as_batch_work

logger = logging.getLogger(__name__)

MAPPED_UPLOAD_BYTES = 1024 * 1024
"""Uploads up to this size are copied through memory the server and the worker both map."""

PICTURE_SIDE = 512
"""The longest side of the upright picture a worker sends back when asked (for an overlay):
bounded so that it fits where the upload was, in the mapped memory."""
assert PICTURE_SIDE * PICTURE_SIDE * 3 <= MAPPED_UPLOAD_BYTES

HEAP_ALLOCATION_BYTES = 32 * 1024 * 1024
"""The largest allocation a worker serves from its heap (glibc's own ceiling for its adaptive
threshold): an 8-megapixel image's RGBA buffer. Between 1080p photos a worker holds ~47 MB,
after a 12-megapixel one ~87 MB, until its next image or until it has been idle
IDLE_BEFORE_TRIM_S (~38 MB)."""

IDLE_BEFORE_TRIM_S = 1.0
"""A worker with no image for this long gives the memory it kept back (`malloc_trim`): under
load it keeps it, and after a burst of large photos the pod shrinks back within a second."""

# Every decoder loaded with this module, in the fork server the workers come from, not by a
# worker's first image of a format: what a plugin and its library map would otherwise come out
# of that image's memory allowance, and of every later image's in that worker.
Image.init()

_ERRORS: dict[str, type[ImageError]] = {
    error.__name__: error
    for error in (UnsupportedImageFormat, UndecodableImage, TooManyPixels, TooExpensiveToDecode)
}
"""The image errors a worker's answer may name; anything else it met is `UndecodableImage`."""

Replaced = Callable[[str], None]
"""Told why a worker was killed and replaced: "memory" or "time" (the image overran that
limit), "crash" (the decoder died) or "abandoned" (its request went away)."""


@dataclass(frozen=True)
class Decoded:
    """An upload as the model's input, and what decoding found (for the input metrics)."""

    tensor: np.ndarray
    format: str
    original_mode: str
    exif_rotated: bool
    upright_size: tuple[int, int]
    """The original's size, upright."""
    box: tuple[float, float, float, float]
    """The box of the upright original that became the model's input (model_contract)."""
    picture: np.ndarray | None = None
    """The upright image, at most PICTURE_SIDE on its longest side, as (H, W, 3) uint8: only
    when asked for."""


MEMORY_ERROR_CODE = "decoder error -9"
"""How Pillow reports a C decoder's failed allocation (IMAGING_CODEC_MEMORY)."""


def _caused_by_memory(error: BaseException) -> bool:
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


def _serve(
    conn: Connection, spec_json: str, max_pixels: int, memory_bytes: int | None, upload_at: int
) -> None:
    """A worker's life: decode each image put in the shared file, write its tensor there and
    answer with what decoding found, or with its error. `memory_bytes` None: no memory limit
    (the kernel would not enforce it)."""
    run_as_batch_work()
    # libtiff and libjpeg warn on stderr; the answer carries every error that matters.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    shared = _Shared(reduction.recv_handle(conn), reduction.recv_handle(conn), upload_at)
    _keep_freed_memory_for_the_next_image()
    spec = PreprocessSpec.model_validate_json(spec_json)
    if memory_bytes is not None:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
        # What the worker has mapped now (interpreter, libraries) plus what one image may take.
        limit = mapped + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    kept_memory = False
    while True:
        waits = [shared.bell, conn.fileno()]
        readable, _, _ = select.select(waits, [], [], IDLE_BEFORE_TRIM_S if kept_memory else None)
        if not readable:
            give_back_free_memory()
            kept_memory = False
            continue
        if conn.fileno() in readable:  # the server has gone: it never writes here
            return
        kept_before, kept_memory = kept_memory, True
        request = shared.heard() - 1
        size, wants_picture = request >> 1, bool(request & 1)
        try:
            data = shared.take_upload(size)
            try:
                tensor, decoded = preprocess_upload(data, spec, max_pixels=max_pixels)
                retry = False
            except Exception as error:
                if not (kept_before and _caused_by_memory(error)):
                    raise
                retry = True  # below, once this error and the memory it holds are gone
            if retry:
                # What earlier images left in the heap counts against the limit too: an image
                # gets the chance it would have in a fresh worker, whatever came before it.
                give_back_free_memory()
                tensor, decoded = preprocess_upload(data, spec, max_pixels=max_pixels)
            box = seen_box(decoded, spec)
            picture = _picture(data, decoded, spec, max_pixels) if wants_picture else None
        except Exception as error:  # every error goes back to the parent, which raises it
            if _caused_by_memory(error):
                conn.send(("memory", str(error)))
                return  # the parent replaces this worker: its heap may stay large
            kind = type(error).__name__ if isinstance(error, ImageError) else ""
            conn.send(("error", kind, str(error)))
            continue
        finally:
            data = b""  # the upload's memory goes before the next one arrives
        shared.put_tensor(tensor)
        if picture is not None:
            shared.put_picture(picture)
        found = (decoded.format, decoded.original_mode, decoded.exif_rotated, decoded.upright_size)
        conn.send(("ok", *found, box, tensor.shape, None if picture is None else picture.shape))
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


class _Shared:
    """A worker's file in memory (a memfd; an unlinked temporary file where there is none, as
    on macOS), mapped by the server and by the worker: the tensor at 0, the upload at
    `upload_at`. A pipe would move them in 64 KB pieces, each a wake-up of the other side,
    and `pread`/`pwrite` cost several times a copy through the mapping. An upload over
    `MAPPED_UPLOAD_BYTES` goes into the file past the mapping, and its pages are given back
    as soon as the worker has read it."""

    def __init__(self, fd: int, bell: int, upload_at: int, ringer: int | None = None) -> None:
        self.fd = fd
        self.bell = bell
        """What the worker waits on: the server writes an upload's size + 1 to it (`ring`),
        as 8 bytes. An eventfd: a write to a pipe or a socket asks the scheduler to run the
        woken worker on the writer's core, where it preempts the event loop; an eventfd's
        wake-up lets it go to the other core. A pipe where there is no eventfd (macOS)."""
        self._ringer = bell if ringer is None else ringer
        """The end the server writes to: the eventfd itself, or the pipe's other end."""
        self._upload_at = upload_at
        self._mapped = upload_at + MAPPED_UPLOAD_BYTES
        self._map = mmap.mmap(fd, self._mapped)

    @classmethod
    def created(cls, upload_at: int) -> _Shared:
        """A new file, sized for the mapping, and a bell, for a worker about to start. Only
        its creator sizes the file: a worker that did so as it started would cut off an upload
        already written past the mapping (the first large upload after a worker was replaced)."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("vit-decode", os.MFD_CLOEXEC)
        else:
            fd, path = tempfile.mkstemp(prefix="vit-decode-")
            os.unlink(path)  # only the server and its worker, through their descriptors
        os.ftruncate(fd, upload_at + MAPPED_UPLOAD_BYTES)  # pages are allocated when written
        if hasattr(os, "eventfd"):
            return cls(fd, os.eventfd(0, os.EFD_CLOEXEC), upload_at)
        bell, ringer = os.pipe()
        return cls(fd, bell, upload_at, ringer)

    def ring(self, value: int) -> None:
        """Wake the worker with `value` (never 0)."""
        os.write(self._ringer, value.to_bytes(8, sys.byteorder))

    def heard(self) -> int:
        """In the worker: the value the server rang with."""
        return int.from_bytes(os.read(self.bell, 8), sys.byteorder)

    def put_upload(self, data: bytes) -> None:
        if len(data) <= MAPPED_UPLOAD_BYTES:
            self._map[self._upload_at : self._upload_at + len(data)] = data
        else:
            written = 0
            while written < len(data):  # a write may be short
                written += os.pwrite(self.fd, memoryview(data)[written:], self._upload_at + written)

    def take_upload(self, size: int) -> bytes:
        if size <= MAPPED_UPLOAD_BYTES:
            return self._map[self._upload_at : self._upload_at + size]
        data = os.pread(self.fd, size, self._upload_at)
        os.ftruncate(self.fd, self._mapped)
        return data

    def put_tensor(self, tensor: np.ndarray) -> None:
        self._map[: tensor.nbytes] = tensor.data

    def take_tensor(self, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        return np.frombuffer(self._map, np.float32, count).reshape(shape).copy()

    def put_picture(self, picture: np.ndarray) -> None:
        """Where the upload was: the worker has read it by now."""
        self._map[self._upload_at : self._upload_at + picture.nbytes] = picture.tobytes()

    def take_picture(self, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        picture = np.frombuffer(self._map, np.uint8, count, offset=self._upload_at)
        return picture.reshape(shape).copy()

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
        os.close(self.bell)
        if self._ringer != self.bell:
            os.close(self._ringer)


class _Popen(popen_forkserver.Popen):
    """multiprocessing's fork-server launch, less one step: the child does not re-run the
    parent's `__main__` (vit-serve's imports FastAPI and onnxruntime, ~100 MB a worker would
    carry for nothing). The rest is CPython's `Popen._launch` as it stands in 3.11-3.13."""

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_name", None)
        prep_data.pop("init_main_from_path", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)  # type: ignore[attr-defined]
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(
            self,
            util.close_fds,  # type: ignore[attr-defined]
            (_parent_w, self.sentinel),
        )
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _Process(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _Popen:
        return _Popen(process_obj)


@dataclass(eq=False)
class _Worker:
    """One decoding process, the server's end of the connection its answers come back on, and
    the file that carries the data; replaced in place when killed."""

    process: _Process
    conn: Connection
    shared: _Shared


@dataclass(eq=False)
class _Job:
    """One upload, its answer-to-be, the request it belongs to, and while it is being decoded,
    its worker and deadline."""

    data: bytes
    answer: asyncio.Future[Decoded]
    request: object
    picture: bool = False
    worker: _Worker | None = None
    deadline: asyncio.TimerHandle | None = None


class _TakenInTurns:
    """Images waiting for a worker, taken in turns by request: the next image of each request
    with any waiting, round and round. A request of 64 slow images then delays another one's
    image by one image of its own, not by all 64, and a client cannot starve the others by
    sending many images at once (only by sending many requests, which admission bounds)."""

    def __init__(self) -> None:
        self._turns: OrderedDict[object, deque[_Job]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._turns)

    def append(self, job: _Job) -> None:
        self._turns.setdefault(job.request, deque()).append(job)

    def popleft(self) -> _Job:
        request, jobs = next(iter(self._turns.items()))
        job = jobs.popleft()
        if jobs:
            self._turns.move_to_end(request)
        else:
            del self._turns[request]
        return job

    def remove(self, job: _Job) -> None:
        """Take `job` out if it is still waiting."""
        jobs = self._turns.get(job.request)
        if jobs is None or job not in jobs:
            return
        jobs.remove(job)
        if not jobs:
            del self._turns[job.request]

    def drain(self) -> list[_Job]:
        """Every waiting job, none left."""
        jobs = [job for waiting in self._turns.values() for job in waiting]
        self._turns.clear()
        return jobs


class DecodeWorkers:
    """`workers` decoding processes, driven from the event loop.

    Each image may use `memory_bytes` beyond what its worker holds at rest and `timeout_s`
    seconds; a worker that overruns either is killed and replaced, and the image is a 422
    `too_expensive_to_decode`. A request that fails, times out or loses its client stops its
    images: those not started never are, and a running one has its worker killed.

    A worker's answer is read in a callback of the event loop, which gives the worker the next
    waiting image at once: under load the workers never wait for a task to be scheduled.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        *,
        workers: int,
        max_pixels: int,
        memory_bytes: int,
        timeout_s: float,
        on_replaced: Replaced,
    ) -> None:
        self._spec_json = spec.model_dump_json()
        self._max_pixels = max_pixels
        self._memory_bytes = memory_bytes
        self._memory_limit = memory_bytes if enforces_memory_limits() else None
        """What a worker holds an image to; None where the kernel would not enforce it."""
        if self._memory_limit is None:
            missing_protection(
                f"decoding workers run without a memory limit on {sys.platform}: its kernel "
                "does not enforce RLIMIT_AS, so an image that needs more than "
                "VIT_DECODE_MEMORY_BYTES is stopped only by VIT_DECODE_TIMEOUT_S (VIT_MAX_PIXELS "
                "still refuses the largest images before decoding)"
            )
        self._timeout_s = timeout_s
        self._on_replaced = on_replaced
        tensor_bytes = 3 * spec.input_size * spec.input_size * np.dtype(np.float32).itemsize
        pages = mmap.PAGESIZE
        self._upload_at = (tensor_bytes + pages - 1) // pages * pages
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__])
        self._count = workers
        # Idle workers and the images waiting for one. A replaced worker may come back from
        # a thread after its event loop has closed (tests run several loops): a lock.
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._waiting = _TakenInTurns()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replacing = ThreadPoolExecutor(workers, thread_name_prefix="decode-replace")
        self._closed = False

    def start(self) -> None:
        """Start the workers (blocking: the first start also starts the fork server)."""
        for _ in range(self._count):
            self._idle.append(self._spawn())

    def pids(self) -> list[int]:
        """The workers' process ids (idle ones; for tests and the memory figures)."""
        with self._lock:
            return [w.process.pid for w in self._idle if w.process.pid is not None]

    async def decode(
        self, data: bytes, *, picture: bool = False, request: object | None = None
    ) -> Decoded:
        """One upload as a (1, 3, S, S) model input, and with `picture` the upright image
        (bounded); cancelling the caller stops its decode. Images of one `request` wait
        their turn with each other's (`_TakenInTurns`); without one, an image is a request."""
        self._loop = loop = asyncio.get_running_loop()
        job = _Job(data, loop.create_future(), object() if request is None else request, picture)
        with self._lock:
            self._waiting.append(job)
        self._dispatch()
        try:
            return await job.answer
        except asyncio.CancelledError:
            with self._lock:
                self._waiting.remove(job)  # never started, where it was still waiting
            if job.worker is not None:
                self._fail(job, "abandoned", None)
            raise

    def close(self) -> None:
        """Stop the idle workers, and the others as they finish; images still waiting are
        cancelled."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            waiting = self._waiting.drain()
        self._replacing.shutdown(wait=False, cancel_futures=True)
        for job in waiting:
            job.answer.cancel()
        for worker in idle:
            self._stop(worker)

    def _dispatch(self) -> None:
        """On the event loop: give waiting images to idle workers."""
        while True:
            with self._lock:
                if not self._idle or not self._waiting:
                    return
                worker, job = self._idle.pop(), self._waiting.popleft()
            job.worker = worker
            try:
                worker.shared.put_upload(job.data)
                worker.shared.ring((len(job.data) << 1 | job.picture) + 1)
            except OSError:
                self._fail(job, "crash", UndecodableImage("the decoder stopped on this image"))
                continue
            loop = asyncio.get_running_loop()
            job.deadline = loop.call_later(self._timeout_s, self._overran, job)
            loop.add_reader(worker.conn.fileno(), self._answered, job)

    def _answered(self, job: _Job) -> None:
        """On the event loop, when the worker has answered or gone: settle the image, and
        give the worker the next one before its caller even wakes."""
        worker = job.worker
        assert worker is not None
        try:
            reply = worker.conn.recv()
        except (EOFError, OSError):
            self._fail(job, "crash", UndecodableImage("the decoder stopped on this image"))
            return
        if reply[0] == "memory":
            self._fail(
                job,
                "memory",
                TooExpensiveToDecode(
                    f"decoding needs more than the limit of {self._memory_bytes} bytes"
                ),
            )
            return
        outcome: Decoded | ImageError
        if reply[0] == "ok":
            _, image_format, mode, rotated, upright_size, box, shape, picture_shape = reply
            outcome = Decoded(
                worker.shared.take_tensor(shape),
                image_format,
                mode,
                rotated,
                upright_size,
                box,
                None if picture_shape is None else worker.shared.take_picture(picture_shape),
            )
        else:
            _, kind, message = reply
            outcome = _ERRORS.get(kind, UndecodableImage)(message)
        self._unwatch(job)
        self._free(worker)
        _settle(job.answer, outcome)

    def _overran(self, job: _Job) -> None:
        self._fail(
            job,
            "time",
            TooExpensiveToDecode(f"decoding took longer than the limit of {self._timeout_s:g} s"),
        )

    def _fail(self, job: _Job, why: str, error: ImageError | None) -> None:
        """Kill the job's worker now (its successor is forked off the event loop, a fork takes
        milliseconds) and settle the job with `error` unless its caller has gone."""
        worker = job.worker
        assert worker is not None
        self._unwatch(job)
        worker.process.kill()
        self._on_replaced(why)
        try:
            self._replacing.submit(self._respawn, worker)
        except RuntimeError:  # closed
            self._stop(worker)
        if error is not None:
            _settle(job.answer, error)

    def _unwatch(self, job: _Job) -> None:
        assert job.worker is not None
        if job.deadline is not None:
            job.deadline.cancel()
        asyncio.get_running_loop().remove_reader(job.worker.conn.fileno())
        job.worker = None

    def _free(self, worker: _Worker) -> None:
        """On the event loop: `worker` is idle again; give it the next waiting image."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._idle.append(worker)
        if closed:
            self._stop(worker)
        else:
            self._dispatch()

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = _Process(
            target=_serve,
            args=(child, self._spec_json, self._max_pixels, self._memory_limit, self._upload_at),
            name="vit-decode",
            daemon=True,
        )
        process.start()
        child.close()
        shared = _Shared.created(self._upload_at)
        reduction.send_handle(parent, shared.fd, process.pid)
        reduction.send_handle(parent, shared.bell, process.pid)
        return _Worker(process, parent, shared)

    def _stop(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        worker.shared.close()

    def _respawn(self, worker: _Worker) -> None:
        """On a thread: reap the killed worker, fork its successor, hand it to the event loop
        (or make it idle, if that loop has closed)."""
        self._stop(worker)
        fresh = self._spawn()
        worker.process, worker.conn, worker.shared = fresh.process, fresh.conn, fresh.shared
        loop = self._loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._free, worker)
                return
        except RuntimeError:  # closed
            pass
        with self._lock:
            self._idle.append(worker)


def _settle(answer: asyncio.Future[Decoded], outcome: Decoded | ImageError) -> None:
    if answer.done():  # its caller has gone
        return
    if isinstance(outcome, Decoded):
        answer.set_result(outcome)
    else:
        answer.set_exception(outcome)
