"""Decoding in worker processes: the same tensors as in-process, errors kept, every overrun a
422 with the worker replaced, and abandoned work stopped."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import attacks
from model_contract.errors import TooExpensiveToDecode, TooManyPixels, UnsupportedImageFormat
from model_contract.preprocess import PreprocessSpec, preprocess_upload
from model_runtime import platform
from model_runtime.decoding.pool import Decoded, DecodeWorkers
from model_runtime.decoding.shared_file import MAPPED_TENSOR_SIDE, MAPPED_UPLOAD_BYTES
from model_runtime.decoding.worker import IDLE_BEFORE_TRIM_S
from tests.images import asymmetric, encode, upload_variety

SPEC = PreprocessSpec()
UPLOADS = upload_variety()


class Pool:
    """A pool (started unless told otherwise) and the worker replacements it reported."""

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        memory_bytes: int = 256 * 1024 * 1024,
        start: bool = True,
    ) -> None:
        self.replaced: list[str] = []
        self.workers = DecodeWorkers(
            workers=workers, max_pixels=40_000_000, memory_bytes=memory_bytes, timeout_s=timeout_s
        )
        if start:
            self.workers.start()

    async def decode(
        self, data: bytes, spec: PreprocessSpec = SPEC, request: object | None = None
    ) -> Decoded:
        return await self.workers.decode(
            data, spec, on_replaced=self.replaced.append, request=request
        )


@pytest.fixture
def pool() -> Iterator[Pool]:
    started = Pool(workers=2, timeout_s=1.0)
    yield started
    started.workers.close()


def test_tensors_and_findings_are_those_of_decoding_in_process(pool: Pool) -> None:
    async def decode_all() -> None:
        for name in ("jpeg-640x480", "png-rgba", "gif-palette", "tiff-cmyk", "bmp-grey"):
            data = UPLOADS[name][0]
            decoded = await pool.decode(data)
            expected, found = preprocess_upload(data, SPEC)
            np.testing.assert_array_equal(decoded.tensor, expected)
            assert (decoded.format, decoded.original_mode, decoded.exif_rotated) == (
                found.format,
                found.original_mode,
                found.exif_rotated,
            )

    asyncio.run(decode_all())
    assert pool.replaced == []


def test_concurrent_decodes_each_get_their_own_tensor(pool: Pool) -> None:
    """More images at once than workers: each waits its turn and none gets another's tensor."""
    names = ["jpeg", "jpeg-640x480", "png-rgba", "gif-palette", "webp", "bmp-grey", "tiff-cmyk"]
    uploads = [UPLOADS[name][0] for name in names * 3]

    async def decode_all() -> list[np.ndarray]:
        decoded = await asyncio.gather(*(pool.decode(data) for data in uploads))
        return [d.tensor for d in decoded]

    for data, tensor in zip(uploads, asyncio.run(decode_all()), strict=True):
        np.testing.assert_array_equal(tensor, preprocess_upload(data, SPEC)[0])


MODELS = [
    SPEC,
    PreprocessSpec(input_size=32),
    PreprocessSpec(input_size=224, resize="squash", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    PreprocessSpec(input_size=64, alpha_background=(255, 255, 255), interpolation="bilinear"),
]
"""The preprocessing of four models that share the workers."""


def test_each_image_is_preprocessed_as_its_own_model_asks(pool: Pool) -> None:
    """The workers serve every model: images of four models at once, interleaved, each come
    back at their model's size and as their model preprocesses them, whatever model each
    worker decoded for before."""
    names = ["jpeg", "png-rgba", "gif-palette", "webp", "tiff-cmyk"]
    jobs = [(UPLOADS[name][0], spec) for name in names for spec in MODELS] * 2

    async def decode_all() -> list[Decoded]:
        return await asyncio.gather(*(pool.decode(data, spec) for data, spec in jobs))

    for (data, spec), decoded in zip(jobs, asyncio.run(decode_all()), strict=True):
        assert decoded.tensor.shape == (1, 3, spec.input_size, spec.input_size)
        np.testing.assert_array_equal(decoded.tensor, preprocess_upload(data, spec)[0])
    assert pool.replaced == []


def test_a_tensor_larger_than_the_shared_mapping_comes_back_the_same() -> None:
    """A model whose input is over MAPPED_TENSOR_SIDE gets its tensors through the file past
    the mapping, before and after other models' images, large uploads included."""
    large_input = PreprocessSpec(input_size=MAPPED_TENSOR_SIDE + 32)
    noise = np.random.default_rng(3).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    large_upload = encode(Image.fromarray(noise), "PNG")
    assert len(large_upload) > MAPPED_UPLOAD_BYTES
    small = UPLOADS["jpeg"][0]
    jobs = [
        (small, large_input),
        (small, SPEC),
        (large_upload, large_input),
        (large_upload, SPEC),
        (small, large_input),
    ]
    single = Pool(workers=1, timeout_s=30.0)

    async def decode_all() -> list[np.ndarray]:
        return [(await single.decode(data, spec)).tensor for data, spec in jobs]

    try:
        tensors = asyncio.run(decode_all())
    finally:
        single.workers.close()
    for (data, spec), tensor in zip(jobs, tensors, strict=True):
        np.testing.assert_array_equal(tensor, preprocess_upload(data, spec)[0])
    assert single.replaced == []


def test_a_replacement_is_told_to_the_model_whose_image_caused_it(pool: Pool) -> None:
    """With workers shared, the model of the image that overran is the one told (its
    metric), not the model whose image the replaced worker decoded before or after."""
    overran: list[str] = []
    other: list[str] = []

    async def bomb_beside_ordinary() -> tuple[Decoded | BaseException, ...]:
        await pool.workers.decode(UPLOADS["jpeg"][0], MODELS[1], on_replaced=other.append)
        return await asyncio.gather(
            pool.workers.decode(attacks.tiled_tiff(), MODELS[2], on_replaced=overran.append),
            pool.workers.decode(UPLOADS["png-rgba"][0], MODELS[1], on_replaced=other.append),
            return_exceptions=True,
        )

    bombed, ordinary = asyncio.run(bomb_beside_ordinary())
    assert isinstance(bombed, TooExpensiveToDecode)
    assert isinstance(ordinary, Decoded)
    assert (overran, other, pool.replaced) == (["memory"], [], [])


def test_an_upload_larger_than_the_shared_mapping_decodes_the_same(pool: Pool) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    large = encode(Image.fromarray(noise), "PNG")
    assert len(large) > MAPPED_UPLOAD_BYTES

    async def large_then_small() -> None:
        for data in (large, UPLOADS["jpeg"][0], large):
            decoded = await pool.decode(data)
            np.testing.assert_array_equal(decoded.tensor, preprocess_upload(data, SPEC)[0])

    asyncio.run(large_then_small())
    assert pool.replaced == []


def test_a_large_upload_decodes_when_it_is_a_new_workers_first() -> None:
    """A worker that sized the shared file as it started cut off an upload already written
    past the mapping: the first large photo after a start or a replacement was 'truncated'."""
    noise = np.random.default_rng(1).integers(0, 256, (2500, 2600, 3), dtype=np.uint8)
    large = encode(Image.fromarray(noise), "PNG", compress_level=0)  # ~19 MB
    for _ in range(2):
        fresh = Pool(workers=1, timeout_s=30.0)
        try:
            decoded = asyncio.run(fresh.decode(large))  # before the worker has started
        finally:
            fresh.workers.close()
        np.testing.assert_array_equal(decoded.tensor, preprocess_upload(large, SPEC)[0])


def decodes_within(data: bytes, memory_bytes: int, before: list[bytes]) -> list[bool]:
    """Whether `data` decodes, in one worker with this allowance, first and after each of
    `before`."""
    single = Pool(workers=1, timeout_s=30.0, memory_bytes=memory_bytes)

    async def answers() -> list[bool]:
        seen = []
        for earlier in [b"", *before]:
            if earlier:
                await single.decode(earlier)
            try:
                await single.decode(data)
                seen.append(True)
            except TooExpensiveToDecode:
                seen.append(False)
        return seen

    try:
        return asyncio.run(answers())
    finally:
        single.workers.close()


def test_an_image_near_the_memory_allowance_gets_the_same_answer_whatever_came_before() -> None:
    """What earlier images left in a worker (freed heap, a decoder library loaded by the first
    image of its format) must not come out of a later image's allowance: a 40-megapixel strip
    admitted by a fresh worker was refused by one that had decoded some other formats."""
    edge = encode(Image.new("L", (40_000_000, 1), 90), "PNG")
    low, high = 16, 512  # MiB: the smallest allowance a fresh worker decodes it in, found
    while high - low > 4:
        middle = (low + high) // 2
        low, high = (low, middle) if decodes_within(edge, middle << 20, [])[0] else (middle, high)
    others = [data for data, _ in UPLOADS.values()]
    others.append(encode(Image.effect_noise((3000, 2500), 64).convert("RGB"), "PNG"))
    assert all(decodes_within(edge, (high + 4) << 20, others)), high


def test_decoding_errors_come_back_as_they_were_raised(pool: Pool) -> None:
    async def decode(data: bytes) -> None:
        await pool.decode(data)

    with pytest.raises(UnsupportedImageFormat):
        asyncio.run(decode(b"%PDF-1.4 not an image"))
    with pytest.raises(TooManyPixels):
        asyncio.run(decode(attacks.sixteen_bit_png(width=9000, height=5000)))
    assert pool.replaced == []


@pytest.mark.parametrize(
    ("attack", "limit"),
    [
        (attacks.tiled_tiff, "memory"),
        (attacks.sixteen_bit_png, "memory"),
        (attacks.rle_bmp, "time"),
        (attacks.repeated_scan_jpeg, "time"),
    ],
)
def test_an_overrun_is_too_expensive_and_its_worker_is_replaced(
    pool: Pool, attack: attacks.Attack, limit: str
) -> None:
    ordinary = UPLOADS["jpeg"][0]

    async def attack_then_ordinary() -> None:
        started = time.monotonic()
        with pytest.raises(TooExpensiveToDecode):
            await pool.decode(attack())
        assert time.monotonic() - started < 10
        decoded = await pool.decode(ordinary)
        assert decoded.tensor.shape == (1, 3, SPEC.input_size, SPEC.input_size)

    asyncio.run(attack_then_ordinary())
    assert pool.replaced == [limit]


def test_an_abandoned_decode_is_stopped_and_queued_ones_never_start() -> None:
    single = Pool(workers=1, timeout_s=60.0)
    slow = attacks.rle_bmp()

    async def abandon() -> None:
        tasks = [asyncio.ensure_future(single.decode(slow)) for _ in range(5)]
        await asyncio.sleep(0.3)  # the first is being decoded, the others wait for the worker
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        started = time.monotonic()
        await single.decode(UPLOADS["jpeg"][0])
        assert time.monotonic() - started < 5  # not behind four decodes of a minute each

    try:
        asyncio.run(abandon())
        assert single.replaced == ["abandoned"]  # only the running one had to be killed
    finally:
        single.workers.close()


def test_a_request_of_many_images_delays_another_requests_image_by_one_not_all() -> None:
    single = Pool(workers=1, timeout_s=60.0)
    slow = encode(Image.effect_noise((3000, 2500), 64).convert("RGB"), "PNG")  # ~0.1 s each
    finished: list[str] = []

    async def decode(data: bytes, request: object, name: str) -> None:
        await single.decode(data, request=request)
        finished.append(name)

    async def two_requests() -> None:
        many, one = object(), object()
        tasks = [asyncio.ensure_future(decode(slow, many, f"many {i}")) for i in range(6)]
        await asyncio.sleep(0.02)  # the first of the six is being decoded
        tasks.append(asyncio.ensure_future(decode(UPLOADS["jpeg"][0], one, "one")))
        await asyncio.gather(*tasks)

    try:
        asyncio.run(two_requests())
    finally:
        single.workers.close()
    # first come first served would answer it last; in turns, ahead of most of the six
    assert len(finished) - 1 - finished.index("one") >= 3, finished
    assert [name for name in finished if name != "one"] == [f"many {i}" for i in range(6)]


@pytest.mark.skipif(sys.platform != "linux", reason="SCHED_BATCH is Linux's")
def test_workers_run_as_batch_work_that_never_preempts_the_event_loop() -> None:
    started = Pool(workers=1, timeout_s=5.0)
    try:
        asyncio.run(started.decode(UPLOADS["jpeg"][0]))  # the worker has begun serving
        (pid,) = started.workers.pids()
        assert os.sched_getscheduler(pid) == os.SCHED_BATCH
    finally:
        started.workers.close()


def minor_page_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


@pytest.mark.skipif(sys.platform != "linux", reason="page fault counts are Linux's /proc")
def test_a_worker_keeps_a_large_images_memory_for_the_next() -> None:
    """A 1080p photo's decoded buffer (8 MB, ~2,000 pages) is reused, not mapped afresh and
    faulted in page by page for every image (which doubled its decoding time)."""
    started = Pool(workers=1, timeout_s=10.0)
    photo = encode(asymmetric((1920, 1080)), "JPEG", quality=90)
    try:

        async def decode(times: int) -> None:
            for _ in range(times):
                await started.decode(photo)

        asyncio.run(decode(3))
        (pid,) = started.workers.pids()
        before = minor_page_faults(pid)
        asyncio.run(decode(5))
        assert (minor_page_faults(pid) - before) / 5 < 500
    finally:
        started.workers.close()


def resident_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(sys.platform != "linux", reason="resident sizes are Linux's /proc")
def test_an_idle_worker_gives_back_the_memory_it_kept() -> None:
    """Kept for the next image while busy; given back once idle (IDLE_BEFORE_TRIM_S)."""
    started = Pool(workers=1, timeout_s=10.0)
    photo = encode(asymmetric((2500, 2500)), "JPEG", quality=90)  # 25 MB decoded, in the heap
    try:
        asyncio.run(started.decode(photo))
        (pid,) = started.workers.pids()
        kept = resident_bytes(pid)
        deadline = time.monotonic() + IDLE_BEFORE_TRIM_S + 5
        while resident_bytes(pid) > kept - 16 * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert resident_bytes(pid) <= kept - 16 * 1024 * 1024
    finally:
        started.workers.close()


def test_without_memfd_and_eventfd_workers_share_an_unlinked_file_and_wait_on_a_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """macOS has neither: the same tensors come back, small uploads through the mapping and
    large ones past it, and the file is unlinked from the start (nothing left behind)."""
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.delattr(os, "eventfd", raising=False)
    noise = np.random.default_rng(2).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    large = encode(Image.fromarray(noise), "PNG")
    assert len(large) > MAPPED_UPLOAD_BYTES
    uploads = [UPLOADS["jpeg"][0], large, UPLOADS["png-rgba"][0], large]
    single = Pool(workers=1, timeout_s=30.0)
    try:

        async def decode_all() -> list[np.ndarray]:
            return [(await single.decode(data)).tensor for data in uploads]

        for data, tensor in zip(uploads, asyncio.run(decode_all()), strict=True):
            np.testing.assert_array_equal(tensor, preprocess_upload(data, SPEC)[0])
        (pid,) = single.workers.pids()
        if Path(f"/proc/{pid}/fd").exists():
            held = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            assert any("vit-decode-" in link and link.endswith("(deleted)") for link in held)
            assert any(link.startswith("pipe:") for link in held)
            assert not any("memfd:" in link or "eventfd" in link for link in held), held
    finally:
        single.workers.close()
    assert single.replaced == []


@pytest.mark.skipif(sys.platform != "linux", reason="the comparison needs RLIMIT_AS enforced")
def test_where_the_kernel_ignores_the_memory_limit_workers_decode_without_it_and_say_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """macOS accepts RLIMIT_AS and ignores it: its workers are not given it, an image over
    the allowance decodes there as it does in-process, and the server says so in one line,
    however many model versions start workers."""
    large = encode(Image.new("RGB", (4000, 3000), (200, 40, 90)), "PNG")  # 48 MB decoded
    allowance = 32 * 1024 * 1024
    caplog.set_level(logging.WARNING)
    assert decodes_within(large, allowance, []) == [False]  # Linux holds it to the allowance
    assert not caplog.records
    with monkeypatch.context() as simulated:
        simulated.setattr(sys, "platform", "darwin")
        simulated.setattr(platform, "_said", set())
        pools = [
            Pool(workers=1, timeout_s=30.0, memory_bytes=allowance, start=False) for _ in range(2)
        ]
    pools[0].workers.start()
    try:
        decoded = asyncio.run(pools[0].decode(large))
    finally:
        for pool in pools:
            pool.workers.close()
    np.testing.assert_array_equal(decoded.tensor, preprocess_upload(large, SPEC)[0])
    assert pools[0].replaced == []
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("decoding workers run without a memory limit on darwin")
