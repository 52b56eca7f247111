"""Upload bytes -> probabilities: decoding in a thread pool, inference in its own thread."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.errors import InferenceFailed, NotReady
from service.preprocess import preprocess
from service.session import ModelSession
from service.settings import Settings

logger = logging.getLogger(__name__)


class Pipeline:
    """The model behind the routes: never blocks the event loop, ready only after a warm-up."""

    def __init__(self, session: ModelSession, settings: Settings) -> None:
        self.session = session
        self.spec = session.metadata.preprocessing
        self.max_pixels = settings.max_pixels
        self.ready = False
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        # One inference thread: onnxruntime parallelises inside a call with its own threads.
        self._inference_pool = ThreadPoolExecutor(1, thread_name_prefix="inference")

    def input_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.spec.input_size
        return batch_size, 3, size, size

    async def prepare(self, data: bytes) -> np.ndarray:
        """One upload as a (1, 3, S, S) model input, decoded off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._decode_pool, lambda: preprocess(data, self.spec, max_pixels=self.max_pixels)
        )

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) for a preprocessed batch."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._inference_pool, self.session.predict, batch)
        except Exception as error:
            logger.exception("inference failed on a batch of shape %s", batch.shape)
            raise InferenceFailed(f"inference failed: {type(error).__name__}") from error

    async def classify(self, images: list[bytes]) -> np.ndarray:
        """Probabilities for uploads, one row per image in request order."""
        self.require_ready()
        tensors = await asyncio.gather(*(self.prepare(data) for data in images))
        return await self.infer(np.concatenate(tensors))

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady("the model is still warming up")

    async def warm_up(self) -> None:
        """One real inference, so the first client does not pay for onnxruntime's lazy setup."""
        await self.infer(np.zeros(self.input_shape(1), dtype=np.float32))
        self.ready = True
        logger.info("warm-up done: ready")

    def close(self) -> None:
        self.ready = False
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._inference_pool.shutdown(wait=True)
