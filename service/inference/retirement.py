"""Versions taken out of service: each finishes what was admitted to it, then closes and gives
its memory back."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

from model_runtime.heap import give_back_free_memory
from service.inference.pipeline import Pipeline

RETIRE_POLL_S = 0.05


class Retirement:
    def __init__(self, request_timeout_s: float, labels_in_use: Callable[[Pipeline], bool]) -> None:
        self._request_timeout_s = request_timeout_s
        self._labels_in_use = labels_in_use
        """Whether another serving pipeline shares a pipeline's metric series."""
        self._retiring: dict[asyncio.Task[None], Pipeline] = {}

    def retire(self, pipeline: Pipeline) -> asyncio.Task[None]:
        """Close `pipeline` once the requests admitted to it are answered (or the longest a
        request may take has passed), in the background: the task that does."""
        task = asyncio.create_task(self._finish_then_close(pipeline))
        self._retiring[task] = pipeline
        task.add_done_callback(self._retired)
        return task

    async def close(self, pipeline: Pipeline) -> None:
        """Close `pipeline` now (its load failed before it served anything)."""
        await pipeline.close(keep_metrics=self._labels_in_use(pipeline))

    async def close_all(self) -> None:
        """The server is stopping: close every retiring pipeline now, whatever is left."""
        for task, pipeline in list(self._retiring.items()):
            task.cancel()
            await pipeline.close()

    def _retired(self, task: asyncio.Task[None]) -> None:
        """A closed pipeline's objects refer to one another (its tasks, callbacks and
        batcher), so only a full garbage collection frees them and the sessions they hold,
        and an idle server may never run one: it runs here, once the pipeline is let go; then
        what the sessions' memory freed goes back to the system."""
        self._retiring.pop(task, None)
        gc.collect()
        give_back_free_memory()

    async def _finish_then_close(self, pipeline: Pipeline) -> None:
        deadline = time.monotonic() + self._request_timeout_s + 5
        while pipeline.budget.images and time.monotonic() < deadline:
            await asyncio.sleep(RETIRE_POLL_S)
        await self.close(pipeline)
