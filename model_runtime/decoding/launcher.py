"""Starting and ending decoding workers, through public APIs only.

A worker is forked from a launcher: one small process per server, started with `subprocess`,
that has Pillow, numpy and the worker's code imported and does nothing but fork workers when
asked and reap them when told. A worker so costs a fork (milliseconds) and none of the server's
memory: it never holds FastAPI, onnxruntime or a model. The launcher reaps a worker only when
the server says so, so a worker's process id cannot be reused while the server may still signal
it; where the platform has process descriptors (`pidfd`, Linux), signals go through one anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from model_contract.preprocess import PreprocessSpec
from model_runtime.decoding import messages
from model_runtime.decoding.shared_file import SharedFile


@dataclass(frozen=True)
class WorkerProcess:
    """A running worker, as the server sees it."""

    pid: int
    pidfd: int | None
    """A descriptor of exactly this process, where the platform has them."""

    def kill(self) -> None:
        """Stop the worker now, whatever it is doing (it is reaped later, by `Launcher.reap`)."""
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)


@dataclass(frozen=True)
class WorkerLimits:
    """What a worker is started with."""

    spec: PreprocessSpec
    max_pixels: int
    memory_bytes: int | None
    """None: no memory limit (the kernel would not enforce it)."""
    upload_at: int


class Launcher:
    """The server's end of the launcher process: started on first use, started again if it
    has gone. Safe to call from several threads (each call is one exchange, in turn)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        """The launcher process's id, while one runs (for the process tree's memory figures)."""
        return None if self._process is None else self._process.pid

    def launch(
        self, conn: socket.socket, shared: SharedFile, limits: WorkerLimits
    ) -> WorkerProcess:
        """A new worker answering on `conn`, decoding through `shared`."""
        order = [
            "launch",
            limits.spec.model_dump_json(),
            limits.max_pixels,
            limits.memory_bytes,
            limits.upload_at,
        ]
        fds = [conn.fileno(), shared.fd, shared.bell]
        with self._lock:
            try:
                pid: int = self._exchange(order, fds)
            except (messages.ChannelClosed, OSError):
                self._close_locked()  # the launcher has gone: one fresh try
                pid = self._exchange(order, fds)
        pidfd = None
        if hasattr(os, "pidfd_open"):
            pidfd = os.pidfd_open(pid)  # not reaped yet: it is this worker, alive or not
        return WorkerProcess(pid, pidfd)

    def reap(self, worker: WorkerProcess) -> None:
        """Kill `worker` if it runs and wait until it is gone."""
        worker.kill()
        with self._lock:
            with contextlib.suppress(messages.ChannelClosed, OSError):
                self._exchange(["reap", worker.pid], [])
        if worker.pidfd is not None:
            os.close(worker.pidfd)

    def close(self) -> None:
        """Stop the launcher; its workers end when their server ends go."""
        with self._lock:
            self._close_locked()

    def _exchange(self, order: list[object], fds: list[int]) -> Any:
        sock = self._sock if self._sock is not None else self._start()
        messages.send_with_fds(sock, order, fds)
        return messages.receive(sock)

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        code = (
            f"import sys; sys.path[:] = {sys.path!r}; "
            "from model_runtime.decoding.launcher import serve_launches; "
            f"serve_launches({theirs.fileno()})"
        )
        # Workers decode one image each: BLAS threads would only take memory.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self._sock = ours
        return ours

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


_launcher = Launcher()
atexit.register(_launcher.close)


def launcher() -> Launcher:
    """The launcher every pool of this process shares: the process count grows with the
    workers, never with the models."""
    return _launcher


def serve_launches(fd: int) -> None:
    """The launcher process: fork a worker for each "launch", reap one for each "reap", until
    the server goes."""
    from model_runtime.decoding import worker  # imported once here, inherited by every worker

    sock = socket.socket(fileno=fd)
    while True:
        try:
            order, fds = messages.receive_with_fds(sock, 3)
        except messages.ChannelClosed:
            return
        if order[0] == "launch":
            _, spec_json, max_pixels, memory_bytes, upload_at = order
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    sock.close()
                    conn = socket.socket(fileno=fds[0])
                    shared = SharedFile(fds[1], fds[2], upload_at)
                    spec = PreprocessSpec.model_validate_json(spec_json)
                    worker.serve(conn, shared, spec, max_pixels, memory_bytes)
                    code = 0
                finally:
                    os._exit(code)
            for received in fds:
                os.close(received)
            messages.send(sock, pid)
        else:
            _, pid = order  # the server has killed it: only a child of this launcher is waited for
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            messages.send(sock, "reaped")
