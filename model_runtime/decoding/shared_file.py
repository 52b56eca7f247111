"""The memory a server and one decoding worker both map: the upload goes in, the tensor (and a
picture, when asked for) comes out."""

from __future__ import annotations

import math
import mmap
import os
import sys
import tempfile

import numpy as np

MAPPED_UPLOAD_BYTES = 1024 * 1024
"""Uploads up to this size are copied through memory the server and the worker both map."""

PICTURE_SIDE = 512
"""The longest side of the upright picture a worker sends back when asked (for an overlay):
bounded so that it fits where the upload was, in the mapped memory."""
assert PICTURE_SIDE * PICTURE_SIDE * 3 <= MAPPED_UPLOAD_BYTES


class SharedFile:
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
    def created(cls, upload_at: int) -> SharedFile:
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
