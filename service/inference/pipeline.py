"""Upload bytes -> the model's outputs: decoding in the server's worker processes, inference
through the batcher."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import astuple, dataclass
from typing import Literal, NoReturn, TypeVar

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from model_contract.errors import ImageError
from model_contract.ood import in_distribution
from model_contract.outputs import OOD_SCORE, PROBABILITIES
from model_runtime.decoding.pool import Decoded, DecodeWorkers
from model_runtime.graph_check import check_output_kind, check_output_width
from model_runtime.session import ModelSession, Outputs, per_image
from service.errors import (
    DeadlineExceeded,
    ModelLoadFailed,
    NotReady,
    ServiceError,
    TooExpensiveToDecode,
    TooManyPixels,
    UndecodableImage,
    UnsupportedImageFormat,
    from_image_error,
)
from service.inference.batcher import Batcher
from service.inference.budget import Budget, Ticket
from service.inference.tensors import InputSpec, pixel_range
from service.metrics import Metrics
from service.observability.tracing import Tracing
from service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
FILE_ERRORS = (UnsupportedImageFormat, UndecodableImage, TooManyPixels)
"""What one uploaded file can be at fault for, as opposed to its request. Not a file that
overran its decoder's limits: that fails the whole request at once and stops its other files,
or one request of 64 bombs would hold the decoders for 64 time limits."""


@dataclass(frozen=True)
class SelfTestStatus:
    """Where the startup self-test stands: pending, passed, failed or none (no golden images
    in the file), and in words."""

    status: Literal["pending", "passed", "failed", "none"]
    detail: str


class SelfTestFailed(RuntimeError):
    """The golden images' probabilities came out other than the model file expects, or the
    file's self-test is broken."""


class WarmUpOverran(ModelLoadFailed):
    """The warm-up or self-test outlasted the time the model's load-time checks may take; its
    inference may still be running, so the pipeline is closed in the background."""


BROKEN_FILE = "the model file is broken (export or import it again to write its self-test afresh)"


@dataclass(frozen=True)
class Answer:
    """One upload's outputs (one row each) and what decoding found (the box the model saw)."""

    outputs: Outputs
    decoded: Decoded


class Pipeline:
    """The model behind the routes: never blocks the event loop, ready only after a warm-up."""

    def __init__(
        self,
        session: ModelSession,
        settings: Settings,
        metrics: Metrics,
        decoders: DecodeWorkers,
        tracing: Tracing | None = None,
    ) -> None:
        self.session = session
        self.tracing = tracing
        name, version = session.metadata.name, session.metadata.version
        self.span_attributes = {"vit.model.name": name, "vit.model.version": version}
        """What every span of this version's work says of it."""
        self.metrics = model_metrics = metrics.for_model(
            session.metadata.name, session.metadata.version
        )
        self.spec = spec = session.metadata.preprocessing
        self.input_spec = InputSpec(
            pixels_name=session.input_name,
            image_shape=(3, spec.input_size, spec.input_size),
            value_range=pixel_range(spec.mean, spec.std, spec.rescale_factor),
            max_batch=settings.max_images_per_request,
            outputs=session.output_names,
        )
        """What an infer request may send this version, and which outputs it may ask for."""
        self._warmed_up = False
        self.warm_up_error: str | None = None
        self.self_test = SelfTestStatus("pending", "runs after the warm-up")
        self._closed = False
        self._preparing = 0
        self._failures_until_unready = settings.unready_after_failures
        self._recovery_interval = settings.recovery_probe_interval_s
        self._recovery: asyncio.Task[None] | None = None
        self.decoders = decoders
        """The server's decoding workers, shared with every other version: started and closed
        with the server, never with this version."""
        self.batcher = Batcher(
            session.infer,
            max_batch_size=settings.runtime.max_batch_size,
            max_delay=settings.max_batch_delay_ms / 1000,
            max_queue=settings.max_queue,
            metrics=model_metrics,
            workers=session.inference_workers,
            predict_alone=session.infer_alone,
            busy_elsewhere=lambda: self._preparing > 0,
            nice=settings.inference_nice,
            tracing=tracing,
            model=(name, version),
        )
        self.budget = Budget(
            max_images=settings.max_queue,
            max_body_bytes=settings.max_body_bytes_in_flight,
            retry_after=self.batcher.retry_after,
        )

    def publish_metrics(self) -> None:
        """Make this pipeline the one its version's gauges and info describe: once it serves
        (a reload of the same version loads beside the one serving, which they describe until
        the swap)."""
        session, metrics = self.session, self.metrics
        metrics.images_in_flight.set_function(lambda: self.budget.images)
        metrics.body_bytes_in_flight.set_function(lambda: self.budget.body_bytes)
        metrics.ready.set_function(lambda: float(self.ready))
        status = self.self_test.status
        metrics.publish_self_test(status == "passed" if status in ("passed", "failed") else None)
        # Label values are identifiers: the runtime's `batch` phrase becomes two of them, and
        # the fallbacks' reasons stay on /v1/models with only their count here.
        metrics.model.info(
            {
                "sha256": session.sha256,
                **session.runtime,
                "batch": str(session.fixed_batch_size or "dynamic"),
                "images_per_call": (
                    "1" if session.one_image_per_call else str(session.images_per_call or "batch")
                ),
            }
        )
        metrics.fallbacks.set(len(session.fallbacks))

    def input_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.spec.input_size
        return batch_size, 3, size, size

    async def prepare(
        self,
        data: bytes,
        request: object | None = None,
        *,
        picture: bool = False,
        counted: bool = True,
    ) -> Decoded:
        """One upload as a (1, 3, S, S) model input, decoded in a worker process (with
        `picture`, also the upright image, bounded, for an overlay); the images of one
        `request` take their turns at the workers with other requests' images. `counted`: a
        client's upload, measured in the metrics (the self-test's golden images are not)."""
        started = time.perf_counter()
        traced = self.tracing is not None and counted and trace.get_current_span().is_recording()
        waited_ns = time.time_ns() if traced else 0
        try:
            decoded = await self.decoders.decode(
                data,
                self.spec,
                on_replaced=self._decoder_replaced,
                picture=picture,
                request=request,
            )
        except ImageError as error:
            refused = from_image_error(error)
            if traced:
                self._trace_decode(data, None, waited_ns, refused.type)
            raise refused from error
        if traced:
            self._trace_decode(data, decoded, waited_ns)
        if counted:
            self.metrics.stage_seconds.labels("decode_preprocess").observe(
                time.perf_counter() - started, self.metrics.exemplar()
            )
            self.metrics.observe_decoded(
                decoded.format, decoded.original_mode, decoded.exif_rotated
            )
        return decoded

    def _decoder_replaced(self, why: str) -> None:
        """A worker killed over one of this version's images: counted under its labels."""
        self.metrics.decode_workers_replaced.labels(why).inc()

    def _trace_decode(
        self, data: bytes, decoded: Decoded | None, waited_ns: int, error: str | None = None
    ) -> None:
        """An image's decode as a span of the current request: timed by its worker, from its
        first byte read to its tensor written (without the wait for a worker); a refused image
        from when it was handed over to when the refusal came back."""
        assert self.tracing is not None
        attributes: dict[str, str | int] = {**self.span_attributes, "vit.image.bytes": len(data)}
        if decoded is None:
            started_ns, ended_ns = waited_ns, time.time_ns()
        else:
            started_ns, ended_ns = decoded.decoded_ns
            width, height = decoded.upright_size
            attributes["vit.image.pixels"] = width * height
            attributes["vit.image.format"] = decoded.format
        parent = otel_context.get_current()
        self.tracing.record("decode", parent, started_ns, ended_ns, attributes, error=error)

    async def infer(self, batch: np.ndarray, deadline: float) -> Outputs:
        """The outputs (one row per image) for a preprocessed batch, batched with other
        requests."""
        self.require_ready()
        outputs = await self.batcher.submit(batch, deadline)
        if PROBABILITIES not in outputs:  # a model without classes
            return outputs
        probabilities = outputs[PROBABILITIES]
        top = probabilities.argmax(axis=1)
        ood = self.session.metadata.ood
        self.metrics.observe_predictions(
            [float(row[i]) for row, i in zip(probabilities, top, strict=True)],
            [self.session.labels[i] for i in top],
            int((~in_distribution(outputs[OOD_SCORE], ood.threshold)).sum()) if ood else 0,
        )
        return outputs

    async def classify(self, images: list[bytes], deadline: float) -> Outputs:
        """The outputs for uploads, one row per image in request order. The first image that
        fails, or the deadline, stops the others: unstarted ones never start."""
        decoded = await self._decoded(images, deadline, self.prepare)
        return await self.infer(np.concatenate([d.tensor for d in decoded]), deadline)

    async def classify_each(
        self, images: list[bytes], deadline: float, *, pictures: bool = False
    ) -> list[Answer | ServiceError]:
        """One outcome per upload, in request order: its outputs and what decoding found, or
        the error its file alone caused, so that nine good photos are answered when the tenth
        is corrupt. What is not one file's fault (the deadline, the model, the queue), and a
        file too expensive to decode, fail the request, and its files not yet decoded never
        are."""
        prepare = functools.partial(self._prepare_file, picture=pictures)
        decoded = await self._decoded(images, deadline, prepare)
        good = [d for d in decoded if isinstance(d, Decoded)]
        batch = np.concatenate([d.tensor for d in good]) if good else None
        rows = iter(per_image(await self.infer(batch, deadline)) if batch is not None else ())
        return [
            Answer(next(rows), outcome) if isinstance(outcome, Decoded) else outcome
            for outcome in decoded
        ]

    async def _decoded(
        self,
        images: list[bytes],
        deadline: float,
        prepare: Callable[[bytes, object], Awaitable[T]],
    ) -> list[T]:
        """`prepare` of every upload at once, within the deadline; whatever ends it early (an
        error, the deadline, the client's going) cancels the rest."""
        self.require_ready()
        self._preparing += len(images)
        request = object()  # what the decoding workers take turns by
        tasks: list[asyncio.Future[T]] = []
        try:
            async with asyncio.timeout_at(deadline):
                if len(images) == 1:  # nothing beside it to stop: in this task, a round sooner
                    return [await prepare(images[0], request)]
                tasks = [asyncio.ensure_future(prepare(data, request)) for data in images]
                return list(await asyncio.gather(*tasks))
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it was decoded") from None
        finally:
            for task in tasks:
                task.cancel()
            self._preparing -= len(images)

    async def _prepare_file(
        self, data: bytes, request: object, *, picture: bool
    ) -> Decoded | ServiceError:
        try:
            return await self.prepare(data, request, picture=picture)
        except FILE_ERRORS as error:
            return error

    def admit(self) -> Ticket:
        """A new inference request's ticket (one image place), or the 503 it would end in,
        before its body is even read: not ready, or every place taken. Under overload a refused
        request must cost next to nothing, or refusing starves the requests being served."""
        self.require_ready()
        return self.budget.admit()

    @property
    def ready(self) -> bool:
        """Warmed up, and onnxruntime has not failed `unready_after_failures` times in a row."""
        return self._warmed_up and not self.failing

    @property
    def failing(self) -> bool:
        return self.batcher.consecutive_failures >= self._failures_until_unready

    def require_ready(self) -> None:
        if self._closed:
            raise NotReady(
                "this model version was unloaded or replaced while the request arrived; "
                "send it again"
            )
        if self.self_test.status == "failed":
            raise NotReady(f"the model failed its self-test: {self.self_test.detail}")
        if self.warm_up_error is not None:
            raise NotReady(f"the model failed its warm-up: {self.warm_up_error}")
        if not self._warmed_up:
            raise NotReady("the model is still warming up")
        if self.failing:
            raise NotReady("inference keeps failing; waiting for it to recover")

    async def start(self) -> None:
        """Start batching, then real inferences (one per bound batch size) so no client pays
        for onnxruntime's setup; their output must have one column per label. A failure is
        kept (readiness reports it) and raised: the server stops rather than stay unready."""
        # Bounded as the file's first inferences were: a graph slower than that here is refused.
        bound = self.session.check_seconds
        if self.session.choosing:
            await self._choose_engine(time.monotonic() + 2 * bound)
            if self.session.one_image_per_call:
                self.batcher.schedule(workers=self.session.inference_workers, max_batch_size=1)
        self.batcher.start()
        deadline = time.monotonic() + bound
        try:
            for batch_size in self.session.warm_up_batch_sizes():
                zeros = np.zeros(self.input_shape(batch_size), np.float32)
                outputs = await self._load_time_inference(zeros, deadline)
                if PROBABILITIES in outputs:
                    width = outputs[PROBABILITIES].shape[1]
                    check_output_width(width, self.session.metadata, self.session.path)
                    check_output_kind(
                        outputs[PROBABILITIES], self.session.metadata, self.session.path
                    )
        except DeadlineExceeded:
            self.warm_up_error = f"the warm-up did not finish within {bound:.0f} s"
            raise WarmUpOverran(self.warm_up_error) from None
        except Exception as error:
            self.warm_up_error = str(error)
            raise
        try:
            await self._self_test(deadline)
        except DeadlineExceeded:
            why = f"the golden images were not answered within {bound:.0f} s"
            self.self_test = SelfTestStatus("failed", why)
            raise WarmUpOverran(f"self-test failed: {why}") from None
        self._warmed_up = True
        self._recovery = asyncio.create_task(self._recover_when_failing(), name="recovery")
        metadata = self.session.metadata
        logger.info(
            "%s version %s: warm-up done, self-test %s (%s): ready",
            metadata.name,
            metadata.version,
            *astuple(self.self_test),
        )

    async def _choose_engine(self, deadline: float) -> None:
        """Under VIT_ENGINE=auto, each engine timed and self-tested on the file's golden images
        (decoded as uploads are), the faster that passes kept, and one image per call where
        batching gains too little (ModelSession.choose_engine). Twice the load-time bound: each
        engine runs its warm-up; past it the model is refused (WarmUpOverran)."""
        test = self.session.metadata.self_test
        golden = (
            [(await self._golden(i, image)).tensor for i, image in enumerate(test.images)]
            if test is not None
            else []
        )
        expected = None if test is None else np.asarray(test.expected, dtype=np.float64)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.to_thread(self.session.choose_engine, golden, expected)
        except TimeoutError:
            self.warm_up_error = "timing the engines outlasted the load-time bound"
            raise WarmUpOverran(self.warm_up_error) from None

    async def _load_time_inference(self, batch: np.ndarray, deadline: float) -> Outputs:
        """The outputs for a warm-up or self-test batch, given up at `deadline` even while its
        call runs (a client's request waits for a call that started): a graph slower than the
        load-time bound may never return."""
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self.batcher.submit(batch, deadline, counted=False)
        except TimeoutError:
            raise DeadlineExceeded("the load-time inference outlasted its bound") from None

    async def _self_test(self, deadline: float) -> None:
        """The model file's golden images through the whole serving path (decoding workers,
        preprocessing, batching, the session with its provider, precision and IO binding);
        any probability further from the file's expectation than its tolerance fails it:
        the version never becomes ready (SelfTestFailed), and says why. So does a self-test
        the file holds broken (an image that does not decode, an expectation that is not a
        number), naming the image."""
        test = self.session.metadata.self_test
        if test is None:
            self.self_test = SelfTestStatus("none", "the model file carries no self-test images")
            return
        expected = np.asarray(test.expected, dtype=np.float64)
        output = self.session.primary_output
        field = "probabilities" if output == PROBABILITIES else "embeddings"
        for index, row in enumerate(expected):
            if not np.isfinite(row).all():
                self._self_test_failed(
                    f"golden image self_test.images[{index}]: its expectation "
                    f"self_test.{field}[{index}] holds {row[~np.isfinite(row)][0]}, not a "
                    f"number: {BROKEN_FILE}"
                )
        # One image at a time, as separate requests come: within any queue bound.
        decoded = [await self._golden(index, image) for index, image in enumerate(test.images)]
        rows = [(await self._load_time_inference(d.tensor, deadline))[output] for d in decoded]
        # Finite both: the batcher refuses a NaN the model gives, and the file's are checked.
        differences = np.abs(np.concatenate(rows) - expected).max(axis=1)
        image = int(differences.argmax())
        worst = float(differences[image])
        runtime = self.session.runtime
        where = f"{runtime['provider']}, {runtime['precision']}, io_binding {runtime['io_binding']}"
        if worst > test.tolerance:
            self._self_test_failed(
                f"golden image self_test.images[{image}] (of {len(test.images)}): a value "
                f"of its {output} differs by {worst:.2e} from the file's expectation, over its "
                f"tolerance {test.tolerance:.1e} ({where}); the provider, precision or onnxruntime "
                "version computes other numbers than the model was exported with, or the file's "
                "weights or expectations were changed since"
            )
        self.self_test = SelfTestStatus(
            "passed",
            f"{len(test.images)} golden images within {test.tolerance:.1e} "
            f"(largest difference {worst:.1e}; {where})",
        )

    async def _golden(self, index: int, image: str) -> Decoded:
        """Golden image `index`, decoded as an upload is."""
        try:
            return await self.prepare(base64.b64decode(image, validate=True), counted=False)
        except binascii.Error as error:
            reason = f"not base64: {error}"
        except (*FILE_ERRORS, TooExpensiveToDecode) as error:  # over this server's bounds too
            reason = error.message
        self._self_test_failed(
            f"golden image self_test.images[{index}] does not decode ({reason}): {BROKEN_FILE}"
        )

    def _self_test_failed(self, detail: str) -> NoReturn:
        self.self_test = SelfTestStatus("failed", detail)
        raise SelfTestFailed(f"self-test failed: {detail}")

    async def _recover_when_failing(self) -> None:
        """While not ready because inference kept failing, try one probe inference now and
        then; the first that works makes the service ready again."""
        while True:
            await asyncio.sleep(self._recovery_interval)
            if not self.failing:
                continue
            probe = np.zeros(self.input_shape(1), np.float32)
            try:
                await self.batcher.submit(
                    probe, time.monotonic() + self.session.check_seconds, counted=False
                )
            except ServiceError:
                continue
            logger.info("inference works again: ready")

    async def close(self, *, keep_metrics: bool = False) -> None:
        """Stop batching; once (a retired version may be closed as the server stops). The
        decoding workers serve on: they are the server's. `keep_metrics` where another
        pipeline of the same name and version (a reload of its file) writes the same series."""
        if self._closed:
            return
        self._closed = True
        self._warmed_up = False
        if self._recovery is not None:
            self._recovery.cancel()
        await self.batcher.stop()
        if not keep_metrics:
            self.metrics.remove()
