"""Starting and ending decoding workers, through public APIs only.

A worker is forked from a launcher: one small process per server, started with `subprocess`,
that has Pillow, numpy and the worker's code imported and does nothing but fork workers when
asked and reap them when told. A worker so costs a fork (milliseconds) and none of the server's
memory: it never holds FastAPI, onnxruntime or a model, nor the server's secrets (its
environment is `child_environment()`'s). The launcher reaps only its own children, and only
when the server says so, so a worker's process id cannot be reused while the server may still
signal it; where the platform has process descriptors (`pidfd`, Linux), signals go through one
anyway, which also covers the workers of a launcher that died and was started again.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from model_runtime.decoding import messages
from model_runtime.decoding.shared_file import SharedFile
from model_runtime.platform import child_environment

logger = logging.getLogger(__name__)

EXCHANGE_TIMEOUT_S = 60.0
"""The longest the server waits for the launcher to answer (its first answer includes its
interpreter's start): past it, the launcher is replaced."""


@dataclass(frozen=True)
class WorkerProcess:
    """A running worker, as the server sees it."""

    pid: int
    pidfd: int | None
    """A descriptor of exactly this process, where the platform has them."""
    launcher: int
    """Which launcher forked it (they are numbered as they start): only that one reaps it."""

    def kill(self) -> None:
        """Stop the worker now, whatever it is doing (it is reaped later, by `Launcher.reap`).
        Without a pidfd, only while its launcher runs: a launcher that died left its workers to
        init, which may have reaped them and given their ids to other processes."""
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif launcher().runs(self.launcher):
                os.kill(self.pid, signal.SIGKILL)


@dataclass(frozen=True)
class WorkerLimits:
    """What a worker is started with: the same for every image and every model (each image's
    preprocessing comes with it)."""

    max_pixels: int
    memory_bytes: int | None
    """None: no memory limit (the kernel would not enforce it)."""


class Launcher:
    """The server's end of the launcher process: started on first use, started again if it
    has gone. Safe to call from several threads (each call is one exchange, in turn)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._number = 0
        """The running launcher's number (0: none has started)."""

    @property
    def pid(self) -> int | None:
        """The launcher process's id, while one runs (for the process tree's memory figures)."""
        return None if self._process is None else self._process.pid

    def runs(self, number: int) -> bool:
        """Whether launcher `number` is the one running."""
        return self._sock is not None and number == self._number

    def launch(
        self, conn: socket.socket, shared: SharedFile, limits: WorkerLimits
    ) -> WorkerProcess:
        """A new worker answering on `conn`, decoding through `shared`."""
        order = ["launch", limits.max_pixels, limits.memory_bytes]
        fds = [conn.fileno(), shared.fd, shared.bell]
        with self._lock:
            try:
                pid: int = self._exchange(order, fds)
            except (messages.ChannelClosed, OSError):
                self._close_locked()  # the launcher has gone, or hangs: one fresh try
                pid = self._exchange(order, fds)
            number = self._number
        pidfd = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)  # not reaped yet: it is this worker, alive or not
        return WorkerProcess(pid, pidfd, number)

    def reap(self, worker: WorkerProcess) -> None:
        """Kill `worker` if it runs and, where its launcher still runs, wait until it is gone."""
        worker.kill()
        with self._lock:
            if self.runs(worker.launcher):
                try:
                    self._exchange(["reap", worker.pid], [])
                except (messages.ChannelClosed, OSError):
                    self._close_locked()
        if worker.pidfd is not None:
            os.close(worker.pidfd)

    def close(self) -> None:
        """Stop the launcher; its workers end when the server closes their sockets."""
        with self._lock:
            self._close_locked()

    def _exchange(self, order: list[object], fds: list[int]) -> Any:
        sock = self._sock if self._sock is not None else self._start()
        messages.send_with_fds(sock, order, fds)
        return messages.receive(sock)

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.settimeout(EXCHANGE_TIMEOUT_S)
        code = (
            f"import sys; sys.path[:] = {sys.path!r}; "
            "from model_runtime.decoding.launcher import serve_launches; "
            f"serve_launches({theirs.fileno()})"
        )
        # Workers decode one image each: BLAS threads would only take memory.
        env = child_environment({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self._sock = ours
        self._number += 1
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
    """The launcher every pool of this process shares (a server has one pool, for every
    model; tests start many)."""
    return _launcher


def serve_launches(fd: int) -> None:
    """The launcher process: fork a worker for each "launch", reap one of its own for each
    "reap", until the server goes."""
    from model_runtime.decoding import worker  # imported once here, inherited by every worker

    sock = socket.socket(fileno=fd)
    children: set[int] = set()
    while True:
        try:
            order, fds = messages.receive_with_fds(sock, 3)
        except messages.ChannelClosed:
            return
        if order[0] == "launch":
            _, max_pixels, memory_bytes = order
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    sock.close()
                    conn = socket.socket(fileno=fds[0])
                    shared = SharedFile(fds[1], fds[2])
                    worker.serve(conn, shared, max_pixels, memory_bytes)
                    code = 0
                finally:
                    os._exit(code)
            children.add(pid)
            for received in fds:
                os.close(received)
            messages.send(sock, pid)
        else:
            _, pid = order
            if pid in children:  # the server has killed it: wait for it to be gone
                children.discard(pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            messages.send(sock, "reaped")
