"""Batcher: batches form, callers get their rows, the queue pushes back, deadlines hold."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import numpy as np
import pytest

from model_contract.outputs import PROBABILITIES
from model_runtime.session import Outputs
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded
from service.inference.batcher import Batcher, call_share
from service.metrics import Metrics


class GatedModel:
    """A model whose calls wait for a gate, recording every batch it was given."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[np.ndarray] = []
        self.started: list[int] = []  # batch sizes, as each call begins
        self.fail = False

    def predict(self, batch: np.ndarray) -> Outputs:
        self.started.append(len(batch))
        self.entered.set()
        self.gate.wait(timeout=10)
        self.calls.append(batch.copy())
        if self.fail:
            raise RuntimeError("onnxruntime said no")
        return sums(batch)


def sums(batch: np.ndarray) -> Outputs:
    """Each image's pixel sum in three columns, and as a second output its negation."""
    total = batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)
    return {PROBABILITIES: total * np.ones((1, 3)), "negated": -total}


async def submitted(batcher: Batcher, inputs: np.ndarray, deadline: float) -> np.ndarray:
    """The first output's rows for `inputs`, the second's checked to be the same rows'."""
    outputs = await batcher.submit(inputs, deadline)
    np.testing.assert_array_equal(outputs["negated"], -outputs[PROBABILITIES][:, :1])
    return outputs[PROBABILITIES]


def rows(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(-1, 1)


def far() -> float:
    return time.monotonic() + 30


def make(model: GatedModel, **overrides: float) -> Batcher:
    """One worker unless asked: most tests are about what one call at a time does."""
    options = {"max_batch_size": 4, "max_delay": 0.0, "max_queue": 100, **overrides}
    return Batcher(model.predict, metrics=Metrics().for_model("m", "1"), **options)  # type: ignore[arg-type]


async def wait_for_calls(model: GatedModel, count: int) -> None:
    while len(model.started) < count:
        await asyncio.sleep(0.001)


async def wait_until_inference_runs(model: GatedModel) -> None:
    while not model.entered.is_set():
        await asyncio.sleep(0.001)


async def finish_and_check_99_never_ran(
    model: GatedModel, batcher: Batcher, blocker: asyncio.Task[np.ndarray]
) -> None:
    """Open the gate, let the blocking call finish, prove the batcher still works and that the
    request carrying 99 never reached the model, then stop."""
    model.gate.set()
    await blocker
    assert (await submitted(batcher, rows(3), far()))[0, 0] == 3
    assert all(99 not in call for call in model.calls)
    await batcher.stop()


def test_concurrent_requests_share_a_call_and_get_their_own_rows() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model)
        batcher.start()
        first = asyncio.create_task(submitted(batcher, rows(1), far()))
        await wait_until_inference_runs(model)  # the first call waits on the gate, alone
        others = [
            asyncio.create_task(submitted(batcher, rows(v, v + 0.5), far())) for v in (10, 20)
        ]
        await asyncio.sleep(0.02)
        model.gate.set()
        assert (await first)[:, 0].tolist() == [1]
        assert [(await task)[:, 0].tolist() for task in others] == [[10, 10.5], [20, 20.5]]
        assert [len(call) for call in model.calls] == [1, 4]
        await batcher.stop()

    asyncio.run(scenario())


def test_full_queue_refuses_at_once_with_retry_after() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model, max_queue=3)
        batcher.start()
        held = [asyncio.create_task(submitted(batcher, rows(v), far())) for v in (1, 2, 3)]
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded) as refused:
            await submitted(batcher, rows(4), far())
        assert refused.value.retry_after >= 1
        model.gate.set()
        await asyncio.gather(*held)
        assert (await submitted(batcher, rows(5), far()))[0, 0] == 5  # places were released
        await batcher.stop()

    asyncio.run(scenario())


def test_a_place_is_held_until_inference_returns() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model, max_queue=1)
        batcher.start()
        running = asyncio.create_task(submitted(batcher, rows(1), far()))
        await wait_until_inference_runs(model)  # dequeued and in inference, not returned
        with pytest.raises(Overloaded):
            await submitted(batcher, rows(2), far())
        model.gate.set()
        await running
        await batcher.stop()

    asyncio.run(scenario())


def test_expired_requests_get_504_and_never_reach_the_model() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model)
        batcher.start()
        blocker = asyncio.create_task(submitted(batcher, rows(1), far()))
        await wait_until_inference_runs(model)
        with pytest.raises(DeadlineExceeded):
            await submitted(batcher, rows(99), time.monotonic() + 0.05)
        await finish_and_check_99_never_ran(model, batcher, blocker)

    asyncio.run(scenario())


def test_inference_failure_reaches_every_caller_and_the_next_call_works() -> None:
    async def scenario() -> None:
        model = GatedModel()
        model.fail = True
        batcher = make(model)
        batcher.start()
        model.gate.set()
        with pytest.raises(InferenceFailed):
            await submitted(batcher, rows(1), far())
        model.fail = False
        assert (await submitted(batcher, rows(2), far()))[0, 0] == 2
        await batcher.stop()

    asyncio.run(scenario())


def test_delay_waits_for_more_requests() -> None:
    async def scenario() -> None:
        model = GatedModel()
        model.gate.set()
        batcher = make(model, max_delay=0.2)
        batcher.start()
        first = asyncio.create_task(submitted(batcher, rows(1), far()))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(submitted(batcher, rows(2), far()))
        await asyncio.gather(first, second)
        assert [len(call) for call in model.calls] == [2]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_caller_that_gives_up_frees_its_place_and_never_reaches_the_model() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model, max_queue=2)
        batcher.start()
        blocker = asyncio.create_task(submitted(batcher, rows(1), far()))
        await wait_until_inference_runs(model)
        abandoned = asyncio.create_task(submitted(batcher, rows(99), far()))
        await asyncio.sleep(0.02)
        assert batcher.is_full(1)
        abandoned.cancel()  # what a client disconnect does to its request's task
        await asyncio.gather(abandoned, return_exceptions=True)
        assert not batcher.is_full(1)
        await finish_and_check_99_never_ran(model, batcher, blocker)

    asyncio.run(scenario())


def test_a_deadline_passing_during_its_own_inference_still_gets_the_answer() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model)
        batcher.start()
        running = asyncio.create_task(submitted(batcher, rows(7), time.monotonic() + 0.05))
        await wait_until_inference_runs(model)
        await asyncio.sleep(0.1)  # past its deadline, inside its inference
        model.gate.set()
        assert (await running)[0, 0] == 7
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_waits_for_the_call_in_progress() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model)
        batcher.start()
        running = asyncio.create_task(submitted(batcher, rows(5), far()))
        await wait_until_inference_runs(model)
        asyncio.get_running_loop().call_later(0.05, model.gate.set)
        await batcher.stop()
        assert (await running)[0, 0] == 5

    asyncio.run(scenario())


def test_workers_run_batches_at_once_and_each_caller_gets_its_rows() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model, max_batch_size=2, workers=2)
        batcher.start()
        first = asyncio.create_task(submitted(batcher, rows(1, 2), far()))
        await wait_for_calls(model, 1)
        second = asyncio.create_task(submitted(batcher, rows(3, 4), far()))
        await wait_for_calls(model, 2)  # began while the first is still held by the gate
        third = asyncio.create_task(submitted(batcher, rows(5), far()))
        await asyncio.sleep(0.02)
        assert batcher.is_full(98)  # five images held: two calls running, one queued
        model.gate.set()
        results = [(await task)[:, 0].tolist() for task in (first, second, third)]
        assert results == [[1, 2], [3, 4], [5]]
        await batcher.stop()

    asyncio.run(scenario())


def test_with_every_worker_busy_a_request_waits_and_can_expire() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = make(model, max_batch_size=1, workers=2)
        batcher.start()
        busy = [asyncio.create_task(submitted(batcher, rows(v), far())) for v in (1, 2)]
        await wait_for_calls(model, 2)  # both workers inside predict, held by the gate
        with pytest.raises(DeadlineExceeded):
            await submitted(batcher, rows(99), time.monotonic() + 0.05)
        model.gate.set()
        assert sorted([(await task)[0, 0] for task in busy]) == [1, 2]
        assert all(99 not in call for call in model.calls)
        await batcher.stop()

    asyncio.run(scenario())


class Recorder:
    """A predict function that records the batch sizes it was given."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> Outputs:
        self.sizes.append(len(batch))
        return sums(batch)


def test_a_lone_image_goes_through_predict_alone_and_anything_else_does_not() -> None:
    async def scenario() -> None:
        model, alone = GatedModel(), Recorder()
        model.gate.set()
        busy = {"elsewhere": False}
        batcher = Batcher(
            model.predict,
            max_batch_size=4,
            max_delay=0.0,
            max_queue=100,
            metrics=Metrics().for_model("m", "1"),
            predict_alone=alone,
            busy_elsewhere=lambda: busy["elsewhere"],
        )
        batcher.start()
        assert (await submitted(batcher, rows(1), far()))[0, 0] == 1
        assert alone.sizes == [1] and model.started == []
        assert (await submitted(batcher, rows(2, 3), far()))[:, 0].tolist() == [2, 3]
        assert model.started == [2]
        busy["elsewhere"] = True  # an upload being decoded wants the cores too
        assert (await submitted(batcher, rows(4), far()))[0, 0] == 4
        assert alone.sizes == [1] and model.started == [2, 1]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_lone_image_next_to_a_running_call_goes_through_predict() -> None:
    async def scenario() -> None:
        model, alone = GatedModel(), Recorder()
        batcher = Batcher(
            model.predict,
            max_batch_size=2,
            max_delay=0.0,
            max_queue=100,
            metrics=Metrics().for_model("m", "1"),
            workers=2,
            predict_alone=alone,
        )
        batcher.start()
        model.gate.clear()
        first = asyncio.create_task(submitted(batcher, rows(1, 2), far()))  # held in predict
        await wait_for_calls(model, 1)
        second = asyncio.create_task(submitted(batcher, rows(3), far()))
        await wait_for_calls(model, 2)
        model.gate.set()
        await asyncio.gather(first, second)
        assert alone.sizes == [] and model.started == [2, 1]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_request_larger_than_the_batch_limit_runs_as_several_calls() -> None:
    async def scenario() -> None:
        model = Recorder()
        batcher = Batcher(
            model,
            max_batch_size=2,
            max_delay=0.0,
            max_queue=100,
            metrics=Metrics().for_model("m", "1"),
        )
        batcher.start()
        result = await submitted(batcher, rows(1, 2, 3, 4, 5), far())
        assert model.sizes == [2, 2, 1]
        assert result[:, 0].tolist() == [1, 2, 3, 4, 5]  # each row its own answer, in order
        await batcher.stop()

    asyncio.run(scenario())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_inference_threads_run_as_batch_work_at_the_added_niceness() -> None:
    async def scenario() -> None:
        seen: list[tuple[int, int]] = []

        def predict(batch: np.ndarray) -> Outputs:
            # 0: the calling thread
            seen.append((os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)))
            return sums(batch)

        batcher = Batcher(
            predict,
            max_batch_size=1,
            max_delay=0.0,
            max_queue=10,
            metrics=Metrics().for_model("m", "1"),
            nice=3,
        )
        batcher.start()
        await submitted(batcher, rows(1), far())
        await batcher.stop()
        # this thread is untouched
        assert seen == [(os.getpriority(os.PRIO_PROCESS, 0) + 3, os.SCHED_BATCH)]
        assert os.sched_getscheduler(0) == os.SCHED_OTHER

    asyncio.run(scenario())


class PoisonableModel(GatedModel):
    """Returns NaN for a whole call when any of its inputs is 1e30 (one client's poison)."""

    def predict(self, batch: np.ndarray) -> Outputs:
        outputs = super().predict(batch)
        poisoned = (batch == 1e30).any()
        return {name: values * np.nan if poisoned else values for name, values in outputs.items()}


def test_a_batch_with_nan_output_is_split_so_only_the_culprit_fails() -> None:
    async def scenario() -> None:
        model = PoisonableModel()
        batcher = make(model)
        batcher.start()
        first = asyncio.create_task(submitted(batcher, rows(1), far()))
        await wait_until_inference_runs(model)
        culprit = asyncio.create_task(submitted(batcher, rows(1e30), far()))
        others = [asyncio.create_task(submitted(batcher, rows(v), far())) for v in (10, 20)]
        await asyncio.sleep(0.02)
        model.gate.set()
        assert (await first)[0, 0] == 1
        with pytest.raises(InferenceFailed):
            await culprit
        assert [(await task)[0, 0] for task in others] == [10, 20]
        # The batch of three, then each alone, then the known-good probe.
        assert [len(call) for call in model.calls] == [1, 3, 1, 1, 1, 1]
        assert batcher.consecutive_failures == 0  # the model works: the input was at fault
        for _ in range(5):
            with pytest.raises(InferenceFailed):
                await submitted(batcher, rows(1e30), far())
        assert batcher.consecutive_failures == 0
        await batcher.stop()

    asyncio.run(scenario())


def test_failures_count_towards_readiness_only_when_known_good_input_fails_too() -> None:
    async def scenario() -> None:
        model = GatedModel()
        model.gate.set()
        model.fail = True
        batcher = make(model)
        batcher.start()
        for expected in (1, 2):
            with pytest.raises(InferenceFailed):
                await submitted(batcher, rows(1), far())
            assert batcher.consecutive_failures == expected
        model.fail = False
        assert (await submitted(batcher, rows(4), far()))[0, 0] == 4
        assert batcher.consecutive_failures == 0
        await batcher.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("queued", "running", "workers", "share"),
    [
        (14, 2, 2, 8),  # the other call runs 2: this one takes 8 of 14, not all of them
        (6, 8, 2, 7),  # and when that returns, the next takes an even share too
        (64, 0, 2, 16),  # a deep queue fills calls to the limit
        (1, 0, 2, 1),  # a lone image
        (9, 0, 1, 9),  # one call at a time takes all it may
        (40, 0, 1, 16),
    ],
)
def test_calls_at_once_take_even_shares_of_the_images_in_flight(
    queued: int, running: int, workers: int, share: int
) -> None:
    assert call_share(queued, running, workers, max_batch_size=16) == share
