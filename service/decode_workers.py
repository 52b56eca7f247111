"""Decoding in worker processes, each image under a memory limit and a time limit.

Pillow's decoders run in C and in pure Python; neither can be interrupted, and a crafted file can
make them allocate gigabytes or run for minutes. In a process of its own a decoder can be bounded
(`RLIMIT_AS`) and stopped (killed), and its memory comes back when the process goes. Workers are
forked from multiprocessing's fork server, which has this module and Pillow imported already, so
replacing a killed worker costs a fork, not an interpreter start.
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
import queue
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import forkserver, popen_forkserver, spawn, util
from multiprocessing.connection import Connection
from multiprocessing.context import (  # type: ignore[attr-defined]
    ForkServerProcess,
    reduction,
    set_spawning_popen,
)
from typing import Any

import numpy as np

from service.errors import (
    ERROR_TYPES,
    ServiceError,
    TooExpensiveToDecode,
    UndecodableImage,
)
from service.preprocess import PreprocessSpec, preprocess_upload

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.02
"""How often a decoding thread checks whether its request still wants the image."""

_ERRORS = {error.type: error for error in ERROR_TYPES}

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


@dataclass(eq=False)
class _Job:
    data: bytes
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set when the request no longer wants the answer: a running decode is killed."""


class _Abandoned(Exception):
    """The request went away while its image was being decoded."""


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


def _serve(conn: Connection, spec_json: str, max_pixels: int, memory_bytes: int) -> None:
    """A worker's life: decode each image sent, answer with its tensor or its error."""
    # libtiff and libjpeg warn on stderr; the answer carries every error that matters.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    spec = PreprocessSpec.model_validate_json(spec_json)
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    # What the worker has mapped now (interpreter, libraries) plus what one image may take.
    limit = mapped + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            tensor, decoded = preprocess_upload(data, spec, max_pixels=max_pixels)
        except Exception as error:  # every error goes back to the parent, which raises it
            del data
            if _caused_by_memory(error):
                conn.send(("memory", str(error)))
                return  # the parent replaces this worker: its heap may stay large
            kind = error.type if isinstance(error, ServiceError) else UndecodableImage.type
            conn.send(("error", kind, getattr(error, "message", str(error))))
            continue
        del data
        conn.send(("ok", decoded.format, decoded.original_mode, decoded.exif_rotated, tensor.shape))
        conn.send_bytes(tensor.data)


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
    """One decoding process and the parent's end of its pipe; replaced in place when killed."""

    process: _Process
    conn: Connection


class DecodeWorkers:
    """`workers` decoding processes and as many threads that hand them images.

    Each image may use `memory_bytes` beyond what its worker holds at rest and `timeout_s`
    seconds; a worker that overruns either is killed and replaced, and the image is a 422
    `too_expensive_to_decode`. A request that fails, times out or loses its client stops its
    images: those not started never are, and a running one has its worker killed.
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
        self._timeout_s = timeout_s
        self._on_replaced = on_replaced
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__])
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._count = workers
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self._closed = False

    def start(self) -> None:
        """Start the workers (blocking: the first start also starts the fork server)."""
        for _ in range(self._count):
            self._idle.put(self._spawn())

    def pids(self) -> list[int]:
        """The workers' process ids (idle ones; for tests and the memory figures)."""
        workers = []
        while True:
            try:
                workers.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for worker in workers:
            self._idle.put(worker)
        return [w.process.pid for w in workers if w.process.pid is not None]

    async def decode(self, data: bytes) -> Decoded:
        """One upload as a (1, 3, S, S) model input; cancelling the caller stops its decode."""
        job = _Job(data)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, self._run, job)
        except asyncio.CancelledError:
            job.abandoned.set()  # unstarted, run_in_executor's cancel already dropped it
            raise

    def close(self) -> None:
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            self._stop(worker)

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = _Process(
            target=_serve,
            args=(child, self._spec_json, self._max_pixels, self._memory_bytes),
            name="vit-decode",
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def _stop(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()

    def _replace(self, worker: _Worker, why: str) -> None:
        self._stop(worker)
        self._on_replaced(why)
        fresh = self._spawn()
        worker.process, worker.conn = fresh.process, fresh.conn

    def _run(self, job: _Job) -> Decoded:
        """On a decode thread: send the image to an idle worker, wait for the answer while
        watching the clock and the request; kill and replace the worker on an overrun."""
        if job.abandoned.is_set():
            raise _Abandoned()
        worker = self._idle.get()  # one thread per worker: one is always idle here
        try:
            return self._exchange(worker, job)
        finally:
            if self._closed:
                self._stop(worker)
            else:
                self._idle.put(worker)

    def _exchange(self, worker: _Worker, job: _Job) -> Decoded:
        try:
            worker.conn.send_bytes(job.data)
            deadline = time.monotonic() + self._timeout_s
            while not worker.conn.poll(POLL_SECONDS):
                if job.abandoned.is_set():
                    self._replace(worker, "abandoned")
                    raise _Abandoned()
                if time.monotonic() >= deadline:
                    self._replace(worker, "time")
                    raise TooExpensiveToDecode(
                        f"decoding took longer than the limit of {self._timeout_s:g} s"
                    )
            reply = worker.conn.recv()
            if reply[0] == "ok":
                _, image_format, mode, rotated, shape = reply
                tensor = np.frombuffer(worker.conn.recv_bytes(), np.float32).reshape(shape)
                return Decoded(tensor, image_format, mode, rotated)
        except (EOFError, OSError):
            self._replace(worker, "crash")
            raise UndecodableImage("the decoder stopped on this image") from None
        if reply[0] == "memory":
            self._replace(worker, "memory")
            raise TooExpensiveToDecode(
                f"decoding needs more than the limit of {self._memory_bytes} bytes"
            )
        _, kind, message = reply
        raise _ERRORS.get(kind, UndecodableImage)(message)
