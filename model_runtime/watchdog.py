"""Every onnxruntime call bounded in time: past its bound, its `RunOptions.terminate` is set, which
onnxruntime checks between operators (inside loop bodies too), and the call fails.

A graph can run for as long as its inputs tell it to (a `Loop` whose trip count comes from the
pixels), and a thread stuck in onnxruntime can never be stopped otherwise. One thread watches
every call in the process and sleeps until the earliest deadline, so a call costs a lock and a
dictionary entry, not a timer thread of its own.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import onnxruntime as ort


class InferenceOverran(RuntimeError):
    """An onnxruntime call outlasted its bound and was stopped."""


class Watchdog:
    """Sets `terminate` on the run options of calls past their deadline."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[float, ort.RunOptions]] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def bounded(
        self, seconds: float, options: ort.RunOptions | None = None
    ) -> Iterator[ort.RunOptions]:
        """Run options (`options`, or new ones) that are told to stop `seconds` from now, for one
        call at a time. InferenceOverran replaces the call's error where they were."""
        options = options if options is not None else ort.RunOptions()
        options.log_severity_level = 4  # fatal only: the stop is raised and said once, here
        key = id(options)
        with self._changed:
            self._calls[key] = (time.monotonic() + seconds, options)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield options
        except Exception as error:
            if options.terminate:
                raise InferenceOverran(
                    f"an inference outlasted its {seconds:.0f} s bound and was stopped"
                ) from error
            raise
        finally:
            with self._changed:
                self._calls.pop(key, None)
            options.terminate = False  # reusable: never set again once it is unwatched

    def _watch(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for key, (deadline, options) in list(self._calls.items()):
                    if deadline <= now:
                        options.terminate = True
                        del self._calls[key]
                upcoming = [deadline for deadline, _ in self._calls.values()]
                self._changed.wait(min(upcoming) - now if upcoming else None)


@functools.cache
def watchdog() -> Watchdog:
    """The process's one watchdog, made on first use."""
    return Watchdog()
