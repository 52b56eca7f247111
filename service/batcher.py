"""Dynamic batching with backpressure: queued tensors -> one onnxruntime call -> each caller's rows.

Places are counted in images and held from submission until the caller's inference has really
returned, so the queue bound is a bound on the work the service has accepted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, Overloaded
from service.metrics import Metrics

logger = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(eq=False)
class _Job:
    inputs: np.ndarray
    deadline: float
    enqueued: float
    future: asyncio.Future[np.ndarray]
    started: bool = False


@dataclass
class _Throughput:
    """Images per second of recent inference calls (an exponential moving average)."""

    images_per_second: float = 0.0
    smoothing: float = field(default=0.2)

    def observe(self, images: int, seconds: float) -> None:
        rate = images / max(seconds, 1e-6)
        if self.images_per_second == 0.0:
            self.images_per_second = rate
        else:
            self.images_per_second += self.smoothing * (rate - self.images_per_second)


class Batcher:
    """Forms batches of up to `max_batch_size` images, waiting at most `max_delay` for more."""

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_delay: float,
        max_queue: int,
        metrics: Metrics,
    ) -> None:
        self._predict = predict
        self._max_batch_size = max_batch_size
        self._max_delay = max_delay
        self._max_queue = max_queue
        self._metrics = metrics
        self._queue: deque[_Job] = deque()
        self._held = 0
        self._wake = asyncio.Event()
        self._throughput = _Throughput()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._worker: asyncio.Task[None] | None = None
        self.consecutive_failures = 0
        """onnxruntime calls that raised or returned non-finite numbers since the last good one."""

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def is_full(self, incoming: int) -> bool:
        """Whether `incoming` more images would exceed the queue bound."""
        return self._held + incoming > self._max_queue

    def retry_after(self) -> int:
        """Seconds until the work already held should be done, at the measured throughput."""
        rate = self._throughput.images_per_second
        return max(1, math.ceil(self._held / rate)) if rate > 0 else 1

    async def submit(self, inputs: np.ndarray, deadline: float) -> np.ndarray:
        """The output rows for `inputs`; 503 when the queue is full, 504 past the deadline."""
        count = len(inputs)
        if self._held + count > self._max_queue:
            raise Overloaded("the inference queue is full", retry_after=self.retry_after())
        now = time.monotonic()
        job = _Job(inputs, deadline, now, asyncio.get_running_loop().create_future())
        self._hold(count)
        self._queue.append(job)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), max(0.0, deadline - now))
        except TimeoutError:
            if job.started:  # its inference is running: the answer is moments away
                return await job.future
            self._expire(job)
            raise DeadlineExceeded("the request's deadline passed while it was queued") from None
        except asyncio.CancelledError:
            if not job.started:
                self._expire(job)
            raise

    def _hold(self, count: int) -> None:
        self._held += count
        self._metrics.queue_depth.set(self._held)

    def _release(self, count: int) -> None:
        self._held -= count
        self._metrics.queue_depth.set(self._held)

    def _expire(self, job: _Job) -> None:
        if job in self._queue:
            self._queue.remove(job)
            self._release(len(job.inputs))
        if not job.future.done():
            job.future.cancel()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = await self._collect()
                if batch:
                    await self._infer(batch)

    async def _collect(self) -> list[_Job]:
        """Jobs for one call: whole requests, at most max_batch_size images unless one is larger."""
        if self._max_delay > 0 and self._queued_images() < self._max_batch_size:
            closes = time.monotonic() + self._max_delay
            while self._queued_images() < self._max_batch_size:
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
        batch: list[_Job] = []
        images = 0
        now = time.monotonic()
        while self._queue:
            job = self._queue[0]
            if job.deadline <= now:
                self._queue.popleft()
                self._release(len(job.inputs))
                if not job.future.done():
                    job.future.set_exception(
                        DeadlineExceeded("the request's deadline passed while it was queued")
                    )
                continue
            if batch and images + len(job.inputs) > self._max_batch_size:
                break
            self._queue.popleft()
            job.started = True
            batch.append(job)
            images += len(job.inputs)
        return batch

    def _queued_images(self) -> int:
        return sum(len(job.inputs) for job in self._queue)

    async def _infer(self, batch: list[_Job]) -> None:
        inputs = np.concatenate([job.inputs for job in batch])
        started = time.monotonic()
        for job in batch:
            self._metrics.stage_seconds.labels("queue_wait").observe(started - job.enqueued)
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self._predict, inputs)
            if not np.isfinite(outputs).all():
                raise FloatingPointError("the model returned NaN or infinite values")
        except Exception as error:
            logger.exception("inference failed on a batch of %d images", len(inputs))
            self.consecutive_failures += 1
            failure = InferenceFailed(f"inference failed: {type(error).__name__}")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(failure)
            return
        finally:
            self._release(len(inputs))
        self.consecutive_failures = 0
        elapsed = time.monotonic() - started
        self._throughput.observe(len(inputs), elapsed)
        self._metrics.stage_seconds.labels("inference").observe(elapsed)
        self._metrics.batch_size.observe(len(inputs))
        offset = 0
        for job in batch:
            rows = outputs[offset : offset + len(job.inputs)]
            offset += len(job.inputs)
            if not job.future.done():
                job.future.set_result(rows)
