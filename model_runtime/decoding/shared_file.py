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

MAPPED_TENSOR_SIDE = 1024
"""Tensors of a square input up to this side come back through memory both map, larger ones
through the file past the mapping. A worker decodes for every model, so the mapping is sized
for the inputs models have, not for one model's: it costs address space, and memory only for
the pages a tensor writes."""

MAPPED_TENSOR_BYTES = 3 * MAPPED_TENSOR_SIDE * MAPPED_TENSOR_SIDE * np.dtype(np.float32).itemsize
assert MAPPED_TENSOR_BYTES % mmap.PAGESIZE == 0

PICTURE_SIDE = 512
"""The longest side of the upright picture a worker sends back when asked (for an overlay):
bounded so that it fits where the upload was, in the mapped memory."""
assert PICTURE_SIDE * PICTURE_SIDE * 3 <= MAPPED_UPLOAD_BYTES

_UPLOAD_AT = MAPPED_TENSOR_BYTES
_MAPPED = MAPPED_TENSOR_BYTES + MAPPED_UPLOAD_BYTES


class SharedFile:
    """A worker's file in memory (a memfd; an unlinked temporary file where there is none, as
    on macOS), mapped by the server and by the worker: the tensor at 0, the upload after
    MAPPED_TENSOR_BYTES. A pipe would move them in 64 KB pieces, each a wake-up of the other
    side, and `pread`/`pwrite` cost several times a copy through the mapping. An upload over
    MAPPED_UPLOAD_BYTES, or a tensor over MAPPED_TENSOR_BYTES, goes into the file past the
    mapping, and its pages are given back as soon as the other side has read it."""

    def __init__(self, fd: int, bell: int, ringer: int | None = None) -> None:
        self.fd = fd
        self.bell = bell
        """What the worker waits on: the server writes an upload's size + 1 to it (`ring`),
        as 8 bytes. An eventfd: a write to a pipe or a socket asks the scheduler to run the
        woken worker on the writer's core, where it preempts the event loop; an eventfd's
        wake-up lets it go to the other core. A pipe where there is no eventfd (macOS)."""
        self._ringer = bell if ringer is None else ringer
        """The end the server writes to: the eventfd itself, or the pipe's other end."""
        self._map = mmap.mmap(fd, _MAPPED)

    @classmethod
    def created(cls) -> SharedFile:
        """A new file, sized for the mapping, and a bell, for a worker about to start. Only
        its creator sizes the file: a worker that did so as it started would cut off an upload
        already written past the mapping (the first large upload after a worker was replaced)."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("vit-decode", os.MFD_CLOEXEC)
        else:
            fd, path = tempfile.mkstemp(prefix="vit-decode-")
            os.unlink(path)  # only the server and its worker, through their descriptors
        os.ftruncate(fd, _MAPPED)  # pages are allocated when written
        if hasattr(os, "eventfd"):
            return cls(fd, os.eventfd(0, os.EFD_CLOEXEC))
        bell, ringer = os.pipe()
        return cls(fd, bell, ringer)

    def ring(self, value: int) -> None:
        """Wake the worker with `value` (never 0)."""
        os.write(self._ringer, value.to_bytes(8, sys.byteorder))

    def heard(self) -> int:
        """In the worker: the value the server rang with."""
        return int.from_bytes(os.read(self.bell, 8), sys.byteorder)

    def put_upload(self, data: bytes) -> None:
        if len(data) <= MAPPED_UPLOAD_BYTES:
            self._map[_UPLOAD_AT : _UPLOAD_AT + len(data)] = data
        else:
            self._write_past_mapping(data, _UPLOAD_AT)

    def take_upload(self, size: int) -> bytes:
        if size <= MAPPED_UPLOAD_BYTES:
            return self._map[_UPLOAD_AT : _UPLOAD_AT + size]
        return self._read_past_mapping(size, _UPLOAD_AT)

    def put_tensor(self, tensor: np.ndarray) -> None:
        """Once the upload is taken: past the mapping, a large one's place is free again."""
        if tensor.nbytes <= MAPPED_TENSOR_BYTES:
            self._map[: tensor.nbytes] = tensor.data
        else:
            self._write_past_mapping(tensor.tobytes(), _MAPPED)

    def take_tensor(self, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        size = count * np.dtype(np.float32).itemsize
        if size <= MAPPED_TENSOR_BYTES:
            return np.frombuffer(self._map, np.float32, count).reshape(shape).copy()
        data = self._read_past_mapping(size, _MAPPED)
        return np.frombuffer(data, np.float32, count).reshape(shape).copy()

    def put_picture(self, picture: np.ndarray) -> None:
        """Where the upload was: the worker has read it by now."""
        self._map[_UPLOAD_AT : _UPLOAD_AT + picture.nbytes] = picture.tobytes()

    def take_picture(self, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        picture = np.frombuffer(self._map, np.uint8, count, offset=_UPLOAD_AT)
        return picture.reshape(shape).copy()

    def _write_past_mapping(self, data: bytes, at: int) -> None:
        written = 0
        while written < len(data):  # a write may be short
            written += os.pwrite(self.fd, memoryview(data)[written:], at + written)

    def _read_past_mapping(self, size: int, at: int) -> bytes:
        """What was written from `at`, then the file cut back to the mapping: its pages go."""
        data = os.pread(self.fd, size, at)
        os.ftruncate(self.fd, _MAPPED)
        return data

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
        os.close(self.bell)
        if self._ringer != self.bell:
            os.close(self._ringer)
