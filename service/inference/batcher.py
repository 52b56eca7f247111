"""Dynamic batching with backpressure: queued tensors -> one onnxruntime call -> each caller's
rows of every named output.

Places are counted in images and held from submission until the caller's inference has really
returned, so the queue bound is a bound on the work the service has accepted.

The batching loop runs on its own threads (`workers` of them, each taking whole batches), which
take the next batch the moment a call returns. Run as an asyncio task instead, every hand-off
waited for a turn of a busy event loop: under load the inference thread stood idle about a
fifth of the time (profiled at twice capacity).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link

from model_runtime.scheduling import run_as_batch_work
from model_runtime.session import Outputs
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded
from service.metrics import Exemplar, ModelMetrics, exemplar_of
from service.observability.tracing import Tracing

logger = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], Outputs]


@dataclass(eq=False)
class _Job:
    inputs: np.ndarray
    deadline: float
    enqueued: float
    future: asyncio.Future[Outputs]
    counted: bool = True
    """A client's images, measured in the metrics; the service's own (warm-up, self-test,
    recovery probes) are not traffic."""
    started: bool = False
    """Taken by the batching thread: its answer will come, whatever its deadline says."""
    trace: otel_context.Context | None = None
    """The request's trace context, while tracing is on and the job is a traced request's."""
    enqueued_ns: int = 0
    """When it was queued, in nanoseconds since the epoch (for its span), while traced."""

    def exemplar(self) -> Exemplar:
        if self.trace is None:
            return None
        return exemplar_of(trace.get_current_span(self.trace).get_span_context())


@dataclass(frozen=True)
class _Call:
    """One onnxruntime call: which images of the batch it ran, and when (ns since the epoch)."""

    first: int
    images: int
    started_ns: int
    ended_ns: int


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


def call_share(queued: int, running: int, workers: int, max_batch_size: int) -> int:
    """Images the next call may hold: an even share, among the calls that may run at once, of
    the images queued and those in calls running, within `max_batch_size`. A call that took
    everything queued while another ran a few images would keep its requests waiting the
    whole long call, while the other's clients came round again and again: p99 several times
    p50 at 16 clients."""
    return max(1, min(max_batch_size, math.ceil((queued + running) / workers)))


class Batcher:
    """Forms batches of up to `max_batch_size` images, waiting at most `max_delay` for more,
    and runs them on `workers` threads at once. A lone image, with no other call running,
    nothing queued and nothing `busy_elsewhere`, goes through `predict_alone` instead.

    `submit` is called on the event loop; the batching threads answer through
    `call_soon_threadsafe`. One lock guards the queue, the places held and the failure count.
    """

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_delay: float,
        max_queue: int,
        metrics: ModelMetrics,
        workers: int = 1,
        predict_alone: Predict | None = None,
        busy_elsewhere: Callable[[], bool] = lambda: False,
        nice: int = 0,
        tracing: Tracing | None = None,
        model: tuple[str, str] = ("", ""),
    ) -> None:
        self._predict = predict
        self._tracing = tracing
        self._model_attributes = {"vit.model.name": model[0], "vit.model.version": model[1]}
        self._predict_alone = predict_alone or predict
        self._busy_elsewhere = busy_elsewhere
        """Whether work outside the batcher (uploads being decoded) needs the cores too."""
        self._workers = workers
        self._nice = nice
        """Added to the batching threads' niceness, so that on saturated cores the event loop
        and the decoders run first and onnxruntime takes what is left; the threads are batch
        work too (`run_as_batch_work`)."""
        self._running = 0
        self._running_images = 0
        """Images in the calls running now."""
        self._max_batch_size = max_batch_size
        self._max_delay = max_delay
        self._max_queue = max_queue
        self._metrics = metrics
        self._queue: deque[_Job] = deque()
        self._held = 0
        self._changed = threading.Condition()
        self._stopping = False
        self._throughput = _Throughput()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.consecutive_failures = 0
        """onnxruntime calls that raised or returned non-finite numbers since the last good one."""

    def schedule(self, *, workers: int, max_batch_size: int) -> None:
        """Calls at once and images per call, as the model's load-time measurement chose;
        before `start`."""
        if self._threads:
            raise RuntimeError("the batcher is scheduled before it starts")
        self._workers, self._max_batch_size = workers, max_batch_size

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(target=self._run, name=f"inference_{i}", daemon=True)
            for i in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        """Stop after the calls in progress, if any, have returned."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    def is_full(self, incoming: int) -> bool:
        """Whether `incoming` more images would exceed the queue bound."""
        return self._held + incoming > self._max_queue

    def retry_after(self, images: int | None = None) -> int:
        """Seconds until the work for `images` (default: those held here) should be done, at
        the measured throughput (per call, times the calls running at once: under load every
        worker is busy)."""
        rate = self._throughput.images_per_second * self._workers
        held = self._held if images is None else images
        return max(1, math.ceil(held / rate)) if rate > 0 else 1

    async def submit(self, inputs: np.ndarray, deadline: float, *, counted: bool = True) -> Outputs:
        """The outputs' rows for `inputs`; 503 when the queue is full, 504 past the deadline.
        `counted`: a client's, measured in the metrics (see _Job)."""
        count = len(inputs)
        now = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        job = _Job(inputs, deadline, now, future, counted=counted)
        if self._tracing is not None and counted:
            current = otel_context.get_current()
            if trace.get_current_span(current).is_recording():  # a sampled request's
                job.trace, job.enqueued_ns = current, time.time_ns()
        with self._changed:
            if self._held + count > self._max_queue:
                raise Overloaded("the inference queue is full", retry_after=self.retry_after())
            self._hold(count)
            self._queue.append(job)
            self._changed.notify()
        # The deadline answers the future itself: awaited bare, the answer wakes the caller
        # in one scheduling round, where a timeout around a shield took three.
        expiry = asyncio.get_running_loop().call_later(max(0.0, deadline - now), self._expire, job)
        try:
            return await job.future
        except asyncio.CancelledError:
            self._withdraw(job)
            job.future.cancel()
            raise
        finally:
            expiry.cancel()

    def _expire(self, job: _Job) -> None:
        """On the event loop, at a job's deadline: 504 if it is still queued; if its inference
        runs, nothing (the answer is moments away)."""
        if self._withdraw(job) and not job.future.done():
            job.future.set_exception(
                DeadlineExceeded("the request's deadline passed while it was queued")
            )

    def _hold(self, count: int) -> None:
        self._held += count
        self._metrics.queue_depth.set(self._held)

    def _release(self, count: int) -> None:
        with self._changed:
            self._held -= count
            self._metrics.queue_depth.set(self._held)

    def _withdraw(self, job: _Job) -> bool:
        """Take a job back unless the batching thread already has it; True if taken back."""
        with self._changed:
            if job.started:
                return False
            if job in self._queue:
                self._queue.remove(job)
                self._release(len(job.inputs))
            return True

    def _run(self) -> None:
        run_as_batch_work(self._nice)
        while (collected := self._collect()) is not None:
            batch, alone = collected
            if not batch:
                continue
            try:
                lone = alone and not self._busy_elsewhere()
                self._infer(batch, self._predict_alone if lone else self._predict)
            finally:
                with self._changed:
                    self._running -= 1
                    self._running_images -= sum(len(job.inputs) for job in batch)

    def _collect(self) -> tuple[list[_Job], bool] | None:
        """Jobs for one call (whole requests, at most max_batch_size images unless one is
        larger) and whether it is a lone image with no other call running or queued; None
        once stopping."""
        with self._changed:
            while not self._queue and not self._stopping:
                self._changed.wait()
            if self._max_delay > 0:
                closes = time.monotonic() + self._max_delay
                while self._queued_images() < self._max_batch_size and not self._stopping:
                    remaining = closes - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
            if self._stopping:
                return None
            batch = self._take()
            if not batch:
                return batch, False
            alone = len(batch) == 1 and len(batch[0].inputs) == 1 and self._running == 0
            self._running += 1
            self._running_images += sum(len(job.inputs) for job in batch)
            return batch, alone and not self._queue

    def _take(self) -> list[_Job]:
        batch: list[_Job] = []
        images = 0
        limit = call_share(
            self._queued_images(), self._running_images, self._workers, self._max_batch_size
        )
        now = time.monotonic()
        while self._queue:
            job = self._queue[0]
            if job.deadline <= now:
                self._queue.popleft()
                self._release(len(job.inputs))
                expired = DeadlineExceeded("the request's deadline passed while it was queued")
                self._answer([(job, expired)])
                continue
            if batch and images + len(job.inputs) > limit:
                break
            self._queue.popleft()
            job.started = True
            batch.append(job)
            images += len(job.inputs)
        return batch

    def _queued_images(self) -> int:
        return sum(len(job.inputs) for job in self._queue)

    def _answer(self, outcomes: list[tuple[_Job, Outputs | Exception]]) -> None:
        """Settle jobs' futures on the event loop (one wake-up for a whole batch), skipping
        callers that have given up."""

        def settle() -> None:
            for job, outcome in outcomes:
                if job.future.done():
                    continue
                if isinstance(outcome, Exception):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _infer(self, batch: list[_Job], predict: Predict) -> None:
        inputs = np.concatenate([job.inputs for job in batch])
        started = time.monotonic()
        counted = any(job.counted for job in batch)
        for job in batch:
            if job.counted:
                self._metrics.stage_seconds.labels("queue_wait").observe(
                    started - job.enqueued, job.exemplar()
                )
        traced = self._tracing is not None and any(job.trace is not None for job in batch)
        calls: list[_Call] | None = [] if traced else None
        try:
            outputs = self._calls(predict, inputs, counted=counted, calls=calls)
        except Exception as error:
            logger.exception("inference failed on a batch of %d images", len(inputs))
            self._isolate(batch, predict, error)
            if calls is not None:
                self._trace(batch, calls, failed=type(error).__name__)
            return
        finally:
            self._release(len(inputs))
        elapsed = time.monotonic() - started
        with self._changed:
            self.consecutive_failures = 0
            self._throughput.observe(len(inputs), elapsed)
        if counted:
            exemplar = next((e for job in batch if (e := job.exemplar()) is not None), None)
            self._metrics.stage_seconds.labels("inference").observe(elapsed, exemplar)
        ends = np.cumsum([len(job.inputs) for job in batch])
        starts = ends - [len(job.inputs) for job in batch]
        rows = [{k: v[a:b] for k, v in outputs.items()} for a, b in zip(starts, ends, strict=True)]
        self._answer(list(zip(batch, rows, strict=True)))
        if calls is not None:  # after the answers: the spans hold up no request
            self._trace(batch, calls)

    def _isolate(self, batch: list[_Job], predict: Predict, error: Exception) -> None:
        """After a failed call: each request of a batch of several alone, so that only those
        that fail by themselves fail; then a known-good input (zeros: every channel at its
        mean), so that only a model failing on that counts towards readiness turning off."""
        outcomes: list[tuple[_Job, Outputs | Exception]] = []
        for job in batch:
            outcome: Outputs | Exception = error
            if len(batch) > 1:
                try:
                    outcome = self._calls(predict, job.inputs, counted=job.counted)
                except Exception as alone:
                    outcome = alone
            if isinstance(outcome, Exception):
                outcome = InferenceFailed(f"inference failed: {type(outcome).__name__}")
            outcomes.append((job, outcome))
        try:
            _checked(predict, np.zeros((1, *batch[0].inputs.shape[1:]), np.float32))
            known_good_works = True
        except Exception:
            known_good_works = False
        with self._changed:
            self.consecutive_failures = 0 if known_good_works else self.consecutive_failures + 1
        self._answer(outcomes)

    def _calls(
        self,
        predict: Predict,
        inputs: np.ndarray,
        *,
        counted: bool,
        calls: list[_Call] | None = None,
    ) -> Outputs:
        """`inputs` through onnxruntime in calls of at most max_batch_size images: a request
        larger than that is split, never run as one larger call. Each call is appended to
        `calls` where given (for its spans); a failed one too, with the time it failed."""
        step = self._max_batch_size
        chunks = []
        for start in range(0, len(inputs), step):
            chunk = inputs[start : start + step]
            began = time.time_ns() if calls is not None else 0
            try:
                chunks.append(_checked(predict, chunk))
            finally:
                if calls is not None:
                    calls.append(_Call(start, len(chunk), began, time.time_ns()))
            if counted:
                self._metrics.batch_size.observe(len(chunk))
        if len(chunks) == 1:
            return chunks[0]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def _trace(self, batch: list[_Job], calls: list[_Call], *, failed: str | None = None) -> None:
        """`_record_spans`, whose failure is logged, never the batching thread's end."""
        try:
            self._record_spans(batch, calls, failed=failed)
        except Exception:
            logger.exception("the spans of a batch could not be recorded")

    def _record_spans(
        self, batch: list[_Job], calls: list[_Call], *, failed: str | None = None
    ) -> None:
        """The batch's spans, after the fact: each onnxruntime call as a span of its own trace,
        linked to every traced request it served, and in each such request's trace its wait in
        the queue and a child for each call it rode in, linked back to the call. `failed`: the
        last call raised this (its requests are then tried one by one, untraced)."""
        assert self._tracing is not None
        tracing, attributes = self._tracing, self._model_attributes
        ends = np.cumsum([len(job.inputs) for job in batch])
        spans = [
            (job, int(end) - len(job.inputs), int(end))
            for job, end in zip(batch, ends, strict=True)
        ]
        for job, _, _ in spans:
            if job.trace is not None:
                tracing.record(
                    "queue_wait", job.trace, job.enqueued_ns, calls[0].started_ns, attributes
                )
        for index, call in enumerate(calls):
            error = failed if index == len(calls) - 1 else None
            riders = [
                job
                for job, first, end in spans
                if first < call.first + call.images and end > call.first
            ]
            traced = [job.trace for job in riders if job.trace is not None]
            batch_attributes = {
                **attributes,
                "vit.batch.size": call.images,
                "vit.batch.requests": len(riders),
            }
            run = tracing.record(
                "onnxruntime.run",
                None,
                call.started_ns,
                call.ended_ns,
                batch_attributes,
                links=[Link(trace.get_current_span(ctx).get_span_context()) for ctx in traced],
                error=error,
            )
            ran = run.get_span_context()
            for context in traced:
                tracing.record(
                    "inference",
                    context,
                    call.started_ns,
                    call.ended_ns,
                    {
                        **batch_attributes,
                        "vit.inference.trace_id": trace.format_trace_id(ran.trace_id),
                        "vit.inference.span_id": trace.format_span_id(ran.span_id),
                    },
                    links=[Link(ran)],
                    error=error,
                )


def _checked(predict: Predict, inputs: np.ndarray) -> Outputs:
    """`predict`, raising where the model returned NaN or infinite values in any output."""
    outputs = predict(inputs)
    if not all(np.isfinite(values).all() for values in outputs.values()):
        raise FloatingPointError("the model returned NaN or infinite values")
    return outputs
