"""Decoding workers driven from the event loop, one pool for every model of a server: each
upload to an idle worker with its model's preprocessing, its answer read in a callback, overruns
killed and replaced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from model_contract.errors import (
    ImageError,
    TooExpensiveToDecode,
    TooManyPixels,
    UndecodableImage,
    UnsupportedImageFormat,
)
from model_contract.preprocess import PreprocessSpec
from model_runtime.decoding import messages
from model_runtime.decoding.launcher import WorkerLimits, WorkerProcess, launcher
from model_runtime.decoding.shared_file import SharedFile
from model_runtime.decoding.turns import TakenInTurns
from model_runtime.platform import enforces_memory_limits, missing_protection

logger = logging.getLogger(__name__)

_ERRORS: dict[str, type[ImageError]] = {
    error.__name__: error
    for error in (UnsupportedImageFormat, UndecodableImage, TooManyPixels, TooExpensiveToDecode)
}
"""The image errors a worker's answer may name; anything else it met is `UndecodableImage`."""

Replaced = Callable[[str], None]
"""Told why the worker of an image was killed and replaced: "memory" or "time" (the image
overran that limit), "crash" (the decoder died) or "abandoned" (its request went away)."""


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
    decoded_ns: tuple[int, int] = (0, 0)
    """When its worker began and finished it, in nanoseconds since the epoch."""
    picture: np.ndarray | None = None
    """The upright image, at most PICTURE_SIDE on its longest side, as (H, W, 3) uint8: only
    when asked for."""


@dataclass(eq=False)
class _Worker:
    """One decoding process, the server's end of the socket its answers come back on, and
    the file that carries the data; replaced in place when killed."""

    process: WorkerProcess
    conn: socket.socket
    shared: SharedFile
    spec: PreprocessSpec | None = None
    """The preprocessing it was last sent (None: none yet): sent again only for another."""


@dataclass(eq=False)
class _Job:
    """One upload, the preprocessing of its model, its answer-to-be, the request it belongs
    to, who is told if its worker is replaced, and while it is being decoded, its worker and
    deadline."""

    data: bytes
    spec: PreprocessSpec
    answer: asyncio.Future[Decoded]
    request: object
    on_replaced: Replaced
    picture: bool = False
    worker: _Worker | None = None
    deadline: asyncio.TimerHandle | None = None


class DecodeWorkers:
    """`workers` decoding processes, driven from the event loop: one pool per server, whatever
    the number of models. Each image comes with its model's `PreprocessSpec`.

    Each image may use `memory_bytes` beyond what its worker holds at rest and `timeout_s`
    seconds; a worker that overruns either is killed and replaced, and the image is
    `TooExpensiveToDecode`. A request that fails, times out or loses its client stops its
    images: those not started never are, and a running one has its worker killed.

    A worker's answer is read in a callback of the event loop, which gives the worker the next
    waiting image at once: under load the workers never wait for a task to be scheduled.
    """

    def __init__(
        self, *, workers: int, max_pixels: int, memory_bytes: int, timeout_s: float
    ) -> None:
        self._memory_bytes = memory_bytes
        memory_limit = memory_bytes if enforces_memory_limits() else None
        if memory_limit is None:
            missing_protection(
                f"decoding workers run without a memory limit on {sys.platform}: its kernel "
                "does not enforce RLIMIT_AS, so an image that needs more than "
                "VIT_DECODE_MEMORY_BYTES is stopped only by VIT_DECODE_TIMEOUT_S (VIT_MAX_PIXELS "
                "still refuses the largest images before decoding)"
            )
        self._limits = WorkerLimits(max_pixels, memory_limit)
        self._timeout_s = timeout_s
        self._count = workers
        # Idle workers and the images waiting for one. A replaced worker may come back from
        # a thread after its event loop has closed (tests run several loops): a lock.
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._waiting: TakenInTurns[_Job] = TakenInTurns()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replacing = ThreadPoolExecutor(workers, thread_name_prefix="decode-replace")
        self._closed = False

    def start(self) -> None:
        """Start the workers (blocking: the first start in a process also starts the launcher)."""
        for _ in range(self._count):
            self._idle.append(self._spawn())

    def pids(self) -> list[int]:
        """The workers' process ids (idle ones; for tests and the memory figures)."""
        with self._lock:
            return [w.process.pid for w in self._idle]

    async def decode(
        self,
        data: bytes,
        spec: PreprocessSpec,
        *,
        on_replaced: Replaced,
        picture: bool = False,
        request: object | None = None,
    ) -> Decoded:
        """One upload as a (1, 3, S, S) input of the model `spec` preprocesses for, and with
        `picture` the upright image (bounded); cancelling the caller stops its decode.
        `on_replaced` is told if this image's worker is replaced (its model's metric). Images
        of one `request` wait their turn with each other's (`TakenInTurns`), whatever their
        models; without one, an image is a request."""
        self._loop = loop = asyncio.get_running_loop()
        request = object() if request is None else request
        job = _Job(data, spec, loop.create_future(), request, on_replaced, picture)
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
        cancelled. Blocking (each worker is reaped): call it off the event loop."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            waiting = self._waiting.drain()
        # Replacements already asked for still run: each reaps the worker it replaces.
        self._replacing.shutdown(wait=False)
        for job in waiting:
            with contextlib.suppress(RuntimeError):  # its event loop has closed
                job.answer.get_loop().call_soon_threadsafe(job.answer.cancel)
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
                if worker.spec is not job.spec:  # read by the worker before the bell
                    messages.send(worker.conn, job.spec.model_dump(mode="json"))
                    worker.spec = job.spec
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
            reply = messages.receive(worker.conn)
        except messages.ChannelClosed:
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
            _, image_format, mode, rotated, upright, box, picture_shape, began, ended = reply
            side = job.spec.input_size  # not the worker's word: it sizes what is read back
            outcome = Decoded(
                worker.shared.take_tensor((1, 3, side, side)),
                image_format,
                mode,
                rotated,
                (upright[0], upright[1]),
                (box[0], box[1], box[2], box[3]),
                (int(began), int(ended)),
                None if picture_shape is None else worker.shared.take_picture(tuple(picture_shape)),
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
        job.on_replaced(why)
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
        if closed:  # reaped off the event loop
            threading.Thread(target=self._stop, args=(worker,), daemon=True).start()
        else:
            self._dispatch()

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        shared = SharedFile.created()
        try:
            process = launcher().launch(theirs, shared, self._limits)
        except BaseException:
            ours.close()
            shared.close()
            raise
        finally:
            theirs.close()
        return _Worker(process, ours, shared)

    def _stop(self, worker: _Worker) -> None:
        launcher().reap(worker.process)
        worker.conn.close()
        worker.shared.close()

    def _respawn(self, worker: _Worker) -> None:
        """On a thread: reap the killed worker, fork its successor, hand it to the event loop
        (or make it idle, if that loop has closed)."""
        self._stop(worker)
        with self._lock:
            if self._closed:
                return
        try:
            fresh = self._spawn()
        except Exception:
            logger.exception("a decoding worker could not be replaced: one fewer serves")
            return
        worker.process, worker.conn, worker.shared = fresh.process, fresh.conn, fresh.shared
        worker.spec = None
        loop = self._loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._free, worker)
                return
        except RuntimeError:  # its event loop has closed
            pass
        with self._lock:
            closed = self._closed
            if not closed:
                self._idle.append(worker)
        if closed:
            self._stop(worker)


def _settle(answer: asyncio.Future[Decoded], outcome: Decoded | ImageError) -> None:
    if answer.done():  # its caller has gone
        return
    if isinstance(outcome, Decoded):
        answer.set_result(outcome)
    else:
        answer.set_exception(outcome)
